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
from qkit.core.store import MANIFEST, Kind, Store
from qkit.data import CalibSpec
from qkit.evaluation import EvalSpec, baseline, compare, metrics
from qkit.quant import artifacts, formats, registry, variants
from qkit.studies import cells, contract, plots
from qkit.studies.contract import Summary

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
    bf16 = models.bf16_bytes(loaded.model)
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


@dataclass(frozen=True)
class Config(cells.Placement):
    """What the methods study runs: the model, the methods (None: every study method), the calibration set
    of the methods that calibrate, and the held-out text every checkpoint is evaluated on. Each method
    missing from the store is a cell (see :class:`qkit.studies.cells.Placement`); checkpoints made
    elsewhere are evaluated here, where their paths are."""

    model: str = models.DEFAULT_MODEL
    methods: tuple[str, ...] | None = None
    calib: str = "prose"
    samples: int = 32  # llm-compressor's examples use 512 x 2048 on a GPU
    seq_len: int = 512
    eval_text: str = "prose"
    eval_tokens: int = 8192
    ctx: int = 512
    seed: int = 0

    @property
    def calib_spec(self) -> CalibSpec:
        return CalibSpec(self.calib, self.samples, self.seq_len, self.seed)

    @property
    def eval_spec(self) -> EvalSpec:
        return EvalSpec(domain=self.eval_text, n_tokens=self.eval_tokens, ctx=self.ctx)


PROFILES = {
    "quick": Config(),
    # llm-compressor's own calibration size, and 8x the evaluation text: for a GPU.
    "full": Config(samples=512, seq_len=2048, eval_tokens=65536),
}


def config(profile: str | Config = "quick", **overrides) -> Config:
    """A profile's config with the overrides that are not None (lists become tuples)."""
    return contract.config(PROFILES, profile, **overrides)


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
    calib, eval_spec = config.calib_spec, config.eval_spec
    loaded = models.resolve_model(config.model, store=store)
    todo = [n for n in names if variants.is_method(n) and not evaluated(loaded, n, calib, eval_spec, store)]
    failed = cells.offload(config, _method_cell, [(n, (n, calib, eval_spec, config.seed)) for n in todo],
                           model=config.model, loaded=loaded, store=store,
                           before=lambda: baseline(loaded, eval_spec, store), desc="methods", keep_going=True)
    rows = []
    for name in tqdm(names, desc="methods", unit="method"):
        try:
            if name in failed:  # it failed in its cell; running it again here would fail the same way
                raise failed[name]
            variant = variants.parse(loaded, name, calib=calib, store=store)
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
        return {"methods": methods_table(self.config.methods), "results": results_table(self.rows),
                "size breakdown": size_breakdown(self.rows), "GGUF tensor types": gguf_tensor_types(self.rows)}

    def findings(self) -> list[str]:
        return rank_findings(self.ok, "kld_mean", "KLD") + rank_findings(
            self.ok, "top1_pct", "top-1 agreement (%)", higher_is_better=True)

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


def methods_table(method_names: Sequence[str] | None = None) -> pd.DataFrame:
    """The registry as a table: what each method stores, whether it calibrates, where it runs natively.
    Checkpoints made elsewhere are not methods: the results table says what they hold."""
    names = [n for n in (method_names or registry.STUDY_METHODS) if variants.is_method(n)]
    rows = [{"method": m.name, "what it is": m.title, "weights": m.weight_format or "from the checkpoint",
             "bits (W/A)": f"{m.weight_bits}/{m.act_bits or 16}" if m.weight_bits else "from the checkpoint",
             "group": m.group_size or "-", "calibration": "yes" if m.needs_calibration else "no",
             "runs natively on": str(m.native_hardware)} for m in map(registry.get_method, names)]
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()


RESULT_COLUMNS = {
    "size_mb": "size (MB)", "reduction_vs_bf16": "× smaller than BF16", "ppl_quant": "perplexity",
    "kld_mean": "KLD mean", "kld_p99": "KLD p99", "top1_pct": "top-1 agree (%)",
    "mean_dp_pct": "mean Δp (%)", "ppl_recovery_pct": "ppl recovery (%)", "quant_seconds": "quantize (s)",
    "error": "error",
}


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader compares first, rounded; the full table stays in `df`."""
    cols = [c for c in RESULT_COLUMNS if c in df and (c != "error" or df[c].notna().any())]
    return df.set_index("method")[cols].rename(columns=RESULT_COLUMNS).round(
        {"size (MB)": 1, "× smaller than BF16": 2, "perplexity": 3, "KLD mean": 5, "KLD p99": 4,
         "top-1 agree (%)": 2, "mean Δp (%)": 3, "ppl recovery (%)": 2, "quantize (s)": 1})


# Tensor roles in a compressed-tensors checkpoint, by name suffix, so that the bytes spent on scales
# and zero points can be told apart from the quantized weights and from what stays in float.
_ROLES = (("weight_packed", "quantized weights"), ("weight_scale", "scales"),
          ("weight_global_scale", "scales"), ("input_scale", "scales"), ("input_global_scale", "scales"),
          ("weight_zero_point", "zero points"), ("weight_shape", "metadata"),
          # GPTQModel's GPTQ format
          ("qweight", "quantized weights"), ("scales", "scales"), ("qzeros", "zero points"), ("g_idx", "metadata"))


def _built(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose method built a checkpoint (a run where every method failed has none)."""
    return df.dropna(subset=["checkpoint"]) if "checkpoint" in df else df.iloc[:0]


def size_breakdown(df: pd.DataFrame) -> pd.DataFrame:
    """Bytes on disk per method split into quantized weights, scales, zero points and float tensors,
    read from the checkpoints' safetensors headers. GGUF checkpoints keep scales inside their blocks, so
    they are left out here (see :func:`gguf_tensor_types`)."""
    rows = []
    for _, r in _built(df).iterrows():
        quantized_layers = set()
        sizes: dict[str, int] = {}
        entries = [(name, nbytes) for name, _, nbytes in artifacts.checkpoint_tensors(Path(r["checkpoint"]))]
        if not entries:
            continue
        for name, _ in entries:
            if name.endswith(("weight_scale", "weight_packed")):
                quantized_layers.add(name.rsplit(".", 1)[0])
        for name, nbytes in entries:
            prefix, _, leaf = name.rpartition(".")
            role = next((label for suffix, label in _ROLES if leaf == suffix), None)
            if role is None:
                role = "quantized weights" if prefix in quantized_layers and leaf == "weight" else "float (unquantized)"
            sizes[role] = sizes.get(role, 0) + nbytes
        rows.append({"method": r["method"], **{k: v / 1e6 for k, v in sizes.items()}})
    if not rows:
        return pd.DataFrame()
    cols = ["quantized weights", "scales", "zero points", "float (unquantized)", "metadata"]
    out = pd.DataFrame(rows).set_index("method").fillna(0.0)
    return out[[c for c in cols if c in out]].round(2).add_suffix(" (MB)")


def gguf_tensor_types(df: pd.DataFrame) -> pd.DataFrame:
    """Tensors of each block type in each GGUF checkpoint: the mix llama-quantize's rules chose."""
    rows = []
    for _, r in _built(df).iterrows():
        manifest = Path(r["checkpoint"]) / MANIFEST
        meta = Store.manifest(Path(r["checkpoint"]))["meta"] if manifest.exists() else {}  # none: made elsewhere
        if meta.get("backend") == "gguf":
            rows.append({"method": r["method"], **meta["tensor_types"]})
    return pd.DataFrame(rows).set_index("method").fillna(0).astype(int) if rows else pd.DataFrame()


def model_note(df: pd.DataFrame):
    """A short markdown note on the model and baseline that the numbers refer to."""
    from IPython.display import Markdown

    info = df.attrs.get("model", {})
    ok = df[df["error"].isna()] if "error" in df else df
    lines = [f"**Model:** `{info.get('spec')}` ({info.get('n_params', 0) / 1e6:.1f}M parameters, "
             f"{info.get('kind')}); baseline perplexity on this text: "
             f"{ok['ppl_base'].iloc[0]:.3f}." if len(ok) else f"**Model:** `{info.get('spec')}`."]
    if info.get("source", {}).get("package") == models.SMOLLM2_SOURCE["package"]:
        lines.append(
            "**Caveat:** SmolLM2's weights reach qkit from a Q4_1 GGUF, so they already sit on a 4-bit grid "
            "in blocks of 32, where INT4 at group size 32 could look lossless. qkit's INT4 methods use group "
            "size 64 (128, the usual choice, does not divide SmolLM2's 576-wide layers, which llm-compressor "
            "refuses); at 64 the rounding error is like a natural weight matrix's.")
    failed = df[df["error"].notna()] if "error" in df else df.iloc[:0]
    for _, r in failed.iterrows():
        lines.append(f"**{r['method']} failed:** {r['error']}")
    return Markdown("\n\n".join(lines))


def provenance_table(df: pd.DataFrame) -> pd.DataFrame:
    """Where each result came from: the checkpoint's manifest (recipe, calibration, seed, versions)."""
    rows = []
    for _, r in _built(df).iterrows():
        path = Path(r["checkpoint"])
        if path.exists() and not (path / MANIFEST).exists():
            rows.append({"method": r["method"], "cache key": f"made elsewhere: {path}"})
            continue
        try:
            m = Store.manifest(path)
        except OSError:  # the result was read from the store, its checkpoint since cleaned away
            rows.append({"method": r["method"], "cache key": f"{r['checkpoint']} (no longer in the store)"})
            continue
        prov = m["provenance"]
        calib = m["spec"].get("calibration")
        rows.append({"method": r["method"], "cache key": m["key"],
                     "calibration": (f"{calib['name']}, {calib['n_samples']} x {calib['seq_len']} tokens, "
                                     f"seed {calib['seed']}" + (f", sha256 {calib['sha256'][:16]}"
                                                                if calib.get("sha256") else ""))
                     if calib else "none (not needed)",
                     "built": prov["time"], "git commit": prov["git_commit"],
                     "hardware": f"{prov['hardware'].get('gpu') or prov['hardware']['cpu']}",
                     # built before qkit recorded the node: unknown
                     "node": " ".join(prov.get("node", {}).values()) or "unknown",
                     "libraries": ", ".join(f"{k} {v}" for k, v in prov["libraries"].items())})
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()
