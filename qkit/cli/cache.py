"""`qkit cache clean`: remove what dead builders left in the store and show what the store holds."""
from __future__ import annotations

import argparse

from qkit.cli import common


def cmd_cache_clean(args: argparse.Namespace) -> int:
    from qkit.core.store import Store

    store = Store(args.root)
    for path in store.clean():
        print(f"removed {path} (left by a builder that is gone)")
    usage = store.usage()
    print(f"store {store.root}:")
    common.print_table(("kind", "entries", "size (MB)"),
                       [(kind, n, f"{size / 1e6:.1f}") for kind, (n, size) in usage.items()]
                       + [("total", sum(n for n, _ in usage.values()),
                           f"{sum(s for _, s in usage.values()) / 1e6:.1f}")])
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache", help="the store of cached results").add_subparsers(
        dest="cache_command", required=True, metavar="COMMAND")
    p = cache.add_parser("clean", help="remove the building directories of dead builders; print the size by kind")
    p.add_argument("--root", default=None, help="the store's folder (default: $QKIT_CACHE or ~/.cache/qkit)")
    p.set_defaults(func=cmd_cache_clean)
