"""Each method's emulated forward against the float forward, on the same chunks of held-out prose.

A CPU evaluates most checkpoints by emulation (compressed-tensors fake-quantizes activations on every
forward, GGUF and low-bit weights are dequantized), so a method's evaluation can cost a multiple of the
float model's. Rounds are interleaved (float, then each method) and each figure is their median. Only
checkpoints already in the store are timed; the others are listed with the command that builds them.

    python benchmarks/method_forward.py [--model smollm2-135m] [--tokens 2048] [--ctx 512] [--batch-size 4]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from perplexity_throughput import forward

from qkit import models
from qkit.core.store import Store
from qkit.evaluation import EvalSpec, eval_chunks
from qkit.quant import methods, registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(registry.STUDY_METHODS))
    args = ap.parse_args()
    loaded = models.resolve_model(args.model)
    chunks = eval_chunks(loaded, EvalSpec(n_tokens=args.tokens, ctx=args.ctx, batch_size=args.batch_size))
    store = Store()
    found, missing = {"float": loaded.model}, []
    for name in args.methods:
        path = store.lookup(methods.CHECKPOINT, methods.checkpoint_spec(loaded, name))
        if path is None:
            missing.append(name)
        else:
            found[name] = methods.load_quantized(path)
    print(f"{args.model}: {chunks.numel()} tokens in windows of {args.ctx}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads; load average before: {open('/proc/loadavg').read().strip()}")
    seconds: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(args.repeats):
        for name, model in found.items():
            seconds[name].append(forward(model, chunks, args.batch_size)[0])
    float_s = statistics.median(seconds["float"])
    for name, values in seconds.items():
        s = statistics.median(values)
        print(f"  {name:28s} {s:7.2f} s  {chunks.numel() / s:7.1f} tokens/s  {s / float_s:5.2f}x the float forward")
    for name in missing:
        print(f"  {name:28s} not in the store (build it: qkit quantize --method {name})")
    print(f"  median of {args.repeats} interleaved rounds; load average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
