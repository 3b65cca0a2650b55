"""`qkit kv plan` and `qkit kv evaluate`: the KV-cache planner and the KV study."""
from __future__ import annotations

import argparse

from qkit import DEFAULT_MODEL
from qkit.cli import common


def cmd_kv_plan(args: argparse.Namespace) -> int:
    from qkit.plan import kv

    split = lambda text, parse=lambda t: t.split(","): parse(text) if text else None  # noqa: E731
    plan = kv.plan(args.model, device_memory=args.device_memory, **common.given(
        contexts=split(args.context, common.ints), batches=split(args.batch, common.ints),
        formats=split(args.formats), weights=split(args.weights)))
    if args.json:
        print(plan.to_json(orient="records", indent=2))
        return 0
    print(kv.plan_table(plan).to_string())
    print()
    print("\n".join(kv.plan_summary(plan)))
    return 0


def cmd_kv_evaluate(args: argparse.Namespace) -> int:
    from qkit.studies import kv_cache as kvcache

    config = kvcache.config(args.profile, model=args.model, schemes=args.scheme.split(",") if args.scheme else None,
                            n_tokens=args.tokens, n_docs=args.docs, trust_remote_code=args.trust_remote_code,
                            context_lengths=common.ints(args.context_lengths) if args.context_lengths else None)
    return common.print_result(kvcache.run(config))


def add_commands(sub: argparse._SubParsersAction) -> None:
    kv = sub.add_parser("kv", help="KV-cache memory planner and quality").add_subparsers(
        dest="kv_command", required=True, metavar="COMMAND")
    p = kv.add_parser("plan", help="KV-cache and weight memory per context, batch and precision")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name (smollm2-135m, llama-3.1-8b, llama-3.1-70b, qwen2.5-7b), hub id of one of "
                        "those, or a config.json / model directory")
    p.add_argument("--context", help="context lengths, comma-separated (default: 1K to 128K, doubling)")
    p.add_argument("--batch", help="batch sizes, comma-separated (default: the planner's, 1,8,32)")
    p.add_argument("--formats", help="KV cache formats: bf16, fp8, int8, int4 (default: bf16,fp8,int4)")
    p.add_argument("--weights", help="weight precisions: bf16, fp8, int8, int4, nvfp4 (default: bf16,fp8,int4)")
    p.add_argument("--device-memory", help="device memory to fit in, e.g. 80GB")
    p.add_argument("--json", action="store_true", help="print the plan's rows as JSON")
    p.set_defaults(func=cmd_kv_plan)
    p = kv.add_parser("evaluate", help="quality by position and passkey retrieval of KV-cache schemes")
    common.model_args(p)
    p.add_argument("--scheme", default=None,
                   help="schemes, comma-separated: fp8_tensor, fp8_head, fp8_unit, fp8_static+fp8_head, "
                        "fp8_static, hqq_int8, hqq_int4, quanto_int4 (default: the profile's)")
    p.add_argument("--profile", default="quick", choices=["quick", "full"])
    p.add_argument("--tokens", type=int, help="tokens per long document (default: the profile's)")
    p.add_argument("--docs", type=int, help="long documents (default: the profile's)")
    p.add_argument("--context-lengths", help="passkey lengths, comma-separated (default: the profile's)")
    p.set_defaults(func=cmd_kv_evaluate)
