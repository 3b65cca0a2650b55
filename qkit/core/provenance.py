"""What produced a result: library versions, the qkit commit, the hardware and the node it ran on."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import qkit

# The libraries whose behaviour changes numbers; their versions are part of every cache key.
LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "lm_eval", "datasets", "gguf")


@functools.cache
def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


@functools.cache
def hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(i)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(i)))
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def node() -> dict:
    """The machine a result is computed on: its host name and, in a process connected to Ray, the Ray
    node id (as ``ray list nodes`` shows it)."""
    out = {"host": socket.gethostname()}
    ray = sys.modules.get("ray")  # never imported here: a process that does not use Ray has no node id
    if ray is not None and ray.is_initialized():
        out["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return out


def collect() -> dict:
    return {"qkit": qkit.__version__, "git_commit": git_commit(), "libraries": library_versions(),
            "python": platform.python_version(), "hardware": hardware(), "node": node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
