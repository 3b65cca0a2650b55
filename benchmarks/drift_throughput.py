"""Drift scoring throughput: requests per second of `qkit.evaluation.served.measure`, batched against one request at
a time, on the same requests and models.

The requests are qkit's sample drift prompts (arithmetic, prose, code and chat; `check` dropped so that
only teacher-forced scoring is timed, not the reference's answers) each with a fixed completion of
`--completion-tokens` tokens of held-out prose. Both runs compute the same measures (KLD, top-1
agreement, served-token agreement, reference log-probability); the script prints their largest
differences. With the reference as its own "quantized" model they agree to float rounding; FP8 rounds
activations to a coarse grid, so a float difference of one ulp from another batch shape can move a value
to the next FP8 step, and an argmax near a tie can flip.

    QKIT_CACHE=... python benchmarks/drift_throughput.py [--model smollm2-135m] [--method fp8_dynamic]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from qkit import data, models
from qkit.data import request_log
from qkit.evaluation import served as serving
from qkit.quant import variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="fp8_dynamic")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--completion-tokens", type=int, default=32)
    args = ap.parse_args()
    loaded = models.resolve_model(args.model)
    served = variants.parse(loaded, args.method)
    tok = loaded.tokenizer
    prose = data.eval_tokens("prose", tok, n_tokens=64 * args.completion_tokens).view(64, -1)
    requests = [dataclasses.replace(r, check=None, fields={}, completion=tok.decode(prose[i % len(prose)]),
                                    completion_ids=tuple(prose[i % len(prose)].tolist()))
                for i, r in enumerate(request_log.read_log(request_log.SAMPLE_PROMPTS).requests)]
    serving.measure(loaded, served.model, requests[:2], serving.DriftConfig(batch_size=2))  # warm-up, not timed
    timings, results = {}, {}
    for bs in (1, args.batch_size):
        started = time.perf_counter()
        results[bs] = serving.measure(loaded, served.model, requests, serving.DriftConfig(batch_size=bs))
        timings[bs] = time.perf_counter() - started
    n_tokens = sum(len(tok(r.prompt)["input_ids"]) + args.completion_tokens for r in requests)
    diff = {m: max(abs(a[m] - b[m]) for a, b in zip(results[1], results[args.batch_size]))
            for m in ("kld", "top1", "served_top1", "ref_logprob")}
    print(f"{args.model} against {args.method}: {len(requests)} requests, {n_tokens} tokens "
          f"({args.completion_tokens} completion tokens each), {torch.get_num_threads()} torch thread(s)")
    for bs, s in timings.items():
        print(f"  batch {bs:>2}: {len(requests) / s:6.2f} requests/s  ({s:.1f} s)")
    print(f"  batched / unbatched = {timings[1] / timings[args.batch_size]:.2f}")
    print("  largest per-request difference, batched vs unbatched: "
          + ", ".join(f"{m} {d:.2e}" for m, d in diff.items()))


if __name__ == "__main__":
    main()
