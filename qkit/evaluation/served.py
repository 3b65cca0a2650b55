"""Served traffic measured against the reference model.

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
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from qkit import models
from qkit.core.errors import QkitError
from qkit.data.request_log import Request
from qkit.evaluation import final_hidden, head_logits
from qkit.evaluation.metrics import token_stats
from qkit.evaluation.tasks import scoring

# The scorer of qkit's task suite behind each check a log record can name (qkit.data.request_log.CHECKS).
SCORERS = {"arithmetic": scoring.arithmetic, "gsm8k": scoring.gsm8k, "passkey": scoring.passkey,
           "humaneval": scoring.humaneval}


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


def encode(tokenizer: Any, prompt: str, completion: Sequence[int] | str, max_length: int
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


def right_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token sequences padded on the right to the longest."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids, mask


def score(req: Request, text: str) -> float:
    """A checkable request's completion `text` scored by its check (1.0 correct)."""
    scorer = SCORERS[req.check]
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
        ids, start, truncated = encode(tok, r.prompt, tokens, max_length)
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
        ids, mask = right_padded([e[2] for e in batch], pad)
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
                res.update(correct_quant=score(r, completion), correct_ref=score(r, ref_answer),
                           ref_answer=ref_answer)
            results.append(res)
    return sorted(results, key=lambda res: res["line"])
