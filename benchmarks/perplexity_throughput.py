"""(b) qkit's evaluation throughput against lm-eval's HF backend (`loglikelihood_rolling`) on the same text.

Both score the same held-out tokens with the same model object, in windows of `ctx` tokens, with the
same torch thread setting; lm-eval runs at its default batch size (1) and at qkit's. qkit's side is its full per-method evaluation: perplexity
plus exact KL divergence and top-1 agreement against the cached baseline, which is strictly more work
than lm-eval's log-likelihoods. Target: qkit ≥ 1.5× lm-eval's tokens/s.

    python benchmarks/perplexity_throughput.py [--model smollm2-135m] [--tokens 8192] [--ctx 512]
"""
from __future__ import annotations

import argparse
import math
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    loaded = models.resolve_model(args.model)
    spec = EvalSpec(n_tokens=args.tokens, ctx=args.ctx, batch_size=args.batch_size)
    baseline(loaded, spec)  # cached once per (model, text), as in every study; not timed
    text = loaded.tokenizer.decode(eval_chunks(loaded, spec).flatten())

    started = time.perf_counter()
    result = compare(loaded.model, loaded, spec, label="qkit")
    q_s = time.perf_counter() - started
    q_tps = result["n_tokens"] / q_s
    print(f"{args.model}: {args.tokens} tokens of held-out prose, windows of {args.ctx}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"  qkit evaluate, batch {args.batch_size} (ppl+KLD+top1): {q_tps:8.1f} tokens/s  "
          f"({result['n_tokens']} tokens in {q_s:.1f} s, ppl {result['ppl_quant']:.3f})")
    for bs in dict.fromkeys((1, args.batch_size)):
        lm_s, lm_tokens, lm_ppl = lm_eval_rolling(loaded, text, args.ctx, bs)
        ratio = q_tps / (lm_tokens / lm_s)
        print(f"  lm-eval loglikelihood_rolling, batch {bs}: {lm_tokens / lm_s:8.1f} tokens/s  ({lm_tokens} tokens in "
              f"{lm_s:.1f} s, ppl {lm_ppl:.3f}); qkit / lm-eval = {ratio:.2f} "
              f"(target >= 1.5: {'met' if ratio >= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
