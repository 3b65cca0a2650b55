"""Studies: one function each, returning a tidy results table that its notebook and the CLI both use."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qkit import metrics, methods, models
from qkit.evaluation import EvalSpec, compare
from qkit.errors import QkitError
from qkit.methods import CalibSpec
from qkit.store import Store

CI_BOOT = 1000


def result_row(result: dict, seed: int = 0) -> dict:
    """Flatten one evaluation into table columns, with 95% bootstrap CIs over chunks."""
    ci = lambda values, **kw: metrics.mean_ci(values, n_boot=CI_BOOT, seed=seed, **kw)  # noqa: E731
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


def evaluate_method(loaded: models.LoadedModel, method: str, *, calib: CalibSpec | None = None,
                    eval_spec: EvalSpec = EvalSpec(), store: Store | None = None, seed: int = 0,
                    quantized: models.Lazy | None = None) -> dict:
    """Quantize (or reuse the cached checkpoint), evaluate against the baseline, and describe the result.
    Pass the same ``quantized`` (a :class:`models.Lazy` of this checkpoint) to several calls to load it once."""
    store = store or Store()
    m = methods.get_method(method)
    ckpt = methods.quantize(loaded, m, calib=calib, store=store)
    quantized = quantized or models.Lazy(lambda: methods.load_quantized(ckpt))
    result = store.get_json("evaluation", evaluation_spec(ckpt.path.name, eval_spec),
                            lambda: compare(quantized(), loaded, eval_spec, store, label=m.name))
    return {
        "method": m.name, "title": m.title, "weight_format": m.weight_format,
        "weight_bits": m.weight_bits, "act_bits": m.act_bits, "group_size": m.group_size,
        "needs_calibration": m.needs_calibration, "native_hardware": str(m.native_hardware),
        "format": ckpt.meta.get("format"), "size_mb": ckpt.size_bytes / 1e6,
        "bf16_run_mb": ckpt.bf16_run_bytes / 1e6, "bf16_mb": ckpt.bf16_bytes / 1e6,
        "reduction_vs_bf16": 1 / ckpt.bf16_ratio,
        "quant_seconds": ckpt.seconds, "quant_peak_rss_mb": ckpt.meta.get("peak_rss_bytes", 0) / 1e6,
        # checkpoints built before qkit sampled memory per run lack it
        "quant_rss_growth_mb": ckpt.meta.get("rss_growth_bytes", float("nan")) / 1e6,
        "checkpoint": str(ckpt.path), **result_row(result, seed), "error": None,
    }


def methods_study(model: str = models.DEFAULT_MODEL, method_names: Sequence[str] | None = None, *,
                  calib: CalibSpec | None = None, eval_spec: EvalSpec = EvalSpec(),
                  store: Store | None = None, seed: int = 0) -> pd.DataFrame:
    """Quantize `model` with each method and measure what it costs against the float baseline.

    A method that fails is kept in the table with its error, so the others still report; every finished
    step sits in the store, so a rerun resumes where this one stopped.
    """
    store = store or Store()
    names = list(method_names or methods.STUDY_METHODS)
    for name in names:
        methods.get_method(name)  # fail on a typo before spending minutes on the first methods
    loaded = models.resolve_model(model, store=store)
    rows = []
    for name in tqdm(names, desc="methods", unit="method"):
        try:
            rows.append(evaluate_method(loaded, name, calib=calib, eval_spec=eval_spec, store=store, seed=seed))
        except QkitError:
            raise
        except Exception as e:  # noqa: BLE001 - one method's failure must not hide the others' results
            warnings.warn(f"{name} failed: {type(e).__name__}: {e}", stacklevel=2)
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
    df = pd.DataFrame(rows)
    df.attrs["model"] = loaded.info
    return df


def methods_table(method_names: Sequence[str] | None = None) -> pd.DataFrame:
    """The registry as a table: what each method stores, whether it calibrates, where it runs natively."""
    rows = [{"method": m.name, "what it is": m.title, "weights": m.weight_format,
             "bits (W/A)": f"{m.weight_bits}/{m.act_bits or 16}", "group": m.group_size or "-",
             "calibration": "yes" if m.needs_calibration else "no", "runs natively on": str(m.native_hardware)}
            for m in (methods.get_method(n) for n in (method_names or methods.STUDY_METHODS))]
    return pd.DataFrame(rows).set_index("method")


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


def size_breakdown(df: pd.DataFrame) -> pd.DataFrame:
    """Bytes on disk per method split into quantized weights, scales, zero points and float tensors,
    read from the checkpoints' safetensors headers. GGUF checkpoints keep scales inside their blocks, so
    they are left out here (see :func:`gguf_tensor_types`)."""
    rows = []
    for _, r in df.dropna(subset=["checkpoint"]).iterrows():
        quantized_layers = set()
        sizes: dict[str, int] = {}
        entries = [(name, nbytes) for name, _, nbytes in methods.checkpoint_tensors(Path(r["checkpoint"]))]
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
    cols = ["quantized weights", "scales", "zero points", "float (unquantized)", "metadata"]
    out = pd.DataFrame(rows).set_index("method").fillna(0.0)
    return out[[c for c in cols if c in out]].round(2).add_suffix(" (MB)")


def gguf_tensor_types(df: pd.DataFrame) -> pd.DataFrame:
    """Tensors of each block type in each GGUF checkpoint: the mix llama-quantize's rules chose."""
    rows = []
    for _, r in df.dropna(subset=["checkpoint"]).iterrows():
        meta = Store.manifest(Path(r["checkpoint"]))["meta"]
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
    for _, r in df.dropna(subset=["checkpoint"]).iterrows():
        m = Store.manifest(Path(r["checkpoint"]))
        prov = m["provenance"]
        calib = m["spec"].get("calibration")
        rows.append({"method": r["method"], "cache key": m["key"],
                     "calibration": (f"{calib['name']}, {calib['n_samples']} x {calib['seq_len']} tokens, "
                                     f"seed {calib['seed']}") if calib else "none (not needed)",
                     "built": prov["time"], "git commit": prov["git_commit"],
                     "hardware": f"{prov['hardware'].get('gpu') or prov['hardware']['cpu']}",
                     **{k: v for k, v in prov["libraries"].items()}})
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()
