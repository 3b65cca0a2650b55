"""The methods study's tables read from its rows and checkpoints: the results, the bytes on disk by role,
the GGUF block types, the model note and where each result came from. The task study reads its
checkpoints' provenance here too."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from qkit import models
from qkit.core.store import MANIFEST, Store
from qkit.quant import artifacts

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
