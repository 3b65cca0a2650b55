"""`qkit advise`: which method for a GPU, and the memory plan."""
from __future__ import annotations

import argparse

from qkit.cli import common


def cmd_advise(args: argparse.Namespace) -> int:
    from qkit.plan import hardware

    model = args.model if args.model or args.model_size else hardware.DEFAULT_PLAN_MODEL
    advice = hardware.advise(args.gpu, model=model, model_size=args.model_size, context=args.context,
                             batch=args.batch, memory_gb=args.memory)
    print("\n".join(hardware.summary(advice)))
    print(f"\nMemory for {advice.n_params / 1e9:.2f}B parameters"
          + (f", KV cache (BF16) at {advice.context} tokens x batch {advice.batch}" if advice.shape else
             " (give --model for the KV cache)") + ":")
    t = advice.table
    common.print_table(("precision", "bits/weight", "weights GB", "KV GB", "total GB", "fits", "room for KV GB"),
                 [(p, f"{r['bits per weight']:.3g}", f"{r['weights GB']:.1f}",
                   "-" if r["KV cache GB"] is None or r["KV cache GB"] != r["KV cache GB"] else f"{r['KV cache GB']:.1f}",
                   f"{r['total GB']:.1f}", "-" if r["fits"] is None else ("yes" if r["fits"] else "no"),
                   "-" if r["room for KV GB"] is None or r["room for KV GB"] != r["room for KV GB"]
                   else f"{r['room for KV GB']:.1f}") for p, r in t.iterrows()])
    print("\nShould you quantize?")
    print("\n".join(hardware.checklist(advice)))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("advise", help="recommend a method for a GPU (or this machine) and plan the memory")
    p.add_argument("--gpu", default=None, help="a GPU from the hardware table, e.g. A100, H100, B200, RTX 4090, "
                                               "apple, cpu (default: detect this machine)")
    p.add_argument("--model", default=None, help="built-in name or config.json / model directory (default "
                                                 "llama-3.1-8b unless --model-size is given)")
    p.add_argument("--model-size", default=None, help="parameter count such as 70B or 135M (overrides the model's)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence for the KV cache (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences in flight (default 1)")
    p.add_argument("--memory", default=None, help="device memory to plan against, e.g. 24GB (default: the table's "
                                                  "or this machine's)")
    p.set_defaults(func=cmd_advise)
