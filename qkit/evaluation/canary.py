"""Upgrade canary: does the same checkpoint still compute the same thing after the environment changed?

The drift monitor compares a deployment with a reference model in one and the same environment, so it
cannot see a regression that comes with an unchanged checkpoint: a new serving engine, a new torch or
transformers, another kernel or dtype. Those are common in the field (a vLLM nightly that lost about 5
GSM8K points on FP8; transformers pinned after a 10-point FP8 drop).

**Record** (:func:`make_record`): a fixed prompt set (qkit's sample prompts by default) runs through the
deployment's model; per prompt the greedy output, the log-probability of each of its tokens, the top-k
of each position's distribution, and the correctness of checkable prompts, with the environment
(library versions, torch build, device, dtype, hardware) and a format version.

**Check** (:func:`check_record`) reruns the prompts in the current environment and compares, per prompt, then
over prompts with a 95% bootstrap CI: the exact-output match rate; on the recorded tokens (teacher
forced) the KLD from the recorded distribution, top-1 agreement with it, and the shift of the recorded
tokens' log-probabilities; the accuracy change on checkable prompts (paired). The KLD is computed over
the recorded top-k and one bucket for the rest of the vocabulary: a lower bound of the full KLD (merging
outcomes never raises a KLD), loose where distributions are flat (the top 8 of `tiny` hold a third of
the mass); the log-prob shift of the recorded tokens is exact. A measure alerts when its point estimate
is past its threshold *and* its 95% CI excludes no change (a two-sided test at 5%): a rerun in an
unchanged environment reproduces the record to the bit on one machine (measured on `tiny`: every
measure exactly at no change), so any change is real, and the thresholds say which are large enough to
matter (:class:`Thresholds`; :data:`ANY_CHANGE` alerts on all).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from qkit import models
from qkit.core import provenance
from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store, canonical, write_json_atomic
from qkit.data.request_log import SAMPLE_PROMPTS, Request, check_log, read_log
from qkit.evaluation import final_hidden, head_logits, metrics
from qkit.evaluation.served import encode, generate, right_padded, score
from qkit.quant import variants

# A record's layout. The store keys its entries by the library versions, which a canary must outlive, so a
# record lives under this kind's name but at a path of the model, the variant and the prompts only.
RECORD = Kind("drift_canary", 1)


@dataclass(frozen=True)
class CanaryConfig:
    """What a record holds; a check reruns with the record's own."""

    max_new_tokens: int = 32
    batch_size: int = 8  # left padding can move a greedy choice at a near tie: the check batches alike
    top_k: int = 8  # the recorded part of each position's distribution

    def __post_init__(self) -> None:
        if min(self.max_new_tokens, self.batch_size, self.top_k) < 1:
            raise QkitError("max_new_tokens, batch_size and top_k must be ≥ 1", "pass positive values")


@dataclass(frozen=True)
class Thresholds:
    """When a check alerts: each an effect size, past which a measure alerts if its CI excludes no change.
    Judgement, not measurement: well under what an upgrade that costs points does (FP8 itself costs
    SmolLM2 a mean KLD of ~0.02), well over a float rounding change (bfloat16 against float32 on
    `tiny`: KLD 1.4e-5, log-prob shift -1.6e-4 nats/token, 63 of 64 outputs alike)."""

    match_drop: float = 0.05  # exact-output match rate at or below 1 − this
    top1_drop: float = 0.02  # top-1 agreement with the recorded distributions at or below 1 − this
    kld: float = 1e-3  # mean KLD from the recorded distributions (nats/token)
    logprob_drop: float = 0.02  # mean fall of the recorded tokens' log-probability (nats/token)
    accuracy_drop: float = 0.05  # on checkable prompts


# Any change of the numbers that its CI shows alerts, however small: for an environment pinned on purpose.
ANY_CHANGE = Thresholds(0.0, 0.0, 0.0, 0.0, 0.0)


def environment(model: Any) -> dict:
    """What the numbers depend on besides the checkpoint: libraries, torch build, device, dtype, hardware."""
    param = next(model.parameters())
    prov = provenance.collect()
    return {"qkit": prov["qkit"], "python": prov["python"], "libraries": prov["libraries"],
            "torch_build": {"version": torch.__version__, "cuda": torch.version.cuda,
                            "debug": torch.version.debug},
            "device": str(param.device), "dtype": str(param.dtype).removeprefix("torch."),
            "hardware": prov["hardware"]}


def environment_diff(before: dict, now: dict) -> list[str]:
    """The environment's entries that differ, as "name: before → now"."""
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(before), flat(now)
    return [f"{k}: {a.get(k)} → {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def prompts_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record_path(identity: dict, store: Store | None = None) -> Path:
    """Where a record of this identity (model, variant, prompts) is kept by default."""
    digest = hashlib.sha256(canonical({"version": RECORD.version, **identity}).encode()).hexdigest()[:20]
    return (store or Store()).root / RECORD.name / digest / "record.json"


def _positions(model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[Sequence[int]],
               context: int, batch_size: int) -> list[torch.Tensor]:
    """Per prompt, the model's float32 log-probabilities [n, V] at its completion's n tokens (teacher forced)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode(tokenizer, p, c, context) for p, c in zip(prompts, completions)]
    out: list[torch.Tensor] = []
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i:i + batch_size]
        ids, mask = right_padded([seq for seq, _, _ in batch], pad)
        hidden = final_hidden(model, ids, attention_mask=mask)
        for row, (seq, start, _) in enumerate(batch):
            logits = head_logits(model, hidden[row, start - 1:len(seq) - 1])
            out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


def record(model: Any, tokenizer: Any, requests: Sequence[Request], context: int,
           config: CanaryConfig = CanaryConfig()) -> list[dict]:
    """Per prompt: greedy output, its tokens' log-probabilities, each position's top-k, and correctness."""
    answers = generate(model, tokenizer, [r.prompt for r in requests], config.max_new_tokens, config.batch_size,
                       "canary", context)
    logprobs = _positions(model, tokenizer, [r.prompt for r in requests], [ids for _, ids in answers], context,
                          config.batch_size)
    out = []
    for r, (text, ids), lp in zip(requests, answers, logprobs):
        top = lp.topk(min(config.top_k, lp.shape[-1]), dim=-1) if len(ids) else None
        out.append({"line": r.line, "tag": r.tag, "output": text, "output_ids": list(ids),
                    "logprobs": lp[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)].tolist(),
                    "topk_ids": top.indices.tolist() if top is not None else [],
                    "topk_logprobs": top.values.tolist() if top is not None else [],
                    "correct": score(r, text) if r.check else None})
    return out


def compare(recorded: Sequence[dict], model: Any, tokenizer: Any, requests: Sequence[Request], context: int,
            config: CanaryConfig = CanaryConfig()) -> pd.DataFrame:
    """One row per prompt: the rerun against its record (match, kld, top1, logprob_shift, correct then/now)."""
    answers = generate(model, tokenizer, [r.prompt for r in requests], config.max_new_tokens, config.batch_size,
                       "canary", context)
    logprobs = _positions(model, tokenizer, [r.prompt for r in requests], [rec["output_ids"] for rec in recorded],
                          context, config.batch_size)
    rows = []
    for r, rec, (text, ids), lp in zip(requests, recorded, answers, logprobs):
        row = {"line": r.line, "tag": r.tag, "match": float(list(ids) == rec["output_ids"]),
               "correct_then": rec["correct"], "correct_now": score(r, text) if r.check else None,
               "kld": math.nan, "top1": math.nan, "logprob_shift": math.nan}
        if rec["output_ids"]:
            top_ids = torch.tensor(rec["topk_ids"], dtype=torch.long)
            p = torch.tensor(rec["topk_logprobs"], dtype=torch.float64).exp()
            q = lp.gather(1, top_ids).double().exp()
            # The rest of the vocabulary as one outcome; clamped, as rounding can push a share under 0.
            p_rest, q_rest = (1 - p.sum(1)).clamp_min(1e-12), (1 - q.sum(1)).clamp_min(1e-12)
            kld = (p * (p.log() - q.log())).sum(1) + p_rest * (p_rest.log() - q_rest.log())
            served = torch.tensor(rec["output_ids"], dtype=torch.long)
            row.update(kld=kld.clamp_min(0).mean().item(),
                       top1=(lp.argmax(-1) == top_ids[:, 0]).double().mean().item(),
                       logprob_shift=(lp[torch.arange(len(served)), served].double()
                                      - torch.tensor(rec["logprobs"], dtype=torch.float64)).mean().item())
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(per_prompt: pd.DataFrame, config: Thresholds = Thresholds()) -> pd.DataFrame:
    """One row per measure: estimate with its 95% CI, the no-change value, the threshold, and the alert."""
    checked = per_prompt.dropna(subset=["correct_then"])
    measures = [  # (name, values, paired with, no change, alert past: +1 above / -1 below, threshold)
        ("exact match", per_prompt["match"], None, 1.0, -1, 1 - config.match_drop),
        ("top-1 agreement", per_prompt["top1"].dropna(), None, 1.0, -1, 1 - config.top1_drop),
        ("KLD (nats/token)", per_prompt["kld"].dropna(), None, 0.0, +1, config.kld),
        ("log-prob shift (nats/token)", per_prompt["logprob_shift"].dropna(), None, 0.0, -1, -config.logprob_drop),
        ("accuracy change", checked["correct_now"].astype(float), checked["correct_then"].astype(float), 0.0, -1,
         -config.accuracy_drop),
    ]
    rows = []
    for name, values, paired, none, side, threshold in measures:
        if not len(values):
            continue
        point, low, high = metrics.mean_ci(values.to_numpy(dtype=float), seed=0,
                                           paired_with=None if paired is None else paired.to_numpy(dtype=float))
        past = point >= threshold if side > 0 else point <= threshold
        excludes = (low > none) if side > 0 else (high < none)
        rows.append({"measure": name, "n": len(values), "value": point, "low": low, "high": high,
                     "no change": none, "threshold": threshold, "alert": bool(past and excludes)})
    return pd.DataFrame(rows)


@dataclass
class CanaryCheck:
    measures: pd.DataFrame  # :func:`summarize`
    per_prompt: pd.DataFrame  # :func:`compare`
    changed: list[str]  # :func:`environment_diff` of the record's environment and this one
    thresholds: Thresholds

    @property
    def alert(self) -> bool:
        return bool(self.measures["alert"].any())


@dataclass
class Identity:
    """What a record must match: the model, the variant and the prompts (found without loading a model)."""
    key: dict  # fingerprints: model, variant, prompts_sha256
    names: dict  # the same as the user named them, for messages
    requests: list[Request]


def identify(model: str = models.DEFAULT_MODEL, variant: str | None = None,
             prompts: str | Path | None = None) -> Identity:
    """The identity of `model` (or `variant` of it, a method or a checkpoint) on `prompts` (a JSONL file in
    the request-log format; qkit's sample prompts by default)."""
    prompts = Path(prompts) if prompts is not None else SAMPLE_PROMPTS
    chunk = read_log(check_log(prompts))
    if not chunk.requests:
        raise QkitError(f"the prompts file {prompts} holds no usable prompt ({len(chunk.malformed)} malformed "
                        "line(s))", "write one JSON object per line with a non-empty \"prompt\", or leave out "
                                    "--prompts for qkit's sample prompts")
    for line_no, why in chunk.malformed:
        warnings.warn(f"{prompts}:{line_no}: skipped, {why}", stacklevel=2)
    if variant is not None:
        variants.check(variant)
    key = {"model": models.fingerprint(model), "variant": None if variant is None else variants.spec_key(variant),
           "prompts_sha256": prompts_sha256(prompts)}
    return Identity(key, {"model": model, "variant": variant, "prompts": str(prompts)}, chunk.requests)


@dataclass
class Deployment:
    """The model a canary runs, with its identity."""
    model: Any
    tokenizer: Any
    context: int
    id: Identity


def deployment(ident: Identity, dtype: str | None = None, store: Store | None = None,
               trust_remote_code: bool = False) -> Deployment:
    """Load the model of an identity. `dtype` loads the model itself in float32, bfloat16 or float16; a
    variant runs in the dtypes its checkpoint loads in."""
    variant = ident.names["variant"]
    if variant is not None and dtype is not None:
        raise QkitError(f"--dtype applies to the model itself, not to the variant {variant}",
                        "leave out --dtype: a variant runs in the dtypes its checkpoint loads in")
    loaded = models.resolve_model(ident.names["model"], dtype=dtype or "float32",
                                  trust_remote_code=trust_remote_code, store=store)
    served = variants.baseline(loaded) if variant is None else variants.parse(loaded, variant, store=store)
    return Deployment(served.model, loaded.tokenizer, loaded.info["max_length"], ident)


def make_record(dep: Deployment, config: CanaryConfig = CanaryConfig()) -> dict:
    """A record of the deployment on its prompts in this environment (see the module docstring)."""
    return {"format": RECORD.version, "identity": dep.id.key, "names": dep.id.names, "config": asdict(config),
            "environment": environment(dep.model),
            "prompts": record(dep.model, dep.tokenizer, dep.id.requests, dep.context, config)}


def save_record(saved: dict, out: str | Path | None = None, store: Store | None = None) -> Path:
    path = Path(out) if out is not None else record_path(saved["identity"], store)
    write_json_atomic(path, saved)
    return path


def load_record(ident: Identity, path: str | Path | None = None, store: Store | None = None) -> tuple[dict, Path]:
    """The record of this identity (at `path`, or where :func:`save_record` keeps it by default), refused
    in one line if it is missing, of another qkit format, or made with another model or prompt set."""
    path = Path(path) if path is not None else record_path(ident.key, store)
    again = (f"qkit drift canary record --model {ident.names['model']}"
             + (f" --variant {ident.names['variant']}" if ident.names["variant"] else "")
             + (f" --prompts {ident.names['prompts']}" if ident.names["prompts"] != str(SAMPLE_PROMPTS) else ""))
    if not path.is_file():
        raise QkitError(f"there is no canary record at {path}",
                        f"record one in the environment to guard, before it changes: {again}")
    try:
        saved = json.loads(path.read_text())
        version = saved.get("format") if isinstance(saved, dict) else None
    except ValueError:
        version = None
    if version != RECORD.version:
        raise QkitError(f"{path} is a canary record of format {version}, and this qkit reads format "
                        f"{RECORD.version} only", f"record it again, in the environment to guard: {again}")
    names = saved["names"]
    for key, what in (("model", "model"), ("variant", "variant"), ("prompts_sha256", "prompt set")):
        if saved["identity"][key] != ident.key[key]:
            name = "prompts" if key == "prompts_sha256" else key
            then, now = (n[name] or f"none: {n['model']} itself" for n in (names, ident.names))
            raise QkitError(f"the canary record {path} was made with another {what} ({then}) than this check "
                            f"names ({now})", f"check what it recorded (--{name} {then}), or pass the record "
                                              "of this one (--record)")
    return saved, path


def check_record(saved: dict, dep: Deployment, thresholds: Thresholds = Thresholds()) -> CanaryCheck:
    """Rerun a loaded record's prompts on the deployment and compare (see the module docstring)."""
    config = CanaryConfig(**saved["config"])
    by_line = {r.line: r for r in dep.id.requests}
    requests = [by_line[p["line"]] for p in saved["prompts"]]
    per_prompt = compare(saved["prompts"], dep.model, dep.tokenizer, requests, dep.context, config)
    return CanaryCheck(summarize(per_prompt, thresholds), per_prompt,
                       environment_diff(saved["environment"], environment(dep.model)), thresholds)
