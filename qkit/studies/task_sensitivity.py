"""Task sensitivity: how much each quantization method costs on arithmetic, code, long context and
summarization, item by item, against the unquantized baseline.

For each method x task it gives the score, recovery % of the baseline's score, a paired bootstrap CI of
the difference (items are the units), flips in both directions for right/wrong tasks (Dutta et al.
2024), and the mean KLD to the baseline on the task's prompts. Families pool the items of their
score tasks. Every item's result is cached per (model, method, task, item), so adding a method, a task
or items reuses everything computed before.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qkit import data, models
from qkit.core import provenance
from qkit.core.store import Kind, Store
from qkit.data import CalibSpec
from qkit.evaluation import TASK_PREFIX, EvalSpec, compare, metrics, tasks
from qkit.evaluation.tasks import items as task_items
from qkit.evaluation.tasks import scoring
from qkit.evaluation.tasks import user as user_tasks
from qkit.quant import variants
from qkit.studies import contract, plots, quantization_methods
from qkit.studies.contract import Summary

BASELINE = variants.BASELINE
# The KLD of a variant on a task's prompts.
TASK_KLD = Kind("task_kld", 1)
DEFAULT_METHODS = ("fp8_dynamic", "w8a8_int8", "w4a16_gptq", "w4a16_awq")
# Below this many paired items a percentile bootstrap CI is too unreliable to conclude from (with 4 items
# there are only 35 distinct resamples): findings say so instead of calling a change real.
MIN_ITEMS = 10


@dataclass(frozen=True)
class Config:
    """What the task study runs: the model and methods, the tasks (None: all; names or families), and how
    much of each. Items are spread evenly over a task (every k-th), so that a cap still covers all of
    BIG-bench's digit counts and operations. ``max_items`` is the profile's cap per task; ``limit``, when
    set, is a number of items the user asked for, which must exist."""

    max_items: int | None  # items per task at most; None = all
    context_lengths: tuple[int, ...]  # passkey
    depths: tuple[float, ...]  # passkey
    per_cell: int  # passkey items per (length, depth)
    kld_tokens: int  # prompt tokens per task for the KLD column
    max_gen_toks: int | None  # cap on generated tokens (None: each task's own)
    batch_size: int = 8
    task_limits: tuple[tuple[str, int], ...] = ()  # (task, items) where a task needs fewer than the cap
    model: str = models.DEFAULT_MODEL
    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] | None = None
    # The user's lm-eval YAML tasks (as lm_eval --include_path), and families for them: ((task, family), ...).
    include_path: str | None = None
    families: tuple[tuple[str, str], ...] = ()
    limit: int | None = None
    calib: str = "prose"
    samples: int = 32
    seq_len: int = 512
    seed: int = 0  # of the calibration set and of the bootstrap
    trust_remote_code: bool = False

    @property
    def calib_spec(self) -> CalibSpec:
        return CalibSpec(self.calib, self.samples, self.seq_len, self.seed)


PROFILES = {
    # ≤ 10 minutes for the baseline and four methods on SmolLM2-135M with 2 CPU cores: wide CIs, meant
    # to show the machinery and gross effects. Passkey at 512-1024 tokens only.
    # Measured on SmolLM2 with 2 cores: ~140 prompt tokens/s and ~0.2 s per batched decoding step, so the
    # XSum articles (~600 tokens each) and long generations dominate; they get fewer items and tokens.
    # Too few items for conclusions (see MIN_ITEMS): it shows the machinery and gross effects only.
    "quick": Config(max_items=6, context_lengths=(512, 1024), depths=(0.0, 1.0), per_cell=1, kld_tokens=256,
                    max_gen_toks=48, batch_size=8, task_limits=(("qkit_xsum", 4), ("qkit_xsum_ll", 4))),
    # Every item, passkey up to 8K: for a GPU, or a CPU with hours to spare.
    "full": Config(max_items=None, context_lengths=task_items.CONTEXT_LENGTHS, depths=task_items.DEPTHS,
                   per_cell=task_items.PASSKEY_PER_CELL, kld_tokens=4096, max_gen_toks=None, batch_size=16),
}


@dataclass
class Result:
    config: Config
    items: pd.DataFrame  # one row per (method, task, item): method, task, family, id, score, output
    kld: pd.DataFrame  # one row per (method, task): kld_mean, top1_agreement_pct, n_tokens
    meta: dict = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        seed = self.config.seed
        return {"by family": display_table(family_table(self, seed)), "flips": flip_table(self),
                "flip examples": flip_examples(self, n=8), "by task": display_table(task_table(self, seed)),
                "seconds": timing_table(self)}

    def findings(self) -> list[str]:
        return findings(self, self.config.seed)

    def figures(self) -> plots.Figures:
        return plots.Figures({"recovery by family": lambda: plots.recovery_by_family(
            family_table(self, self.config.seed))})

    def provenance(self) -> pd.DataFrame:
        checkpoints = self.meta.get("checkpoints", {})
        return quantization_methods.provenance_table(
            pd.DataFrame({"method": list(checkpoints), "checkpoint": list(checkpoints.values())}))

    def summary(self) -> Summary:
        fam = family_table(self, self.config.seed)
        # As the findings: a CI on fewer than MIN_ITEMS items is no ground for a claim.
        losses = fam[(fam["diff_high"] < 0) & (fam["n"] >= MIN_ITEMS)] if len(fam) else fam
        worst = losses.sort_values("diff").iloc[0] if len(losses) else None
        headline = (f"{len(losses)} of {len(fam)} (method, family) pairs lose with a CI that excludes zero on "
                    f"{MIN_ITEMS}+ items"
                    + (f"; the largest: {worst['method']} on {worst['family']} "
                       f"({100 * worst['diff']:+.1f} pp)" if worst is not None else ""))
        return Summary("task sensitivity", headline, None, "ok" if len(losses) else "no effect resolved",
                       "recovery by family")


def config(profile: str | Config = "quick", **overrides) -> Config:
    """A profile's config with the overrides that are not None (lists become tuples)."""
    return contract.config(PROFILES, profile, **overrides)


def _options(task: tasks.Task, prof: Config) -> dict:
    if not task.needs_tokenizer:
        return {}
    return {"context_lengths": list(prof.context_lengths), "depths": list(prof.depths), "per_cell": prof.per_cell}


def spread(n_available: int, limit: int) -> list[int]:
    """`limit` indices spread evenly over range(n_available), first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, n_available - 1, limit)})


def run(config: Config = PROFILES["quick"], *, store: Store | None = None) -> Result:
    """Run the baseline and each method on each task (cached per item) and measure the KLD on the prompts."""
    user_tasks.include(config.include_path, dict(config.families))
    tasks.resolve(config.tasks)  # fail on a typo before a model loads
    for spec in config.methods:
        variants.check(spec)
    loaded = models.resolve_model(config.model, store=store, trust_remote_code=config.trust_remote_code)
    return score(config, loaded, store=store)


def task_catalog(config: Config) -> pd.DataFrame:
    """The tasks a run can choose from: the built-in ones and those of the config's include path, with
    their items, metric, source and license."""
    user = user_tasks.include(config.include_path, dict(config.families))
    return pd.DataFrame(tasks.item_counts(user)).set_index("task")


def score(config: Config, loaded: models.LoadedModel, *, store: Store | None = None,
          compared: Sequence[variants.Variant] | None = None) -> Result:
    """The study on a model already loaded: the baseline and ``compared`` (default: a variant per entry of
    ``config.methods``, a registry method or a checkpoint directory), e.g. the float model generating with
    a quantized KV cache."""
    prof, limit, calib = config, config.limit, config.calib_spec
    store = store or Store()
    user_tasks.include(config.include_path, dict(config.families))
    chosen = tasks.resolve(config.tasks)
    max_len = loaded.info["max_length"]
    if any(t.needs_tokenizer for t in chosen):
        task_items.check_context_lengths(prof.context_lengths, max_len)
    plan = []
    for task in chosen:
        docs = tasks.load_items(task, loaded.tokenizer, **_options(task, prof), max_len=max_len)
        # A limit the user asked for must exist; the profile's is a cap.
        cap = dict(prof.task_limits).get(task.name, prof.max_items)
        n = (tasks.check_limit(task, limit, len(docs)) if limit is not None else min(cap or len(docs), len(docs)))
        plan.append((task, [docs[i]["id"] for i in spread(len(docs), n)], {d["id"]: i for i, d in enumerate(docs)}))

    if compared is None:
        compared = [variants.parse(loaded, spec, calib=calib, store=store) for spec in dict.fromkeys(config.methods)]
    every = [variants.baseline(loaded), *compared]

    rows, kld_rows, seconds = [], [], {}
    for variant in tqdm(every, desc="models", unit="model"):
        label, identity = variant.label, variant.identity
        for task, ids, index_of in tqdm(plan, desc=label, unit="task", leave=False):
            spec = {"model": loaded.info["fingerprint"], "dtype": loaded.info["dtype"], "variant": identity,
                    "task": task.name, "yaml": tasks.fingerprint(task), "options": _options(task, prof),
                    "max_gen_toks": prof.max_gen_toks, "scorers": tasks.scoring_versions(task)}
            started = time.perf_counter()

            def compute(part: list[str], task=task, index_of=index_of, variant=variant) -> dict[str, dict]:
                records, _ = tasks.evaluate(variant.model, loaded.tokenizer, task, [index_of[i] for i in part],
                                            options=_options(task, prof), batch_size=prof.batch_size,
                                            max_length=max_len, max_gen_toks=prof.max_gen_toks)
                return {r["id"]: r for r in records}

            done = store.get_items(tasks.TASK_ITEMS, spec, ids, compute, batch=max(prof.batch_size, 16))
            seconds[(label, task.name)] = round(time.perf_counter() - started, 2)
            rows += [{"method": label, "task": task.name, "family": task.family, "id": i,
                      "score": r["score"], "weight": r.get("weight", 1.0), "output": r.get("output")}
                     for i, r in done.items()]
            if label != BASELINE:
                kld_rows.append({"method": label, "task": task.name,
                                 **_task_kld(loaded, task, variant, prof, store)})
    meta = {"model": loaded.info, "config": asdict(prof), "limit": limit, "methods": [v.label for v in compared],
            "tasks": [t.name for t in chosen], "calibration": asdict(calib),
            "seconds": {f"{m}/{t}": s for (m, t), s in seconds.items()},
            "checkpoints": {v.label: str(v.checkpoint.path) for v in compared if v.checkpoint},
            "provenance": provenance.collect()}
    return Result(config, pd.DataFrame(rows), pd.DataFrame(kld_rows), meta)


def _task_kld(loaded: models.LoadedModel, task: tasks.Task, variant: variants.Variant, prof: Config, store: Store
              ) -> dict:
    prompts = tasks.get_task(task.prompts_of or task.name)
    n_tokens = prof.kld_tokens
    if prompts.include_path != tasks.TASK_DIR:  # a user's task may hold fewer prompt tokens than asked for
        held = len(data.text_tokens(tasks.prompts(prompts, loaded.tokenizer, loaded.info["max_length"]),
                                    loaded.tokenizer, None))
        n_tokens = min(n_tokens, held - held % min(512, n_tokens, held))
    spec = EvalSpec(domain=TASK_PREFIX + prompts.name, n_tokens=n_tokens, ctx=min(512, n_tokens), batch_size=4)
    key = {"variant": variant.identity, "eval": spec.key(), "yaml": tasks.fingerprint(prompts),
           "items": tasks.TASK_ITEMS.version}  # the prompts come from the items' code
    result = store.get_json(TASK_KLD, key,
                            lambda: compare(variant.model, loaded, spec, store, label=f"KLD {task.name}"))
    return {"kld_mean": result["kld_mean"], "top1_agreement_pct": result["top1_agreement_pct"],
            "kld_tokens": result["n_tokens"]}


# ---------------------------------------------------------------- analysis


def _paired(res: Result, method: str, task_filter: Callable[[tasks.Task], bool] | None,
            group: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Baseline and `method` scores on the items both have, and the items' weights."""
    df = res.items
    sel = df[group] == key
    base = df[(df["method"] == BASELINE) & sel].set_index(["task", "id"])
    quant = df[(df["method"] == method) & sel].set_index(["task", "id"])["score"]
    if task_filter is not None:
        keep = [t for t in base.index.get_level_values(0).unique() if task_filter(tasks.get_task(t))]
        base, quant = base[base.index.get_level_values(0).isin(keep)], quant[quant.index.get_level_values(0).isin(keep)]
    common = base.index.intersection(quant.index)
    weight = base.loc[common]["weight"] if "weight" in base else pd.Series(1.0, index=common)
    return (base.loc[common]["score"].to_numpy(float), quant.loc[common].to_numpy(float),
            weight.fillna(1.0).to_numpy(float))


def compare_scores(base: np.ndarray, quant: np.ndarray, *, higher_is_better: bool = True, binary: bool = True,
                   seed: int = 0, weights: np.ndarray | None = None, aggregation: str = "mean") -> dict:
    """Score, recovery, paired-bootstrap CI of the difference and flips for one set of paired items.
    A rolling-likelihood task's scores are per-item NLL per unit with ``weights`` (units per item), and
    its score is lm-eval's ``aggregation`` of them (:func:`qkit.evaluation.tasks.scoring.weighted_score`)."""
    if aggregation != "mean" and base.size:
        diff, low, high = scoring.weighted_diff_ci(quant, base, weights, aggregation, seed=seed)
        out: dict[str, Any] = {"n": int(base.size), "score_base": scoring.weighted_score(base, weights, aggregation),
                               "score": scoring.weighted_score(quant, weights, aggregation)}
    else:
        out = {"n": int(base.size), "score_base": float(base.mean()) if base.size else np.nan,
               "score": float(quant.mean()) if quant.size else np.nan}
        diff, low, high = (metrics.mean_ci(quant, paired_with=base, seed=seed) if base.size
                           else (np.nan, np.nan, np.nan))
    out.update(diff=diff, diff_low=low, diff_high=high)
    out["recovery_pct"], out["recovery_low"], out["recovery_high"] = metrics.recovery_ci(
        out["score_base"], out["score"], diff, low, high, higher_is_better)
    if binary and base.size:
        out.update({k: v for k, v in metrics.flips(base > 0.5, quant > 0.5).items() if k != "n"})
    return out


def task_table(res: Result, seed: int = 0) -> pd.DataFrame:
    """One row per (method, task)."""
    rows = []
    for method in res.meta["methods"]:
        for name in res.meta["tasks"]:
            task = tasks.get_task(name)
            base, quant, weights = _paired(res, method, None, "task", name)
            row = {"method": method, "task": name, "family": task.family, "metric": task.metric,
                   **compare_scores(base, quant, higher_is_better=task.higher_is_better, binary=task.binary,
                                    seed=seed, weights=weights, aggregation=task.aggregation)}
            k = res.kld[(res.kld["method"] == method) & (res.kld["task"] == name)] if len(res.kld) else res.kld
            row["kld_mean"] = float(k["kld_mean"].iloc[0]) if len(k) else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def family_table(res: Result, seed: int = 0) -> pd.DataFrame:
    """One row per (method, family): the items of the family's score tasks pooled (the likelihood task,
    on another scale, is left out); KLD is the mean over the family's tasks."""
    by_task = task_table(res, seed)
    rows = []
    for method in res.meta["methods"]:
        for family in dict.fromkeys(tasks.get_task(t).family for t in res.meta["tasks"]):
            base, quant, _ = _paired(res, method, lambda t: t.in_family_score, "family", family)
            if not base.size:
                continue
            fam_tasks = [t for t in res.meta["tasks"] if tasks.get_task(t).family == family
                         and tasks.get_task(t).in_family_score]
            binary = all(tasks.get_task(t).binary for t in fam_tasks)
            kld = by_task[(by_task["method"] == method) & (by_task["family"] == family)]["kld_mean"]
            rows.append({"method": method, "family": family, "tasks": ", ".join(fam_tasks),
                         **compare_scores(base, quant, binary=binary, seed=seed), "kld_mean": kld.mean()})
    return pd.DataFrame(rows)


def flip_table(res: Result) -> pd.DataFrame:
    """Items whose correctness changed, per method and right/wrong task."""
    df = task_table(res)
    df = df[df["task"].map(lambda t: tasks.get_task(t).binary)]
    cols = ["method", "task", "n", "score_base", "score", "correct_to_wrong", "wrong_to_correct", "flips_pct"]
    # A run without right/wrong tasks has no flip columns at all: an empty table, not a KeyError.
    df = df.reindex(columns=cols)
    out = df.assign(score_base=100 * df["score_base"], score=100 * df["score"])
    out = out.astype({"correct_to_wrong": int, "wrong_to_correct": int}).round(1)
    return out.rename(columns={"score_base": "baseline %", "score": "quantized %"}).set_index(["method", "task"])


def findings(res: Result, seed: int = 0) -> list[str]:
    """What the data shows, one sentence per method and family, worded by the CIs; then the seed's claim
    (arithmetic, code and long context lose more than summarization) checked against them."""
    fam = family_table(res, seed)
    if fam.empty:
        return ["No family has a pooled score in this run: likelihood tasks are shown per task only (see the "
                "per-task table); add a scored task of the family to compare families."]
    lines = []
    for method, g in fam.groupby("method", sort=False):
        parts = []
        for _, r in g.iterrows():
            pp = f"{100 * r['diff']:+.1f} pp [{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}]"
            if r["score_base"] == 0 and r["score"] == 0:
                parts.append(f"{r['family']}: baseline and {method} both score 0 on {r['n']} items, so this "
                             "model cannot show a loss here")
            elif np.isnan(r["diff_low"]) or r["n"] < MIN_ITEMS:
                parts.append(f"{r['family']}: {pp} on {r['n']} item(s), too few to conclude (fewer than "
                             f"{MIN_ITEMS}; run more items or the full profile)")
            elif r["diff_high"] < 0:
                parts.append(f"{r['family']}: loses {pp}, a loss the 95% CI excludes zero from")
            elif r["diff_low"] > 0:
                parts.append(f"{r['family']}: gains {pp} (CI above zero)")
            else:
                parts.append(f"{r['family']}: {pp}, no difference detectable on {r['n']} items (the CI spans zero)")
        lines.append(f"**{method}** — " + "; ".join(parts) + ".")
        lines.append(_claim(method, g))
    return lines


def _claim(method: str, g: pd.DataFrame) -> str:
    summ = g[g["family"] == "summarization"]
    others = g[g["family"].isin(["arithmetic", "code", "long_context"])]
    if summ.empty or others.empty:
        return f"*{method}: the claim needs summarization and at least one other family in the run.*"
    s = summ.iloc[0]
    if s["score_base"] == 0:
        return f"*{method}: the baseline scores 0 on summarization, so there is no loss to compare against.*"
    worse, overlap, better, floor, few = [], [], [], [], []
    for _, r in others.iterrows():
        if r["score_base"] == 0:
            floor.append(r["family"])
        elif min(r["n"], s["n"]) < MIN_ITEMS or np.isnan(r["diff_low"]) or np.isnan(s["diff_low"]):
            few.append(r["family"])
        elif r["diff_high"] < s["diff_low"]:
            worse.append(r["family"])
        elif r["diff_low"] > s["diff_high"]:
            better.append(r["family"])
        else:
            overlap.append(r["family"])
    out = [f"*{method} against the claim:*"]
    if worse:
        out.append(f"{', '.join(worse)} lost more than summarization, with non-overlapping CIs.")
    if better:
        out.append(f"{', '.join(better)} lost less than summarization, with non-overlapping CIs.")
    if overlap:
        out.append(f"For {', '.join(overlap)} the CIs overlap summarization's: this run cannot tell them apart.")
    if few:
        out.append(f"{', '.join(few)}: not compared, too few items (fewer than {MIN_ITEMS} in a family).")
    if floor:
        out.append(f"{', '.join(floor)}: not compared, the baseline scores 0.")
    return " ".join(out)


def _ci_text(r: pd.Series, scale: float = 100, digits: int = 1) -> str:
    text = f"{scale * r['diff']:+.{digits}f}"
    if np.isnan(r["diff_low"]):
        return text
    return f"{text} [{scale * r['diff_low']:+.{digits}f}, {scale * r['diff_high']:+.{digits}f}]"


def timing_table(res: Result) -> pd.DataFrame:
    """Seconds per model and task in the run that produced `res` (near zero where the cache answered)."""
    rows = [{"model": k.split("/")[0], "task": k.split("/")[1], "seconds": v} for k, v in res.meta["seconds"].items()]
    out = pd.DataFrame(rows).pivot(index="model", columns="task", values="seconds")
    out = out.reindex(index=[BASELINE, *res.meta["methods"]], columns=res.meta["tasks"])
    out["total"] = out.sum(axis=1)
    return out.round(1)


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """A family or task table as people read it: scores in %, the change in points with its 95% CI,
    recovery, flips and KLD. Likelihood rows (nats per byte) are shown as they are, not in %."""
    rows = []
    for _, r in df.iterrows():
        # Scores are fractions shown in %; likelihoods and perplexities as they are.
        pct = r.get("metric") not in ("nll_per_byte", *user_tasks.ROLLING_AGGREGATION)
        scale, digits = (100, 1) if pct else (1, 4)
        rows.append({
            "method": r["method"], ("task" if "task" in r else "family"): r.get("task", r.get("family")),
            "items": r["n"],
            "baseline": f"{scale * r['score_base']:.{digits}f}",
            "quantized": f"{scale * r['score']:.{digits}f}",
            "change [95% CI]": _ci_text(r, scale, digits),
            "recovery %": "-" if np.isnan(r["recovery_pct"]) else f"{r['recovery_pct']:.1f}",
            "flips c→w / w→c": ("-" if np.isnan(r.get("correct_to_wrong", np.nan)) else
                                f"{r['correct_to_wrong']:.0f} / {r['wrong_to_correct']:.0f}"),
            "KLD": f"{r['kld_mean']:.4f}",
        })
    out = pd.DataFrame(rows)
    return out.set_index(list(out.columns[:2])) if len(out) else out


def flip_examples(res: Result, n: int = 6) -> pd.DataFrame:
    """Items whose correctness flipped, with both generations, to read what changed."""
    df = res.items
    base = df[df["method"] == BASELINE].set_index(["task", "id"])
    rows = []
    for (method, task_name), g in df[df["method"] != BASELINE].groupby(["method", "task"], sort=False):
        if not tasks.get_task(task_name).binary:
            continue
        for _, r in g.iterrows():
            b = base.loc[(task_name, r["id"])]
            if (b["score"] > 0.5) != (r["score"] > 0.5):
                rows.append({"method": method, "task": task_name, "item": r["id"],
                             "flip": "correct → wrong" if b["score"] > 0.5 else "wrong → correct",
                             "baseline output": (b["output"] or "")[:160], "quantized output": (r["output"] or "")[:160]})
    return pd.DataFrame(rows).head(n)
