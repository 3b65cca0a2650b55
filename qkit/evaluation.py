"""Teacher-forced evaluation of a model against its unquantized baseline on held-out text.

The text is cut into equal chunks of `ctx` tokens, each scored independently (as llama.cpp's
perplexity tool does), every position predicting the next token. The baseline is run once per
(model, text) and kept as top-k log-probabilities plus the tail mass (`qkit.metrics.TopK`), not as full
logits; every quantized model is then compared against that reference. Results keep per-chunk means so
that confidence intervals can be bootstrapped over chunks, the unit whose tokens are independent
enough to resample.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qkit import data, metrics
from qkit.errors import QkitError
from qkit.models import LoadedModel
from qkit.store import Store


@dataclass(frozen=True)
class EvalSpec:
    domain: str = "prose"
    n_tokens: int = 8192
    ctx: int = 512
    k: int = metrics.DEFAULT_TOPK
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.domain not in data.EVAL_DOMAINS:
            raise QkitError(f"unknown eval text {self.domain!r}", f"use one of {', '.join(data.EVAL_DOMAINS)}")
        for name in ("n_tokens", "ctx", "k", "batch_size"):
            if getattr(self, name) <= 0:
                raise QkitError(f"{name} must be positive, got {getattr(self, name)}", f"pass a {name} above 0")
        if self.n_tokens < self.ctx:
            raise QkitError(f"n_tokens={self.n_tokens} is shorter than one chunk (ctx={self.ctx})",
                            "raise n_tokens or lower ctx")


def eval_chunks(loaded: LoadedModel, spec: EvalSpec) -> torch.Tensor:
    """[n_chunks, ctx] token ids of the held-out text; the remainder that fills no chunk is dropped."""
    data.check_seq_len(spec.ctx, loaded.info["max_length"])
    n = spec.n_tokens - spec.n_tokens % spec.ctx
    return data.eval_tokens(spec.domain, loaded.tokenizer, n).view(-1, spec.ctx)


def _logits(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int, desc: str
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [b*(ctx-1), V] in fp32, targets [b*(ctx-1)]) per batch of chunks."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in tqdm(range(0, len(chunks), batch_size), desc=desc, unit="batch", leave=False):
            batch = chunks[i:i + batch_size]
            logits = model(batch.to(device)).logits[:, :-1].float()
            yield logits.reshape(-1, logits.shape[-1]).cpu(), batch[:, 1:].reshape(-1)


def _spec_key(loaded: LoadedModel, spec: EvalSpec) -> dict:
    # batch_size changes nothing but speed, so it stays out of the key.
    s = asdict(spec)
    s.pop("batch_size")
    return {"model": loaded.info["fingerprint"], **s}


def baseline(loaded: LoadedModel, spec: EvalSpec, store: Store | None = None) -> metrics.TopK:
    """The baseline's top-k reference on the eval text, computed once per (model, text) and cached."""
    store = store or Store()
    chunks = eval_chunks(loaded, spec)

    def build(tmp: Path) -> dict:
        refs = [metrics.topk_reference(logits, targets, spec.k)
                for logits, targets in _logits(loaded.model, chunks, spec.batch_size, "baseline")]
        save_file(metrics.TopK.cat(refs).to_tensors(), str(tmp / "reference.safetensors"))
        return {"n_chunks": len(chunks), "ctx": spec.ctx}

    path = store.get_dir("baseline", _spec_key(loaded, spec), build)
    return metrics.TopK.from_tensors(load_file(str(path / "reference.safetensors")))


def compare(model: torch.nn.Module, loaded: LoadedModel, spec: EvalSpec, store: Store | None = None,
            label: str = "quantized") -> dict:
    """Per-token statistics of `model` against the baseline of `loaded`, summarised.

    Returns the summary of `qkit.metrics.summarize` plus per-chunk means (`chunk_kld`, `chunk_nll`,
    `chunk_nll_base`, `chunk_top1`) for bootstrapping, and the throughput of the forward passes.
    """
    ref = baseline(loaded, spec, store)
    chunks = eval_chunks(loaded, spec)
    per_row = spec.ctx - 1
    stats: dict[str, list[torch.Tensor]] = {}
    started, row = time.perf_counter(), 0
    for logits, targets in _logits(model, chunks, spec.batch_size, label):
        part = ref.slice(row, row + len(targets))
        for name, value in metrics.token_stats(part, logits, targets).items():
            stats.setdefault(name, []).append(value)
        row += len(targets)
    seconds = time.perf_counter() - started
    tok = {name: torch.cat(values) for name, values in stats.items()}
    base_nll = -ref.target_logp
    summary = metrics.summarize(tok, base_nll)

    def per_chunk(x: torch.Tensor) -> list[float]:
        return x.double().view(-1, per_row).mean(dim=1).tolist()

    summary.update(
        n_tokens=int(row), n_chunks=len(chunks), seconds=round(seconds, 3),
        tokens_per_second=round(row / seconds, 1),
        chunk_kld=per_chunk(tok["kld"]), chunk_nll=per_chunk(tok["nll"]),
        chunk_nll_base=per_chunk(base_nll), chunk_top1=per_chunk(tok["same_top1"]),
    )
    return summary
