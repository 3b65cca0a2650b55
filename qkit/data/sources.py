"""Calibration sets and held-out evaluation texts, from a named text: one of the built-in domains
(prose, chat, code: :mod:`qkit.data.corpora`) or the path of a user's file (:mod:`qkit.data.files`).

A document goes to the held-out split when the hash of its id is 0 mod 10, so the two splits never share
a document and do not depend on how many documents a source holds. Both splits are ordered by that hash,
which mixes the sources without any random state.

This module imports only the standard library at import time: `documents()` feeds tokenizer training,
which should not pay for torch or datasets.
"""
from __future__ import annotations

import functools
import hashlib
import platform
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from qkit.core.errors import QkitError
from qkit.data import corpora, files

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

CALIBRATION_SOURCES = ("prose", "chat", "code", "random")
EVAL_DOMAINS = ("prose", "chat", "code")
# "mixed" is accepted on top of the contract's CALIBRATION_SOURCES: equal parts of the three domains.
CALIBRATION_NAMES = CALIBRATION_SOURCES + ("mixed",)
SPLITS = ("calibration", "heldout")

_HELDOUT_MOD = 10
# Texts are tokenized in batches that start small and double, so a quick run tokenizes a few
# documents and a full-size one does not pay per-call overhead thousands of times.
_FIRST_BATCH_CHARS = 1 << 14
_MAX_BATCH_CHARS = 1 << 20


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")


def _load(domain: str) -> tuple[tuple[str, Any], ...]:
    return _load_builtin(domain) if domain in corpora.LOADERS else files.load(domain)[1]


@functools.cache
def _load_builtin(domain: str) -> tuple[tuple[str, Any], ...]:
    return tuple(corpora.LOADERS[domain]())


def _split(domain: str, split: str) -> tuple[tuple[str, Any], ...]:
    """(id, payload) pairs of one split, ordered by id hash; payload is text, or messages for chat."""
    heldout = split == "heldout"
    docs = [d for d in _load(domain) if (_id_hash(d[0]) % _HELDOUT_MOD == 0) == heldout]
    if heldout and not docs and domain not in EVAL_DOMAINS:
        # A user's file with too few documents for the rule (a single .txt) is an eval text as a whole;
        # check_disjoint refuses to also calibrate on it.
        docs = list(_load(domain))
    return tuple(sorted(docs, key=lambda d: _id_hash(d[0])))


def check_disjoint(calib: str, text: str) -> None:
    """Raise when a user's file is both the calibration set and the eval text but holds too few documents
    to split: the evaluation would see the documents the method was calibrated on."""
    if calib != text or text in EVAL_DOMAINS:
        return
    docs = _load(text)
    if not any(_id_hash(i) % _HELDOUT_MOD == 0 for i, _ in docs):
        raise QkitError(f"{text} holds {len(docs)} document(s), too few to split into calibration and "
                        "held-out documents, and is both the calibration set and the eval text",
                        "give it more documents (one per JSONL line, table row or .txt file), or evaluate on "
                        "another text")

def _plain_chat(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _render(payload: str | list[dict[str, str]]) -> str:
    return _plain_chat(payload) if isinstance(payload, list) else payload


def check_text(domain: str) -> None:
    """Raise on an eval text that is neither a built-in domain nor a readable user file."""
    if domain not in EVAL_DOMAINS:
        files.check(domain, EVAL_DOMAINS, "eval text")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise QkitError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")


def documents(domain: str, split: str = "calibration") -> list[str]:
    """The documents of one domain and split as plain text (chats as "user: ...\\nassistant: ...")."""
    check_text(domain)
    _check_split(split)
    return [_render(payload) for _, payload in _split(domain, split)]


# ---------------------------------------------------------------- tokenizing


def _texts(docs: Iterable[tuple[str, Any]], tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    """Documents as the model should see them: chats (lists of messages) through the tokenizer's chat
    template when it has one. A generator, so only documents that get tokenized get rendered."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    for _, payload in docs:
        if templated and isinstance(payload, list):
            yield tokenizer.apply_chat_template(payload, tokenize=False)
        else:
            yield _render(payload)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise QkitError("the tokenizer has no EOS token to separate packed documents",
                        "set tokenizer.eos_token, or use the model's own tokenizer")
    return tokenizer.eos_token_id


def _token_stream(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, need: int | None) -> list[int]:
    """Token ids of the texts, each followed by EOS; stops once `need` ids are collected."""
    eos = _eos_id(tokenizer)
    out: list[int] = []
    batch: list[str] = []
    size = 0
    limit = _FIRST_BATCH_CHARS

    def flush() -> None:
        # verbose=False: documents are longer than the model's context on purpose (they get packed).
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            out.extend(ids)
            out.append(eos)
        batch.clear()

    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= limit:
            flush()
            size, limit = 0, min(2 * limit, _MAX_BATCH_CHARS)
            if need is not None and len(out) >= need:
                return out
    if batch:
        flush()
    return out


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise QkitError(f"{name} must be a positive integer, got {value!r}", f"pass {name}=1 or more")


def check_seq_len(seq_len: int, max_len: int) -> None:
    """Raise when calibration windows of seq_len tokens would not fit the model's context."""
    _check_positive("seq_len", seq_len)
    if seq_len > max_len:
        raise QkitError(f"seq_len {seq_len} is longer than the model's maximum length of {max_len} tokens",
                        f"use seq_len <= {max_len}")


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    # all_special_ids covers only the named roles (bos, eos, ...); chat markers and other added special
    # tokens are found in added_tokens_decoder.
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}


def _random_rows(n_samples: int, seq_len: int, seed: int, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    import torch

    special = _special_ids(tokenizer)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (n_samples, seq_len), generator=gen)].tolist()


def _packed_rows(domain: str, n_samples: int, seq_len: int, seed: int,
                 tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    docs = list(_split(domain, "calibration"))
    random.Random(seed).shuffle(docs)
    need = n_samples * seq_len
    ids = _token_stream(_texts(docs, tokenizer), tokenizer, need)
    if len(ids) < need:
        fits = len(ids) // seq_len
        raise QkitError(
            f"the {domain} calibration split holds {len(ids):,} tokens with this tokenizer, fewer than "
            f"n_samples x seq_len = {n_samples} x {seq_len} = {need:,}",
            f"ask for at most {fits} samples of {seq_len} tokens" if fits else f"use seq_len <= {len(ids)}")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n_samples)]


def check_calibration(name: str, n_samples: int, seq_len: int, seed: int = 0) -> None:
    """Raise on a calibration request that cannot be built, before any model or text is loaded."""
    if name not in CALIBRATION_NAMES:
        files.check(name, CALIBRATION_NAMES, "calibration set")
    _check_positive("n_samples", n_samples)
    _check_positive("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise QkitError(f"seed must be an integer, got {seed!r}", "pass seed=0 or another integer")


@dataclass(frozen=True)
class CalibSpec:
    """Which calibration set a method sees: `calibration_set(name, n_samples, seq_len, seed)`."""
    name: str = "prose"
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        check_calibration(self.name, self.n_samples, self.seq_len, self.seed)

    def key(self) -> dict:
        """The fields, and a user file's content hash: an edited file is another calibration set."""
        return {**asdict(self), **({"sha256": fingerprint(self.name)} if self.name not in CALIBRATION_NAMES else {})}


def calibration_rows(name: str, n_samples: int, seq_len: int, seed: int = 0, *,
                     tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, list[int]]]:
    """The rows of `calibration_set`, each with the domain it came from ("random" for random tokens)."""
    check_calibration(name, n_samples, seq_len, seed)
    if name == "random":
        return [("random", row) for row in _random_rows(n_samples, seq_len, seed, tokenizer)]
    if name != "mixed":
        return [(name, row) for row in _packed_rows(name, n_samples, seq_len, seed, tokenizer)]
    rows: list[tuple[str, list[int]]] = []
    for i, domain in enumerate(EVAL_DOMAINS):
        count = n_samples // 3 + (i < n_samples % 3)
        if count:
            rows += [(domain, row) for row in _packed_rows(domain, count, seq_len, seed, tokenizer)]
    random.Random(seed).shuffle(rows)
    return rows


def calibration_set(name: str, n_samples: int, seq_len: int, seed: int = 0, *,
                    tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Exactly n_samples rows of exactly seq_len tokens (`input_ids`, `attention_mask`).

    Text sources pack the calibration split, shuffled by `seed`, into windows (documents joined with
    EOS, no padding). `random` draws token ids uniformly from the non-special vocabulary; `mixed` is equal
    parts prose, chat and code.
    """
    rows = [row for _, row in calibration_rows(name, n_samples, seq_len, seed, tokenizer=tokenizer)]

    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]})


def eval_tokens(domain: str, tokenizer: PreTrainedTokenizerBase, n_tokens: int | None = None) -> torch.Tensor:
    """The held-out split as one 1-D LongTensor: documents in their fixed order, each followed by EOS,
    cut to n_tokens."""
    check_text(domain)
    what = (f"the {domain} held-out split" if domain in EVAL_DOMAINS else
            f"the held-out split of {domain} (its documents whose id hashes to 0 mod {_HELDOUT_MOD}: "
            f"{len(_split(domain, 'heldout'))} of {len(_load(domain))})")
    return text_tokens(_texts(_split(domain, "heldout"), tokenizer), tokenizer, n_tokens, what)


def heldout_tokens(domain: str, tokenizer: PreTrainedTokenizerBase, at_most: int) -> list[int]:
    """Up to ``at_most`` tokens of a domain's held-out split: all it holds when that is fewer."""
    check_text(domain)
    return _token_stream(_texts(_split(domain, "heldout"), tokenizer), tokenizer, at_most)[:at_most]


def text_tokens(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, n_tokens: int | None = None,
                what: str = "the text") -> torch.Tensor:
    """Texts as one 1-D LongTensor, each followed by EOS, cut to n_tokens."""
    if n_tokens is not None:
        _check_positive("n_tokens", n_tokens)
    ids = _token_stream(texts, tokenizer, n_tokens)
    if n_tokens is not None:
        if len(ids) < n_tokens:
            raise QkitError(f"{what} holds {len(ids):,} tokens with this tokenizer, "
                            f"fewer than the {n_tokens:,} asked for", f"ask for at most {len(ids):,} tokens")
        ids = ids[:n_tokens]

    import torch

    return torch.tensor(ids, dtype=torch.long)


def fingerprint(name: str) -> str | None:
    """A user file's sha256 (None for a built-in set, which its package versions pin)."""
    return None if name in CALIBRATION_NAMES else files.load(name)[0].sha256


def describe(name: str) -> dict:
    """Provenance of a calibration set or domain: sources, licenses, document counts per split (and for a
    user's file its path, size and sha256)."""
    split_rule = f"held-out when sha256(document id)[:8] % {_HELDOUT_MOD} == 0"
    if name not in CALIBRATION_NAMES:
        files.check(name, CALIBRATION_NAMES, "data name")
        return {**files.describe(name), "documents": {s: len(_split(name, s)) for s in SPLITS}, "split": split_rule}
    if name == "random":
        return {"name": name, "sources": [], "licenses": [], "documents": {s: 0 for s in SPLITS},
                "method": "token ids drawn uniformly from the tokenizer's non-special vocabulary, "
                          "torch.Generator seeded with the calibration seed"}
    domains = EVAL_DOMAINS if name == "mixed" else (name,)
    sources = [asdict(s) | {"domain": d} for d in domains for s in corpora.sources_of(d)]
    out = {
        "name": name,
        "sources": sources,
        "licenses": sorted({s["license"] for s in sources}),
        "documents": {s: sum(len(_split(d, s)) for d in domains) for s in SPLITS},
        "split": split_rule,
    }
    if "chat" in domains:
        out["chat_rendering"] = "the tokenizer's chat template when it has one, else 'user: ...\\nassistant: ...'"
    if "code" in domains:
        out["python"] = platform.python_version()
    return out
