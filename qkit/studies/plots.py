"""Matplotlib figures drawn from study tables, and the interactive panel that redraws them in JupyterLab.

Each function takes a tidy table and returns a Figure, so a notebook shows it and a test can inspect it.
A study's ``Result.figures()`` is a :class:`Figures`: named figures, each drawn when it is first asked for.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

import qkit
from qkit.quant.formats import rule_of_thumb


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["error"].isna()] if "error" in df else df


class Figures(Mapping):
    """A study's figures by name, each drawn on first access (a notebook shows one per cell, and pyplot
    would display every figure a cell created)."""

    def __init__(self, draw: dict[str, Callable[[], Figure]]) -> None:
        self._draw, self._drawn = draw, {}

    def __getitem__(self, name: str) -> Figure:
        if name not in self._drawn:
            self._drawn[name] = self._draw[name]()
        return self._drawn[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._draw)

    def __len__(self) -> int:
        return len(self._draw)


def panel(show: Any, **controls: Any) -> Any:
    """An ipywidgets panel that reruns ``show(**values)`` whenever one of `controls` changes, for JupyterLab.

    Under `qkit report` it is a note instead: the HTML cannot run it, and a widget cell in a papermill run
    sometimes never gets its execute_reply (jupyter/nbclient#312), which once left a report waiting forever.
    """
    if os.environ.get(qkit.REPORT_ENV) == "1":
        from IPython.display import Markdown

        return Markdown("*The interactive panel runs when this notebook is opened in JupyterLab; this report "
                        "shows its default view above.*")
    import ipywidgets as widgets

    return widgets.interactive(show, **controls)


def log_scale(ax, values, axis: str = "y") -> None:
    """A log axis for values that may include exact zeros (a lossless method, a runtime KV cache's
    unquantized first chunk): symmetric-log, linear below the smallest positive value, so a zero shows at 0
    instead of vanishing; a plain log axis when every value is positive, linear when none is."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    positive = v[v > 0]
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if positive.size == 0:
        setter("linear")
    elif (v <= 0).any():
        setter("symlog", linthresh=float(positive.min()))
    else:
        setter("log")


def error_lengths(point, low, high) -> np.ndarray:
    """[2, N] error-bar lengths below and above each point, as matplotlib's ``xerr``/``yerr`` take them.

    matplotlib refuses negative lengths. Every interval qkit draws contains its point by construction
    (:func:`qkit.metrics.bootstrap_ci`, and derived bounds anchored on their point), so a length is never
    below zero; a missing CI (NaN, e.g. a single unit) draws no bar.
    """
    point, low, high = (np.asarray(v, dtype=float) for v in (point, low, high))
    lengths = np.vstack([point - low, high - point])
    return np.where(np.isfinite(lengths) & (lengths > 0), lengths, 0.0)


def size_vs_kld(df: pd.DataFrame) -> Figure:
    """Checkpoint size against mean KLD to the baseline, with bootstrap CIs: down and left is better."""
    d = _ok(df).dropna(subset=["kld_mean"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    yerr = error_lengths(d["kld_mean"], d["kld_mean_low"], d["kld_mean_high"])
    ax.errorbar(d["size_mb"], d["kld_mean"], yerr=yerr, fmt="o", capsize=3)
    labels = [ax.annotate(r["method"], (r["size_mb"], r["kld_mean"]), textcoords="offset points", xytext=(5, 4),
                          fontsize=8, arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
              for _, r in d.iterrows()]
    log_scale(ax, np.concatenate([d["kld_mean"], d["kld_mean_low"], d["kld_mean_high"]]))
    ax.set_xlabel("checkpoint size on disk (MB)")
    ax.set_ylabel("mean KL divergence to baseline (nats, log scale)")
    ax.set_title("Size against quality loss")
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.12, y=0.15)  # room for the labels of the outermost points
    fig.tight_layout()
    separate_labels(labels)
    return fig


def separate_labels(labels: list) -> None:
    """Move point labels (annotations in offset points) up or down a line at a time until none covers
    another: methods of one format sit at nearly one point (fp8_static over fp8_dynamic, the W4A16 trio),
    and matplotlib places text without looking. A thin line still ties each label to its point."""
    if not labels:
        return
    fig = labels[0].figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    text_box = lambda t: Text.get_window_extent(t, renderer)  # noqa: E731  (the text alone, not its line)
    placed = []
    for label in sorted(labels, key=lambda t: -t.xy[1]):
        dx, dy = label.xyann
        for step in [0] + [k * sign for k in range(1, 2 * len(labels)) for sign in (1, -1)]:
            label.xyann = (dx, dy + 9 * step)
            if not any(text_box(label).overlaps(other) for other in placed):
                break
        placed.append(text_box(label))


def metric_bars(df: pd.DataFrame, metric: str, label: str, *, log: bool = False) -> Figure:
    """One bar per method with its 95% bootstrap CI (`<metric>_low` / `<metric>_high`)."""
    d = _ok(df).dropna(subset=[metric])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(d) + 1.2))
    y = np.arange(len(d))
    xerr = error_lengths(d[metric], d[f"{metric}_low"], d[f"{metric}_high"])
    ax.barh(y, d[metric], xerr=xerr, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_yticks(y, d["method"])
    ax.invert_yaxis()
    if log:
        log_scale(ax, np.concatenate([d[metric], d[f"{metric}_low"], d[f"{metric}_high"]]), axis="x")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def memory_reduction(df: pd.DataFrame) -> Figure:
    """Measured size reduction against BF16 beside the seed's rule of thumb for the method's format."""
    d = _ok(df).dropna(subset=["reduction_vs_bf16"])
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(d))
    labels = d["weight_format"] if "weight_format" in d else [None] * len(d)  # a directory has no method
    seed = [rule_of_thumb(f) or np.nan for f in labels]
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
        base, rec = d["score_base"].to_numpy(float), d["recovery_pct"].to_numpy(float)
        err = error_lengths(rec, d["recovery_low"], d["recovery_high"])
        ax.bar(x, np.nan_to_num(rec), yerr=err, capsize=3, color=[colors[f] for f in families], alpha=0.85)
        for xi, b, r in zip(x, base, rec):
            if not b > 0:
                ax.annotate("baseline 0", (xi, 0), textcoords="offset points", xytext=(0, 3), ha="center",
                            fontsize=7, rotation=90, va="bottom")
        ax.axhline(100, color="black", lw=0.8, ls="--")
        # Recovery of a near-zero baseline score swings wildly; clip the axis, not the data.
        ax.set_ylim(-10, 250)
        ax.set_xticks(x, [f.replace("_", " ") for f in families], rotation=30, ha="right")
        ax.set_title(method, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("recovery of baseline score (%)")
    fig.tight_layout()
    return fig


def source_heatmaps(matrices: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], label: str,
                    higher_is_better: bool = False) -> Figure:
    """Calibration source (rows) x eval text (columns), one panel per method: each method's (mean over
    seeds, seed-to-seed range) matrices; in-domain cells are outlined, the better end is lighter."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices) + 0.6, 3.4), squeeze=False)
    for ax, (method, (mean, spread)) in zip(axes[0], matrices.items()):
        values = mean.to_numpy(float)
        im = ax.imshow(values, cmap="viridis" if higher_is_better else "viridis_r", aspect="auto")
        ax.set_xticks(range(len(mean.columns)), mean.columns)
        ax.set_yticks(range(len(mean.index)), mean.index)
        for i, src in enumerate(mean.index):
            for j, dom in enumerate(mean.columns):
                r, g, b, _ = im.cmap(im.norm(values[i, j]))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # readable on the cell
                ax.text(j, i, f"{values[i, j]:.3g}\n±{spread.iloc[i, j] / 2:.1g}", ha="center", va="center",
                        fontsize=7, color=ink)
                if src == dom:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, color="red"))
        ax.set_xlabel("evaluated on")
        ax.set_title(method, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0][0].set_ylabel("calibrated on")
    fig.suptitle(f"{label} (± half the seed-to-seed range)", fontsize=10)
    fig.tight_layout()
    return fig


def size_curves(curves: Mapping[str, Mapping[str, pd.DataFrame]], label: str, title: str) -> Figure:
    """Quality against calibration samples and against tokens per sample: ``curves[method][axis]`` holds
    one row per axis value with the mean and std over seeds (axis "n_samples" or "seq_len")."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, (axis, name) in zip(axes[0], (("n_samples", "calibration samples"), ("seq_len", "tokens per sample"))):
        ticks = sorted({v for c in curves.values() for v in c[axis][axis]})
        for method, c in curves.items():
            ax.errorbar(c[axis][axis], c[axis]["mean"], yerr=c[axis]["std"].fillna(0), marker="o", capsize=3,
                        label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(f"{name} (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def calibration_cost(cost: pd.DataFrame) -> Figure:
    """Calibration time and the memory oneshot added against calibration tokens (samples x length), per
    method, from a cost table. Added, not peak: a worker's peak also holds what its earlier cells left to
    the allocator."""
    cost = cost.assign(tokens=cost["n_samples"] * cost["seq_len"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, g in cost.groupby("method", sort=False):
        g = g.groupby("tokens")[["quant_seconds", "rss_growth_mb"]].mean().reset_index()
        axes[0].plot(g["tokens"], g["quant_seconds"], marker="o", label=m)
        axes[1].plot(g["tokens"], g["rss_growth_mb"], marker="o", label=m)
    for ax, label in zip(axes, ("quantization time (s)", "memory added by oneshot (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration tokens (samples × length, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def segment_histograms(diagnostics: dict) -> Figure:
    """Token lengths of the document pieces in each calibration set (a piece ends at EOS or a row edge)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    longest = max(max(d.segment_lengths) for d in diagnostics.values())
    bins = np.unique(np.geomspace(1, longest, 30).round())
    # Side by side in each bin: outlines of sets whose pieces all have one length would cover each other.
    ax.hist([d.segment_lengths for d in diagnostics.values()], bins=bins,
            label=[f"{name} ({len(d.segment_lengths)})" for name, d in diagnostics.items()])
    ax.set_xscale("log")
    ax.set_xlabel("tokens per document piece (log scale)")
    ax.set_ylabel("pieces")
    ax.legend(fontsize=8, title="source (pieces)", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def kv_by_position(table: pd.DataFrame, metric: str = "kld") -> Figure:
    """Quality by position bucket per KV scheme, with 95% CIs: a KV error that grows with distance rises
    to the right. A scheme at exactly 0 (a runtime cache's first, unquantized chunk) sits on the linear part
    of the axis, below the smallest positive value."""
    buckets = list(dict.fromkeys(table.sort_values("from")["bucket"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for scheme, g in table.groupby("scheme", sort=False):
        x = [buckets.index(b) for b in g["bucket"]]
        ax.errorbar(x, g[metric], yerr=error_lengths(g[metric], g["low"], g["high"]),
                    marker="o", capsize=3, label=scheme)
    ax.set_xticks(range(len(buckets)), buckets)
    log_scale(ax, np.concatenate([table[metric], table["low"], table["high"]]))
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("mean KL divergence to baseline (nats, log)")
    ax.set_title("KV-cache quantization: quality by position")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def kv_retrieval(table: pd.DataFrame) -> Figure:
    """Passkey accuracy per scheme (rows) and (context length, depth) (columns)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * table.shape[1] + 2), 0.5 * len(table) + 1.5))
    im = ax.imshow(table.to_numpy(dtype=float), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_yticks(range(len(table)), [" / ".join(i) if isinstance(i, tuple) else i for i in table.index])
    ax.set_xticks(range(table.shape[1]), [f"{n}\n@{d:g}" for n, d in table.columns], fontsize=8)
    for (i, j), v in np.ndenumerate(table.to_numpy(dtype=float)):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens) @ depth of the key")
    ax.set_title("Passkey retrieval (% correct)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def kv_plan(plan: pd.DataFrame, batch: int | None = None) -> Figure:
    """KV-cache GB against context length per cache format at one batch size, with the room the weights
    leave on the device at each precision as horizontal lines."""
    batch = batch or int(plan["batch"].max())
    d = plan[plan["batch"] == batch]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for fmt, g in d.groupby("kv_format", sort=False):
        ax.plot(g["context"], g["kv_gb"], marker="o", label=f"KV cache, {fmt}")
    device = plan.attrs.get("device_gb")
    if device:
        for (w, wgb), ls in zip(plan.attrs["weights_gb"].items(), ("--", ":", "-.", (0, (1, 4)))):
            ax.axhline(device - wgb, ls=ls, lw=1, color="grey", label=f"room beside {w} weights")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("GB")
    ax.set_title(f"{plan.attrs['model'].name}: KV cache at batch {batch}"
                 + (f" on a {device:g} GB device" if device else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def drift_windows(windows: pd.DataFrame, config: object) -> Figure:
    """The drift monitor's windows (`qkit.studies.drift_monitoring.monitor(...).windows`) against its thresholds: mean KLD
    with the baseline times the alert ratio, the two agreements with the baseline minus the alert drop,
    and the tail share with its alert level. Alerting windows are shaded."""
    w = windows
    base = w[w["baseline"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        (axes[0], [("kld", "mean KLD")], base["kld"].mean() * config.kld_ratio, "nats"),
        (axes[1], [("top1", "top-1 agreement"), ("served_top1", "served tokens = reference top-1")],
         None, "share"),
        (axes[2], [("tail_share", "requests past baseline KLD p" + f"{100 * config.tail_quantile:.0f}")],
         config.tail_share, "share"),
    )
    for ax, series, level, unit in panels:
        for col, label in series:
            ax.plot(w["window"], w[col], marker="o", label=label)
            if col in ("top1", "served_top1"):
                ax.axhline(base[col].mean() - config.agreement_drop, ls="--", lw=1,
                           color=ax.lines[-1].get_color(), label=f"alert below ({col})")
        if level is not None:
            ax.axhline(level, ls="--", lw=1, color="tab:red", label="alert above")
        for x in w.loc[w["alert"], "window"]:
            ax.axvspan(x - 0.5, x + 0.5, color="tab:red", alpha=0.12)
        ax.set_xlabel("window")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Drift per window (shaded: alert)")
    fig.tight_layout()
    return fig


def memory_plan(table: pd.DataFrame, device_gb: float | None = None, title: str = "") -> Figure:
    """Weights and KV cache per precision (a hardware.memory_table) as stacked bars, with the device's
    memory as a line: a bar past the line does not fit."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.5))
    y = np.arange(len(table))
    ax.barh(y, table["weights GB"], color="tab:blue", label="weights")
    kv = table["KV cache GB"].astype(float).fillna(0.0)
    if kv.any():
        ax.barh(y, kv, left=table["weights GB"], color="tab:orange", label="KV cache (BF16)")
    if device_gb:
        ax.axvline(device_gb, color="black", linestyle="--", label=f"device memory {device_gb:.0f} GB")
    ax.set_yticks(y, table.index)
    ax.invert_yaxis()
    ax.set_xlabel("GB")
    ax.set_title(title or "Memory per weight precision")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig



