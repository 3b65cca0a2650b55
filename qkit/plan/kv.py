"""The KV-cache memory planner, and the runtime caches it is checked against.

Every generated or prompt token keeps a key and a value vector per layer and KV head, so

    KV bytes = 2 x layers x kv_heads x head_dim x bytes per element x tokens x batch.

A quantized cache stores each group of ``group`` elements as ``bits`` each plus a scale and a zero point
(transformers' QuantizedCache, one group per head vector), and keeps the newest ``residual`` tokens
unquantized until it requantizes. The formulas are checked against the bytes the caches really hold
(:func:`measure_bytes`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qkit.core.errors import QkitError, lookup
from qkit.plan import memory
from qkit.plan.memory import GB, ModelShape
from qkit.quant.kv_runtime import Q_GROUP, RUNTIME_CACHES, make_cache


@dataclass(frozen=True)
class CacheFormat:
    """How a KV cache stores one element."""

    name: str
    bits: float
    group: int | None = None  # elements per scale + zero point; None: no per-group metadata
    meta_bytes: int = 2  # bytes of each scale and each zero point (the model's compute dtype)

    def bytes_per_element(self) -> float:
        return self.bits / 8 + (2 * self.meta_bytes / self.group if self.group else 0.0)


# What the planner compares. FP8 is what vLLM stores with `kv_cache_dtype="fp8"` (one scale per tensor or
# per head: negligible bytes); int4 is transformers' QuantizedCache (group 64 = a SmolLM2/Llama head
# vector, BF16 scale and zero on a GPU).
FORMATS: dict[str, CacheFormat] = {
    "bf16": CacheFormat("bf16", 16),
    "fp8": CacheFormat("fp8", 8),  # vLLM kv_cache_dtype=fp8, per-tensor or per-head scales
    "int8": CacheFormat("int8", 8, group=64),  # transformers QuantizedCache, HQQ backend
    "int4": CacheFormat("int4", 4, group=64),  # transformers QuantizedCache, HQQ or quanto backend
}


def get_format(name: str) -> CacheFormat:
    return lookup(FORMATS, name, "KV cache format")


def kv_bytes(shape: ModelShape, tokens: int, batch: int = 1, fmt: str | CacheFormat = "bf16", *,
             residual: int = 0, residual_bytes: int = 2) -> float:
    """Bytes a KV cache holds for `tokens` tokens of each of `batch` sequences. For a quantized format,
    `residual` of those tokens sit unquantized at `residual_bytes` per element."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if tokens < 0 or batch < 1 or not 0 <= residual <= tokens:
        raise QkitError(f"cannot size a cache of {tokens} tokens x batch {batch} with {residual} residual",
                        "use tokens >= 0, batch >= 1 and 0 <= residual <= tokens")
    per_token = shape.kv_elements_per_token * batch
    return per_token * ((tokens - residual) * fmt.bytes_per_element() + residual * residual_bytes)


def check_context(shape: ModelShape, tokens: int) -> None:
    if shape.max_context and tokens > shape.max_context:
        raise QkitError(f"a context of {tokens} tokens is beyond {shape.name}'s maximum of {shape.max_context}",
                        f"ask for at most {shape.max_context} tokens")


CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


BATCHES = (1, 8, 32)


def plan(model: str | ModelShape, contexts: Sequence[int] = CONTEXTS, batches: Sequence[int] = BATCHES,
         formats: Sequence[str] = ("bf16", "fp8", "int4"), weights: Sequence[str] = ("bf16", "fp8", "int4"),
         device_memory: float | str | None = None):
    """KV-cache memory (GB) per context, batch and cache format, one row each, with the total next to the
    weights at each precision and, given `device_memory` (bytes or text such as "80GB"), whether it fits.
    Contexts beyond the model's maximum are left out (and must not all be)."""
    import pandas as pd

    shape = model if isinstance(model, ModelShape) else memory.get_shape(model)
    for fmt in formats:
        get_format(fmt)
    usable = [c for c in contexts if not shape.max_context or c <= shape.max_context]
    if not usable:
        check_context(shape, min(contexts))
    device = memory.parse_size(device_memory) / GB if device_memory is not None else None
    weight_gb = ({w: memory.weight_bytes(shape.n_params, w) / GB for w in weights} if shape.n_params else {})
    rows = []
    for context in usable:
        for batch in batches:
            for fmt in formats:
                kv = kv_bytes(shape, context, batch, fmt) / GB
                row = {"context": context, "batch": batch, "kv_format": fmt, "kv_gb": kv}
                for w, wgb in weight_gb.items():
                    row[f"total_gb_{w}"] = wgb + kv
                    if device:
                        row[f"fits_{w}"] = wgb + kv <= device
                rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs.update(model=shape, weights_gb=weight_gb, device_gb=device,
                    dropped_contexts=[c for c in contexts if c not in usable])
    return df


def plan_table(df, weights: str | None = None):
    """The plan as a grid: one row per (context, batch), one column per cache format, KV GB in each cell;
    with a device, a cell whose cache does not fit beside `weights` (default: the first precision) is
    marked "✗"."""
    device, wgb = df.attrs["device_gb"], df.attrs["weights_gb"]
    weights = weights or next(iter(wgb), None)
    order = list(dict.fromkeys(df["kv_format"]))

    def cell(r) -> str:
        text = f"{r['kv_gb']:.2f}"
        if device and weights:
            text += "" if r[f"fits_{weights}"] else " ✗"
        return text

    out = df.assign(cell=df.apply(cell, axis=1)).pivot(index=["context", "batch"], columns="kv_format",
                                                         values="cell")[order]
    out.columns = [f"KV GB, {f}" for f in order]
    return out


def plan_summary(df, weights: str | None = None) -> list[str]:
    """What a reader of the plan wants in words: KV per token, weights, the room left on the device."""
    shape: ModelShape = df.attrs["model"]
    wgb, device = df.attrs["weights_gb"], df.attrs["device_gb"]
    lines = [f"{shape.name}: {shape.layers} layers x {shape.kv_heads} KV heads x head_dim {shape.head_dim} = "
             f"{shape.kv_elements_per_token:,} cached elements per token, "
             f"{kv_bytes(shape, 1, 1, 'bf16') / 1024:.1f} KiB per token at BF16."]
    if wgb:
        lines.append("Weights: " + ", ".join(f"{w} {g:.3g} GB" for w, g in wgb.items()) + ".")
    else:
        lines.append("Weights: unknown (no parameter count for this model).")
    if device and wgb:
        weights = weights or next(iter(wgb))
        lines.append(f"On a {device:g} GB device, room left for the KV cache: "
                     + ", ".join(f"{max(device - g, 0):.1f} GB beside {w} weights" for w, g in wgb.items())
                     + f". ✗ marks a cache that does not fit beside {weights} weights.")
    if df.attrs["dropped_contexts"]:
        lines.append(f"Left out contexts beyond the model's maximum of {shape.max_context}: "
                     + ", ".join(str(c) for c in df.attrs["dropped_contexts"]) + ".")
    return lines


def held_bytes(cache: Any) -> int:
    """Bytes of the tensors a transformers Cache holds: keys and values, and for a quantized cache its
    packed data, scales and zero points (quanto's QTensors are opened up to their parts)."""
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> int:
        if isinstance(obj, torch.Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
                names, _ = obj.__tensor_flatten__()
                return sum(walk(getattr(obj, n), depth + 1) for n in names)
            return obj.numel() * obj.element_size()
        if depth > 4 or isinstance(obj, (str, bytes, int, float, type)) or obj is None:
            return 0
        if isinstance(obj, dict):
            return sum(walk(v, depth + 1) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v, depth + 1) for v in obj)
        if hasattr(obj, "__dict__"):
            return sum(walk(v, depth + 1) for v in vars(obj).values())
        return 0

    return sum(walk(layer, 0) for layer in cache.layers)


def cache_format(name: str, dtype: torch.dtype) -> CacheFormat:
    """The planner's format for a runtime cache whose model computes in `dtype`."""
    size = torch.tensor([], dtype=dtype).element_size()
    kwargs = RUNTIME_CACHES[name]
    if not kwargs:
        return CacheFormat(str(dtype).removeprefix("torch."), 8 * size)
    return CacheFormat(name, kwargs["nbits"], group=Q_GROUP, meta_bytes=size)


def measure_bytes(loaded: Any, lengths: Sequence[int] = (128, 512, 2048),
                  caches: Sequence[str] = tuple(RUNTIME_CACHES)):
    """The planner against the bytes each runtime cache holds after one forward pass (prefill) of
    `lengths` tokens: one row per (cache, length). After a prefill a quantized cache has no residual."""
    import pandas as pd

    shape = memory.shape_of(loaded)
    dtype = next(loaded.model.parameters()).dtype
    rows = []
    for length in lengths:
        check_context(shape, length)
        ids = torch.randint(0, loaded.model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        for name in caches:
            cache = make_cache(name, loaded.model.config)
            with torch.inference_mode():
                loaded.model(ids, past_key_values=cache, use_cache=True)
            rows.append({"cache": name, "tokens": length, "measured_bytes": held_bytes(cache),
                         "planned_bytes": round(kv_bytes(shape, length, 1, cache_format(name, dtype)))})
    return pd.DataFrame(rows)
