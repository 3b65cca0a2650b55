"""Layer sensitivity and mixed precision, the study: which units of the model hurt when quantized, on each
evaluation text or task's prompts, and the mix of formats that loses least under a size budget, verified.

**Scan.** For a target format (default ``w4a16_rtn``), each unit (a decoder layer, a module type across
layers, or in the full profile every Linear) is put in that format alone, the rest left in float, and its
exact KLD to the baseline measured with a bootstrap CI over chunks. The reverse view keeps one unit in
float and the rest in the format: the KLD that keeping it saves. The unit's weights are the whole-model
checkpoint's, dequantized by compressed-tensors (:mod:`qkit.quant.mixed` says why that equals quantizing
the unit alone for round-to-nearest formats), so a unit costs one forward pass, not a quantization run.

**Proxy.** Each module's KLD estimated from the diagonal Fisher information on calibration text,
``½ Σ F ⊙ ΔW²`` per token (:func:`qkit.quant.mixed.fisher_klds`), summed over a unit's modules: one forward
and backward pass per calibration sample for the whole model. Its Spearman ρ against the
measured KLD (CI by resampling units) says whether it could prune a larger scan, and with ``prune`` it
does: when its ρ on the measured layers clears the bar of :func:`qkit.studies.layer_results.ranks_well`,
only the modules it ranks highest are measured, with as many drawn at random from the rest to show what
pruning missed.

**Search.** Candidate formats per unit (the target format, a wider one, float); a unit's cost in a format
is its measured KLD (0 in float), its size is read from that format's checkpoint. The assignment that
minimizes the summed KLD under a budget in bits per weight (of the decoder's Linear weights) is a
multiple-choice knapsack, solved by dynamic programming over sizes (exact when sizes are whole grid
steps). The mix is written as an llm-compressor recipe (one config group per format, modules by name,
float modules ignored), run through the same path as a user's recipe, and measured: predicted against
measured KLD says whether unit KLDs add up.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from qkit import data, models
from qkit.core import provenance
from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store, write_text_atomic
from qkit.data import CalibSpec
from qkit.evaluation import TASK_PREFIX, EvalSpec, baseline, compare, metrics
from qkit.quant import methods, mixed, registry, variants
from qkit.studies import cells, contract, layer_results, quantization_methods
from qkit.studies.layer_results import Result, rank_check

# One unit's comparison against the baseline (unit alone in a format, or all but the unit), the proxy's
# per-module KLD estimates, and the recipe file of a searched mix.
LAYER_UNIT = Kind("layer_unit", 1)
LAYER_PROXY = Kind("layer_proxy", 2)
LAYER_MIX = Kind("layer_mix", 1)
# The decoder's Linear modules and their weight shapes, so that a warm run loads no weights: the load, and
# importing transformers' model code for it, took ~7 s of this notebook's ~16 s warm.
LAYER_MODULES = Kind("layer_modules", 1)


@dataclass(frozen=True)
class Config(cells.Placement):
    """What the layer study runs. ``texts`` are eval texts (prose, chat, code, a data file) or a task's
    prompts (``task:NAME``); ``budgets`` are bits per weight of the decoder's Linear weights; the search
    minimizes the KLD on each of ``targets`` (a subset of ``texts``) and measures each mix on every text.
    The unit measurements missing from the store are cells (see :class:`qkit.studies.cells.Placement`)."""

    model: str = models.DEFAULT_MODEL
    format: str = "w4a16_rtn"
    units: tuple[str, ...] = ("layers", "types")  # kinds (mixed.UNIT_KINDS) or units by name ("layer 3")
    reverse: tuple[str, ...] = ("types",)  # unit kinds also measured kept-in-float among the rest quantized
    texts: tuple[str, ...] = ("prose",)
    eval_tokens: int = 2048
    ctx: int = 256
    formats: tuple[str, ...] = ("w4a16_rtn", "w8a16_rtn")  # the search's candidates besides float
    search_units: str = "types"
    budgets: tuple[float, ...] = (4.5, 5.0, 6.0)
    targets: tuple[str, ...] = ("prose",)
    prune: int = 0  # with "modules" among the units: this many at random, then the proxy's top this many
    anchors: tuple[str, ...] = ("w4a16_rtn", "w4a16_gptq", "w8a16_rtn", "gguf_q4_k_m")
    calib: str = "prose"  # the text of the proxy's Fisher information
    samples: int = 16
    seq_len: int = 256
    seed: int = 0

    def eval_spec(self, text: str) -> EvalSpec:
        return EvalSpec(domain=text, n_tokens=self.eval_tokens, ctx=self.ctx)


# The full profile's proxy-pruned module scan: 40 modules at random, then (if the proxy ranks those well)
# the proxy's top 40. On SmolLM2 the proxy ranked all 210 with ρ 0.90 [0.85, 0.93].
PRUNE_DEFAULT = 40

PROFILES = {
    "quick": Config(),
    # Layers, module types and modules (pruned), on 4x the text and on code too, each text's mix scored on
    # the other. For SmolLM2 about 207 unit passes of 8,192 tokens per text, ~3 h on 2 cores; measuring all
    # 210 modules would add 139 per text, ~2 h (estimated from the quick scan's 10.6 s per unit on one core).
    "full": Config(units=("layers", "types", "modules"), reverse=("types", "layers"), texts=("prose", "code"),
                   targets=("prose", "code"), eval_tokens=8192, ctx=512, prune=PRUNE_DEFAULT,
                   search_units="layers", budgets=(4.5, 5.0, 6.0, 8.0), samples=64, seq_len=512),
}


def config(profile: str | Config = "quick", **overrides: Any) -> Config:
    """A profile with overrides; see :func:`qkit.studies.contract.config`."""
    return contract.config(PROFILES, profile, **overrides)


# ---------------------------------------------------------------- run


def _check(config: Config) -> None:
    for name in (config.format, *config.formats):
        mixed.weight_group(registry.get_method(name))
    for anchor in config.anchors:
        variants.check(anchor)
    for text in config.texts:
        config.eval_spec(text)  # an unknown text or task fails here
    missing = sorted(set(config.targets) - set(config.texts))
    if missing:
        raise QkitError(f"search target {', '.join(missing)} is not among the texts {', '.join(config.texts)}",
                        "add it to texts, or target one of them")
    if config.prune < 0:
        raise QkitError(f"prune={config.prune} is negative", "pass the number of modules to measure, or 0 for all")
    if config.prune and "modules" not in config.units:
        raise QkitError(f"prune={config.prune} needs modules among the units: it prunes the module scan",
                        "add modules to units, or pass prune=0")
    if config.search_units not in mixed.UNIT_KINDS:
        raise QkitError(f"unknown search unit kind {config.search_units!r}", f"use {', '.join(mixed.UNIT_KINDS)}")
    formats_bits = [registry.get_method(f).weight_bits or 16 for f in config.formats]
    for b in config.budgets:
        if not min(formats_bits) <= b <= 16:
            raise QkitError(f"budget {b:g} bits per weight is outside what the formats allow "
                            f"({min(formats_bits)} to 16, float)", f"pass budgets between {min(formats_bits)} and 16")
    for text in config.texts:
        if not text.startswith(TASK_PREFIX):
            data.check_disjoint(config.calib, text)


def run(config: Config = PROFILES["quick"], *, store: Store | None = None) -> Result:
    """Scan, proxy, search and verify, every step cached in the store."""
    _check(config)
    store = store or Store()
    loaded = models.resolve_model(config.model, store=store)
    return Study(config, loaded, store).run()


class Study:
    """One run's state: the baseline, each format's checkpoint and dequantized weights, and a float copy of
    the model that units' weights are swapped into."""

    def __init__(self, config: Config, loaded: models.LoadedModel, store: Store) -> None:
        self.config, self.loaded, self.store = config, loaded, store
        # [name, out, in] rows: the store's JSON sorts object keys, and units keep the model's order.
        rows = store.get_json(LAYER_MODULES, {"model": loaded.info["fingerprint"]},
                              lambda: [[n, *shape] for n, shape in mixed.linear_shapes(loaded.model).items()])
        self.shapes = {name: tuple(shape) for name, *shape in rows}
        mixed.units(self.shapes, config.units)  # a unit name the model lacks fails before any quantization
        names = dict.fromkeys((config.format, *config.formats))
        self.checkpoints = {f: methods.quantize(loaded, f, store=store) for f in names}
        self._weights: dict[str, dict[str, torch.Tensor]] = {}
        self._copy: torch.nn.Module | None = None

    def weights(self, fmt: str) -> dict[str, torch.Tensor]:
        if fmt not in self._weights:
            self._weights[fmt] = mixed.dequantized_weights(self.checkpoints[fmt])
        return self._weights[fmt]

    def weight_changes(self, fmt: str) -> dict[str, torch.Tensor]:
        """Per module: its weights in `fmt` minus its float weights."""
        linears = mixed.linear_modules(self.loaded.model)
        return {name: w - linears[name].weight.detach().float() for name, w in self.weights(fmt).items()}

    def model_copy(self) -> torch.nn.Module:
        if self._copy is None:
            self._copy = mixed.float_copy(self.loaded.model)
        return self._copy

    def measure_key(self, fmt: str, modules: Sequence[str], text: str, keep_float: bool = False) -> dict:
        return {"model": self.loaded.info["fingerprint"], "dtype": self.loaded.info["dtype"],
                "format": self.checkpoints[fmt].path.name, "modules": sorted(modules), "keep_float": keep_float,
                "eval": self.config.eval_spec(text).key()}

    def measure(self, fmt: str, modules: Sequence[str], text: str, *, keep_float: bool = False) -> dict:
        """The comparison of the model with `modules` in `fmt` (or, with ``keep_float``, every other module
        in `fmt` and these in float), cached."""
        spec = self.config.eval_spec(text)
        key = self.measure_key(fmt, modules, text, keep_float)

        def run_it() -> dict:
            every, kept = self.weights(fmt), set(modules)
            chosen = ({m: w for m, w in every.items() if m not in kept} if keep_float
                      else {m: every[m] for m in modules})
            with mixed.swapped(self.model_copy(), chosen) as model:
                return compare(model, self.loaded, spec, self.store, label=f"{fmt} {len(modules)} modules")

        return self.store.get_json(LAYER_UNIT, key, run_it)

    def jobs(self) -> list[tuple[str, tuple[str, ...], str, bool]]:
        """Every (format, modules, text, keep_float) the scan, the reverse view and the search costs measure,
        but for the module units of a pruned scan (:meth:`pruned_module_scan`)."""
        c = self.config
        scan_units, search_units = self.scan_units(pruned=True), mixed.units(self.shapes, (c.search_units,))
        out = [(c.format, scan_units[u], text, False) for text in c.texts for u in scan_units]
        for kind in c.reverse:
            rev = mixed.units(self.shapes, (kind,))
            out += [(c.format, m, text, True) for text in c.texts for m in ((), *rev.values())]
        out += [(fmt, search_units[u], text, False) for fmt in c.formats for text in c.targets for u in search_units]
        return list(dict.fromkeys(out))

    def scan_units(self, pruned: bool = False) -> dict[str, tuple[str, ...]]:
        """The scan's units; with `pruned`, without the module units when the config prunes them."""
        kinds = self.config.units
        if pruned and self.config.prune:
            kinds = tuple(k for k in kinds if k != "modules")
        return mixed.units(self.shapes, kinds)

    def offload(self, jobs: Sequence[tuple[str, tuple[str, ...], str, bool]]) -> None:
        """The jobs missing from the store, as cells (see :func:`qkit.studies.cells.offload`)."""
        c = self.config
        todo = [job for job in jobs if self.store.lookup(LAYER_UNIT, self.measure_key(*job)) is None]
        cells.offload(c, _measure_cell, [(f"{fmt} {len(mods)} modules on {text}", (c, fmt, mods, text, keep))
                                         for fmt, mods, text, keep in todo],
                      model=c.model, loaded=self.loaded, store=self.store, desc="layer units",
                      before=lambda: [baseline(self.loaded, c.eval_spec(text), self.store) for text in c.texts])

    def pruned_module_scan(self) -> tuple[list[dict], pd.DataFrame]:
        """The module scan's rows when ``prune`` is set, and a row per text on the decision. ``prune``
        modules drawn at random are measured first; on a text where the proxy ranks them well
        (:func:`qkit.studies.layer_results.ranks_well`), the proxy's top ``prune`` are measured too and the
        rest left out; elsewhere every module is. Being drawn at random, they estimate without bias the
        proxy's ρ over all modules and what the modules left out hold (see ``Result.pruning_check``)."""
        c = self.config
        every = list(mixed.units(self.shapes, ("modules",)))
        per_module = self.per_module_proxy()
        drawn = {every[i] for i in np.random.default_rng(c.seed).choice(len(every), min(c.prune, len(every)),
                                                                         replace=False)}
        top = set(layer_results.proxy_top(per_module, c.prune))
        proxy = self.proxy({})  # per module
        self.offload([(c.format, (m,), text, False) for text in c.texts for m in every if m in drawn])
        rows, decisions, later = [], [], []
        for text in c.texts:
            sample = [self.scan_row(text, m, (m,), picked="at random") for m in every if m in drawn]
            (r,) = rank_check(pd.DataFrame(sample), proxy, c.seed).to_dict("records")
            pruned = layer_results.ranks_well(r)
            more = [m for m in every if m not in drawn and (m in top or not pruned)]
            later += [(text, m, "proxy top" if pruned else "all") for m in more]
            rows += sample
            decisions.append({"text": text, "at_random": len(sample), "random_rho": r["spearman_rho"],
                              "rho_low": r["rho_low"], "rho_high": r["rho_high"], "pruned": pruned,
                              "modules": len(every), "measured": len(sample) + len(more)})
        self.offload([(c.format, (m,), text, False) for text, m, _ in later])
        rows += [self.scan_row(text, m, (m,), picked=why)
                 for text, m, why in tqdm(later, desc=f"module scan ({c.format})", unit="module")]
        return rows, pd.DataFrame(decisions)

    def scan_row(self, text: str, unit: str, modules: tuple[str, ...], **extra: str) -> dict:
        """The scan's row of `unit` (its `modules` in the target format) on `text`."""
        c = self.config
        return {"text": text, "unit": unit, "kind": mixed.unit_kind(unit), "modules": len(modules), **extra,
                **_row(self.measure(c.format, modules, text), c.seed)}

    def run(self) -> Result:
        c = self.config
        self.offload(self.jobs())
        scan_units, search_units = self.scan_units(pruned=True), mixed.units(self.shapes, (c.search_units,))
        rows, reverse_rows, cost_rows = [], [], []
        jobs = [(text, u) for text in c.texts for u in scan_units]
        for text, unit in tqdm(jobs, desc=f"scan ({c.format})", unit="unit"):
            rows.append(self.scan_row(text, unit, scan_units[unit]))
        pruning = pd.DataFrame()
        if c.prune:
            module_rows, pruning = self.pruned_module_scan()
            rows += module_rows
        for kind in c.reverse:
            rev = mixed.units(self.shapes, (kind,))
            for text in c.texts:
                whole = self.measure(c.format, (), text, keep_float=True)
                for unit in tqdm(rev, desc=f"reverse {kind} ({text})", unit="unit", leave=False):
                    kept = self.measure(c.format, rev[unit], text, keep_float=True)
                    saved, lo, hi = metrics.mean_ci(whole["chunk_kld"], paired_with=kept["chunk_kld"], seed=c.seed)
                    reverse_rows.append({"text": text, "unit": unit, "kind": kind, "kld_all": whole["kld_mean"],
                                         "kld_kept_float": kept["kld_mean"], "kld_saved": saved,
                                         "kld_saved_low": lo, "kld_saved_high": hi})
        for fmt in c.formats:
            for text in c.targets:
                for unit in tqdm(search_units, desc=f"search costs {fmt} ({text})", unit="unit", leave=False):
                    cost_rows.append({"format": fmt, "text": text, "unit": unit,
                                      **_row(self.measure(fmt, search_units[unit], text), c.seed)})
        scan, costs = pd.DataFrame(rows), pd.DataFrame(cost_rows)
        proxy = self.proxy(self.scan_units())
        sizes = self.sizes(search_units)
        mixes, mix_rows = self.search(costs, sizes, search_units)
        anchors = self.anchors()
        meta = {"model": self.loaded.info, "config": asdict(c), "provenance": provenance.collect(),
                "checkpoints": {f: str(ck.path) for f, ck in self.checkpoints.items()},
                "calibration": data.describe(c.calib)}
        return Result(c, scan, pd.DataFrame(reverse_rows), costs, proxy, pruning, sizes, mixes,
                      pd.DataFrame(mix_rows), anchors, meta)

    def per_module_proxy(self) -> dict[str, float]:
        """Per module: the Fisher estimate of its KLD in the target format (:func:`qkit.quant.mixed.fisher_klds`)
        on the calibration text."""
        c = self.config
        calib = CalibSpec(c.calib, c.samples, c.seq_len, c.seed)
        key = {"model": self.loaded.info["fingerprint"], "format": self.checkpoints[c.format].path.name,
               "calibration": calib.key()}

        def compute() -> dict[str, float]:
            samples = data.calibration_set(calib.name, calib.n_samples, calib.seq_len, calib.seed,
                                           tokenizer=self.loaded.tokenizer)
            return mixed.fisher_klds(self.loaded.model, [torch.tensor([x["input_ids"]]) for x in samples],
                                     self.weight_changes(c.format), seed=c.seed)

        return self.store.get_json(LAYER_PROXY, key, compute)

    def proxy(self, scan_units: Mapping[str, tuple[str, ...]]) -> pd.DataFrame:
        """The proxy per scan unit (the sum over its modules), and per module."""
        per_module = self.per_module_proxy()
        rows = [{"unit": u, "proxy": sum(per_module[m] for m in mods)} for u, mods in scan_units.items()]
        modules = [{"unit": m, "proxy": v} for m, v in per_module.items()]
        return pd.DataFrame(rows + [r for r in modules if r["unit"] not in scan_units])

    def sizes(self, search_units: Mapping[str, tuple[str, ...]]) -> pd.DataFrame:
        """Bytes of each search unit in each candidate format (from its checkpoint) and in float (BF16)."""
        table = pd.DataFrame({"params": {u: sum(math.prod(self.shapes[m]) for m in mods)
                                         for u, mods in search_units.items()},
                              mixed.FLOAT: mixed.unit_bytes(None, search_units, self.shapes),
                              **{f: mixed.unit_bytes(self.checkpoints[f], search_units, self.shapes)
                                 for f in self.config.formats}})
        return table.rename_axis("unit")

    def search(self, costs: pd.DataFrame, sizes: pd.DataFrame, search_units: Mapping[str, tuple[str, ...]]
               ) -> tuple[pd.DataFrame, list[dict]]:
        c = self.config
        options = [*c.formats, mixed.FLOAT]
        params = int(sizes["params"].sum())
        mixes, rows = [], []
        for target in c.targets:
            kld = costs[costs["text"] == target].pivot(index="unit", columns="format", values="kld_mean")
            kld = kld.reindex(index=sizes.index)
            kld[mixed.FLOAT] = 0.0
            for budget in c.budgets:
                picks = mixed.solve(sizes[options].to_numpy(float), kld[options].to_numpy(float), budget * params / 8)
                chosen = {u: options[j] for u, j in zip(sizes.index, picks)}
                assignment = {m: f for u, f in chosen.items() for m in search_units[u]}
                bits = 8 * sum(sizes.loc[u, f] for u, f in chosen.items()) / params
                label = f"mix {budget:g} bpw ({target})"
                variant = self.variant(label, assignment)
                predicted = float(sum(kld.loc[u, f] for u, f in chosen.items()))
                mixes.append({"mix": label, "target": target, "budget": budget, "bits": bits, "predicted_kld": predicted,
                              **{f"{f} units": sum(v == f for v in chosen.values()) for f in options},
                              "assignment": chosen, "recipe": variant.checkpoint.method.source})
                for text in c.texts:
                    rows.append({**self.evaluate(variant, text), "mix": label, "target": target, "budget": budget,
                                 "predicted_kld": predicted if text == target else np.nan})
        return pd.DataFrame(mixes), rows

    def variant(self, label: str, assignment: Mapping[str, str]) -> variants.Variant:
        """The mix as a recipe file in the store, quantized through the path a user's recipe takes."""
        formats = {f: registry.get_method(f) for f in self.config.formats}
        text = mixed.recipe(assignment, formats, label)
        name = "_".join("".join(ch if ch.isalnum() or ch == "." else " " for ch in label).split()) + ".yaml"
        path = self.store.get_dir(LAYER_MIX, {"recipe": text, "file": name}, lambda tmp: write_text_atomic(tmp / name, text))
        return variants.from_method(self.loaded, registry.load_recipe(path / name, name=label), store=self.store)

    def anchors(self) -> pd.DataFrame:
        """The uniform methods on the same texts: what a mix must beat at its size."""
        every = [variants.parse(self.loaded, name, store=self.store) for name in self.config.anchors]
        return pd.DataFrame([self.evaluate(v, text) for v in every for text in self.config.texts])

    def evaluate(self, variant: variants.Variant, text: str) -> dict:
        """A methods-study row of `variant` on `text`, with its per-chunk KLDs for paired comparisons."""
        spec = self.config.eval_spec(text)
        raw = quantization_methods.evaluation(self.loaded, variant, spec, store=self.store)
        return {**quantization_methods.evaluate(self.loaded, variant, spec, store=self.store, seed=self.config.seed),
                "text": text, "chunk_kld": raw["chunk_kld"]}


_STUDIES: dict[Config, Study] = {}


def _measure_cell(config: Config, fmt: str, modules: tuple[str, ...], text: str, keep_float: bool) -> None:
    # A worker keeps its study (dequantized weights, the float copy) for the next cell of the same run.
    if config not in _STUDIES:
        loaded, store = cells.worker()
        _STUDIES.clear()
        _STUDIES[config] = Study(config, loaded, store)
    _STUDIES[config].measure(fmt, modules, text, keep_float=keep_float)


def _row(result: dict, seed: int) -> dict:
    """A unit's KLD and top-1 agreement with 95% CIs over chunks (the chunks are equal, so the mean of
    chunk means is the mean over tokens)."""
    kld, lo, hi = metrics.mean_ci(result["chunk_kld"], seed=seed)
    top1, t_lo, t_hi = metrics.mean_ci(result["chunk_top1"], seed=seed)
    return {"kld_mean": kld, "kld_low": lo, "kld_high": hi, "top1_pct": 100 * top1, "top1_low": 100 * t_lo,
            "top1_high": 100 * t_hi, "chunk_kld": result["chunk_kld"]}
