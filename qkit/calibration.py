"""Calibration data: diagnostics of a calibration set before quantizing, and the calibration study.

:func:`diagnose` looks at the token rows a method would see (pure function, testable on hand-made rows);
:func:`inspect` builds one of qkit's calibration sets and diagnoses it against the held-out text of every
domain. The thresholds come from what llm-compressor's own examples use (:data:`ANCHORS`).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from qkit import data
from qkit.errors import QkitError, lookup

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# What llm-compressor's examples calibrate with (samples, tokens per sample, where). A set below them is
# not wrong, but the method's authors tuned and reported it on more.
ANCHORS: dict[str, tuple[int, int, str]] = {
    "w4a16_gptq": (512, 2048, "llm-compressor examples/quantization_w4a16/llama3_example.py"),
    "w8a8_int8": (512, 2048, "llm-compressor examples/quantization_w8a8_int8/llama3_example.py"),
    "fp8_static": (512, 2048, "llm-compressor examples/quantization_w8a8_fp8 (static scales)"),
    "w4a16_awq": (256, 512, "llm-compressor examples/awq/llama_example.py (\"256 samples is a good place to start\")"),
}
# Duplicates are counted on windows of this many tokens: long enough that common phrases do not count.
NGRAM = 16
# Below this share of eval tokens whose type the set contains, the set hardly sees that domain: 32 x 512
# tokens of in-domain text cover 84-89% on SmolLM2, out-of-domain text 53-72%, random tokens 23-45%.
COVERAGE_WARN_PCT = 50.0


@dataclass
class Diagnostics:
    """What a calibration set holds. Percentages are 0-100."""

    n_samples: int
    seq_len: int
    tokens: int
    segment_lengths: list[int]  # tokens per document piece (documents split at EOS and row edges)
    domain_mix: dict[str, float]  # % of rows per source domain
    duplicate_rows_pct: float  # rows identical to an earlier row
    duplicate_ngrams_pct: float  # NGRAM-token windows that occur more than once
    truncated_pct: float  # rows that end inside a document (a cut document)
    padded_pct: float  # share of tokens that are padding
    coverage: dict[str, dict[str, float]] = field(default_factory=dict)  # per eval domain: types_pct, tokens_pct
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The scalar figures, for a table."""
        out = {k: v for k, v in asdict(self).items() if k not in ("segment_lengths", "domain_mix", "coverage",
                                                                    "warnings")}
        out["median_segment"] = float(np.median(self.segment_lengths)) if self.segment_lengths else 0.0
        out.update({f"mix_{d}_pct": v for d, v in self.domain_mix.items()})
        for domain, cov in self.coverage.items():
            out.update({f"coverage_{domain}_{k}": v for k, v in cov.items()})
        return out


def _segments(row: Sequence[int], eos_id: int | None) -> list[int]:
    lengths, run = [], 0
    for t in row:
        run += 1
        if t == eos_id:
            lengths.append(run)
            run = 0
    if run:
        lengths.append(run)
    return lengths


def diagnose(rows: Sequence[Sequence[int]], *, eos_id: int | None, pad_id: int | None = None,
             domains: Sequence[str] | None = None, eval_ids: Mapping[str, Sequence[int]] | None = None,
             methods: Sequence[str] = ()) -> Diagnostics:
    """Diagnostics of calibration rows (token id lists), with warnings for `methods` whose anchors the set
    falls short of. ``domains`` labels each row's source; ``eval_ids`` maps an eval domain to its tokens."""
    if not rows:
        raise QkitError("the calibration set has no rows", "ask for at least one sample")
    n = len(rows)
    seq_len = max(len(r) for r in rows)
    tokens = sum(len(r) for r in rows)
    pad = sum(1 for r in rows for t in r if pad_id is not None and t == pad_id) + sum(seq_len - len(r) for r in rows)
    seen: set[tuple[int, ...]] = set()
    dup_rows = 0
    for r in rows:
        key = tuple(r)
        dup_rows += key in seen
        seen.add(key)
    grams = Counter(tuple(r[i:i + NGRAM]) for r in rows for i in range(len(r) - NGRAM + 1))
    total_grams = sum(grams.values())
    dup_grams = sum(c for c in grams.values() if c > 1)
    # A packed row that does not end in EOS cut its last document short.
    truncated = sum(1 for r in rows if r and r[-1] != eos_id) if eos_id is not None else 0
    labels = list(domains) if domains is not None else ["unknown"] * n
    if len(labels) != n:
        raise QkitError(f"{len(labels)} domain labels for {n} rows", "pass one label per row")
    mix = {d: 100.0 * c / n for d, c in sorted(Counter(labels).items())}
    out = Diagnostics(
        n_samples=n, seq_len=seq_len, tokens=tokens,
        segment_lengths=[s for r in rows for s in _segments(r, eos_id)],
        domain_mix=mix, duplicate_rows_pct=100.0 * dup_rows / n,
        duplicate_ngrams_pct=100.0 * dup_grams / total_grams if total_grams else 0.0,
        truncated_pct=100.0 * truncated / n, padded_pct=100.0 * pad / (n * seq_len),
    )
    calib_types = {t for r in rows for t in r}
    for domain, ids in (eval_ids or {}).items():
        types = set(ids)
        out.coverage[domain] = {
            "types_pct": 100.0 * len(types & calib_types) / len(types) if types else 0.0,
            "tokens_pct": 100.0 * sum(t in calib_types for t in ids) / len(ids) if len(ids) else 0.0,
        }
    out.warnings = _warnings(out, methods)
    return out


def _warnings(d: Diagnostics, methods: Sequence[str]) -> list[str]:
    out = []
    for m in methods:
        if m not in ANCHORS:
            continue
        samples, seq_len, where = ANCHORS[m]
        if d.n_samples < samples or d.seq_len < seq_len:
            out.append(f"{m}: {d.n_samples} x {d.seq_len} tokens is below the {samples} x {seq_len} of {where}")
    if d.duplicate_rows_pct > 0:
        out.append(f"{d.duplicate_rows_pct:.1f}% of the rows repeat an earlier row: they add no information")
    if d.duplicate_ngrams_pct > 10:
        out.append(f"{d.duplicate_ngrams_pct:.1f}% of {NGRAM}-token windows repeat: the set is less varied than "
                   "its size suggests")
    if d.padded_pct > 10:
        out.append(f"{d.padded_pct:.1f}% of the tokens are padding, which calibrates nothing")
    for domain, cov in d.coverage.items():
        if cov["tokens_pct"] < COVERAGE_WARN_PCT:
            out.append(f"only {cov['tokens_pct']:.1f}% of the {domain} eval tokens are of a type the set contains: "
                       f"it barely sees {domain} text")
    return out


def inspect(name: str, n_samples: int, seq_len: int, seed: int = 0, *, tokenizer: PreTrainedTokenizerBase,
            methods: Sequence[str] = tuple(ANCHORS), eval_tokens: int = 8192) -> Diagnostics:
    """Build qkit's calibration set `name` and diagnose it against each domain's held-out text."""
    labelled = data.calibration_rows(name, n_samples, seq_len, seed, tokenizer=tokenizer)
    eval_ids = {d: data.eval_tokens(d, tokenizer, eval_tokens).tolist() for d in data.EVAL_DOMAINS}
    # Random token rows hold no documents: nothing to count as cut.
    eos = None if name == "random" else tokenizer.eos_token_id
    return diagnose([r for _, r in labelled], eos_id=eos, pad_id=None,
                    domains=[d for d, _ in labelled], eval_ids=eval_ids, methods=methods)


# ---------------------------------------------------------------- the calibration study


@dataclass(frozen=True)
class Grid:
    """A sweep along three axes through one center point, each point at every seed and method:
    sources at ``center`` (samples, seq_len); sample counts and sequence lengths for ``curve_source``."""

    methods: tuple[str, ...]
    sources: tuple[str, ...]
    samples: tuple[int, ...]
    seq_lens: tuple[int, ...]
    seeds: tuple[int, ...]
    center: tuple[int, int]
    curve_source: str = "prose"
    eval_tokens: int = 4096
    ctx: int = 512

    def configs(self) -> list[data.CalibSpec]:
        """The calibration sets to quantize with, each once, in a fixed order."""
        n0, len0 = self.center
        points = ([(s, n0, len0) for s in self.sources] + [(self.curve_source, n, len0) for n in self.samples]
                  + [(self.curve_source, n0, length) for length in self.seq_lens])
        return [data.CalibSpec(s, n, length, seed) for s, n, length in dict.fromkeys(points) for seed in self.seeds]


PROFILES = {
    # GPTQ and AWQ, tiny sets, two seeds, 512 held-out tokens per domain. Cold on SmolLM2 with 2 idle cores
    # and 2 workers: 14 min 11 s, of which oneshot ~10 min and evaluation ~4 s a domain per checkpoint.
    # Measured per run there (one thread): GPTQ ~50 s whatever the set's size (a per-column loop over 30
    # layers); AWQ ~20 s + 0.15 s per calibration token (95 s at 4 x 128, 330 s at 16 x 128). So the
    # curves step down from the center, where they are cheap; `full` steps up.
    "quick": Grid(methods=("w4a16_gptq", "w4a16_awq"), sources=("prose", "chat", "code"),
                  samples=(2, 4), seq_lens=(64, 128), seeds=(0, 1), center=(4, 128), eval_tokens=512, ctx=256),
    # The grid: for a GPU or a long night.
    "full": Grid(methods=("w4a16_gptq", "w4a16_awq", "w8a8_int8", "fp8_static"),
                 sources=("prose", "chat", "code", "random", "mixed"), samples=(8, 32, 128, 512),
                 seq_lens=(128, 512, 2048), seeds=(0, 1, 2), center=(128, 512), eval_tokens=8192),
}

CALIBRATED = ("w4a16_gptq", "w4a16_awq", "w8a8_int8", "fp8_static", "nvfp4")


def get_grid(profile: str | Grid, **overrides) -> Grid:
    """A profile's grid with the overrides that are not None (lists become tuples)."""
    grid = profile if isinstance(profile, Grid) else lookup(PROFILES, profile, "profile")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    unknown = set(fields) - set(asdict(grid))
    if unknown:
        raise QkitError(f"unknown grid field(s) {', '.join(sorted(unknown))}", f"use {', '.join(asdict(grid))}")
    return replace(grid, **fields)


def check_grid(grid: Grid, max_len: int) -> None:
    """Bad grids fail here, before any quantization."""
    from qkit import methods

    for name in grid.methods:
        methods.get_method(name)
    if not any(methods.get_method(m).needs_calibration for m in grid.methods):
        raise QkitError(f"none of {', '.join(grid.methods)} uses calibration data, so the sweep would show nothing",
                        f"include a calibration-dependent method: {', '.join(CALIBRATED)}")
    for spec in grid.configs():  # unknown sources, non-positive sizes
        data.check_seq_len(spec.seq_len, max_len)
    if grid.curve_source not in grid.sources:
        raise QkitError(f"curve_source {grid.curve_source!r} is not among the sources {grid.sources}",
                        "add it to the sources")


def default_workers() -> int:
    """Parallel quantization processes for a sweep on this machine.

    On CPU, GPTQ spends its time in a per-column Python loop (~50 s per run on SmolLM2 whatever the
    calibration size) that one thread runs as fast as two, and two one-thread processes on 2 cores each
    kept their single-process speed: two workers halve a sweep's time. Each holds a model copy (~1.5 GB
    peak on SmolLM2), hence the cap. With an accelerator, one process owns it."""
    import os

    import torch

    return 1 if torch.accelerator.is_available() else max(1, min(2, os.cpu_count() or 1))


def sweep(model: str = "smollm2-135m", profile: str | Grid = "quick", *, store=None,
          trust_remote_code: bool = False, workers: int | None = None):
    """Quantize with every calibration set of the grid and evaluate each checkpoint on every domain's
    held-out text. One row per (method, calibration set, eval domain); every step is cached, so a
    larger grid computes only its new cells. Missing cells run in ``workers`` processes
    (:func:`default_workers`)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from qkit import evaluation, methods, models, studies
    from qkit.evaluation import EvalSpec
    from qkit.store import Store

    grid = get_grid(profile)
    store = store or Store()
    loaded = models.resolve_model(model, store=store, trust_remote_code=trust_remote_code)
    check_grid(grid, loaded.info["max_length"])
    # Too many samples for a source fails on the first config that asks; check the largest first.
    for source in grid.sources:
        largest = max((c for c in grid.configs() if c.name == source), key=lambda c: c.n_samples * c.seq_len)
        data.calibration_rows(largest.name, largest.n_samples, largest.seq_len, largest.seed,
                              tokenizer=loaded.tokenizer)
    evals = [EvalSpec(domain=d, n_tokens=grid.eval_tokens, ctx=grid.ctx) for d in data.EVAL_DOMAINS]
    cells = [(m, c) for m in grid.methods for c in grid.configs() if methods.get_method(m).needs_calibration]
    missing = [(m, c) for m, c in cells if any(
        store.lookup("evaluation", studies.evaluation_spec(store.key("checkpoint", methods.checkpoint_spec(
            loaded, m, c)), e)) is None for e in evals)]
    workers = default_workers() if workers is None else workers
    if workers > 1 and len(missing) > 1:
        for spec in evals:  # once, here, rather than raced for by the workers
            evaluation.baseline(loaded, spec, store)
        _run_parallel(missing, model, store.root, evals, trust_remote_code, min(workers, len(missing)))
    rows = []
    for method, calib in tqdm(cells, desc="calibration sweep", unit="checkpoint", disable=not missing):
        rows.extend(_cell(loaded, method, calib, evals, store))
    df = pd.DataFrame(rows)
    df.attrs.update(model=loaded.info, grid=asdict(grid))
    return df


def _cell(loaded, method: str, calib: data.CalibSpec, evals, store) -> list[dict]:
    """One checkpoint on every eval text, its model loaded once and only if some evaluation is missing."""
    from qkit import methods, models, studies

    quantized = models.Lazy(lambda: methods.load_quantized(methods.quantize(loaded, method, calib=calib,
                                                                            store=store)))
    rows = []
    for spec in evals:
        r = studies.evaluate_method(loaded, method, calib=calib, eval_spec=spec, store=store, seed=calib.seed,
                                    quantized=quantized)
        rows.append({"method": method, "source": calib.name, "n_samples": calib.n_samples,
                     "seq_len": calib.seq_len, "seed": calib.seed, "eval_domain": spec.domain,
                     "in_domain": calib.name == spec.domain, "kld_mean": r["kld_mean"],
                     "ppl_quant": r["ppl_quant"], "ppl_base": r["ppl_base"], "top1_pct": r["top1_pct"],
                     "quant_seconds": r["quant_seconds"], "peak_rss_mb": r["quant_peak_rss_mb"],
                     "rss_growth_mb": r["quant_rss_growth_mb"], "checkpoint": r["checkpoint"]})
    return rows


def _run_parallel(cells, model: str, root, evals, trust_remote_code: bool, workers: int) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(model, str(root), trust_remote_code)) as pool:
        futures = [pool.submit(_worker_cell, m, c, evals) for m, c in cells]
        try:
            for f in tqdm(as_completed(futures), total=len(futures), desc=f"calibration sweep ({workers} workers)",
                          unit="checkpoint"):
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()  # what finished is cached; a rerun resumes from there
            raise


_WORKER: dict = {}


def _worker_init(model: str, root: str, trust_remote_code: bool) -> None:
    import torch

    from qkit import models
    from qkit.store import Store

    torch.set_num_threads(1)
    store = Store(root)
    _WORKER.update(store=store, loaded=models.resolve_model(model, store=store, trust_remote_code=trust_remote_code))


def _worker_cell(method: str, calib: data.CalibSpec, evals) -> None:
    _cell(_WORKER["loaded"], method, calib, evals, _WORKER["store"])


METRICS = {"kld_mean": "mean KLD to baseline (nats)", "ppl_quant": "perplexity", "top1_pct": "top-1 agreement (%)"}


def _center(df):
    n0, len0 = df.attrs["grid"]["center"]
    return df[(df["n_samples"] == n0) & (df["seq_len"] == len0)]


def source_matrix(df, method: str, metric: str = "kld_mean"):
    """Calibration source x eval domain at the grid's center: (mean over seeds, seed-to-seed range)."""
    d = _center(df)
    d = d[d["method"] == method]
    g = d.groupby(["source", "eval_domain"])[metric]
    order = [s for s in df.attrs["grid"]["sources"] if s in set(d["source"])]
    mean = g.mean().unstack().reindex(order)
    spread = (g.max() - g.min()).unstack().reindex(order)
    return mean, spread


def curve(df, method: str, axis: str, metric: str = "kld_mean"):
    """Quality against `axis` ("n_samples" or "seq_len") for the curve source, the other size at the center:
    one row per (axis value, eval domain) with the mean, std and range over seeds."""
    grid = df.attrs["grid"]
    n0, len0 = grid["center"]
    other, fixed = ("seq_len", len0) if axis == "n_samples" else ("n_samples", n0)
    d = df[(df["method"] == method) & (df["source"] == grid["curve_source"]) & (df[other] == fixed)]
    g = d.groupby([axis, "eval_domain"])[metric]
    out = g.agg(["mean", "std", "min", "max", "count"]).reset_index()
    out["range"] = out["max"] - out["min"]
    return out


def _differ(a_mean: float, a_range: float, b_mean: float, b_range: float) -> bool:
    """A difference counts only when it is larger than the seed-to-seed range of either cell."""
    return abs(a_mean - b_mean) > max(a_range, b_range)


def findings(df, metric: str = "kld_mean") -> list[str]:
    """What the sweep shows per method, worded by the seed-to-seed spread."""
    grid = df.attrs["grid"]
    lines = []
    for method in dict.fromkeys(df["method"]):
        mean, spread = source_matrix(df, method, metric)
        parts = []
        for domain in mean.columns:
            if domain not in mean.index:
                continue
            col, rng = mean[domain].dropna(), spread[domain]
            others = col.drop(domain)
            if others.empty:  # one source in the grid: nothing to compare in-domain calibration with
                continue
            best_other = others.idxmin()
            if _differ(col[domain], rng[domain], others[best_other], rng[best_other]):
                better = "better" if col[domain] < others[best_other] else "worse"
                parts.append(f"on {domain} text, in-domain calibration is {better} than the best other source "
                             f"({best_other}): KLD {col[domain]:.3g} against {others[best_other]:.3g}")
            else:
                parts.append(f"on {domain} text, in-domain ({col[domain]:.3g}) and {best_other} "
                             f"({others[best_other]:.3g}) calibration differ by less than the seed-to-seed "
                             "spread: no difference")
        for axis, label in (("n_samples", "samples"), ("seq_len", "tokens per sample")):
            c = curve(df, method, axis, metric)
            c = c[c["eval_domain"] == grid["curve_source"]] if grid["curve_source"] in set(c["eval_domain"]) else c
            if c[axis].nunique() < 2:
                continue
            lo, hi = c.loc[c[axis].idxmin()], c.loc[c[axis].idxmax()]
            if _differ(lo["mean"], lo["range"], hi["mean"], hi["range"]):
                trend = "lowers" if hi["mean"] < lo["mean"] else "raises"
                parts.append(f"going from {lo[axis]:.0f} to {hi[axis]:.0f} {label} {trend} KLD "
                             f"{lo['mean']:.3g} → {hi['mean']:.3g}")
            else:
                parts.append(f"{lo[axis]:.0f} and {hi[axis]:.0f} {label} give KLD {lo['mean']:.3g} and "
                             f"{hi['mean']:.3g}, within the seed-to-seed spread: no difference")
        lines.append(f"**{method}**: " + "; ".join(parts) + ".")
    return lines


def cost_table(df):
    """Calibration time and memory per checkpoint (one row per method and calibration set)."""
    cols = ["method", "source", "n_samples", "seq_len", "seed", "quant_seconds", "peak_rss_mb", "rss_growth_mb"]
    return df[cols].drop_duplicates(["method", "source", "n_samples", "seq_len", "seed"]).reset_index(drop=True)


def explorer(df):
    """An ipywidgets panel to slice the sweep in JupyterLab: method, metric and eval domain."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    from qkit import plots, report

    method = widgets.Dropdown(options=list(dict.fromkeys(df["method"])), description="method")
    metric = widgets.Dropdown(options=[(v, k) for k, v in METRICS.items()], description="metric")
    domain = widgets.Dropdown(options=sorted(set(df["eval_domain"])), description="eval text")

    def show(method: str, metric: str, domain: str) -> None:
        display(plots.calibration_heatmap(df, method, metric))
        display(plots.calibration_curves(df, method, metric, domain))
        plt.close("all")

    return report.panel(show, method=method, metric=metric, domain=domain)


def provenance(df):
    """Where each checkpoint of the sweep came from (its calibration set, versions, commit, hardware)."""
    from qkit import studies

    return studies.provenance_table(df.drop_duplicates("checkpoint"))
