"""`qkit methods`, `qkit quantize`, `qkit evaluate`: the registry, one checkpoint, one evaluation."""
from __future__ import annotations

import argparse
import json

from qkit.cli import common


def cmd_methods(args: argparse.Namespace) -> int:
    from qkit.quant.registry import BACKEND_METHODS, METHODS, RECIPE_DIR, STUDY_METHODS

    common.print_table(("method", "format", "bits", "group", "calibration", "in study", "runs natively on"),
                       [(m.name, m.weight_format, f"W{m.weight_bits}A{m.act_bits or 16}", m.group_size or "-",
                         "yes" if m.needs_calibration else "no", "yes" if m.name in STUDY_METHODS else "no",
                         m.native_hardware) for m in (METHODS | BACKEND_METHODS).values()])
    print(f"\nllm-compressor recipes: {RECIPE_DIR}; pass your own as --method recipe:FILE.yaml")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qkit import models
    from qkit.quant import methods, registry

    method, calib = registry.get_method(args.method), common.calib(args)  # bad input fails before a model loads
    loaded = models.resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    ckpt = methods.quantize(loaded, method, calib=calib)
    print(ckpt.path)
    print(f"size on disk: {ckpt.size_bytes / 1e6:.1f} MB ({ckpt.bf16_run_bytes / 1e6:.1f} MB had the float "
          f"parts been saved in BF16); model in BF16: {ckpt.bf16_bytes / 1e6:.1f} MB; "
          f"ratio to BF16: {ckpt.bf16_ratio:.3f} ({1 / ckpt.bf16_ratio:.2f}x smaller)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qkit import models
    from qkit.data import check_disjoint
    from qkit.quant import variants
    from qkit.studies import quantization_methods as studies

    variants.check(args.method)  # bad input fails before a model loads
    calib = common.calib(args)
    config = studies.config("quick", eval_text=args.eval_text, eval_tokens=args.tokens, ctx=args.ctx)
    check_disjoint(calib.name, config.eval_text)
    loaded = models.resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    row = studies.evaluate(loaded, variants.parse(loaded, args.method, calib=calib), config.eval_spec)
    if args.json:
        print(json.dumps(row, indent=2, default=str))
        return 0
    print(f"{row['method']} on {args.model}, {row['n_tokens']} tokens of held-out {config.eval_text}")
    print(f"  perplexity       {row['ppl_quant']:.3f}  (baseline {row['ppl_base']:.3f}; "
          f"95% CI {row['ppl_quant_low']:.3f}-{row['ppl_quant_high']:.3f})")
    print(f"  KLD mean         {row['kld_mean']:.5f}  (95% CI {row['kld_mean_low']:.5f}-{row['kld_mean_high']:.5f})")
    for name in ("median", "p90", "p99", "p99.9", "max"):
        print(f"  KLD {name:<12} {row['kld_' + name]:.5f}")
    print(f"  top-1 agreement  {row['top1_pct']:.2f}%  (95% CI {row['top1_pct_low']:.2f}-{row['top1_pct_high']:.2f})")
    print(f"  mean delta p     {row['mean_dp_pct']:+.3f}%")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the quantization methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("quantize", help="quantize a model with one method; prints the checkpoint path")
    common.model_args(p)
    p.add_argument("--method", required=True, metavar="METHOD|recipe:FILE",
                   help="a method from `qkit methods`, or recipe:FILE.yaml (an llm-compressor recipe)")
    common.calib_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="perplexity, KL divergence and top-1 agreement against the baseline")
    common.model_args(p)
    p.add_argument("--method", required=True, metavar="VARIANT",
                   help="a method from `qkit methods`, recipe:FILE.yaml, or a checkpoint made elsewhere: a "
                        "directory (compressed-tensors, GPTQ, AWQ or float), a .gguf file or a cached hub id")
    common.calib_args(p)
    p.add_argument("--eval-text", metavar="NAME|PATH",
                   help="held-out text: prose, chat, code, or a data file whose held-out split (1 document in 10) "
                        "is used (default: the methods study's, prose)")
    p.add_argument("--tokens", type=int, help="evaluation tokens (default: the methods study's quick profile)")
    p.add_argument("--ctx", type=int, help="tokens per evaluation chunk (default: the methods study's)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_evaluate)
