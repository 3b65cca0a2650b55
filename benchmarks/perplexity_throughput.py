"""(b) qkit's evaluation throughput against lm-eval's HF backend (`loglikelihood_rolling`) on the same text.

Both score the same held-out tokens with the same model object, in windows of `ctx` tokens, with the
same torch thread setting, in one run; lm-eval runs at each of `--lm-eval-batches` and qkit is compared
with lm-eval's best. qkit's side is its full per-method evaluation: perplexity plus exact KL divergence,
top-1 agreement and Δp against the cached baseline, which is strictly more work than lm-eval's
log-likelihoods. Beside it the script prints the float forward alone (full logits, as the comparison
runs it) and the machine's matmul peak in the model's dtype, with the fraction of that peak the forward reaches. Targets: qkit ≥ 1.5× lm-eval's best tokens/s; the forward
≥ 50% of the matmul peak.

    python benchmarks/perplexity_throughput.py [--model smollm2-135m] [--tokens 8192] [--ctx 512] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from qkit import models
from qkit.evaluation import EvalSpec, baseline, compare, eval_chunks


def lm_eval_rolling(loaded: models.LoadedModel, text: str, ctx: int, batch_size: int) -> tuple[float, int, float]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device="cpu", batch_size=batch_size,
              max_length=ctx)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    n_tokens = len(lm.tok_encode(text))
    started = time.perf_counter()
    (loglik,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    seconds = time.perf_counter() - started
    return seconds, n_tokens, math.exp(-loglik / n_tokens)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` n×n×n matmuls in `dtype`, with the current torch threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def flops_per_token(model: torch.nn.Module, ctx: int) -> float:
    """Matmul FLOPs of one token's forward: every Linear (the output head included) plus attention's scores
    and values over an average ctx/2 earlier positions."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * 2 * (ctx / 2) * config.num_attention_heads * head_dim * config.num_hidden_layers
    return 2 * linear + attention


def forward(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """(seconds, tokens) of a model's forward with full logits over every batch, as compare runs it."""
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(chunks), batch_size):
            model(chunks[i:i + batch_size])
    return time.perf_counter() - started, chunks.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--dtype", default="float32", help="the model's dtype, on both sides (bfloat16 where the CPU "
                    "has native bf16 matmul)")
    ap.add_argument("--batch-size", type=int, default=4, help="qkit's batch size")
    ap.add_argument("--lm-eval-batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds; each figure is their median")
    args = ap.parse_args()
    loaded = models.resolve_model(args.model, dtype=args.dtype)
    spec = EvalSpec(n_tokens=args.tokens, ctx=args.ctx, batch_size=args.batch_size)
    baseline(loaded, spec)  # cached once per (model, text), as in every study; not timed
    chunks = eval_chunks(loaded, spec)
    text = loaded.tokenizer.decode(chunks.flatten())
    print(f"{args.model} ({args.dtype}): {args.tokens} tokens of held-out prose, windows of {args.ctx}, "
          f"{torch.get_num_threads()} torch threads; load average before: {open('/proc/loadavg').read().strip()}")

    runs: dict[str, list[float]] = {}  # tokens/s per round
    peaks, ppl = [], {}
    for _ in range(args.repeats):
        peaks.append(matmul_peak(loaded.model.dtype))
        result = compare(loaded.model, loaded, spec, label="qkit")
        runs.setdefault("qkit", []).append(result["tokens_per_second"])
        ppl["qkit"] = result["ppl_quant"]
        seconds, n = forward(loaded.model, chunks, args.batch_size)
        runs.setdefault("forward", []).append(n / seconds)
        for bs in args.lm_eval_batches:
            lm_s, lm_tokens, ppl[bs] = lm_eval_rolling(loaded, text, args.ctx, bs)
            runs.setdefault(bs, []).append(lm_tokens / lm_s)
    tps = {name: statistics.median(values) for name, values in runs.items()}
    peak = statistics.median(peaks)
    forward_gflops = tps["forward"] * flops_per_token(loaded.model, args.ctx) / 1e9
    best = max(args.lm_eval_batches, key=lambda bs: tps[bs])
    ratio = tps["qkit"] / tps[best]
    print(f"  qkit evaluate, batch {args.batch_size} (ppl+KLD+top1+Δp): {tps['qkit']:8.1f} tokens/s  "
          f"(ppl {ppl['qkit']:.3f})")
    print(f"  float forward alone, batch {args.batch_size}: {tps['forward']:8.1f} tokens/s = {forward_gflops:.1f} "
          f"GFLOP/s = {forward_gflops / peak:.0%} of the {args.dtype} matmul peak {peak:.1f} GFLOP/s "
          f"(target >= 50%: {'met' if forward_gflops >= 0.5 * peak else 'NOT met'})")
    for bs in args.lm_eval_batches:
        print(f"  lm-eval loglikelihood_rolling, batch {bs}: {tps[bs]:8.1f} tokens/s (ppl {ppl[bs]:.3f}); "
              f"qkit / lm-eval = {tps['qkit'] / tps[bs]:.2f}")
    print(f"  qkit / lm-eval's best (batch {best}) = {ratio:.2f} (target >= 1.5: {'met' if ratio >= 1.5 else 'NOT met'})")
    print(f"  median of {args.repeats} interleaved round(s); load average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
