"""Text the user brings, as a calibration set or an evaluation text: read into the same (id, payload)
documents as the built-in corpora, so that splitting, packing and tokenizing take one path.

A data name that is not a built-in one is a path:
- ``.jsonl``: one JSON object per line with a ``text`` field, or a ``messages`` field (a chat: a list of
  ``{"role", "content"}``, rendered with the tokenizer's chat template as the built-in chat set is);
- ``.txt``: one document per file, or a directory of them;
- ``.parquet`` and ``.csv``, with the text column named after a colon (``my.csv:body``; default ``text``);
- a directory written by `datasets`' ``save_to_disk`` (``DIR:column`` likewise).

A document's id is its line, row or file, so the held-out split (sha256 of the id, as for the built-in
sets) is fixed by the file and never shares a document with the calibration split.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkit.core.errors import QkitError

FORMATS = ".jsonl, .txt (or a folder of .txt), .parquet, .csv, or a datasets save_to_disk folder"
TABLE_SUFFIXES = (".parquet", ".csv")
DEFAULT_COLUMN = "text"


@dataclass(frozen=True)
class UserFile:
    """A user's data file: where it is, which column holds the text, and what it holds."""
    path: Path
    column: str | None
    kind: str  # "text" or "chat"
    sha256: str
    size_bytes: int


def split_column(name: str) -> tuple[Path, str | None]:
    """``PATH:column`` into the path and the column (None when the name has no column)."""
    head, sep, tail = name.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(name).exists():
        return Path(head).expanduser(), tail
    return Path(name).expanduser(), None


def check(name: str, builtin: tuple[str, ...], what: str) -> Path:
    """The path a data name points at, or a one-line error naming what is wrong: cheap, before a model loads."""
    path, column = split_column(name)
    if not path.exists():
        raise QkitError(f"unknown {what} {name!r}: no built-in set and no such file",
                        f"use one of {', '.join(builtin)}, or a path to {FORMATS}")
    if column is not None and not (path.suffix in TABLE_SUFFIXES or _is_datasets_dir(path)):
        raise QkitError(f"{name!r}: a column is named but {path.name} is not a table",
                        f"name a column only for {', '.join(TABLE_SUFFIXES)} files or a datasets folder")
    return path


def _is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json"))


def _digest(path: Path) -> tuple[str, int]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h, size = hashlib.sha256(), 0
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                h.update(block)
                size += len(block)
    return h.hexdigest(), size


def _jsonl(path: Path) -> list[tuple[str, Any]]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise QkitError(f"{path}: line {n} is not JSON ({e.msg})",
                                "write one JSON object per line, e.g. {\"text\": \"...\"}") from None
            if not isinstance(rec, dict) or not ({"text", "messages"} & rec.keys()):
                fields = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
                raise QkitError(f"{path}: line {n} has no 'text' or 'messages' field (it has: {fields})",
                                "give each line a text field, or a chat's messages [{role, content}, ...]")
            payload = rec["messages"] if "messages" in rec else rec["text"]
            if "messages" in rec and not (isinstance(payload, list) and all(
                    isinstance(m, dict) and {"role", "content"} <= m.keys() for m in payload)):
                raise QkitError(f"{path}: line {n}'s messages are not a list of {{role, content}}",
                                "write messages as [{\"role\": \"user\", \"content\": \"...\"}, ...]")
            if "messages" not in rec and not isinstance(payload, str):
                raise QkitError(f"{path}: line {n}'s text is a {type(payload).__name__}, not a string",
                                "write the text field as a JSON string")
            docs.append((f"line {n}", payload))
    return docs


def _column(rows: Any, columns: list[str], column: str | None, name: Path) -> list[tuple[str, Any]]:
    col = column or DEFAULT_COLUMN
    if col not in columns:
        raise QkitError(f"{name} has no column {col!r} (it has: {', '.join(map(str, columns))})",
                        f"name the text column after a colon: {name}:COLUMN")
    return [(f"row {i}", "" if v is None else str(v)) for i, v in enumerate(rows(col))]


def _datasets_dir(path: Path, column: str | None) -> list[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    return _column(lambda c: ds[c], list(ds.column_names), column, path)


def _txt(path: Path) -> list[tuple[str, Any]]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise QkitError(f"{path} holds no .txt files and is not a datasets folder",
                        f"point at {FORMATS}")
    return [(f.relative_to(path).as_posix() if path.is_dir() else f.name, f.read_text(encoding="utf-8"))
            for f in files]


def _read(path: Path, column: str | None) -> list[tuple[str, Any]]:
    if path.is_dir():
        if _is_datasets_dir(path):
            return _datasets_dir(path, column)
        return _txt(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix == ".txt":
        return _txt(path)
    if suffix in TABLE_SUFFIXES:
        import pandas as pd

        try:
            df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        except Exception as e:  # pyarrow and the csv parser raise many kinds
            raise QkitError(f"{path} could not be read as {suffix[1:]}: {str(e).splitlines()[0]}",
                            f"check that the file is valid {suffix[1:]}") from None
        return _column(lambda c: df[c].tolist(), list(df.columns), column, path)
    raise QkitError(f"{path}: unknown data format {path.suffix or '(no suffix)'}", f"use {FORMATS}")


@functools.cache
def _load(path: Path, column: str | None, mtime: int) -> tuple[UserFile, tuple[tuple[str, Any], ...]]:
    try:
        docs = [(i, p) for i, p in _read(path, column) if (p.strip() if isinstance(p, str) else p)]
    except (OSError, UnicodeDecodeError) as e:
        raise QkitError(f"{path} could not be read: {e}", "check the path and that the file is UTF-8 text") from None
    if not docs:
        raise QkitError(f"{path} holds no text", "give it at least one non-empty document")
    kinds = {"chat" if isinstance(p, list) else "text" for _, p in docs}
    if len(kinds) > 1:
        raise QkitError(f"{path} mixes chats (messages) and plain text", "keep one kind per file")
    sha, size = _digest(path)
    return UserFile(path, column, kinds.pop(), sha, size), tuple(docs)


def load(name: str) -> tuple[UserFile, tuple[tuple[str, Any], ...]]:
    """The file a data name points at and its (id, payload) documents: text, or messages for a chat.
    Read once per process while the file is unchanged."""
    path, column = split_column(name)
    path = path.resolve()
    return _load(path, column, path.stat().st_mtime_ns)


def describe(name: str) -> dict:
    """Provenance of a user's file: path, column, size, sha256 and kind."""
    info, docs = load(name)
    return {"name": name, "path": str(info.path), "column": info.column, "kind": info.kind,
            "size_bytes": info.size_bytes, "sha256": info.sha256}
