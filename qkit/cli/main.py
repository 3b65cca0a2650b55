"""The `qkit` command: one module per command group, each adding its subcommands to the parser."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qkit.cli import advise, cache, calib, drift, kv, layers, quant, report, tasks
from qkit.core.errors import QkitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkit", description="Quantize an LLM and measure what it costs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (quant, tasks, calib, kv, layers, drift, advise, report, cache):
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QkitError as e:
        print(f"qkit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `qkit ... | head` closed the pipe: what was asked for has been read
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
