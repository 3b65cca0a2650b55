"""(c) Wall time of `qkit report` for the methods notebook on the default model, cold and warm cache.

Cold: an empty cache, so the GGUF is dequantized, every method quantizes and the baseline runs.
Warm: the same command again, reading everything back. Target: warm ≤ 60 s.

    python benchmarks/report_wall_time.py [--model smollm2-135m] [--keep-cache DIR] [--out DIR] [-p key=value ...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cache: Path, out: Path, params: list[str]) -> float:
    cmd = [sys.executable, "-m", "qkit.cli", "report", "02_quantization_methods", "--out", str(out)]
    for p in params:
        cmd += ["-p", p]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "QKIT_CACHE": str(cache)})
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep-cache", type=Path, help="use this cache folder and leave it (default: a temp dir)")
    ap.add_argument("--out", type=Path, help="keep the reports here (default: a temp dir)")
    ap.add_argument("-p", "--param", action="append", default=[], help="extra notebook parameter")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.keep_cache or Path(tmp) / "cache"
        out = args.out or Path(tmp) / "reports"
        params = [f"model={args.model}", *args.param]
        cold = run(cache, out, params)
        warm = run(cache, out, params)
    print(f"qkit report 02_quantization_methods, model={args.model}")
    print(f"  cold cache: {cold:8.1f} s")
    print(f"  warm cache: {warm:8.1f} s   (target <= 60 s: {'met' if warm <= 60 else 'NOT met'})")


if __name__ == "__main__":
    main()
