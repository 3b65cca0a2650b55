"""A deployment's request log, read incrementally from a byte offset.

**The log** is JSONL, one served request per line (vLLM's request log or an OpenAI-compatible proxy's,
mapped to these fields; `qkit/datafiles/drift_log_sample.jsonl` is a sample):

- ``prompt`` (string, required): the text the model was given, chat template already applied.
- ``completion`` (string, optional): what the deployment answered. Without it, the quantized model named
  to the monitor generates one (greedy, ``DriftConfig.max_new_tokens``).
- ``completion_ids`` (list of token ids, optional): the completion as the server's tokens. Text alone is
  re-tokenized, which need not give the tokens the model chose (a run of "\n" tokens comes back as
  "\n\n" tokens), so servers that can log the ids should; replay does.
- ``timestamp`` (optional): seconds since the epoch, or an ISO 8601 string; needed for time windows.
- ``tag`` (string, optional): task type, tenant or route, for the per-tag breakdown ("untagged" if absent).
- ``check`` with ``answer``, or with ``test`` and ``entry_point`` (optional): a checkable request.
  ``check`` names the scorer of qkit's task suite that decides correctness: ``arithmetic`` and
  ``passkey`` (the first number of the answer equals ``answer``), ``gsm8k`` (the final number equals
  ``answer``), ``humaneval`` (prompt + completion pass the record's Python ``test``, with its
  ``entry_point``, run in qkit's sandbox).
Other fields are kept out of the way (replay writes ``served_by``, the ground truth of a demo).

Bad lines are reported with their line numbers and skipped, with a count; a log with no usable line is
an error. A request longer than the model's context keeps its last tokens: the prompt is cut from the
left, with a warning and ``truncated`` in its result, because the completion is what is measured.
"""
from __future__ import annotations

import datetime
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkit.core.errors import QkitError
from qkit.data.corpora import DATAFILES

SAMPLE_LOG = DATAFILES / "drift_log_sample.jsonl"


SAMPLE_PROMPTS = DATAFILES / "drift_prompts.jsonl"


UNTAGGED = "untagged"


# The checks a record can name, and the fields each needs besides the completion (scored by
# qkit.evaluation.served.SCORERS).
CHECKS: dict[str, tuple[str, ...]] = {"arithmetic": ("answer",), "gsm8k": ("answer",), "passkey": ("answer",),
                                    "humaneval": ("test", "entry_point")}


@dataclass(frozen=True)
class Request:
    line: int
    prompt: str
    completion: str | None = None
    timestamp: float | None = None
    tag: str = UNTAGGED
    check: str | None = None
    fields: dict = field(default_factory=dict)  # what the check needs: answer, or test and entry_point
    completion_ids: tuple[int, ...] | None = None


@dataclass
class LogChunk:
    requests: list[Request]
    malformed: list[tuple[int, str]]  # (line number, why)
    end_offset: int  # bytes consumed: a last line without newline that does not parse is left for later
    n_lines: int
    ends: dict[int, int]  # a request's line number → the byte offset just past its line


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            ts = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"timestamp {value!r} is neither epoch seconds nor ISO 8601") from None
        return (ts if ts.tzinfo else ts.replace(tzinfo=datetime.timezone.utc)).timestamp()
    raise ValueError(f"timestamp {value!r} is neither epoch seconds nor ISO 8601")


def parse_record(line_no: int, text: str) -> Request:
    """One log line as a Request; ValueError says why it is unusable."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("no prompt (a non-empty string)")
    if completion is not None and not isinstance(completion, str):
        raise ValueError("completion is not a string")
    ids = rec.get("completion_ids")
    if ids is not None:
        if completion is None or not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError("completion_ids is not a list of token ids beside a completion")
        ids = tuple(ids)
    tag = rec.get("tag", UNTAGGED)
    if not isinstance(tag, str) or not tag:
        raise ValueError("tag is not a non-empty string")
    check, fields = rec.get("check"), {}
    if check is not None:
        if check not in CHECKS:
            raise ValueError(f"unknown check {check!r} (known: {', '.join(CHECKS)})")
        missing = [f for f in CHECKS[check] if not isinstance(rec.get(f), (str, int, float))]
        if missing:
            raise ValueError(f"check {check!r} needs {', '.join(missing)}")
        fields = {f: str(rec[f]) for f in CHECKS[check]}
    return Request(line_no, prompt, completion, _timestamp(rec.get("timestamp")), tag, check, fields, ids)


def check_log(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise QkitError(f"the log {path} does not exist", "pass the path of a JSONL request log (see qkit.data.request_log)")
    return path


def read_log(path: str | Path, offset: int = 0, first_line: int = 1) -> LogChunk:
    """The requests from byte `offset` on (line numbers counted from `first_line`).

    A last line with no newline may still be being written: it is taken only if it parses whole.
    """
    path = check_log(path)
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read()
    requests, malformed, ends, consumed, line_no = [], [], {}, 0, first_line
    for chunk in raw.splitlines(keepends=True):
        complete = chunk.endswith(b"\n")
        text = chunk.decode("utf-8", errors="replace").strip()
        if text:
            try:
                requests.append(parse_record(line_no, text))
            except ValueError as e:
                if not complete:
                    break
                malformed.append((line_no, str(e)))
        consumed += len(chunk)
        ends[line_no] = offset + consumed
        line_no += 1
    return LogChunk(requests, malformed, offset + consumed, line_no - first_line, ends)


def report_malformed(malformed: Sequence[tuple[int, str]], path: str | Path) -> None:
    for line_no, why in malformed:
        warnings.warn(f"{path}:{line_no}: skipped, {why}", stacklevel=2)
