"""Mixed precision: a model's Linear modules grouped into units, each unit in one of several weight
formats, and the llm-compressor recipe that writes such a mix.

A unit is a set of the decoder's Linear modules: a decoder layer (``layer 3``), a module type across all
layers (``type down_proj``), or one module (its name). A format is a registry method whose recipe is a
weight-only ``QuantizationModifier`` with one config group (round-to-nearest): only then is quantizing a
unit alone the same as quantizing the whole model and keeping that unit's weights, which is what
:func:`dequantized_weights` and :func:`swapped` do to measure a unit with one forward pass and no
quantization run per unit. (GPTQ's rounding of a layer depends on the layers before it, so its weights
cannot be taken one unit at a time.)
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import yaml

from qkit import models
from qkit.core.errors import QkitError
from qkit.quant import artifacts, methods, registry

UNIT_KINDS = ("layers", "types", "modules")
FLOAT = "float"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The decoder's Linear modules by name, without those every recipe leaves in float (lm_head)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and _LAYER.search(name) and name.split(".")[-1] not in registry.IGNORE}


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The weight shape (out, in) of each of :func:`linear_modules`, in model order: what units and their
    float sizes need, which a caller can keep without the weights."""
    return {name: tuple(m.weight.shape) for name, m in linear_modules(model).items()}


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> int:
    return int(_LAYER.search(name).group(1))


def unit_kind(unit: str) -> str:
    """Which kind of unit :func:`units` named `unit`: a layer, a module type or one module."""
    return "layer" if unit.startswith("layer ") else "type" if unit.startswith("type ") else "module"


def units(modules: Sequence[str], kinds: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Unit name → its module names, for each of `kinds`: a kind of :data:`UNIT_KINDS`, or one unit by its
    name (``layer 3``, ``type v_proj``, a module's full name), from the names of :func:`linear_modules` (or
    the keys of :func:`linear_shapes`) in model order. A name that matches nothing is a QkitError that lists
    the module types found."""
    names = list(modules)
    if not names:
        raise QkitError("the model has no Linear modules inside numbered decoder layers",
                        "scan a decoder-only causal LM (Llama, Qwen, Mistral, ...)")
    every: dict[str, dict[str, tuple[str, ...]]] = {"layers": {}, "types": {}, "modules": {n: (n,) for n in names}}
    for layer in dict.fromkeys(map(layer_of, names)):
        every["layers"][f"layer {layer}"] = tuple(n for n in names if layer_of(n) == layer)
    for t in dict.fromkeys(map(module_type, names)):
        every["types"][f"type {t}"] = tuple(n for n in names if module_type(n) == t)
    named = {u: mods for group in every.values() for u, mods in group.items()}
    missing = [k for k in kinds if k not in every and k not in named]
    if missing:
        raise QkitError(f"no unit {', '.join(map(repr, missing))} in the model",
                        f"name a kind ({', '.join(UNIT_KINDS)}), 'layer N' (0-{max(map(layer_of, names))}), "
                        f"'type T' with T one of {', '.join(sorted(set(map(module_type, names))))}, "
                        "or a module's full name")
    out: dict[str, tuple[str, ...]] = {}
    for kind in kinds:
        out.update(every[kind] if kind in every else {kind: named[kind]})
    return out


def _why_not(method: registry.Method) -> str | None:
    """Why a method cannot be applied per module, or None when it can."""
    if method.backend != "llmcompressor" or method.recipe_text is not None:
        return "its recipe is not one llm-compressor modifier group"
    if method.act_bits or method.kv_bits:
        return "it quantizes activations or the KV cache, which swapping weights cannot reproduce"
    steps = {name: kwargs for step in method.recipe for name, kwargs in step.items()}
    if set(steps) != {"QuantizationModifier"}:
        return ("its rounding is calibrated across layers (GPTQ, AWQ, ...), so a unit quantized alone is not "
                "that unit of the whole model")
    groups = steps["QuantizationModifier"].get("config_groups") or {}
    if len(groups) != 1 or any(g.get("input_activations") or "weights" not in g for g in groups.values()):
        return "its QuantizationModifier has not exactly one weight-only config group"
    return None


def weight_group(method: registry.Method) -> dict[str, Any]:
    """The weight quantization arguments of a format that can be applied per module; a QkitError for a
    method that cannot (activations or KV cache quantized, calibrated rounding, another backend)."""
    why = _why_not(method)
    if why:
        usable = [m.name for m in registry.METHODS.values() if _why_not(m) is None]
        raise QkitError(f"{method.name} cannot be applied per module: {why}", f"use one of {', '.join(usable)}")
    ((_, modifier),) = (kv for step in method.recipe for kv in step.items())
    (group,) = modifier["config_groups"].values()
    return dict(group["weights"])


def dequantized_weights(checkpoint: methods.Checkpoint) -> dict[str, torch.Tensor]:
    """Every quantized Linear weight of a compressed-tensors checkpoint, dequantized to float32 by
    compressed-tensors itself: swapped into the float model, they give the checkpoint's own logits."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():  # "the quantization_config from the model will be used": as meant
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = models.load_pretrained(checkpoint.path, dtype="float32",
                                       quantization_config=CompressedTensorsConfig(dequantize=True))
    return {name: m.weight.detach().clone() for name, m in linear_modules(model).items()
            if getattr(m, "quantization_scheme", None) is not None}


def unit_bytes(checkpoint: methods.Checkpoint | None, units: Mapping[str, Sequence[str]],
               shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """What each unit's modules take in `checkpoint`'s files as on a GPU (float32 scales counted as BF16),
    or in BF16 for None (left in float; `shapes` as :func:`linear_shapes`): a unit's size comes from the
    checkpoint, not from a declared bit width. The checkpoint's headers are read once for all units."""
    if checkpoint is None:
        return {u: sum(2 * math.prod(shapes[m]) for m in mods) for u, mods in units.items()}
    per_module: dict[str, int] = {}
    for name, dtype, n in artifacts.checkpoint_tensors(checkpoint.path):
        module = name.rsplit(".", 1)[0]
        per_module[module] = per_module.get(module, 0) + (n // 2 if dtype == "F32" else n)
    return {u: sum(per_module.get(m, 0) for m in mods) for u, mods in units.items()}


@contextlib.contextmanager
def swapped(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """`model` with the named Linear weights replaced, restored on exit even if the block fails."""
    linears = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for name, w in weights.items():
                saved[name] = linears[name].weight.detach().clone()
                linears[name].weight.copy_(w)
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                linears[name].weight.copy_(w)


def float_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the float model to swap weights into, so that the baseline itself never changes."""
    return copy.deepcopy(model).eval()


def solve(sizes: np.ndarray, costs: np.ndarray, budget: float, grid: int = 4096) -> list[int]:
    """The option per unit (a column of ``sizes``/``costs`` [units, options]) that minimizes the summed cost
    with the summed size at most ``budget``: a multiple-choice knapsack by dynamic programming over sizes
    rounded up to ``budget / grid`` steps, so the answer always fits and is exact when sizes are whole
    steps. An infeasible budget is a QkitError with the smallest size it would need."""
    sizes, costs = np.asarray(sizes, float), np.asarray(costs, float)
    need = sizes.min(axis=1).sum()
    if need > budget:
        raise QkitError(f"the budget {budget:.4g} is below the smallest mix ({need:.4g}, every unit in its "
                        "smallest format)", "raise the budget")
    step = budget / grid if budget > grid else 1.0  # sizes are bytes: steps of one byte where they are few
    units = np.ceil(sizes / step - 1e-9).astype(int)
    cap = int(math.floor(budget / step + 1e-9))
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(sizes), cap + 1), dtype=int)
    for i in range(len(sizes)):
        new = np.full(cap + 1, np.inf)
        for j in range(sizes.shape[1]):
            w = units[i, j]
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + costs[i, j]
            better = cand < new
            new[better], choice[i, better] = cand[better], j
        best = new
    end = int(np.argmin(best))
    picks = []
    for i in reversed(range(len(sizes))):
        j = choice[i, end]
        picks.append(int(j))
        end -= units[i, j]
    return picks[::-1]


def fisher_klds(model: torch.nn.Module, batches: Sequence[torch.Tensor], deltas: Mapping[str, torch.Tensor],
                seed: int = 0, labels: str = "drawn") -> dict[str, float]:
    """Per decoder Linear named in `deltas` (its weight change, quantized minus float): ``½ Σ F ⊙ ΔW²`` per
    token, F the diagonal of the Fisher information of the model's own next-token distribution over the
    token ids in `batches` (one label drawn from it per position, seeded). Since KL(p‖p_δ) ≈ ½ δᵀFδ, it
    estimates in nats the KLD that the change causes alone, with F's off-diagonal terms dropped. One
    forward and backward pass per batch (best one sequence each: the cross terms between positions
    average out, those between sequences too, but more slowly).

    On SmolLM2's 210 modules in W4A16 RTN (16 x 256 prose tokens, against each module's measured KLD on
    2,048 held-out ones) it ranked modules with Spearman ρ 0.90 and layers 0.83, and its sum was 1.25x
    the summed KLDs. With the text's own next tokens as labels (the empirical Fisher) ρ was 0.68, and the
    output error ``tr(ΔW XᵀX ΔWᵀ)`` on the same activations ranked them no better than chance (-0.08):
    a module's output error says nothing of how much the rest of the network amplifies it
    (``benchmarks/layer_proxy.py`` measures all three). ``labels="text"`` gives the empirical Fisher."""
    if labels not in ("drawn", "text"):
        raise QkitError(f"unknown Fisher labels {labels!r}", "use 'drawn' (from the model) or 'text' (its next tokens)")
    linears = linear_modules(model)
    weights = [linears[name].weight for name in deltas]
    totals = dict.fromkeys(deltas, 0.0)
    tokens = 0
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    was = [w.requires_grad for w in params]
    try:
        for w in params:  # the graph holds only what the weights' gradients need
            w.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for ids in batches:
                logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
                flat = logp.reshape(-1, logp.shape[-1])
                picked = (torch.multinomial(flat.detach().exp(), 1, generator=generator) if labels == "drawn"
                          else ids[:, 1:].reshape(-1, 1))
                grads = torch.autograd.grad(-flat.gather(1, picked).sum(), weights)
                for name, g in zip(deltas, grads):
                    totals[name] += float((g.double() ** 2 * deltas[name].double() ** 2).sum())
                tokens += len(picked)
    finally:
        for w, req in zip(params, was):
            w.requires_grad_(req)
    return {name: 0.5 * total / tokens for name, total in totals.items()}


def recipe(assignment: Mapping[str, str], formats: Mapping[str, registry.Method], title: str) -> str:
    """An llm-compressor recipe (YAML, with qkit's header) that puts each module of `assignment` (module →
    format name, or :data:`FLOAT`) in its format: one config group per format, targeting modules by name,
    and the float ones in the ignore list."""
    groups, ignore = {}, list(registry.IGNORE)
    for i, (fmt, method) in enumerate(formats.items()):
        targets = [m for m, f in assignment.items() if f == fmt]
        if targets:
            groups[f"group_{i}"] = {"targets": targets, "weights": weight_group(method)}
    ignore += [m for m, f in assignment.items() if f == FLOAT]
    unknown = sorted(set(assignment.values()) - set(formats) - {FLOAT})
    if unknown:
        raise QkitError(f"the mix names formats {', '.join(unknown)} it was not given", "pass every format it uses")
    if not groups:
        raise QkitError("the mix leaves every module in float", "give it a budget below float's 16 bits")
    header = {"title": title, "description": f"Mixed precision chosen by qkit's layer-sensitivity search: "
              f"{', '.join(f'{sum(f == k for f in assignment.values())} modules {k}' for k in (*formats, FLOAT))}.",
              "kind": "weights", "study": False, "calibration": False, "format": "pack-quantized"}
    body = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"ignore": ignore, "config_groups": groups}}}}
    return yaml.safe_dump({"qkit": header, **body}, sort_keys=False)
