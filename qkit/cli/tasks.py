"""`qkit tasks` and `qkit sensitivity`: the offline lm-eval tasks and the task study."""
from __future__ import annotations

import argparse
import json

from qkit.cli import common


def cmd_tasks(args: argparse.Namespace) -> int:
    from qkit.evaluation import tasks
    from qkit.evaluation.tasks import user

    rows = tasks.item_counts(user.include(args.include_path))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    common.print_table(("task", "family", "items", "metric", "source"),
                 [(r["task"], r["family"], r["items"], r["metric"], r["source"]) for r in rows])
    print(f"\nlm-eval include path: {tasks.TASK_DIR}  (passkey items: default lengths x depths x per-cell)")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from qkit.studies import task_sensitivity as sensitivity

    split = lambda text: [m.strip() for m in text.split(",") if m.strip()] if text else None  # noqa: E731
    from qkit.evaluation.tasks import user

    config = sensitivity.config(args.profile, model=args.model, methods=split(args.methods), tasks=split(args.tasks),
                                include_path=args.include_path, families=user.parse_families(args.family) or None,
                                limit=args.limit, trust_remote_code=args.trust_remote_code,
                                context_lengths=common.ints(args.context_lengths) if args.context_lengths else None,
                                calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    res = sensitivity.run(config)
    fam = sensitivity.family_table(res)
    if args.json:
        print(json.dumps({"families": fam.to_dict("records"), "tasks": sensitivity.task_table(res).to_dict("records"),
                          "meta": res.meta}, indent=2, default=str))
        return 0
    print(res.tables()["by family"].to_string())
    print()
    print("\n".join(line.replace("**", "").replace("*", "") for line in res.findings()))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="list the offline lm-eval tasks with item counts and sources")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--include-path", default=None, metavar="DIR", help="list your lm-eval YAML tasks in DIR too")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("sensitivity", help="score methods on task families (arithmetic, code, long context, summarization, "
                                         "commonsense, truthfulness, and your own lm-eval tasks)")
    common.model_args(p)
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: the profile's, fp8_dynamic,w8a8_int8,w4a16_gptq,w4a16_awq)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks or families (default: all; see `qkit tasks`)")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="also your lm-eval YAML tasks in DIR (as lm_eval --include_path), named in --tasks")
    p.add_argument("--family", action="append", metavar="FAMILY=TASK",
                   help="the family of one of your tasks, e.g. code=my_task (repeatable; default: its own)")
    p.add_argument("--profile", default="quick", help="quick (minutes on a CPU) or full (default quick)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: the profile's)")
    p.add_argument("--context-lengths", default=None, metavar="N,N,...",
                   help="passkey context lengths in tokens (default: the profile's; quick 512,1024, full to 8192)")
    common.calib_args(p, profile=True)
    p.add_argument("--json", action="store_true", help="print the family and task tables as JSON")
    p.set_defaults(func=cmd_sensitivity)
