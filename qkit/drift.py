"""Quality-drift monitoring: how far a quantized deployment's answers drift from its reference model's on
the traffic it actually served, whether that is getting worse, and on which kind of request.

**The log** is JSONL, one served request per line (vLLM's request log or an OpenAI-compatible proxy's,
mapped to these fields; `qkit/datafiles/drift_log_sample.jsonl` is a sample):

- ``prompt`` (string, required): the text the model was given, chat template already applied.
- ``completion`` (string, optional): what the deployment answered. Without it, the quantized model named
  to the monitor generates one (greedy, ``DriftConfig.max_new_tokens``).
- ``completion_ids`` (list of token ids, optional): the completion as the server's tokens. Text alone is
  re-tokenized, which need not give the tokens the model chose (a run of "\\n" tokens comes back as
  "\\n\\n" tokens), so servers that can log the ids should; replay does.
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

**Per request**, the reference and the quantized model read the same prompt + completion (teacher
forcing, right-padded batches) and, over the completion's tokens:

- ``kld``: mean KL(reference ‖ quantized), the quantized model being the one named to the monitor;
- ``top1``: share of positions where the two models' most likely tokens agree (llama.cpp's "same top");
- ``served_top1``: share of the served tokens that are the reference's most likely token; for a greedy
  deployment of the named model it equals ``top1``, and it is the one measure that sees the deployment
  itself, whatever model actually served (a swapped or damaged checkpoint). On SmolLM2, a log whose
  second half w4a16_rtn served, monitored as fp8_dynamic, kept its KLD (0.018-0.022 a window) while
  this fell from 93% to 74-79%;
- ``ref_logprob``: the mean log-probability the reference gives the served tokens;
- ``correct_ref`` / ``correct_quant`` for checkable requests: the reference's own greedy answer and the
  served completion, scored by the request's check.

**Monitoring** (:func:`monitor`) cuts the requests into windows (a number of requests, or a duration),
compares each window with a baseline window (the first by default) and alerts when a measure moves past
its threshold *and* the change is unlikely to be chance. The thresholds (:class:`MonitorConfig`) are
effect sizes: mean KLD at least 2x the baseline's; agreement (``top1`` or ``served_top1``) down at least
5 points; at least 15% of the window's requests past the baseline's 95th KLD percentile (5% expected).
The reference's log-probability of the served tokens is shown but alerts only when given a threshold:
it depends on the text as much as on the model (on `tiny`, prose and code openings differ by 0.5
nats/token under one and the same deployment), so a change of traffic mix would read as drift.

The change test for a mean is a one-sided permutation test of the window's requests against the
baseline's: requests are the independent units, their KLDs are skewed and heavy-tailed (a t-test's
normal approximation is poor at 10-50 requests), and the permutation test assumes nothing but
exchangeability under no change. A CUSUM would flag a shift
sooner, but it needs the in-control mean and spread known in advance and a tuned slack, and its alarm
belongs to the whole history rather than to a window one can look at. The tail share is tested with an
exact binomial test against the 5% expected. Each test runs at ``alpha`` = 0.01 without correction for
the several measures and windows; requiring the effect size as well keeps false alarms rare (an
unchanged log raises none in the tests), and a stricter ``alpha`` is one setting away.

**Incremental**: the state (byte offset, line count, per-request results) lives in the qkit store under
``drift/<key>``, keyed by the log's path, the two models and the scoring settings; a rerun reads only
the lines added since, and a log that was rewritten or rotated (its start changed) is read afresh.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from qkit import methods, models, provenance
from qkit.errors import QkitError
from qkit.evaluation import final_hidden, head_logits
from qkit.metrics import token_stats
from qkit.store import Store, write_json_atomic, write_text_atomic
from qkit.tasks import scoring

DATAFILES = Path(__file__).resolve().parent / "datafiles"
SAMPLE_LOG = DATAFILES / "drift_log_sample.jsonl"
SAMPLE_PROMPTS = DATAFILES / "drift_prompts.jsonl"
UNTAGGED = "untagged"

# A check's scorer from qkit's task suite, and the record fields it needs besides the completion.
CHECKS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "arithmetic": (scoring.arithmetic, ("answer",)),
    "gsm8k": (scoring.gsm8k, ("answer",)),
    "passkey": (scoring.passkey, ("answer",)),
    "humaneval": (scoring.humaneval, ("test", "entry_point")),
}
# Hashed to tell whether a log was rewritten under the monitor: the first bytes it already read.
_HEAD_BYTES = 4096
_PROBE = "Quantization drift: 12 + 7 = 19.\ndef f(x):\n    return x ** 2  # café ✓"


# ---------------------------------------------------------------- reading the log


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
        missing = [f for f in CHECKS[check][1] if not isinstance(rec.get(f), (str, int, float))]
        if missing:
            raise ValueError(f"check {check!r} needs {', '.join(missing)}")
        fields = {f: str(rec[f]) for f in CHECKS[check][1]}
    return Request(line_no, prompt, completion, _timestamp(rec.get("timestamp")), tag, check, fields, ids)


def check_log(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise QkitError(f"the log {path} does not exist", "pass the path of a JSONL request log (see qkit.drift)")
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


# ---------------------------------------------------------------- the two models


@dataclass
class Served:
    """The quantized model the monitor compares with the reference, and what identifies it."""

    model: Any
    name: str  # the method, or the directory
    identity: str  # a content id for the store key


def check_tokenizers(reference: Any, other: Any, other_name: str) -> None:
    """QkitError unless the two tokenizers turn text into the same ids: teacher forcing needs one text."""
    same = (reference.get_vocab() == other.get_vocab()
            and reference(_PROBE)["input_ids"] == other(_PROBE)["input_ids"])
    if not same:
        raise QkitError(f"the quantized model {other_name} has another tokenizer than the reference "
                        f"({len(other.get_vocab())} vs {len(reference.get_vocab())} tokens, or other ids "
                        "for the same text), so their per-token measures would not be comparable",
                        "pass a checkpoint quantized from the reference model (--quantized METHOD does so)")


def load_served(reference: models.LoadedModel, spec: str, store: Store | None = None) -> Served:
    """A qkit method's checkpoint of `reference` (quantized and cached on first use), or a model directory
    (a compressed-tensors checkpoint or a float model, e.g. a damaged copy for a test)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        identity = models.fingerprint(str(path))
        check_tokenizers(reference.tokenizer, models.load_tokenizer(path), str(path))
        quantized = "quantization_config" in json.loads((path / "config.json").read_text())
        model = methods.load_quantized(path) if quantized else models.load_pretrained(path)
        return Served(model, str(path), identity)
    method = methods.get_method(spec)
    ckpt = methods.quantize(reference, method, store=store)
    check_tokenizers(reference.tokenizer, models.load_tokenizer(ckpt.path), method.name)
    return Served(methods.load_quantized(ckpt), method.name, f"checkpoint:{ckpt.path.name}")


# ---------------------------------------------------------------- measuring


@dataclass(frozen=True)
class DriftConfig:
    batch_size: int = 8
    max_new_tokens: int = 32  # greedy answers: the reference's to checkable prompts, and missing completions
    max_length: int | None = None  # tokens per request scored; None: the reference's context

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise QkitError(f"{name} must be ≥ 1, got {getattr(self, name)}", f"pass a positive {name}")
        if self.max_length is not None and self.max_length < 2:
            raise QkitError(f"max_length must be ≥ 2 tokens, got {self.max_length}", "pass a longer max_length")


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
             desc: str = "generating", context: int | None = None) -> list[tuple[str, list[int]]]:
    """Greedy completions as (text, token ids), left-padded batches (as a server batches); each stops
    before the end-of-text token. With `context`, a prompt keeps only its last context − max_new_tokens
    tokens, so that prompt and answer fit."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    fit = {"truncation": True, "max_length": max(1, context - max_new_tokens)} if context else {}
    out: list[tuple[str, list[int]]] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True, **fit)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                ids = row[:row.index(eos)] if eos in row else row
                out.append((tokenizer.decode(ids, skip_special_tokens=True), ids))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return out


def _encode(tokenizer: Any, prompt: str, completion: Sequence[int] | str, max_length: int
            ) -> tuple[list[int], int, bool]:
    """(ids, index of the first completion token, truncated): the last `max_length` tokens of prompt +
    completion (token ids, or text to tokenize), so a long prompt loses its start. At least one token
    stays before the completion."""
    p = tokenizer(prompt, verbose=False)["input_ids"]
    c = (tokenizer(completion, add_special_tokens=False, verbose=False)["input_ids"] if isinstance(completion, str)
         else list(completion))
    ids = p + c
    cut = max(0, len(ids) - max_length)
    return ids[cut:], max(1, len(p) - cut), cut > 0


def _check(req: Request, text: str) -> float:
    scorer, _ = CHECKS[req.check]
    doc = {"prompt": req.prompt, **req.fields}
    return next(iter(scorer(doc, [text]).values()))


def measure(reference: models.LoadedModel, quantized: Any, requests: Sequence[Request],
            config: DriftConfig = DriftConfig()) -> list[dict]:
    """One result per request with a completion of at least one token (see the module docstring)."""
    tok = reference.tokenizer
    max_length = config.max_length or reference.info["max_length"]
    need = [r for r in requests if r.completion is None]
    made = dict(zip((r.line for r in need), generate(quantized, tok, [r.prompt for r in need],
                                                     config.max_new_tokens, config.batch_size,
                                                     "quantized answers", max_length)))
    checkable = [r for r in requests if r.check]
    ref_answers = dict(zip((r.line for r in checkable), generate(reference.model, tok, [r.prompt for r in checkable],
                                                                 config.max_new_tokens, config.batch_size,
                                                                 "reference answers", max_length)))
    encoded = []
    for r in requests:
        if r.completion is not None:
            completion, tokens = r.completion, r.completion_ids or r.completion
        else:
            completion, tokens = made[r.line]
        ids, start, truncated = _encode(tok, r.prompt, tokens, max_length)
        if start < len(ids):
            encoded.append((r, completion, ids, start, truncated))
    n_cut = sum(e[4] for e in encoded)
    if n_cut:
        warnings.warn(f"{n_cut} request(s) longer than {max_length} tokens: their prompts were cut from the left",
                      stacklevel=2)
    # Similar lengths batched together waste little on padding.
    encoded.sort(key=lambda e: len(e[2]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results = []
    for i in tqdm(range(0, len(encoded), config.batch_size), desc="scoring", unit="batch", leave=False):
        batch = encoded[i:i + config.batch_size]
        width = max(len(e[2]) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            ids[row, :len(e[2])] = torch.tensor(e[2])
            mask[row, :len(e[2])] = 1
        # the head is applied to completion rows only
        hidden_p = final_hidden(reference.model, ids, attention_mask=mask)
        hidden_q = final_hidden(quantized, ids, attention_mask=mask)
        for row, (r, completion, seq, start, truncated) in enumerate(batch):
            rows = slice(start - 1, len(seq) - 1)
            logits_p = head_logits(reference.model, hidden_p[row, rows])
            stats = token_stats(logits_p, head_logits(quantized, hidden_q[row, rows]), ids[row, start:len(seq)])
            served = ids[row, start:len(seq)]
            res = {"line": r.line, "timestamp": r.timestamp, "tag": r.tag, "n_tokens": len(seq) - start,
                   "truncated": truncated, "kld": stats["kld"].mean().item(), "kld_max": stats["kld"].max().item(),
                   "top1": stats["same_top1"].double().mean().item(),
                   "served_top1": (logits_p.argmax(-1) == served).double().mean().item(),
                   "ref_logprob": -stats["nll_base"].mean().item(),
                   "completion": completion, "generated": r.completion is None, "check": r.check}
            if r.check:
                ref_answer = ref_answers[r.line][0]
                res.update(correct_quant=_check(r, completion), correct_ref=_check(r, ref_answer),
                           ref_answer=ref_answer)
            results.append(res)
    return sorted(results, key=lambda res: res["line"])


# ---------------------------------------------------------------- incremental runs


@dataclass
class DriftState:
    log: str
    offset: int = 0
    n_lines: int = 0
    head_sha256: str = ""
    results: list[dict] = field(default_factory=list)
    malformed: list[list] = field(default_factory=list)  # [line, why]
    skipped_empty: int = 0  # requests whose completion has no token
    meta: dict = field(default_factory=dict)


def _head_digest(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(min(n, _HEAD_BYTES))).hexdigest()


def state_path(store: Store, spec: dict) -> Path:
    return store.path("drift", spec) / "state.json"


def _spec(log: Path, reference: models.LoadedModel, served: Served, config: DriftConfig) -> dict:
    return {"log": str(log), "reference": reference.info["fingerprint"], "quantized": served.identity,
            "config": asdict(config)}


def state_path_for(log: str | Path, reference: models.LoadedModel, served: Served, config: DriftConfig = DriftConfig(),
                   store: Store | None = None) -> Path:
    """Where :func:`update` keeps this log's state for these models and settings."""
    return state_path(store or Store(), _spec(Path(log).resolve(), reference, served, config))


def update(log: str | Path, reference: models.LoadedModel, served: Served, config: DriftConfig = DriftConfig(),
           store: Store | None = None) -> DriftState:
    """Measure the log's requests not measured yet and return the whole log's state.

    The state is saved after every batch of new requests, so an interrupted run resumes where it stopped.
    """
    store = store or Store()
    log = Path(log).resolve()
    path = state_path(store, _spec(log, reference, served, config))
    state = DriftState(str(log))
    if path.exists():
        saved = DriftState(**json.loads(path.read_text()))
        size = log.stat().st_size if log.exists() else 0
        if size >= saved.offset and _head_digest(log, saved.offset) == saved.head_sha256:
            state = saved
        else:
            warnings.warn(f"{log} was rewritten since the last run (its start changed or it shrank): reading it "
                          "from the beginning", stacklevel=2)
    chunk = read_log(log, state.offset, state.n_lines + 1)
    report_malformed(chunk.malformed, log)
    known, bad = state.malformed, [list(m) for m in chunk.malformed]
    state.meta = {"reference": reference.info["spec"], "reference_fingerprint": reference.info["fingerprint"],
                  "quantized": served.name, "quantized_identity": served.identity, "config": asdict(config),
                  "provenance": provenance.collect()}
    # Saved after each group of requests, with the offset just past the group's last line.
    first_line, step = state.n_lines + 1, 4 * config.batch_size
    for i in range(0, len(chunk.requests), step):
        part = chunk.requests[i:i + step]
        new = measure(reference, served.model, part, config)
        state.skipped_empty += len(part) - len(new)
        state.results += new
        state.offset, state.n_lines = chunk.ends[part[-1].line], part[-1].line
        state.malformed = known + [m for m in bad if m[0] < state.n_lines]  # a resumed run reads the rest again
        state.head_sha256 = _head_digest(log, state.offset)
        write_json_atomic(path, asdict(state))
    state.offset, state.n_lines = chunk.end_offset, first_line - 1 + chunk.n_lines
    state.malformed = known + bad
    state.head_sha256 = _head_digest(log, state.offset)
    write_json_atomic(path, asdict(state))
    if not state.results:
        raise QkitError(f"the log {log} holds no usable request ({len(state.malformed)} malformed line(s), "
                        f"{state.skipped_empty} with an empty completion)",
                        "log one JSON object per line with at least a non-empty \"prompt\" (see qkit.drift)")
    return state


# ---------------------------------------------------------------- monitoring

# The measures a window is compared on, and the direction that is worse.
WORSE = {"kld": +1, "top1": -1, "served_top1": -1, "ref_logprob": -1}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class MonitorConfig:
    """Windows, baseline and alert thresholds; the defaults are argued in the module docstring."""

    window: int | str = 50  # requests per window, or a duration: "30m", "6h", "1d"
    baseline_windows: int = 1  # the first windows, pooled, are the baseline
    kld_ratio: float = 2.0  # window mean KLD / baseline mean KLD
    agreement_drop: float = 0.05  # fall in top1 or served_top1 (a share: 0.05 = 5 points)
    tail_quantile: float = 0.95  # the baseline's KLD percentile that defines the tail ...
    tail_share: float = 0.15  # ... and the share of a window's requests past it that alerts
    # Fall in the reference's mean log-probability of served tokens (nats/token) that alerts; off by default
    # because it moves with the kind of text served as much as with the deployment (see the docstring).
    logprob_drop: float | None = None
    alpha: float = 0.01  # each change test's significance level
    min_requests: int = 10  # a window (or a tag in it) with fewer requests never alerts
    n_permutations: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        self.window_spec()
        if self.baseline_windows < 1 or self.min_requests < 2 or self.n_permutations < 100:
            raise QkitError("baseline_windows must be ≥ 1, min_requests ≥ 2 and n_permutations ≥ 100",
                            "pass larger values")
        if not 0 < self.alpha < 1 or not 0 < self.tail_quantile < 1:
            raise QkitError(f"alpha and tail_quantile must lie in (0, 1), got {self.alpha}, {self.tail_quantile}",
                            "pass e.g. alpha=0.01, tail_quantile=0.95")

    def window_spec(self) -> tuple[str, float]:
        """("requests", N) or ("seconds", S)."""
        w = self.window
        if isinstance(w, str) and w.isdigit():
            w = int(w)
        if isinstance(w, int) and not isinstance(w, bool):
            if w < 2:
                raise QkitError(f"a window of {w} request(s) is too small to compare", "pass --window 20 or more")
            return "requests", w
        m = _DURATION.fullmatch(str(w))
        if not m or float(m.group(1)) <= 0:
            raise QkitError(f"window {w!r} is neither a number of requests nor a duration",
                            "pass e.g. --window 50 (requests) or --window 30m, 6h, 1d")
        return "seconds", float(m.group(1)) * _SECONDS[m.group(2)]


def permutation_p(baseline: np.ndarray, window: np.ndarray, worse: int, n: int, seed: int) -> float:
    """One-sided permutation p-value that the window's mean is worse (higher if worse=+1) than the
    baseline's by chance alone; (1 + as extreme) / (1 + n), never 0."""
    pooled = np.concatenate([baseline, window])
    observed = worse * (window.mean() - baseline.mean())
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.broadcast_to(pooled, (n, pooled.size)), axis=1)
    diffs = worse * (perms[:, baseline.size:].mean(1) - perms[:, :baseline.size].mean(1))
    return float((1 + np.sum(diffs >= observed - 1e-12)) / (1 + n))


def binomial_tail_p(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p): how surprising k of n past a percentile that p of requests pass."""
    return float(min(1.0, sum(math.comb(n, i) * p**i * (1 - p)**(n - i) for i in range(k, n + 1))))


def assign_windows(df: pd.DataFrame, config: MonitorConfig) -> pd.Series:
    """Each request's window index, in log order."""
    kind, size = config.window_spec()
    if kind == "requests":
        return pd.Series(np.arange(len(df)) // int(size), index=df.index)
    if df["timestamp"].isna().any():
        n = int(df["timestamp"].isna().sum())
        raise QkitError(f"time windows need a timestamp on every request, and {n} have none",
                        "log a timestamp (epoch seconds or ISO 8601), or use windows of N requests (--window N)")
    t = df["timestamp"].to_numpy()
    return pd.Series(((t - t.min()) // size).astype(int), index=df.index)


def _compare(base: pd.DataFrame, win: pd.DataFrame, config: MonitorConfig, seed: int) -> dict:
    """A window's measures against the baseline's, with the change tests and the thresholds crossed."""
    out: dict[str, Any] = {"n": len(win)}
    for m in WORSE:
        out[m] = win[m].mean()
    # A tag absent from the baseline window has nothing to be compared with.
    tail = float(np.quantile(base["kld"], config.tail_quantile)) if len(base) else math.nan
    past = int((win["kld"] > tail).sum())
    out["tail_share"] = past / len(win) if len(base) else math.nan
    base_kld = base["kld"].mean() if len(base) else math.nan
    out["kld_ratio"] = out["kld"] / base_kld if base_kld > 0 else (math.inf if base_kld == 0 else math.nan)
    checked = win[win["check"].notna()] if "check" in win else win.iloc[:0]
    if len(checked):
        out["acc_ref"], out["acc_quant"] = checked["correct_ref"].mean(), checked["correct_quant"].mean()
        out["flips"] = int((checked["correct_ref"] != checked["correct_quant"]).sum())
    reasons = []
    if len(win) >= config.min_requests and len(base) >= config.min_requests:
        p = {m: permutation_p(base[m].to_numpy(), win[m].to_numpy(), worse, config.n_permutations, seed)
             for m, worse in WORSE.items()}
        p["tail_share"] = binomial_tail_p(past, len(win), 1 - config.tail_quantile)
        out.update({f"p_{m}": v for m, v in p.items()})
        base_mean = {m: base[m].mean() for m in WORSE}
        crossed = {
            "kld": (out["kld_ratio"] >= config.kld_ratio,
                    f"mean KLD {out['kld']:.3g} is {out['kld_ratio']:.1f}x the baseline's {base_mean['kld']:.3g}"),
            "tail_share": (out["tail_share"] >= config.tail_share,
                           f"{100 * out['tail_share']:.0f}% of requests past the baseline's "
                           f"{100 * config.tail_quantile:.0f}th KLD percentile ({tail:.3g})"),
            "top1": (base_mean["top1"] - out["top1"] >= config.agreement_drop,
                     f"top-1 agreement {100 * out['top1']:.1f}% vs the baseline's {100 * base_mean['top1']:.1f}%"),
            "served_top1": (base_mean["served_top1"] - out["served_top1"] >= config.agreement_drop,
                            f"served tokens the reference's top-1: {100 * out['served_top1']:.1f}% vs the "
                            f"baseline's {100 * base_mean['served_top1']:.1f}%"),
            "ref_logprob": (config.logprob_drop is not None
                            and base_mean["ref_logprob"] - out["ref_logprob"] >= config.logprob_drop,
                            f"reference log-prob of served tokens {out['ref_logprob']:.3f} vs the baseline's "
                            f"{base_mean['ref_logprob']:.3f} nats/token"),
        }
        reasons = [f"{text} (p={p[m]:.4f})" for m, (hit, text) in crossed.items() if hit and p[m] < config.alpha]
    out["alert"] = bool(reasons)
    out["reasons"] = reasons
    return out


@dataclass
class Monitor:
    windows: pd.DataFrame  # one row per window
    tags: pd.DataFrame  # one row per (tag, window), each tag against its own baseline requests
    alerts: list[dict]
    requests: pd.DataFrame  # per-request results with their window
    config: MonitorConfig


def _table(df: pd.DataFrame, config: MonitorConfig, seed: int) -> pd.DataFrame:
    base = df[df["window"] < config.baseline_windows]
    rows = []
    for w, win in df.groupby("window", sort=True):
        row = {"window": int(w), "first_line": int(win["line"].min()), "last_line": int(win["line"].max()),
               "start": win["timestamp"].min(), "end": win["timestamp"].max(),
               "baseline": bool(w < config.baseline_windows)}
        row.update(_compare(base, win, config, seed + int(w)))
        if row["baseline"]:
            row.update(alert=False, reasons=[])
        rows.append(row)
    return pd.DataFrame(rows)


def monitor(results: Sequence[dict], config: MonitorConfig = MonitorConfig()) -> Monitor:
    """Windows against the baseline, overall and per tag, and the alerts (see the module docstring)."""
    if not results:
        raise QkitError("there are no measured requests to monitor", "measure a log first (drift.update)")
    df = pd.DataFrame(list(results))
    if "check" not in df:
        df["check"] = None
    df["window"] = assign_windows(df, config)
    windows = _table(df, config, config.seed)
    if windows["baseline"].all():
        warnings.warn(f"the log fills only the baseline ({len(windows)} window(s) of {config.window}): nothing "
                      "to compare yet", stacklevel=2)
    tags = pd.concat([_table(g, config, config.seed).assign(tag=t) for t, g in df.groupby("tag", sort=True)],
                     ignore_index=True)
    alerts = [{"scope": "all", "tag": None, **_alert_fields(r)} for _, r in windows[windows["alert"]].iterrows()]
    alerts += [{"scope": "tag", "tag": r["tag"], **_alert_fields(r)} for _, r in tags[tags["alert"]].iterrows()]
    return Monitor(windows, tags, alerts, df, config)


def _alert_fields(row: pd.Series) -> dict:
    return {"window": int(row["window"]), "first_line": int(row["first_line"]), "last_line": int(row["last_line"]),
            "start": None if pd.isna(row["start"]) else float(row["start"]),
            "end": None if pd.isna(row["end"]) else float(row["end"]), "n": int(row["n"]),
            "reasons": list(row["reasons"])}


def write_alerts(mon: Monitor, state: DriftState, path: str | Path) -> None:
    """The alerts as JSON, with what was compared and the provenance of the run."""
    write_json_atomic(Path(path), {"log": state.log, "alerts": mon.alerts, "monitor": asdict(mon.config),
                                   "n_requests": len(state.results), "malformed_lines": len(state.malformed),
                                   **state.meta})


def alert_lines(mon: Monitor) -> list[str]:
    return [f"ALERT window {a['window']} (lines {a['first_line']}-{a['last_line']}, {a['n']} requests"
            + (f", tag {a['tag']}" if a["tag"] else "") + "): " + "; ".join(a["reasons"]) for a in mon.alerts]


def worst(mon: Monitor, n: int = 5, by: str = "kld") -> pd.DataFrame:
    """The n requests furthest from the reference by one measure, worst first."""
    ascending = WORSE[by] < 0
    return mon.requests.sort_values(by, ascending=ascending).head(n)


def side_by_side(log: str | Path, mon: Monitor, reference: models.LoadedModel, n: int = 5, by: str = "served_top1",
                 max_new_tokens: int = 32) -> pd.DataFrame:
    """The `n` worst requests by `by`: the served completion beside the reference's own greedy answer to
    the same prompt (generated now, `max_new_tokens` long)."""
    rows = worst(mon, n, by)
    prompts = [json.loads(line)["prompt"] for line in _lines(Path(log), [int(x) for x in rows["line"]])]
    answers = generate(reference.model, reference.tokenizer, prompts, max_new_tokens, desc="reference answers",
                       context=reference.info["max_length"])
    return pd.DataFrame({"line": rows["line"].to_numpy(), "tag": rows["tag"].to_numpy(),
                         "window": rows["window"].to_numpy(), by: rows[by].round(3).to_numpy(),
                         "kld": rows["kld"].to_numpy(), "prompt (end)": [p[-160:] for p in prompts],
                         "served": rows["completion"].to_numpy(), "reference": [a for a, _ in answers]})


# ---------------------------------------------------------------- replay


def _serve_key(spec: str) -> Any:
    """What identifies a method or model directory's answers, without loading it."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return models.fingerprint(str(path))
    method = methods.get_method(spec)
    return {"method": method.name, "recipe": methods.recipe_yaml(method)}


def replay(reference: models.LoadedModel, serve: str, prompts: str | Path | None = None, out: str | Path | None = None,
           *, switch_to: str | None = None, switch_at: int | None = None, max_new_tokens: int = 32,
           batch_size: int = 8, store: Store | None = None) -> Path:
    """Write a log as if `serve` (a method or model directory) had answered the prompts file (the log
    format, completions ignored); with `switch_to`, that one serves from request `switch_at` on (default:
    halfway), so a monitor can be tried on a known change. Greedy, `max_new_tokens` per answer. Without a
    prompts file, qkit's sample prompts serve (SAMPLE_PROMPTS: arithmetic, prose, code, chat). Without
    `out`, the log is kept in the store, keyed by everything that makes it, and a second call serves
    nothing: a report rerun monitors the same log and finds its measures stored."""
    prompts = Path(prompts) if prompts is not None else SAMPLE_PROMPTS
    chunk = read_log(prompts)
    report_malformed(chunk.malformed, prompts)
    reqs = chunk.requests
    if not reqs:
        raise QkitError(f"the prompts file {prompts} holds no usable prompt",
                        "write one JSON object per line with a \"prompt\"")
    if switch_at is not None and switch_to is None:
        raise QkitError("switch_at was given without switch_to", "name the method to switch to (--switch-to)")
    at = len(reqs) if switch_to is None else (len(reqs) // 2 if switch_at is None else switch_at)
    if switch_to is not None and not 0 < at < len(reqs):
        raise QkitError(f"switch_at {at} leaves one side of the switch without requests ({len(reqs)} prompts)",
                        f"pass --switch-at 1..{len(reqs) - 1}")

    def serve_all() -> str:
        raw = {r.line: json.loads(line) for r, line in zip(reqs, _lines(prompts, [r.line for r in reqs]))}
        records = []
        for spec, part in ((serve, reqs[:at]), (switch_to, reqs[at:])):
            if not part:
                continue
            served = load_served(reference, spec, store)
            answers = generate(served.model, reference.tokenizer, [r.prompt for r in part], max_new_tokens,
                               batch_size, f"serving with {served.name}", reference.info["max_length"])
            for r, (answer, ids) in zip(part, answers):
                rec = {k: v for k, v in raw[r.line].items() if k not in ("completion", "completion_ids")}
                rec.update(completion=answer, completion_ids=ids, served_by=served.name)
                rec.setdefault("timestamp", time.time())
                records.append(rec)
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    if out is not None:
        write_text_atomic(Path(out), serve_all())
        return Path(out)
    spec = {"reference": reference.info["fingerprint"], "serve": _serve_key(serve),
            "switch_to": _serve_key(switch_to) if switch_to else None, "switch_at": at,
            "prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(), "max_new_tokens": max_new_tokens,
            "batch_size": batch_size}  # left padding can move a greedy choice at a near tie
    store = store or Store()
    return store.get_dir("drift_replay", spec, lambda tmp: write_text_atomic(tmp / "log.jsonl", serve_all())) \
        / "log.jsonl"


def served_by(log: str | Path) -> dict[int, str]:
    """Line number → what served it, for the lines of a replayed log that say so (a demo's ground truth)."""
    out = {}
    with open(check_log(log), encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("served_by"), str):
                out[i] = rec["served_by"]
    return out


def _lines(path: Path, numbers: Sequence[int]) -> list[str]:
    wanted = set(numbers)
    with open(path, encoding="utf-8", errors="replace") as f:
        found = {i: line for i, line in enumerate(f, 1) if i in wanted}
    return [found[i] for i in numbers]
