"""`qkit report`: the notebooks executed into HTML reports."""
from __future__ import annotations

import argparse

from qkit.cli import common


def cmd_report(args: argparse.Namespace) -> int:
    from qkit.report import run_report

    records = run_report(args.notebooks or None, dict(args.param), args.out, executor=args.executor,
                         ray_address=args.ray_address, jobs=args.jobs)
    return 1 if any(r["status"] != "ok" for r in records) else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="execute notebooks into HTML reports under reports/")
    p.add_argument("notebooks", nargs="*", help="notebook names (default: all in notebooks/)")
    p.add_argument("-p", "--param", type=common.param, action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter, value in YAML (repeatable), e.g. -p model=tiny")
    p.add_argument("--out", default="reports", help="output folder (default reports/)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="ray: run the notebooks, and their studies' cells, as Ray tasks in parallel (default local)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="the Ray cluster's head (`ray start --head` prints it); default: a local Ray instance")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="notebooks run at once with the local executor, each in its own kernel (default 1)")
    p.set_defaults(func=cmd_report)

