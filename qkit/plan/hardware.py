"""The hardware advisor: which method fits a machine, and whether the model fits its memory.

The accelerators and the seed's recommendations are data (``datafiles/hardware.json``); what a chip runs
natively is derived from its compute capability with the same thresholds the method registry states
(:mod:`qkit.methods`' Hardware entries), so the two cannot disagree. Memory comes from
:mod:`qkit.plan.memory` (weights at each precision) and :mod:`qkit.plan.kv` (the KV cache).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from qkit.core.errors import QkitError
from qkit.plan import kv, memory
from qkit.plan.memory import GB, ModelShape
from qkit.quant.formats import WEIGHT_FORMATS
from qkit.quant.registry import FP4_GPUS, FP8_GPUS, INT4_GPUS, INT8_GPUS, Hardware

if TYPE_CHECKING:
    import pandas as pd

# What the table shows a chip runs natively, by the registry's thresholds.
KERNELS: dict[str, Hardware] = {"FP8": FP8_GPUS, "INT8": INT8_GPUS, "Marlin INT4": INT4_GPUS, "FP4": FP4_GPUS}
DEFAULT_PLAN_MODEL = "llama-3.1-8b"  # what `qkit advise` plans for when told no model
PRECISIONS = tuple(WEIGHT_FORMATS)


@dataclass(frozen=True)
class Device:
    name: str
    vendor: str  # nvidia, apple or cpu
    generation: str
    capability: tuple[int, int] | None  # CUDA compute capability; None off NVIDIA
    memory_gb: float | None  # None: unknown (the CPU row plans without a memory check)
    aliases: tuple[str, ...] = ()
    detected: str = ""  # how detect() found it; empty for a table row

    def runs(self, hw: Hardware) -> bool:
        """Whether the chip has the native kernels `hw` names."""
        return self.capability is not None and self.capability >= hw.min_capability

    @property
    def kernels(self) -> dict[str, bool]:
        return {name: self.runs(hw) for name, hw in KERNELS.items()}


@dataclass(frozen=True)
class Rule:
    """One row of the seed's table: which precision and methods suit which chips, and why."""
    precision: str
    methods: tuple[str, ...]
    why: str
    alternative: str
    min_capability: tuple[int, int] | None = None
    vendors: tuple[str, ...] = ()

    def matches(self, device: Device) -> bool:
        if self.min_capability is not None:
            return device.capability is not None and device.capability >= self.min_capability
        return device.vendor in self.vendors


@functools.cache
def _table() -> dict:
    return json.loads(resources.files("qkit").joinpath("datafiles/hardware.json").read_text())


def devices() -> dict[str, Device]:
    """The hardware table, by name."""
    return {g["name"]: Device(name=g["name"], vendor=g["vendor"], generation=g["generation"],
                              capability=tuple(g["capability"]) if g["capability"] else None,
                              memory_gb=g["memory_gb"], aliases=tuple(g.get("aliases", ())))
            for g in _table()["gpus"]}


def rules() -> list[Rule]:
    return [Rule(precision=r["precision"], methods=tuple(r["methods"]), why=r["why"], alternative=r["alternative"],
                 min_capability=tuple(r["min_capability"]) if "min_capability" in r else None,
                 vendors=tuple(r.get("vendors", ()))) for r in _table()["rules"]]


def _key(text: str) -> str:
    """Names compare without case, spaces or dashes: "rtx-4090" is "RTX 4090"."""
    return re.sub(r"[\s_\-]", "", text.lower())


def get_device(name: str) -> Device:
    """A row of the hardware table by name or alias, e.g. "A100", "rtx 4090", "apple", "cpu"."""
    for device in devices().values():
        if _key(name) in {_key(device.name), *map(_key, device.aliases)}:
            return device
    raise QkitError(f"unknown GPU or device {name!r}",
                    f"use one of {', '.join(devices())} (or omit --gpu to plan for this machine)")


def _ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return None


def available_ram_bytes() -> int | None:
    """Host memory a new process could take now without swapping (Linux's MemAvailable, which counts
    reclaimable page cache; elsewhere the free pages), or None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def detect() -> Device:
    """This machine: the first CUDA GPU (name, capability and memory from torch), else Apple Silicon
    (MPS, with unified memory = RAM), else the CPU with its RAM."""
    import torch

    table = devices()
    if torch.cuda.is_available():
        cuda_name = torch.cuda.get_device_name(0)
        capability = tuple(torch.cuda.get_device_capability(0))
        # "NVIDIA H100 80GB HBM3" is the H100 row; the longest name wins so "L40S" is not "L4"
        known = [d for d in table.values() if d.vendor == "nvidia" and _key(d.name) in _key(cuda_name)]
        row = max(known, key=lambda d: len(d.name), default=None)
        return Device(name=cuda_name, vendor="nvidia", generation=row.generation if row else "unknown",
                      capability=capability,  # what the driver reports, not the table
                      memory_gb=torch.cuda.get_device_properties(0).total_memory / GB,
                      detected="torch.cuda")
    apple, cpu = table["Apple M-series"], table["CPU"]
    if torch.backends.mps.is_available():
        return Device(name=apple.name, vendor="apple", generation=apple.generation, capability=None,
                      memory_gb=_ram_gb(), detected="torch.backends.mps")
    return Device(name=cpu.name, vendor="cpu", generation=cpu.generation, capability=None, memory_gb=_ram_gb(),
                  detected="no CUDA or MPS device; memory is this machine's RAM")


def recommend(device: Device) -> Rule:
    """The first rule of the seed's table that the device satisfies."""
    for rule in rules():
        if rule.matches(device):
            return rule
    raise QkitError(f"no recommendation covers {device.name} (vendor {device.vendor!r})",
                    "plan for a listed device with --gpu")


@dataclass(frozen=True)
class Advice:
    device: Device
    rule: Rule
    n_params: float
    shape: ModelShape | None  # None: only a parameter count was given, so no KV cache figure
    context: int
    batch: int
    table: pd.DataFrame = field(repr=False)  # one row per precision (see memory_table)

    def fits(self, precision: str) -> bool | None:
        row = self.table.loc[precision]
        return None if row["fits"] is None else bool(row["fits"])


def memory_table(n_params: float, shape: ModelShape | None = None, context: int = 4096, batch: int = 1,
                 device_gb: float | None = None, precisions: tuple[str, ...] = PRECISIONS) -> pd.DataFrame:
    """Weights at each precision, the BF16 KV cache at `context` x `batch` (when the shape is known),
    their sum, and against a device of `device_gb`: whether they fit and the room left for the KV cache."""
    import pandas as pd

    kv_gb = kv.kv_bytes(shape, context, batch, "bf16") / GB if shape else None
    rows = []
    for p in precisions:
        weights = memory.weight_bytes(n_params, p) / GB
        total = weights + (kv_gb or 0.0)
        rows.append({"precision": p, "bits per weight": WEIGHT_FORMATS[p].bits, "weights GB": weights,
                     "KV cache GB": kv_gb, "total GB": total,
                     "fits": None if device_gb is None else total <= device_gb,
                     "room for KV GB": None if device_gb is None else device_gb - weights})
    return pd.DataFrame(rows).set_index("precision")


def advise(gpu: str | None = None, *, model: str | Path | None = None, model_size: str | float | None = None,
           context: int = 4096, batch: int = 1, memory_gb: str | float | None = None) -> Advice:
    """Recommend a method for `gpu` (a table name; None: this machine) and size `model` (a built-in name or
    config path) or `model_size` ("70B") on it. `memory_gb` overrides the device's memory ("24GB" or 24)."""
    if model is None and model_size is None:
        raise QkitError("no model to plan for", "pass a model (a built-in name or config.json path) or a size "
                                                "such as 70B")
    if context < 1 or batch < 1:
        raise QkitError(f"cannot plan a context of {context} tokens x batch {batch}", "use context >= 1, batch >= 1")
    device = get_device(gpu) if gpu else detect()
    if memory_gb is not None:
        text = str(memory_gb)
        device = replace(device, memory_gb=memory.parse_size(text if re.search(r"[A-Za-z]", text) else text + "GB")
                         / GB)
    shape = memory.get_shape(model) if model is not None else None
    if shape is not None:
        kv.check_context(shape, context)
    n_params = memory.parse_size(model_size) if model_size is not None else shape.n_params
    if not n_params:
        raise QkitError(f"{shape.name} has no parameter count (no n_params in its config and no safetensors "
                        "beside it)", "give the size too, e.g. --model-size 8B")
    return Advice(device=device, rule=recommend(device), n_params=n_params, shape=shape, context=context,
                  batch=batch, table=memory_table(n_params, shape, context, batch, device.memory_gb))


def summary(advice: Advice) -> list[str]:
    """The recommendation with its reasons, in lines for the CLI and the notebook."""
    d, r = advice.device, advice.rule
    cap = f"compute capability {d.capability[0]}.{d.capability[1]}" if d.capability else "no CUDA"
    mem = f"{d.memory_gb:.0f} GB" if d.memory_gb else "memory unknown"
    lines = [f"Device: {d.name} ({d.generation}, {cap}, {mem})" + (f" - detected via {d.detected}" if d.detected
                                                                    else ""),
             "Native kernels: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in d.kernels.items()),
             f"Recommended: {r.precision}" + (f" (qkit methods: {', '.join(r.methods)})" if r.methods else ""),
             f"  why: {r.why}", f"  alternative: {r.alternative}"]
    fit = advice.fits(r.precision)
    if fit is False:
        smallest = [p for p in advice.table.index if advice.fits(p)]
        lines.append(f"  but at {r.precision} the model does not fit in {mem}"
                     + (f"; {', '.join(smallest)} would" if smallest else "; no precision does: use more devices "
                                                                           "(tensor parallel) or a smaller model"))
    elif fit:
        lines.append(f"  fits at {r.precision}; room left for the KV cache: "
                     f"{advice.table.loc[r.precision, 'room for KV GB']:.1f} GB")
    return lines


def checklist(advice: Advice) -> list[str]:
    """The seed's "should you quantize" questions, answered from the plan where the plan can answer."""
    t, d = advice.table, advice.device
    bf16 = t.loc["bf16"]
    kv_gb = bf16["KV cache GB"]
    fits_bf16 = advice.fits("bf16")
    items = [
        ("Does the model fit in BF16?",
         "unknown (no device memory)" if fits_bf16 is None else
         f"{'yes' if fits_bf16 else 'no'}: {bf16['total GB']:.1f} GB needed vs {d.memory_gb:.0f} GB"
         + (" - quantizing is the way to run it here" if not fits_bf16 else
            " - quantize for speed, batch size or longer context, not to fit")),
        ("Is the KV cache a large share of memory?",
         "unknown (give --model for the layer shape)" if kv_gb is None or kv_gb != kv_gb else
         f"{kv_gb:.1f} GB at {advice.context} tokens x batch {advice.batch} "
         f"({100 * kv_gb / bf16['total GB']:.0f}% of the BF16 total)"
         + (" - consider an FP8 KV cache too" if kv_gb > 0.25 * bf16["total GB"] else "")),
        ("Does the hardware run the recommended format natively?",
         f"{advice.rule.precision} on {d.name}: " + ("yes" if advice.rule.methods else
                                                      "no low-precision kernels: quantized weights save memory only")),
        ("Is the workload memory-bound (small-batch decoding) or compute-bound (large batches, long prompts)?",
         "weight-only formats (W4A16, GGUF) speed up the first; W8A8 formats (FP8, INT8, NVFP4) also the second"),
        ("Do you have calibration data like your traffic?",
         "GPTQ, AWQ, static FP8 and SmoothQuant need it (see notebook 01); FP8 dynamic, RTN and NVFP4A16 do not"),
        ("Can you measure the quality loss on your own tasks before deploying?",
         "run `qkit evaluate` (KLD, perplexity, top-1) and `qkit sensitivity` (arithmetic, code, long context)"),
    ]
    return [f"[{i}] {q}\n    {a}" for i, (q, a) in enumerate(items, 1)]


def device_table() -> pd.DataFrame:
    """The hardware table with each chip's native kernels and the seed's recommendation for it."""
    import pandas as pd

    rows = []
    for d in devices().values():
        rule = recommend(d)
        rows.append({"device": d.name, "generation": d.generation,
                     "compute capability": f"{d.capability[0]}.{d.capability[1]}" if d.capability else "-",
                     "memory GB": d.memory_gb if d.memory_gb else "-",
                     **{k: "yes" if v else "no" for k, v in d.kernels.items()},
                     "recommended": rule.precision, "alternative": rule.alternative})
    return pd.DataFrame(rows).set_index("device")


def kv_plan(advice: Advice) -> pd.DataFrame | None:
    """The KV-cache plan beside the recommended weights (a precision the planner sizes: bf16, fp8 or int4,
    int4 for the others), on the advice's device; None without a layer shape (a bare model size)."""
    if advice.shape is None:
        return None
    precision = advice.rule.precision if advice.rule.precision in ("bf16", "fp8", "int4") else "int4"
    return kv.plan(advice.shape, weights=(precision,),
                   device_memory=advice.device.memory_gb * 1e9 if advice.device.memory_gb else None)
