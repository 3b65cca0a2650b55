"""The methods study (notebook 02): quantize one model with each method and measure what each costs
against the float baseline (size, perplexity, exact KLD, top-1 agreement, Δp, with bootstrap CIs over
chunks of held-out text). `evaluate` is its cell, which the calibration study reuses."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from qkit import data, models
from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store
from qkit.data import CalibSpec
from qkit.evaluation import EvalSpec, baseline, compare, metrics
from qkit.quant import artifacts, formats, registry, variants
from qkit.studies import cells, contract, plots
from qkit.studies.contract import Summary
from qkit.studies.method_tables import (
    gguf_tensor_types,
    model_note,  # noqa: F401 - notebook 02 calls it from here, as study.model_note
    provenance_table,
    results_table,
    size_breakdown,
)

EVALUATION = Kind("evaluation", 1)


def result_row(result: dict, seed: int = 0) -> dict:
    """Flatten one evaluation into table columns, with 95% bootstrap CIs over chunks."""
    ci = lambda values, **kw: metrics.mean_ci(values, seed=seed, **kw)  # noqa: E731
    kld, kld_lo, kld_hi = ci(result["chunk_kld"])
    nll, nll_lo, nll_hi = ci(result["chunk_nll"])
    top1, top1_lo, top1_hi = ci(result["chunk_top1"])
    dnll, dnll_lo, dnll_hi = ci(result["chunk_nll"], paired_with=result["chunk_nll_base"])
    row = {k: v for k, v in result.items() if not k.startswith("chunk_")}
    # The perplexity is exp of the mean NLL over every token (as llama.cpp and lm-eval give it); its CI is
    # that of the chunks' mean NLL, carried over by exp so that it brackets the perplexity shown.
    ppl_lo, ppl_hi = metrics.scaled_ci(row["ppl_quant"], nll, nll_lo, nll_hi, math.exp)
    row.update(
        kld_mean=kld, kld_mean_low=kld_lo, kld_mean_high=kld_hi,
        ppl_quant_low=ppl_lo, ppl_quant_high=ppl_hi,
        top1_pct=100 * top1, top1_pct_low=100 * top1_lo, top1_pct_high=100 * top1_hi,
        delta_nll=dnll, delta_nll_low=dnll_lo, delta_nll_high=dnll_hi,
    )
    return row


def evaluation_spec(checkpoint_key: str, eval_spec: EvalSpec) -> dict:
    """The store key of one checkpoint's evaluation on one eval text."""
    return {"checkpoint": checkpoint_key, "eval": eval_spec.key()}


def evaluation(loaded: models.LoadedModel, variant: variants.Variant, eval_spec: EvalSpec = EvalSpec(), *,
               store: Store | None = None) -> dict:
    """A variant against the baseline on one held-out text, as :func:`qkit.evaluation.compare` gives it
    (per-chunk values included), cached. The variant's model loads only if it is not in the store."""
    store = store or Store()
    return store.get_json(EVALUATION, evaluation_spec(variant.identity, eval_spec),
                          lambda: compare(variant.model, loaded, eval_spec, store, label=variant.label))


def evaluate(loaded: models.LoadedModel, variant: variants.Variant, eval_spec: EvalSpec = EvalSpec(), *,
             store: Store | None = None, seed: int = 0) -> dict:
    """A variant against the baseline on one held-out text (cached), with what it is and what it costs:
    one row of the methods study."""
    return {**describe(loaded, variant), **result_row(evaluation(loaded, variant, eval_spec, store=store), seed),
            "error": None}


def describe(loaded: models.LoadedModel, variant: variants.Variant) -> dict:
    """What a variant is and costs: its method's format and bits (a registry method), its size on disk read
    from its files, and the time and memory its build took."""
    bf16 = models.bf16_bytes(loaded.info["n_params"])
    ckpt = variant.checkpoint
    if ckpt is None:  # a checkpoint made elsewhere: what it is and weighs is read from its files
        path = Path(variant.info["path"])
        if variant.info["kind"] == "gguf":
            size, fp32_elements, saved = path.stat().st_size, 0, "gguf"
        else:
            (size, fp32_elements), saved = artifacts.safetensors_sizes(path), artifacts.checkpoint_format(path)
        return {"method": variant.label, "title": variant.info.get("kind"), "size_mb": size / 1e6,
                "bits_per_weight": 8 * size / loaded.info["n_params"], "weight_format": formats.label_of_saved(saved),
                "bf16_run_mb": (size - 2 * fp32_elements) / 1e6, "bf16_mb": bf16 / 1e6,
                "reduction_vs_bf16": bf16 / (size - 2 * fp32_elements), "checkpoint": str(path), "format": saved}
    m = ckpt.method
    saved = ckpt.meta.get("format")
    return {
        # A user's recipe declares no format: the checkpoint's own config says what it wrote.
        "method": variant.label, "title": m.title,
        "weight_format": m.weight_format if m.expected_format else formats.label_of_saved(saved or ""),
        "weight_bits": m.weight_bits, "act_bits": m.act_bits, "group_size": m.group_size,
        "needs_calibration": m.needs_calibration, "native_hardware": str(m.native_hardware),
        "format": saved, "size_mb": ckpt.size_bytes / 1e6,
        "bits_per_weight": 8 * ckpt.size_bytes / loaded.info["n_params"],
        "bf16_run_mb": ckpt.bf16_run_bytes / 1e6, "bf16_mb": ckpt.bf16_bytes / 1e6,
        "reduction_vs_bf16": 1 / ckpt.bf16_ratio,
        "quant_seconds": ckpt.seconds, "quant_peak_rss_mb": ckpt.meta.get("peak_rss_bytes", 0) / 1e6,
        # checkpoints built before qkit sampled memory per run lack it
        "quant_rss_growth_mb": ckpt.meta.get("rss_growth_bytes", float("nan")) / 1e6,
        "checkpoint": str(ckpt.path),
    }


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """How a study calibrates the methods that need it: ``samples`` x ``seq_len`` tokens of ``calib`` drawn
    with ``seed``, except the methods named in ``calib_sizes`` ((method, (samples, seq_len)), ...; a dict
    is taken too), which calibrate on a size of their own. ``seed`` is also the bootstrap's."""

    calib: str = "prose"
    samples: int = 32  # llm-compressor's examples use 512 x 2048 on a GPU
    seq_len: int = 512
    calib_sizes: tuple[tuple[str, tuple[int, int]], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = self.calib_sizes.items() if isinstance(self.calib_sizes, dict) else self.calib_sizes
        try:
            # frozen, and hashable only with tuples all the way down (a notebook parameter arrives as lists)
            object.__setattr__(self, "calib_sizes", tuple((str(m), (int(s), int(n))) for m, (s, n) in sizes))
        except (TypeError, ValueError):
            raise QkitError(f"calib_sizes must pair each method with (samples, seq_len); got {self.calib_sizes!r}",
                            'write it as {"w4a16_awq": (4, 128)}') from None
        for method in dict(self.calib_sizes):
            variants.check(method)  # a typo, or a size that cannot be built, fails before any model loads
            self.calib_for(method)
        self.calib_for(None)

    def calib_for(self, method: str | None) -> CalibSpec:
        """The calibration set `method` sees (the methods that need none ignore it; None: the common one)."""
        samples, seq_len = dict(self.calib_sizes).get(method, (self.samples, self.seq_len))
        return CalibSpec(self.calib, samples, seq_len, self.seed)


# The methods whose KLD on this study's text barely moves from 4 x 128 calibration tokens to 32 x 512 (SmolLM2,
# 2 cores; KLD [95% CI] at 32 x 512, then at 4 x 128, seed 0, each with its checkpoint's build seconds):
#   w4a16_awq   0.170 [0.159, 0.181] 1,620 s  ->  0.180 [0.168, 0.193] 58 s (seed 1: 0.176 [0.166, 0.188])
#   w8a8_int8   0.0179 [0.0164, 0.0195] 324 s ->  0.0198 [0.0171, 0.0236] 45 s (seed 1: 0.0201 [0.0182, 0.0221])
#   fp8_static  0.0381 [0.0355, 0.0408] 127 s ->  0.0370 [0.0344, 0.0399] 11 s
#   nvfp4       0.441 [0.420, 0.466] 135 s    ->  0.451 [0.423, 0.481] 8 s
# so they calibrate on 4 x 128 in the quick profile: 2,000 s less. GPTQ does not (about 2x the KLD at 4
# samples in the calibration study) and keeps 32 x 512, GPTQModel's GPTQ alike, so the two compare evenly.
# The task study calibrates alike, so it reuses these checkpoints. Watch: on its 40 long-context items AWQ at
# 4 x 128 lost -17.5 pp [-32.5, -5.0] and at 4 x 512 -2.5 pp [-20.0, +12.5] (KLD 0.170 [0.162, 0.178], but a
# 634 s oneshot on a shared machine); the two CIs overlap, and 32 x 512 resolved no loss there either.
QUICK_CALIB_SIZES = tuple((m, (4, 128)) for m in ("w4a16_awq", "w8a8_int8", "fp8_static", "nvfp4"))


@dataclass(frozen=True)
class Config(cells.Placement, Calibration):
    """What the methods study runs: the model, the methods (None: every study method), how the methods
    that calibrate are calibrated (:class:`Calibration`), and the held-out text every checkpoint is
    evaluated on. Each method missing from the store is a cell (see :class:`qkit.studies.cells.Placement`);
    checkpoints made elsewhere are evaluated here, where their paths are."""

    model: str = models.DEFAULT_MODEL
    methods: tuple[str, ...] | None = None
    eval_text: str = "prose"
    eval_tokens: int = 8192
    ctx: int = 512

    @property
    def eval_spec(self) -> EvalSpec:
        return EvalSpec(domain=self.eval_text, n_tokens=self.eval_tokens, ctx=self.ctx)


PROFILES = {
    "quick": Config(calib_sizes=QUICK_CALIB_SIZES),
    # llm-compressor's own calibration size, and 8x the evaluation text: for a GPU.
    "full": Config(samples=512, seq_len=2048, eval_tokens=65536),
}


def config(profile: str | Config = "quick", **overrides) -> Config:
    """A profile's config with the overrides that are not None (lists become tuples); see
    :func:`calibration_overrides`."""
    return contract.config(PROFILES, profile, **calibration_overrides(overrides))


def calibration_overrides(overrides: dict) -> dict:
    """`overrides` where a calibration size given (``samples`` or ``seq_len``) holds for every method: the
    profile's own sizes per method (``calib_sizes``) then no longer apply, unless they are given too."""
    sized = overrides.get("samples") is not None or overrides.get("seq_len") is not None
    return {**overrides, "calib_sizes": ()} if sized and overrides.get("calib_sizes") is None else overrides


def run(config: Config = PROFILES["quick"], *, store: Store | None = None) -> Result:
    """Quantize the model with each method and measure what it costs against the float baseline.

    A method that fails is kept in the table with its error, so the others still report; every finished
    step sits in the store, so a rerun resumes where this one stopped.
    """
    store = store or Store()
    names = list(config.methods or registry.STUDY_METHODS)
    for name in names:
        variants.check(name)  # fail on a typo before spending minutes on the first methods
    data.check_disjoint(config.calib, config.eval_text)
    eval_spec = config.eval_spec
    loaded = models.resolve_model(config.model, store=store)
    todo = [n for n in names if variants.is_method(n)
            and not evaluated(loaded, n, config.calib_for(n), eval_spec, store)]
    failed = cells.offload(config, _method_cell,
                           [(n, (n, config.calib_for(n), eval_spec, config.seed)) for n in todo],
                           model=config.model, loaded=loaded, store=store,
                           before=lambda: baseline(loaded, eval_spec, store), desc="methods", keep_going=True)
    rows = []
    for name in tqdm(names, desc="methods", unit="method"):
        try:
            if name in failed:  # it failed in its cell; running it again here would fail the same way
                raise failed[name]
            variant = variants.parse(loaded, name, calib=config.calib_for(name), store=store)
            rows.append(evaluate(loaded, variant, eval_spec, store=store, seed=config.seed))
        except QkitError:
            raise
        except Exception as e:  # noqa: BLE001 - one method's failure must not hide the others' results
            warnings.warn(f"{name} failed: {type(e).__name__}: {e}", stacklevel=2)
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
    df = pd.DataFrame(rows)
    df.attrs["model"] = loaded.info
    return Result(config, df)


def evaluated(loaded: models.LoadedModel, name: str, calib: CalibSpec, eval_spec: EvalSpec, store: Store) -> bool:
    """Whether the store holds method `name`'s evaluation on `eval_spec`, known without building anything."""
    key = variants.method_identity(loaded, name, calib, store)
    return store.lookup(EVALUATION, evaluation_spec(key, eval_spec)) is not None


def _method_cell(name: str, calib: CalibSpec, eval_spec: EvalSpec, seed: int) -> None:
    loaded, store = cells.worker()
    evaluate(loaded, variants.parse(loaded, name, calib=calib, store=store), eval_spec, store=store, seed=seed)


@dataclass
class Result:
    config: Config
    rows: pd.DataFrame  # one row per method: every measure with its CI, or the method's error

    @property
    def ok(self) -> pd.DataFrame:
        return self.rows[self.rows["error"].isna()] if "error" in self.rows else self.rows

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"methods": methods_table(self.config.methods, self.config), "results": results_table(self.rows),
                "size breakdown": size_breakdown(self.rows), "GGUF tensor types": gguf_tensor_types(self.rows)}

    def findings(self) -> list[str]:
        return rank_findings(self.ok, "kld_mean", "KLD") + rank_findings(
            self.ok, "top1_pct", "top-1 agreement (%)", higher_is_better=True) + calibration_findings(
            self.config, self.config.methods or list(registry.STUDY_METHODS))  # specs: a row holds a label

    def figures(self) -> plots.Figures:
        r = self.rows
        return plots.Figures({
            "size against KLD": lambda: plots.size_vs_kld(r),
            "KLD": lambda: plots.metric_bars(r, "kld_mean", "mean KL divergence to baseline (nats)", log=True),
            "top-1": lambda: plots.metric_bars(r, "top1_pct", "top-1 agreement with baseline (%)"),
            "ΔNLL": lambda: plots.metric_bars(r, "delta_nll", "increase in mean negative log-likelihood over "
                                                            "baseline (nats/token)"),
            "size reduction": lambda: plots.memory_reduction(r),
        })

    def provenance(self) -> pd.DataFrame:
        table, text = provenance_table(self.rows), self.config.eval_text
        if len(table) and text not in data.EVAL_DOMAINS:  # a user's file: which one, by content
            info = data.describe(text)
            table.insert(0, "eval text", f"{info['path']} (sha256 {info['sha256'][:16]}, {info['size_bytes']:,} bytes)")
        return table

    def summary(self) -> Summary:
        ok = self.ok.dropna(subset=["kld_mean"])
        failed = [m for m in self.rows["method"] if m not in set(ok["method"])]
        if ok.empty:
            return Summary("quantization methods", "no method finished", status="failed")
        best, small = ok.loc[ok["kld_mean"].idxmin()], ok.loc[ok["size_mb"].idxmin()]
        headline = (f"{len(ok)} methods on {self.config.model}: least loss {best['method']} (KLD "
                    f"{best['kld_mean']:.3g}, {best['size_mb']:.0f} MB); smallest {small['method']} "
                    f"({small['size_mb']:.0f} MB, KLD {small['kld_mean']:.3g})")
        return Summary("quantization methods", headline, best["method"],
                       f"{len(failed)} failed: {', '.join(failed)}" if failed else "ok", "size against KLD")


def rank_findings(df: pd.DataFrame, metric: str, label: str, *, higher_is_better: bool = False) -> list[str]:
    """The methods ranked by `metric`, worded by their 95% CIs: a method is ahead of the next only when
    their CIs do not overlap; those whose CIs overlap are a tie at this sample size. Ends with the
    smallest difference the run can resolve (the narrowest CI's half-width)."""
    d = df.dropna(subset=[metric]).sort_values(metric, ascending=not higher_is_better)
    if d.empty:
        return []
    low, high = d[f"{metric}_low"], d[f"{metric}_high"]
    fmt = lambda r: (f"{r['method']} {r[metric]:.3g}" + ("" if pd.isna(r[f"{metric}_low"]) else  # noqa: E731
                     f" [{r[f'{metric}_low']:.3g}, {r[f'{metric}_high']:.3g}]"))
    tiers, current = [], [d.iloc[0]]
    for (_, prev), (_, r) in zip(d.iloc[:-1].iterrows(), d.iloc[1:].iterrows()):
        apart = (prev[f"{metric}_high"] < r[f"{metric}_low"]) if not higher_is_better else (
            prev[f"{metric}_low"] > r[f"{metric}_high"])
        if apart:
            tiers.append(current)
            current = []
        current.append(r)
    tiers.append(current)
    order = " > ".join("(" + ", ".join(fmt(r) for r in t) + ")" if len(t) > 1 else fmt(t[0]) for t in tiers)
    half = ((high - low) / 2).dropna()
    resolve = (f" The narrowest CI is ±{half.min():.2g}: smaller differences are not resolved here."
               if len(half) else " No CI: the evaluation text held a single chunk.")
    return [f"**{label}**, best first; a `>` only where the 95% CIs do not overlap, parentheses around methods "
            f"this run cannot tell apart: {order}.{resolve}"]


def calibration_findings(calibration: Calibration, names: Sequence[str]) -> list[str]:
    """A line saying which of the calibrated methods among `names` saw a calibration size of their own."""
    calibrated = [n for n in names if variants.is_method(n) and registry.get_method(n).needs_calibration]
    own = [n for n in calibrated if n in dict(calibration.calib_sizes)]
    if not own:
        return []
    def size(name: str) -> str:
        spec = calibration.calib_for(name)
        return f"{name} {spec.n_samples} x {spec.seq_len}"

    rest = [n for n in calibrated if n not in own]
    return [f"**Calibration differs by method** (tokens: samples x length): {', '.join(map(size, own))}"
            + (f"; the others ({', '.join(rest)}) {calibration.samples} x {calibration.seq_len}" if rest else "")
            + ". A method's rank holds for the calibration it saw."]


def methods_table(method_names: Sequence[str] | None = None, calibration: Calibration | None = None
                  ) -> pd.DataFrame:
    """The registry as a table: what each method stores, whether it calibrates (on how many samples x tokens,
    given the study's `calibration`), where it runs natively. Checkpoints made elsewhere are not methods:
    the results table says what they hold."""
    names = [n for n in (method_names or registry.STUDY_METHODS) if variants.is_method(n)]

    def calibrated(m: registry.Method) -> str:
        if not m.needs_calibration:
            return "no"
        if calibration is None:
            return "yes"
        spec = calibration.calib_for(m.name)
        return f"{spec.name}, {spec.n_samples} x {spec.seq_len}"

    rows = [{"method": m.name, "what it is": m.title, "weights": m.weight_format or "from the checkpoint",
             "bits (W/A)": f"{m.weight_bits}/{m.act_bits or 16}" if m.weight_bits else "from the checkpoint",
             "group": m.group_size or "-", "calibration": calibrated(m),
             "runs natively on": str(m.native_hardware)} for m in map(registry.get_method, names)]
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()
