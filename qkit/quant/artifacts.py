"""What qkit reads from a checkpoint directory and records while building one: the safetensors headers
and sizes, the saved format, and the time and memory a build took."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from qkit.core.errors import QkitError


def saved_format(path: Path) -> str:
    """The compressed-tensors format a checkpoint directory was saved in."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text())["quantization_config"]["format"]
    except (OSError, ValueError, KeyError, TypeError):
        raise QkitError(f"{path} is not a compressed-tensors checkpoint (no quantization_config format "
                        "in config.json)",
                        "pass a directory made by qkit.quant.methods.quantize (Checkpoint.path)") from None


def checkpoint_format(path: Path) -> str:
    """What a checkpoint made anywhere says it is: its compressed-tensors format, its quant_method (gptq,
    awq), or "float" when config.json names no quantization."""
    config = json.loads((Path(path) / "config.json").read_text())
    quant = config.get("quantization_config")
    if not quant:
        return "float"
    return quant.get("format") if quant.get("quant_method") == "compressed-tensors" else quant.get("quant_method")


def checkpoint_tensors(path: Path) -> list[tuple[str, str, int]]:
    """(name, dtype, bytes) of every tensor in a directory's safetensors files, read from their headers."""
    out = []
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        out += [(name, t["dtype"], t["data_offsets"][1] - t["data_offsets"][0])
                for name, t in header.items() if name != "__metadata__"]
    return out


def safetensors_sizes(path: Path) -> tuple[int, int]:
    """(bytes on disk, number of float32 elements) of a directory's safetensors files."""
    size = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    return size, sum(nbytes // 4 for _, dtype, nbytes in checkpoint_tensors(path) if dtype == "F32")


@contextlib.contextmanager
def measure_cost() -> Iterator[dict[str, float]]:
    """Wall time and resident memory of a block, filled in on exit as a checkpoint manifest's fields:
    seconds, peak_rss_bytes and rss_growth_bytes (the peak above the block's start)."""
    cost: dict[str, float] = {}
    started = time.perf_counter()
    with _rss_sampler() as rss:
        yield cost
    cost.update(seconds=round(time.perf_counter() - started, 3), peak_rss_bytes=rss["peak"],
                rss_growth_bytes=rss["peak"] - rss["start"])


@contextlib.contextmanager
def _rss_sampler(interval_s: float = 0.05) -> Iterator[dict[str, int]]:
    """Resident memory at the start of the block and its peak during it, sampled from /proc.

    ru_maxrss would give the process's peak so far, which in a sweep of many runs in one process repeats
    the largest earlier run. Where /proc is missing (macOS) that is what is reported.
    """
    statm = Path("/proc/self/statm")
    if not statm.exists():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"start": 0, "peak": peak if sys.platform == "darwin" else peak * 1024}
        yield out
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(statm.read_text().split()[1]) * page

    out = {"start": rss(), "peak": rss()}
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            out["peak"] = max(out["peak"], rss())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = max(out["peak"], rss())
