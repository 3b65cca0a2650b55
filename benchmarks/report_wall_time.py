"""(c) Wall time of the main job, `qkit report` (every notebook), cold and warm, from a fresh clone.

Cold: a fresh clone of this repository's HEAD and an empty cache, so the GGUF is dequantized, every
method quantizes and every baseline runs. Warm: the same command again in that clone, reading everything
back. Per notebook, from the report index. Targets: cold <= 20 min, warm <= 60 s (on 2 idle cores).
Run it alone on the machine: other work on the cores lengthens every figure.

    python benchmarks/report_wall_time.py [NOTEBOOK ...] [--keep DIR] [-p key=value ...] [--jobs N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(clone: Path, cache: Path, notebooks: list[str], params: list[str], jobs: int) -> tuple[float, dict[str, dict]]:
    cmd = [sys.executable, "-c", "import sys; from qkit.cli.main import main; sys.exit(main())", "report",
           "--jobs", str(jobs), *notebooks]
    for p in params:
        cmd += ["-p", p]
    started = time.perf_counter()
    # PYTHONPATH: the clone's qkit, not the installed one, so that the figures are HEAD's.
    subprocess.run(cmd, check=False, cwd=clone, env={**os.environ, "QKIT_CACHE": str(cache), "PYTHONPATH": str(clone)})
    wall = time.perf_counter() - started
    return wall, json.loads((clone / "reports" / "index.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: all, as `make report`)")
    ap.add_argument("--keep", type=Path, help="clone and cache here, and leave them (default: a temp dir)")
    ap.add_argument("-p", "--param", action="append", default=[], help="notebook parameter, e.g. model=tiny")
    ap.add_argument("--jobs", type=int, default=1, help="notebooks at once, as `qkit report --jobs` (default 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        clone, cache = root / "clone", root / "cache"
        if clone.exists() or cache.exists():
            sys.exit(f"{root} already holds a clone or a cache; a cold run needs neither (pass another --keep)")
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                                check=True).stdout.strip()
        cold, cold_index = run(clone, cache, args.notebooks, args.param, args.jobs)
        warm, warm_index = run(clone, cache, args.notebooks, args.param, args.jobs)
    print(f"qkit report {' '.join(args.notebooks) or '(all)'} at {commit}, {os.cpu_count()} cores, "
          f"params {args.param or 'defaults'}, --jobs {args.jobs}")
    print(f"  {'notebook':32s} {'cold s':>9s} {'warm s':>9s}  status")
    for name, record in cold_index.items():
        again = warm_index.get(name, {})
        print(f"  {name:32s} {record.get('seconds', float('nan')):9.1f} {again.get('seconds', float('nan')):9.1f}"
              f"  {record.get('status')}/{again.get('status')}")
    print(f"  {'whole command':32s} {cold:9.1f} {warm:9.1f}")
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"  cold <= 20 min: {verdict(cold <= 1200)}; warm <= 60 s: {verdict(warm <= 60)}")
    print(f"  load average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
