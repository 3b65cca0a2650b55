"""The layer-sensitivity study's figures (:mod:`qkit.studies.layer_sensitivity`), drawn from its tables
with the shared helpers of :mod:`qkit.studies.plots`."""
from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qkit.studies.plots import error_lengths, log_scale, separate_labels


def layer_heatmaps(grids: Mapping[str, pd.DataFrame], fmt: str) -> Figure:
    """Decoder layer (rows) x module type (columns), one panel per eval text: a module's KLD when it alone
    is in `fmt` (or the proxy's estimate where the scan did not measure single modules), log colours."""
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids) + 1.0, 6.0), squeeze=False)
    for ax, (label, grid) in zip(axes[0], grids.items()):
        values = grid.to_numpy(float)
        positive = values[values > 0]
        norm = LogNorm(positive.min(), positive.max()) if positive.size and positive.min() < positive.max() else None
        im = ax.imshow(np.where(values > 0, values, np.nan), cmap="magma_r", aspect="auto", norm=norm)
        ax.set_xticks(range(len(grid.columns)), [c.removesuffix("_proj") for c in grid.columns], rotation=45)
        ax.set_yticks(range(len(grid.index)), grid.index, fontsize=7)
        ax.set_xlabel("module type")
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0][0].set_ylabel("decoder layer")
    fig.suptitle(f"Which modules hurt in {fmt} (darker: more)", fontsize=10)
    fig.tight_layout()
    return fig


def unit_curves(scan: pd.DataFrame, texts: list[str]) -> Figure:
    """Each decoder layer alone in the format: KLD with its 95% CI, one line per eval text."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for text in texts:
        g = scan[scan["text"] == text]
        layers = g["unit"].str.removeprefix("layer ").astype(int)
        ax.errorbar(layers, g["kld_mean"], yerr=error_lengths(g["kld_mean"], g["kld_low"], g["kld_high"]),
                    marker="o", ms=3, capsize=2, label=text)
    if len(scan):
        log_scale(ax, np.concatenate([scan["kld_mean"], scan["kld_low"], scan["kld_high"]]))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer quantized alone")
    ax.set_ylabel("KLD to baseline (nats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def unit_bars(scan: pd.DataFrame, texts: list[str]) -> Figure:
    """Each module type (across all layers) alone in the format: KLD with its 95% CI, bars per eval text."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    units = list(dict.fromkeys(scan["unit"]))
    width = 0.8 / max(1, len(texts))
    for k, text in enumerate(texts):
        g = scan[scan["text"] == text].set_index("unit").reindex(units)
        x = np.arange(len(units)) + k * width
        ax.bar(x, g["kld_mean"], width, yerr=error_lengths(g["kld_mean"], g["kld_low"], g["kld_high"]), capsize=2,
               label=text)
    ax.set_xticks(np.arange(len(units)) + width * (len(texts) - 1) / 2, [u.removeprefix("type ") for u in units])
    ax.set_yscale("log")
    ax.set_ylabel("KLD to baseline (nats, log)")
    ax.set_xlabel("module type quantized alone (in every layer)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    return fig


def proxy_scatter(merged: pd.DataFrame) -> Figure:
    """The proxy (the Fisher estimate of a unit's KLD) against the measured KLD, per unit and text, with the
    line where they are equal."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for text, g in merged.groupby("text", sort=False):
        ax.errorbar(g["proxy"], g["kld_mean"], yerr=error_lengths(g["kld_mean"], g["kld_low"], g["kld_high"]),
                    fmt="o", ms=4, capsize=2, label=text, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    both = pd.concat([merged["proxy"], merged["kld_mean"]])
    span = [both[both > 0].min(), both.max()]
    ax.plot(span, span, color="grey", lw=0.8, ls="--", label="estimate = measured")
    ax.set_xlabel("proxy: ½ Σ F ⊙ ΔW² per token, diagonal Fisher on calibration text (nats)")
    ax.set_ylabel("measured KLD to baseline (nats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def pareto(table: pd.DataFrame) -> Figure:
    """Size (as on a GPU, BF16 where not quantized) against KLD with 95% CIs, one panel per eval text: the
    uniform methods and the searched mixes. Down and left is better."""
    texts = list(dict.fromkeys(table["text"]))
    fig, axes = plt.subplots(1, len(texts), figsize=(6.5 * len(texts), 4.6), squeeze=False)
    for ax, text in zip(axes[0], texts):
        labels = []
        for kind, marker, color in (("uniform", "o", "tab:blue"), ("mix", "s", "tab:red")):
            d = table[(table["text"] == text) & (table["kind"] == kind)]
            ax.errorbar(d["bf16_run_mb"], d["kld_mean"], yerr=error_lengths(d["kld_mean"], d["kld_mean_low"],
                        d["kld_mean_high"]), fmt=marker, color=color, capsize=3, label=kind)
            labels += [ax.annotate(r["method"], (r["bf16_run_mb"], r["kld_mean"]), textcoords="offset points",
                                   xytext=(5, 4), fontsize=7, arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
                       for _, r in d.iterrows()]
        sub = table[table["text"] == text]
        log_scale(ax, np.concatenate([sub["kld_mean"], sub["kld_mean_low"], sub["kld_mean_high"]]))
        ax.set_xlabel("size as on a GPU (MB)")
        ax.set_ylabel("KLD to baseline (nats, log)")
        ax.set_title(f"evaluated on {text}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.15, y=0.15)
        fig.tight_layout()
        separate_labels(labels)
    return fig
