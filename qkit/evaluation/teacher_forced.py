"""Teacher-forced evaluation of a model against its unquantized baseline on held-out text (or on the
prompts of a task, for the KLD column of the task-sensitivity study).

The text is cut into equal chunks of `ctx` tokens, each scored independently (as llama.cpp's
perplexity tool does), every position predicting the next token. The baseline is run once per
(model, dtype, text) and kept as its final hidden states (after the final norm), not as logits; while a
quantized model is compared, the baseline's own output head (:func:`head_logits`) turns them back into
its exact logits, and the quantized model's head does the same for its own final hidden states, one block
of rows at a time, so the KLD is exact and no batch's full logits are ever made. Results keep
per-chunk means so that confidence intervals can be bootstrapped over chunks, the unit whose tokens are
independent enough to resample.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qkit import data
from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store
from qkit.evaluation import metrics, tasks
from qkit.models import LoadedModel

# The float model's final hidden states on an eval text, from which each comparison rebuilds its logits.
BASELINE = Kind("baseline", 1)

# Why hidden states: full float32 logits take V floats per token (llama.cpp's file is 37 GiB for Llama-3
# on wikitext), and a compact top-k summary is not exact enough. Measured on SmolLM2-135M (2,047 tokens,
# decoder Linear weights INT4 RTN group 128, exact mean KLD 0.756): the KLD over the baseline's top k
# tokens plus one tail bin fell short by 1.7e-2 nats at k = 1024 (8 KiB/token) and by 4e-3 at k = 4096.
# SmolLM2's next-token distributions are flat (2.3% of the mass lies outside the top 1024), so the
# shortfall is a near-constant ~2.4% of the KLD and no practical k reaches 1e-3. Final hidden states
# take H floats per token (576 for SmolLM2: 2.3 KB) and give the exact logits back.

# Not compiled: torch.compile (inductor, CPU) of SmolLM2-135M's decoder took 114 s to compile (124 s with
# freezing) on the 2-core Xeon shared with other jobs (load average 5-10), for 1.20x (1.31x) steady-state
# speed at batch 4 x 512 and outputs within 9e-5 of eager; a study's comparison of 8,192 tokens takes
# ~60 s per model eagerly there, and each variant is another model to compile, so it never pays back.

# A rebuilt logit may differ from the model's own by this fraction of the largest |logit|: float
# rounding only (the matmul may be blocked differently), far below anything that moves a KLD.
_HEAD_RTOL = 1e-4
# Rows per step of compare: both models' logits come from their final hidden states one block of rows at a
# time, and the metrics read the block while it is fresh, so no [batch x ctx, vocab] logits are made.
# Measured on SmolLM2-135M (8,192 tokens, batch 4 x 512, 2 threads, idle 2-core EPYC): 410 tokens/s with
# the whole batch (2,044 rows) at once, 413 at 64 rows, 465 at 128, 468 at 256, 456 at 512. Against the
# model's own full logits as before: 472 against 440 tokens/s (median of 3), peak RSS 1.55 against 2.62 GB.
_HEAD_ROWS = 256
# EvalSpec(domain="task:qkit_gsm8k") evaluates on a task's prompts instead of a held-out text.
TASK_PREFIX = "task:"


@dataclass(frozen=True)
class EvalSpec:
    domain: str = "prose"
    n_tokens: int = 8192
    ctx: int = 512
    batch_size: int = 4

    def key(self) -> dict:
        """The fields that change results, for cache keys: batch_size changes only speed; a user's file
        counts by its content."""
        key = {k: v for k, v in asdict(self).items() if k != "batch_size"}
        digest = None if self.domain.startswith(TASK_PREFIX) else data.fingerprint(self.domain)
        return {**key, "sha256": digest} if digest else key

    def __post_init__(self) -> None:
        if self.domain.startswith(TASK_PREFIX):
            tasks.get_task(self.domain.removeprefix(TASK_PREFIX))
        else:
            data.check_text(self.domain)
        for name in ("n_tokens", "ctx", "batch_size"):
            if getattr(self, name) <= 0:
                raise QkitError(f"{name} must be positive, got {getattr(self, name)}", f"pass a {name} above 0")
        if self.n_tokens < self.ctx:
            raise QkitError(f"n_tokens={self.n_tokens} is shorter than one chunk (ctx={self.ctx})",
                            "raise n_tokens or lower ctx")


class Baseline(NamedTuple):
    """The baseline on the eval text; row n is the position that predicts targets[n]."""

    hidden: torch.Tensor  # [N, H] float32 final hidden states, after the final norm
    targets: torch.Tensor  # [N] int64


def eval_chunks(loaded: LoadedModel, spec: EvalSpec) -> torch.Tensor:
    """[n_chunks, ctx] token ids of the held-out text; the remainder that fills no chunk is dropped."""
    data.check_seq_len(spec.ctx, loaded.info["max_length"])
    n = spec.n_tokens - spec.n_tokens % spec.ctx
    if spec.domain.startswith(TASK_PREFIX):

        task = tasks.get_task(spec.domain.removeprefix(TASK_PREFIX))
        return data.text_tokens(tasks.prompts(task, loaded.tokenizer, loaded.info["max_length"]), loaded.tokenizer, n,
                                f"the prompts of {task.name}").view(-1, spec.ctx)
    return data.eval_tokens(spec.domain, loaded.tokenizer, n).view(-1, spec.ctx)


def _decoder_pass(model: Any, ids: torch.Tensor, **forward: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states [B, L, H], logits [B, 1, V] of the last position) from one forward of the whole
    model, with one logit row kept; see :func:`final_hidden`."""
    captured: dict[str, torch.Tensor] = {}

    def keep(module: Any, args: Any, out: Any) -> None:  # returning None leaves the output as it is
        captured["hidden"] = out.last_hidden_state

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, logits_to_keep=1, **forward)
    finally:
        handle.remove()
    return captured["hidden"], out.logits


def final_hidden(model: Any, ids: torch.Tensor, **forward: Any) -> torch.Tensor:
    """Final hidden states [B, L, H] (after the final norm), taken from the decoder while the whole model
    runs (hooks on the model, such as compressed-tensors' decompression at the first forward, must run)
    with one logit row kept, so a long input costs no [L, vocab] logits. `forward` goes to the model's
    call: attention_mask, past_key_values, ..."""
    return _decoder_pass(model, ids, **forward)[0]


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits [..., V] from its final hidden states [..., H].

    Applies the output embeddings, then the logit scaling or soft-capping that some architectures add
    (Cohere's logit_scale, Granite's logits_scaling, Gemma 2/3's final_logit_softcapping), in the head's
    dtype as the models do, so that a bf16 model's logits come back bit for bit.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise QkitError(f"{type(model).__name__} has no output embeddings to turn hidden states into logits",
                        "evaluate a causal language model (an AutoModelForCausalLM)")
    config = model.config.get_text_config()
    with torch.inference_mode():
        logits = head(hidden.to(head.weight.device, head.weight.dtype))
        if (scale := getattr(config, "logit_scale", None)) is not None:
            logits = logits * scale
        if (scaling := getattr(config, "logits_scaling", None)) is not None:
            logits = logits / scaling
        if (cap := getattr(config, "final_logit_softcapping", None)) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


def _hidden_rows(model: Any, chunks: torch.Tensor, batch_size: int, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(final hidden states [b*(ctx-1), H], targets [b*(ctx-1)]) per batch of chunks; the last position
    predicts nothing in its chunk. The first batch checks that the model's logits can be rebuilt from its
    hidden states, against the last position's logits, which the model computes itself."""
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(chunks), batch_size), desc=desc, unit="batch", leave=False):
        batch = chunks[i:i + batch_size]
        hidden, last = _decoder_pass(model, batch.to(device))
        if i == 0:
            _check_head(model, desc, hidden[:, -1], last[:, -1])
        yield hidden[:, :-1].reshape(-1, hidden.shape[-1]), batch[:, 1:].reshape(-1)


def _check_head(model: Any, name: str, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    diff, scale = (head_logits(model, hidden) - logits.float()).abs().max(), logits.abs().max()
    if not diff <= _HEAD_RTOL * scale:  # also false for NaN
        raise QkitError(
            f"qkit cannot rebuild this model's logits from its hidden states ({name}, "
            f"{type(model).__name__}: max difference {diff:.3g} at logits up to {scale:.3g})",
            "evaluate a model whose logits are its output embeddings applied to its last hidden state "
            "(optionally scaled or soft-capped), as in Llama, Qwen, Mistral, Gemma and most causal LMs",
        )


def _spec_key(loaded: LoadedModel, spec: EvalSpec) -> dict:
    # The dtype changes the hidden states.
    return {"model": loaded.info["fingerprint"], "dtype": loaded.info["dtype"], **spec.key()}


def _baseline(loaded: LoadedModel, spec: EvalSpec, store: Store, chunks: torch.Tensor) -> Baseline:
    targets = chunks[:, 1:].reshape(-1)

    def build(tmp: Path) -> dict:
        parts = [h.float().cpu() for h, _ in _hidden_rows(loaded.model, chunks, spec.batch_size, "baseline")]
        hidden = torch.cat(parts)
        save_file({"hidden": hidden, "targets": targets.contiguous()}, str(tmp / "baseline.safetensors"))
        return {"n_chunks": len(chunks), "ctx": spec.ctx, "hidden_size": hidden.shape[1]}

    path = store.get_dir(BASELINE, _spec_key(loaded, spec), build)
    saved = load_file(str(path / "baseline.safetensors"))
    if not torch.equal(saved["targets"], targets):
        raise QkitError(f"the cached baseline {path} was computed on other tokens than the {spec.domain} "
                        "eval text gives now", f"delete {path}; the next run rebuilds it")
    return Baseline(saved["hidden"], saved["targets"])


def baseline(loaded: LoadedModel, spec: EvalSpec, store: Store | None = None) -> Baseline:
    """The baseline's final hidden states on the eval text, computed once per (model, dtype, text) and cached."""
    return _baseline(loaded, spec, store or Store(), eval_chunks(loaded, spec))


def compare(model: torch.nn.Module, loaded: LoadedModel, spec: EvalSpec, store: Store | None = None,
            label: str = "quantized") -> dict:
    """Per-token statistics of `model` against the baseline of `loaded`, summarised.

    Returns the summary of `qkit.metrics.summarize` plus per-chunk means (`chunk_kld`, `chunk_nll`,
    `chunk_nll_base`, `chunk_top1`) for bootstrapping, and the throughput of the comparison.
    """
    chunks = eval_chunks(loaded, spec)
    ref = _baseline(loaded, spec, store or Store(), chunks)
    per_row = spec.ctx - 1
    stats: dict[str, list[torch.Tensor]] = {}
    started, row = time.perf_counter(), 0
    for hidden_q, targets in _hidden_rows(model, chunks, spec.batch_size, label):
        for start in range(0, len(targets), _HEAD_ROWS):
            end = min(start + _HEAD_ROWS, len(targets))
            logits_p = head_logits(loaded.model, ref.hidden[row + start:row + end])
            logits_q = head_logits(model, hidden_q[start:end]).to(logits_p.device)
            for name, value in metrics.token_stats(logits_p, logits_q, targets[start:end].to(logits_p.device)).items():
                stats.setdefault(name, []).append(value.cpu())
        row += len(targets)
    seconds = time.perf_counter() - started
    tok = {name: torch.cat(values) for name, values in stats.items()}
    summary = metrics.summarize(tok)

    def per_chunk(x: torch.Tensor) -> list[float]:
        return x.double().view(-1, per_row).mean(dim=1).tolist()

    summary.update(
        n_tokens=int(row), n_chunks=len(chunks), seconds=round(seconds, 3),
        tokens_per_second=round(row / seconds, 1),
        chunk_kld=per_chunk(tok["kld"]), chunk_nll=per_chunk(tok["nll"]),
        chunk_nll_base=per_chunk(tok["nll_base"]), chunk_top1=per_chunk(tok["same_top1"]),
    )
    return summary
