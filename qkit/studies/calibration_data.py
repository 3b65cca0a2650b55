"""The calibration-data study: quantize with every calibration set of a grid (source x samples x length x
seed) and evaluate each checkpoint on every domain's held-out text. The diagnostics of a set before
quantizing are :mod:`qkit.data.diagnostics`."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import matplotlib.pyplot as plt
import pandas as pd
from tqdm.auto import tqdm

from qkit import data, evaluation, models
from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store
from qkit.data import diagnostics
from qkit.evaluation import EvalSpec
from qkit.quant import registry, variants
from qkit.studies import cells, contract, plots
from qkit.studies import quantization_methods as studies
from qkit.studies.contract import Summary


@dataclass(frozen=True)
class Config(cells.Placement):
    """A sweep along three axes through one center point, each point at every seed: sources at ``center``
    (samples, seq_len) for every method; sample counts and sequence lengths for ``curve_source``, for those
    of ``curve_methods`` that are among the methods (every method when none is, or None). Each checkpoint
    missing from the store is a cell (see :class:`qkit.studies.cells.Placement`)."""

    methods: tuple[str, ...]
    sources: tuple[str, ...]
    samples: tuple[int, ...]
    seq_lens: tuple[int, ...]
    seeds: tuple[int, ...]
    center: tuple[int, int]
    curve_source: str = "prose"
    curve_methods: tuple[str, ...] | None = None
    # Held-out texts every checkpoint is evaluated on: built-in domains or the user's files.
    eval_texts: tuple[str, ...] = data.EVAL_DOMAINS
    eval_tokens: int = 4096
    ctx: int = 512
    model: str = models.DEFAULT_MODEL
    trust_remote_code: bool = False

    def configs(self, method: str | None = None) -> list[data.CalibSpec]:
        """The calibration sets to quantize `method` with (None: every method's), each once, in a fixed
        order."""
        n0, len0 = self.center
        points = [(s, n0, len0) for s in self.sources]
        curved = set(self.curve_methods or ()) & set(self.methods) or set(self.methods)
        if method is None or method in curved:
            points += ([(self.curve_source, n, len0) for n in self.samples]
                       + [(self.curve_source, n0, length) for length in self.seq_lens])
        return [data.CalibSpec(s, n, length, seed) for s, n, length in dict.fromkeys(points) for seed in self.seeds]


# A calibration set's diagnostics (kept: see _diagnostics).
CALIBRATION_DIAGNOSTICS = Kind("calibration_diagnostics", 1)

PROFILES = {
    # GPTQ and AWQ on three sources at 4 x 128, two seeds, 512 held-out tokens per domain; the curves
    # (GPTQ only) span 32x in samples (4 -> 128) and 8x in length (64 -> 512). Cold on SmolLM2 with 2 idle
    # cores and 2 workers: 9 min 41 s. Measured per run there (one thread): GPTQ 19 s at 4 x 64, 20 s at
    # 4 x 128, 33 s at 4 x 512, 34 s at 16 x 128, 157 s at 128 x 128; AWQ 47 s at 4 x 128 and, measured
    # before, ~0.15 s more per calibration token (330 s at 16 x 128): too dear for a 32x curve on a CPU,
    # so its sources are measured and its curves left to `full`.
    "quick": Config(methods=("w4a16_gptq", "w4a16_awq"), sources=("prose", "chat", "code"),
                  samples=(4, 16, 128), seq_lens=(64, 128, 512), seeds=(0, 1), center=(4, 128),
                  curve_methods=("w4a16_gptq",), eval_tokens=512, ctx=256),
    # The grid: for a GPU or a long night.
    "full": Config(methods=("w4a16_gptq", "w4a16_awq", "w8a8_int8", "fp8_static"),
                 sources=("prose", "chat", "code", "random", "mixed"), samples=(8, 32, 128, 512),
                 seq_lens=(128, 512, 2048), seeds=(0, 1, 2), center=(128, 512), eval_tokens=8192),
}


CALIBRATED = ("w4a16_gptq", "w4a16_awq", "w8a8_int8", "fp8_static", "nvfp4")


def config(profile: str | Config = "quick", **overrides) -> Config:
    """A profile's config with the overrides that are not None (lists become tuples)."""
    return contract.config(PROFILES, profile, **overrides)


def check_grid(grid: Config, max_len: int) -> None:
    """Bad grids fail here, before any quantization."""

    for name in grid.methods:
        registry.get_method(name)
    if not any(registry.get_method(m).needs_calibration for m in grid.methods):
        raise QkitError(f"none of {', '.join(grid.methods)} uses calibration data, so the sweep would show nothing",
                        f"include a calibration-dependent method: {', '.join(CALIBRATED)}")
    for spec in grid.configs():  # unknown sources, non-positive sizes
        data.check_seq_len(spec.seq_len, max_len)
    for text in grid.eval_texts:
        data.check_text(text)
        for source in grid.sources:
            data.check_disjoint(source, text)
    if grid.curve_source not in grid.sources:
        raise QkitError(f"curve_source {grid.curve_source!r} is not among the sources {grid.sources}",
                        "add it to the sources")


def run(config: Config = PROFILES["quick"], *, store: Store | None = None) -> Result:
    """Quantize with every calibration set of the grid and evaluate each checkpoint on every domain's
    held-out text: one row per (method, calibration set, eval domain). Every step is cached, so a larger
    grid computes only its new cells; missing cells run in ``config.workers`` processes."""
    store = store or Store()
    loaded = models.resolve_model(config.model, store=store, trust_remote_code=config.trust_remote_code)
    check_grid(config, loaded.info["max_length"])
    evals = [EvalSpec(domain=d, n_tokens=config.eval_tokens, ctx=config.ctx) for d in config.eval_texts]
    all_cells = [(m, c) for m in config.methods for c in config.configs(m) if registry.get_method(m).needs_calibration]
    missing = [(m, c) for m, c in all_cells if not all(studies.evaluated(loaded, m, c, e, store) for e in evals)]
    # Too many samples for a source fails on the first config that asks; check the largest first.
    for source in config.sources if missing else ():
        largest = max((c for c in config.configs() if c.name == source), key=lambda c: c.n_samples * c.seq_len)
        data.calibration_rows(largest.name, largest.n_samples, largest.seq_len, largest.seed,
                              tokenizer=loaded.tokenizer)
    sets = {s: _diagnostics(loaded, s, config, store) for s in config.sources}
    cells.offload(config, _worker_cell, [(f"{m} with {c.name} {c.n_samples} x {c.seq_len} seed {c.seed}",
                                          (m, c, evals)) for m, c in missing],
                  model=config.model, loaded=loaded, store=store, trust_remote_code=config.trust_remote_code,
                  before=lambda: [evaluation.baseline(loaded, spec, store) for spec in evals],
                  desc="calibration sweep")
    rows = []
    for method, calib in tqdm(all_cells, desc="calibration sweep", unit="checkpoint", disable=not missing):
        rows.extend(_cell(loaded, method, calib, evals, store))
    df = pd.DataFrame(rows)
    df.attrs.update(model=loaded.info, grid=asdict(config))
    return Result(config, df, sets)


def _diagnostics(loaded, source: str, config: Config, store: Store) -> diagnostics.Diagnostics:
    """What the source's set at the grid's center holds, kept so that a warm run loads no tokenizer
    (importing transformers' AutoTokenizer took ~5 s of this notebook's ~16 s warm)."""
    n0, len0 = config.center
    spec = {"model": loaded.info["fingerprint"], "calib": data.CalibSpec(source, n0, len0).key(),
            "methods": list(config.methods),
            "eval_texts": [[t, data.fingerprint(t)] for t in config.eval_texts]}

    def build() -> dict:
        d = diagnostics.inspect(source, n0, len0, tokenizer=loaded.tokenizer, methods=config.methods,
                                eval_texts=config.eval_texts)
        # As pairs: the store's JSON sorts object keys, and the tables keep these dicts' order.
        return {**asdict(d), "domain_mix": list(d.domain_mix.items()),
                "coverage": [[t, list(c.items())] for t, c in d.coverage.items()]}

    kept = store.get_json(CALIBRATION_DIAGNOSTICS, spec, build)
    return diagnostics.Diagnostics(**{**kept, "domain_mix": dict(kept["domain_mix"]),
                                      "coverage": {t: dict(c) for t, c in kept["coverage"]}})


def _cell(loaded, method: str, calib: data.CalibSpec, evals, store) -> list[dict]:
    """One checkpoint on every eval text, its model loaded once and only if some evaluation is missing."""

    variant = variants.from_method(loaded, method, calib=calib, store=store)
    rows = []
    for spec in evals:
        r = studies.evaluate(loaded, variant, spec, store=store, seed=calib.seed)
        rows.append({"method": method, "source": calib.name, "n_samples": calib.n_samples,
                     "seq_len": calib.seq_len, "seed": calib.seed, "eval_domain": spec.domain,
                     "in_domain": calib.name == spec.domain, "kld_mean": r["kld_mean"],
                     "ppl_quant": r["ppl_quant"], "ppl_base": r["ppl_base"], "top1_pct": r["top1_pct"],
                     "quant_seconds": r["quant_seconds"], "peak_rss_mb": r["quant_peak_rss_mb"],
                     "rss_growth_mb": r["quant_rss_growth_mb"], "checkpoint": r["checkpoint"]})
    return rows


def _worker_cell(method: str, calib: data.CalibSpec, evals) -> None:
    loaded, store = cells.worker()
    _cell(loaded, method, calib, evals, store)


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
    # Eval texts in the sources' order where they share names, so that in-domain cells run down the diagonal.
    texts = sorted(set(d["eval_domain"]), key=lambda t: (order.index(t) if t in order else len(order), t))
    mean = g.mean().unstack().reindex(index=order, columns=texts)
    spread = (g.max() - g.min()).unstack().reindex(index=order, columns=texts)
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
                # The spread is the smallest difference this grid resolves: the findings say so.
                parts.append(f"on {domain} text, in-domain ({col[domain]:.3g}) and {best_other} "
                             f"({others[best_other]:.3g}) calibration differ by less than the seed-to-seed "
                             f"spread ({max(rng[domain], rng[best_other]):.2g}): no difference")
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
                             f"{hi['mean']:.3g}, within the seed-to-seed spread "
                             f"({max(lo['range'], hi['range']):.2g}): no difference")
        lines.append(f"**{method}**: " + "; ".join(parts) + ".")
    return lines


def cost_table(df):
    """Calibration time and memory per checkpoint (one row per method and calibration set)."""
    cols = ["method", "source", "n_samples", "seq_len", "seed", "quant_seconds", "peak_rss_mb", "rss_growth_mb"]
    return df[cols].drop_duplicates(["method", "source", "n_samples", "seq_len", "seed"]).reset_index(drop=True)


def provenance(df):
    """Where each checkpoint of the sweep came from (its calibration set, versions, commit, hardware)."""
    return studies.provenance_table(df.drop_duplicates("checkpoint"))


@dataclass
class Result:
    config: Config
    rows: pd.DataFrame  # one row per (method, calibration set, eval domain)
    sets: dict[str, diagnostics.Diagnostics]  # what each source's set at the center holds

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"calibration sets": pd.DataFrame({s: d.summary() for s, d in self.sets.items()}).round(2),
                "results": self.rows, "cost": cost_table(self.rows).round(1)}

    def warnings(self) -> list[str]:
        """What the diagnostics say about each source's set, before any quantization."""
        return [f"**{s}**: {w}" for s, d in self.sets.items() for w in d.warnings]

    def findings(self) -> list[str]:
        return findings(self.rows)

    def figures(self) -> plots.Figures:
        df, grid = self.rows, self.config
        methods_ = list(dict.fromkeys(df["method"]))

        def heatmaps(metric: str):
            return lambda: plots.source_heatmaps({m: source_matrix(df, m, metric) for m in methods_},
                                                 METRICS[metric], higher_is_better=metric == "top1_pct")

        return plots.Figures({
            "segment lengths": lambda: plots.segment_histograms(self.sets),
            "KLD by source": heatmaps("kld_mean"), "top-1 by source": heatmaps("top1_pct"),
            "curves": lambda: curves_figure(df, methods_, "kld_mean", grid.curve_source),
            "cost": lambda: plots.calibration_cost(cost_table(df)),
        })

    def explorer(self):
        """An ipywidgets panel to slice the sweep in JupyterLab: method, metric and eval domain."""
        import ipywidgets as widgets
        from IPython.display import display

        df = self.rows
        method = widgets.Dropdown(options=list(dict.fromkeys(df["method"])), description="method")
        metric = widgets.Dropdown(options=[(v, k) for k, v in METRICS.items()], description="metric")
        domain = widgets.Dropdown(options=sorted(set(df["eval_domain"])), description="eval text")

        def show(method: str, metric: str, domain: str) -> None:
            display(plots.source_heatmaps({method: source_matrix(df, method, metric)}, METRICS[metric],
                                          higher_is_better=metric == "top1_pct"))
            display(curves_figure(df, [method], metric, domain))
            plt.close("all")

        return plots.panel(show, method=method, metric=metric, domain=domain)

    def provenance(self) -> pd.DataFrame:
        return provenance(self.rows)

    def summary(self) -> Summary:
        resolved = [f for f in self.findings() if "calibration is better" in f or "lowers KLD" in f]
        parts = []
        for method in dict.fromkeys(self.rows["method"]):
            mean, spread = source_matrix(self.rows, method)
            wins = sum(in_domain_better(mean, spread, d) for d in mean.columns if d in mean.index)
            parts.append(f"{method}: in-domain calibration better on {wins} of {len(mean.columns)} texts")
        return Summary("calibration data", "; ".join(parts), None, "ok" if resolved else "no effect resolved",
                       "KLD by source")


def in_domain_better(mean: pd.DataFrame, spread: pd.DataFrame, domain: str) -> bool:
    """Whether calibrating on `domain` beats every other source on `domain` text by more than the
    seed-to-seed spread."""
    col = mean[domain].dropna()
    others = col.drop(domain)
    if others.empty:
        return False
    best = others.idxmin()
    return col[domain] < others[best] and _differ(col[domain], spread[domain][domain], others[best],
                                                   spread[domain][best])


def curves_figure(df: pd.DataFrame, methods_: list[str], metric: str, domain: str):
    """Quality against calibration samples and tokens per sample for the curve source, on one eval text."""
    grid = df.attrs["grid"]
    n0, len0 = grid["center"]
    curves = {m: {axis: (c := curve(df, m, axis, metric))[c["eval_domain"] == domain]
                  for axis in ("n_samples", "seq_len")} for m in methods_}
    return plots.size_curves(curves, METRICS[metric], f"{grid['curve_source']} calibration, evaluated on {domain} "
                             f"text (other size fixed at {n0} samples / {len0} tokens)")
