"""The user's own data files: every format reads into documents, splits are disjoint by the built-in
rule, the content is part of every cache key, and bad files fail with a one-line error and a fix."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from qkit import data
from qkit.core.errors import QkitError
from qkit.data import files, sources
from qkit.evaluation import EvalSpec

WORDS = "the quick brown fox jumps over the lazy dog while a patient owl reads old letters".split()


def _doc(i: int) -> str:
    return f"Document {i}. " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(120))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([_doc(i) for i in range(20)],
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="</s>")
    t.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    return t


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("user_data")
    (d / "my.jsonl").write_text("".join(json.dumps({"text": _doc(i), "id": i}) + "\n" for i in range(60)))
    (d / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": _doc(i)}]}) + "\n"
        for i in range(40)))
    pd.DataFrame({"body": [_doc(i) for i in range(40)]}).to_csv(d / "t.csv", index=False)
    pd.DataFrame({"body": [_doc(i) for i in range(40)]}).to_parquet(d / "t.parquet")
    (d / "txts").mkdir()
    for i in range(30):
        (d / "txts" / f"{i:02d}.txt").write_text(_doc(i))
    from datasets import Dataset

    Dataset.from_dict({"text": [_doc(i) for i in range(40)]}).save_to_disk(str(d / "saved"))
    return d


@pytest.mark.parametrize("name", ["my.jsonl", "chat.jsonl", "t.csv:body", "t.parquet:body", "txts", "saved"])
def test_every_format_reads_and_splits_like_the_builtin_sets(folder: Path, tok, name: str) -> None:
    path = str(folder / name)
    calib, held = sources._split(path, "calibration"), sources._split(path, "heldout")
    ids_c, ids_h = {i for i, _ in calib}, {i for i, _ in held}
    assert ids_c and ids_h and not ids_c & ids_h
    assert all(sources._id_hash(i) % 10 == 0 for i in ids_h)  # the built-in sets' rule
    assert all(sources._id_hash(i) % 10 != 0 for i in ids_c)
    rows = data.calibration_rows(path, 3, 32, 0, tokenizer=tok)
    assert [len(r) for _, r in rows] == [32] * 3
    assert data.eval_tokens(path, tok, 40).shape == (40,)
    info = data.describe(path)
    assert info["sha256"] == data.fingerprint(path) and info["size_bytes"] > 0
    assert info["documents"] == {"calibration": len(calib), "heldout": len(held)}


def test_chats_go_through_the_chat_template(folder: Path, tok) -> None:
    text = next(sources._texts(sources._split(str(folder / "chat.jsonl"), "calibration"), tok))
    assert text.startswith("<user>question") and "<assistant>Document" in text


def test_the_content_is_part_of_the_cache_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(30)))
    spec, ev = data.CalibSpec(str(path), 2, 16), EvalSpec(domain=str(path), n_tokens=64, ctx=32)
    before = spec.key(), ev.key()
    path.write_text("".join(json.dumps({"text": _doc(i + 1)}) + "\n" for i in range(30)))
    assert spec.key() != before[0] and ev.key() != before[1]
    assert data.CalibSpec("prose").key() == {"name": "prose", "n_samples": 32, "seq_len": 512, "seed": 0}


@pytest.mark.parametrize("content, expected", [
    ('{"text": "a"}\n{oops\n', "line 2 is not JSON"),
    ('{"body": "a", "id": 1}\n', "line 1 has no 'text' or 'messages' field (it has: body, id)"),
    ('{"messages": "hi"}\n', "line 1's messages are not a list of {role, content}"),
    ('{"text": 3}\n', "line 1's text is a int, not a string"),
    ("\n\n", "holds no text"),
])
def test_malformed_jsonl_names_the_line_and_the_fix(tmp_path: Path, tok, content: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(QkitError, match="Fix:") as e:
        data.calibration_rows(str(path), 1, 8, 0, tokenizer=tok)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_bad_names_and_columns_fail_before_any_model(folder: Path, tok) -> None:
    with pytest.raises(QkitError, match="no built-in set and no such file.*prose, chat"):
        data.CalibSpec(str(folder / "missing.jsonl"))
    with pytest.raises(QkitError, match="unknown eval text"):
        EvalSpec(domain="nowhere.txt")
    with pytest.raises(QkitError, match=r"has no column 'text' \(it has: body\)"):
        data.calibration_rows(str(folder / "t.csv"), 1, 8, 0, tokenizer=tok)
    with pytest.raises(QkitError, match="is not a table"):
        data.CalibSpec(str(folder / "txts") + ":body")
    (folder / "odd.xml").write_text("<a/>")
    with pytest.raises(QkitError, match="unknown data format .xml"):
        data.calibration_rows(str(folder / "odd.xml"), 1, 8, 0, tokenizer=tok)


def test_too_few_tokens_says_how_many_the_file_holds(folder: Path, tok) -> None:
    with pytest.raises(QkitError, match=r"my.jsonl calibration split holds [\d,]+ tokens.*at most \d+ samples"):
        data.calibration_rows(str(folder / "my.jsonl"), 1000, 64, 0, tokenizer=tok)
    with pytest.raises(QkitError, match=r"held-out split of .*my.jsonl.*\d+ of 60\).*holds [\d,]+ tokens"):
        data.eval_tokens(str(folder / "my.jsonl"), tok, 10**6)


def test_a_column_after_a_colon_only_splits_a_real_path(tmp_path: Path) -> None:
    assert files.split_column("a/b.csv:body") == (Path("a/b.csv"), "body")
    assert files.split_column("a/b.jsonl") == (Path("a/b.jsonl"), None)
    odd = tmp_path / "x:y"  # a file whose name holds a colon is that file
    odd.write_text("t")
    assert files.split_column(str(odd)) == (odd, None)


def test_a_single_text_file_is_an_eval_text_as_a_whole_but_not_also_its_calibration(tmp_path: Path, tok) -> None:
    path = tmp_path / "one.txt"
    path.write_text(_doc(1) * 3)
    assert sources._id_hash("one.txt") % 10 != 0  # the rule alone would give it an empty held-out split
    assert data.eval_tokens(str(path), tok, 64).shape == (64,)
    data.check_disjoint("prose", str(path))
    with pytest.raises(QkitError, match="holds 1 document.*too few to split.*Fix: give it more documents"):
        data.check_disjoint(str(path), str(path))
