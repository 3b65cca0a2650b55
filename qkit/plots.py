"""Matplotlib figures drawn from a study's results table (one row per method).

Each function takes the tidy table and returns a Figure, so a notebook shows it and a test can inspect it.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# The seed's rule-of-thumb reductions against BF16, shown beside what was measured.
SEED_REDUCTION = {"FP8": 2.0, "INT8": 2.0, "INT4": 4.0, "NVFP4": 3.3}


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["error"].isna()] if "error" in df else df


def size_vs_kld(df: pd.DataFrame) -> Figure:
    """Checkpoint size against mean KLD to the baseline, with bootstrap CIs: down and left is better."""
    d = _ok(df).dropna(subset=["kld_mean"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    yerr = np.vstack([d["kld_mean"] - d["kld_mean_low"], d["kld_mean_high"] - d["kld_mean"]])
    ax.errorbar(d["size_mb"], d["kld_mean"], yerr=yerr, fmt="o", capsize=3)
    for _, r in d.iterrows():
        ax.annotate(r["method"], (r["size_mb"], r["kld_mean"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint size on disk (MB)")
    ax.set_ylabel("mean KL divergence to baseline (nats, log scale)")
    ax.set_title("Size against quality loss")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def metric_bars(df: pd.DataFrame, metric: str, label: str, *, log: bool = False) -> Figure:
    """One bar per method with its 95% bootstrap CI (`<metric>_low` / `<metric>_high`)."""
    d = _ok(df).dropna(subset=[metric])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(d) + 1.2))
    y = np.arange(len(d))
    xerr = np.vstack([d[metric] - d[f"{metric}_low"], d[f"{metric}_high"] - d[metric]])
    ax.barh(y, d[metric], xerr=xerr, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_yticks(y, d["method"])
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def memory_reduction(df: pd.DataFrame) -> Figure:
    """Measured size reduction against BF16 beside the seed's rule of thumb for the method's format."""
    d = _ok(df).dropna(subset=["reduction_vs_bf16"])
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(d))
    seed = [SEED_REDUCTION.get(f, np.nan) for f in d["weight_format"]]
    ax.bar(x - 0.2, d["reduction_vs_bf16"], width=0.4, label="measured (whole checkpoint)")
    ax.bar(x + 0.2, seed, width=0.4, label="seed's figure (weights only)", color="tab:gray", alpha=0.6)
    ax.set_xticks(x, d["method"], rotation=30, ha="right")
    ax.set_ylabel("× smaller than BF16")
    ax.axhline(1, color="black", lw=0.8)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig



def recovery_by_family(fam: pd.DataFrame) -> Figure:
    """One panel per method: recovery % of the baseline's score per task family (100 = no loss). Error
    bars are the 95% paired-bootstrap CI of the score difference, over the baseline's score; a bar whose
    bar crosses 100 shows no detectable change. "baseline 0" marks a family this model cannot do at all,
    where recovery is undefined and no loss can show."""
    methods = list(dict.fromkeys(fam["method"]))
    families = list(dict.fromkeys(fam["family"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 0.8, 3.8), sharey=True, squeeze=False)
    colors = dict(zip(families, plt.cm.tab10.colors))
    for ax, method in zip(axes[0], methods):
        d = fam[fam["method"] == method].set_index("family").reindex(families)
        x = np.arange(len(families))
        base = d["score_base"].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            rec = np.where(base > 0, 100 * d["score"].to_numpy(float) / base, np.nan)
            low = np.where(base > 0, 100 * (1 + d["diff_low"].to_numpy(float) / base), np.nan)
            high = np.where(base > 0, 100 * (1 + d["diff_high"].to_numpy(float) / base), np.nan)
        err = np.nan_to_num(np.vstack([rec - low, high - rec]))
        ax.bar(x, np.nan_to_num(rec), yerr=err, capsize=3, color=[colors[f] for f in families], alpha=0.85)
        for xi, b, r in zip(x, base, rec):
            if not b > 0:
                ax.annotate("baseline 0", (xi, 0), textcoords="offset points", xytext=(0, 3), ha="center",
                            fontsize=7, rotation=90, va="bottom")
        ax.axhline(100, color="black", lw=0.8, ls="--")
        ax.set_xticks(x, [f.replace("_", " ") for f in families], rotation=30, ha="right")
        ax.set_title(method, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("recovery of baseline score (%)")
    fig.tight_layout()
    return fig
