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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qkit import data, models
from qkit.core import provenance
from qkit.core.store import Kind, Store
from qkit.evaluation import TASK_PREFIX, EvalSpec, compare, tasks
from qkit.evaluation.tasks import items as task_items
from qkit.evaluation.tasks import user as user_tasks
from qkit.quant import variants
from qkit.studies import cells, contract, method_tables, plots, quantization_methods
from qkit.studies.contract import Summary
from qkit.studies.task_tables import (
    MIN_ITEMS,
    display_table,
    family_table,
    findings,
    flip_examples,
    flip_table,
    task_table,
    timing_table,
)

BASELINE = variants.BASELINE
# The KLD of a variant on a task's prompts.
TASK_KLD = Kind("task_kld", 1)
# The item ids of a task whose items are made with the model's tokenizer (passkey), so that a warm run loads
# no tokenizer: importing transformers' AutoTokenizer took ~5 s of this notebook's ~15 s warm.
TASK_ITEM_IDS = Kind("task_item_ids", 1)
DEFAULT_METHODS = ("fp8_dynamic", "w8a8_int8", "w4a16_gptq", "w4a16_awq")


@dataclass(frozen=True)
class Config(cells.Placement, quantization_methods.Calibration):
    """What the task study runs: the model and methods, the tasks (None: all; names or families), and how
    much of each. Items are spread evenly over a task (every k-th), so that a cap still covers all of
    BIG-bench's digit counts and operations. ``max_items`` is the profile's cap per task; ``limit``, when
    set, is a number of items the user asked for, which must exist. The baseline and each registry method
    whose results are missing are cells (see :class:`qkit.studies.cells.Placement`). The methods calibrate as
    in the methods study (:class:`qkit.studies.quantization_methods.Calibration`), so that its checkpoints
    serve here too."""

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
    trust_remote_code: bool = False


PROFILES = {
    # ≤ 10 minutes for the baseline and four methods on SmolLM2-135M with 2 CPU cores: wide CIs, meant
    # to show the machinery and gross effects. Passkey at 512-1024 tokens only.
    # Measured on SmolLM2 with 2 cores: ~140 prompt tokens/s and ~0.2 s per batched decoding step, so the
    # XSum articles (~600 tokens each) and long generations dominate; they get fewer items and tokens.
    # Too few items for conclusions (see MIN_ITEMS): it shows the machinery and gross effects only.
    # The arithmetic family gets 48 more items, of the kinds the default model can do (qkit_arithmetic_basic;
    # ~15 s per model on one thread): a 15-point drop made of correct -> wrong flips then has a paired 95%
    # CI half-width of about 11 points, so it is resolved. Long context likewise: 5 passkey items per
    # (length, depth) cell, 20 per task and 40 in the family, of which SmolLM2 retrieves 70%; they cost
    # ~160 s per model on one thread (measured), where the 8 items before cost ~32 s.
    "quick": Config(max_items=6, context_lengths=(512, 1024), depths=(0.0, 1.0), per_cell=5, kld_tokens=256,
                    max_gen_toks=48, batch_size=8, calib_sizes=quantization_methods.QUICK_CALIB_SIZES,
                    task_limits=(("qkit_xsum", 4), ("qkit_xsum_ll", 4), ("qkit_arithmetic_basic", 48),
                                 ("qkit_passkey", 20), ("qkit_passkey_multi", 20))),
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
        return method_tables.provenance_table(
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
    """A profile's config with the overrides that are not None (lists become tuples); a calibration size
    given holds for every method (:func:`qkit.studies.quantization_methods.calibration_overrides`)."""
    return contract.config(PROFILES, profile, **quantization_methods.calibration_overrides(overrides))


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
    a quantized KV cache. The baseline and the registry methods whose results are missing run as cells
    of ``config.executor`` (each quantizes, generates and scores); everything is then read back here."""
    store = store or Store()
    user_tasks.include(config.include_path, dict(config.families))
    chosen = tasks.resolve(config.tasks)
    if any(t.needs_tokenizer for t in chosen):
        task_items.check_context_lengths(config.context_lengths, loaded.info["max_length"])
    plan = _plan(config, loaded, chosen, store)
    if compared is None:
        specs = list(dict.fromkeys(config.methods))
        _run_cells(config, loaded, [BASELINE, *(s for s in specs if variants.is_method(s))], plan, store)
        compared = [variants.parse(loaded, spec, calib=config.calib_for(spec), store=store) for spec in specs]
    every = [variants.baseline(loaded), *compared]

    rows, kld_rows = [], []
    for variant in tqdm(every, desc="models", unit="model"):
        items, kld = _score_variant(loaded, variant, plan, config, store)
        rows += items
        kld_rows += kld
    df = pd.DataFrame(rows)
    seconds = df.groupby(["method", "task"], sort=False)["seconds"].sum(min_count=1) if len(df) else {}
    meta = {"model": loaded.info, "config": asdict(config), "limit": config.limit,
            "methods": [v.label for v in compared], "tasks": [t.name for t in chosen],
            "calibration": {spec: asdict(config.calib_for(spec)) for spec in config.methods},
            "seconds": {f"{m}/{t}": round(float(v), 2) for (m, t), v in dict(seconds).items()},
            "checkpoints": {v.label: str(v.checkpoint.path) for v in compared if v.checkpoint},
            "provenance": provenance.collect()}
    return Result(config, df.drop(columns="seconds", errors="ignore"), pd.DataFrame(kld_rows), meta)


@dataclass(frozen=True)
class _TaskPlan:
    task: tasks.Task
    ids: list[str]  # the items run
    index_of: dict[str, int]  # item id -> its index in the task's items
    kld: EvalSpec  # the KLD on the task's prompts (a user's task's prompts tokenized once, here)


Plan = list[_TaskPlan]


def _item_ids(config: Config, loaded: models.LoadedModel, task: tasks.Task, store: Store) -> list[str]:
    if not task.needs_tokenizer:
        return [d["id"] for d in tasks.load_items(task)]

    def ids() -> list[str]:
        docs = tasks.load_items(task, loaded.tokenizer, **_options(task, config), max_len=loaded.info["max_length"])
        return [d["id"] for d in docs]

    spec = {"model": loaded.info["fingerprint"], "task": task.name, "yaml": tasks.fingerprint(task),
            "options": _options(task, config), "max_len": loaded.info["max_length"],
            "items": tasks.TASK_ITEMS.version}
    return store.get_json(TASK_ITEM_IDS, spec, ids)


def _plan(config: Config, loaded: models.LoadedModel, chosen: Sequence[tasks.Task], store: Store) -> Plan:
    plan = []
    for task in chosen:
        ids = _item_ids(config, loaded, task, store)
        # A limit the user asked for must exist; the profile's is a cap.
        cap = dict(config.task_limits).get(task.name, config.max_items)
        n = (tasks.check_limit(task, config.limit, len(ids)) if config.limit is not None
             else min(cap or len(ids), len(ids)))
        plan.append(_TaskPlan(task, [ids[i] for i in spread(len(ids), n)],
                              {d: i for i, d in enumerate(ids)}, _kld_eval_spec(loaded, task, config)))
    return plan


def _items_spec(loaded: models.LoadedModel, identity: str, task: tasks.Task, prof: Config) -> dict:
    return {"model": loaded.info["fingerprint"], "dtype": loaded.info["dtype"], "variant": identity,
            "task": task.name, "yaml": tasks.fingerprint(task), "options": _options(task, prof),
            "max_gen_toks": prof.max_gen_toks, "scorers": tasks.scoring_versions(task)}


def _score_variant(loaded: models.LoadedModel, variant: variants.Variant, plan: Plan, prof: Config, store: Store
                   ) -> tuple[list[dict], list[dict]]:
    """One variant's item rows on every task of `plan` (computed where the store lacks them) and, unless it is
    the baseline, its KLD rows. Each item keeps the seconds its batch took where it was computed."""
    rows, kld_rows = [], []
    for p in tqdm(plan, desc=variant.label, unit="task", leave=False):
        task, index_of = p.task, p.index_of

        def compute(part: list[str], task=task, index_of=index_of) -> dict[str, dict]:
            started = time.perf_counter()
            records, _ = tasks.evaluate(variant.model, loaded.tokenizer, task, [index_of[i] for i in part],
                                        options=_options(task, prof), batch_size=prof.batch_size,
                                        max_length=loaded.info["max_length"], max_gen_toks=prof.max_gen_toks)
            each = (time.perf_counter() - started) / len(part)
            return {r["id"]: {**r, "seconds": each} for r in records}

        done = store.get_items(tasks.TASK_ITEMS, _items_spec(loaded, variant.identity, task, prof), p.ids, compute,
                               batch=max(prof.batch_size, 16))
        # Items computed before qkit timed them have no seconds.
        rows += [{"method": variant.label, "task": task.name, "family": task.family, "id": i,
                  "score": r["score"], "weight": r.get("weight", 1.0), "output": r.get("output"),
                  "seconds": r.get("seconds", np.nan)} for i, r in done.items()]
        if variant.label != BASELINE:
            kld_rows.append({"method": variant.label, "task": task.name,
                             **_task_kld(loaded, p, variant, store)})
    return rows, kld_rows


def _run_cells(config: Config, loaded: models.LoadedModel, specs: Sequence[str], plan: Plan, store: Store) -> None:
    """Score, in the executor's processes, the specs (the baseline or registry methods) whose results the
    store lacks; a rerun with everything cached starts no process."""
    def scored(spec: str) -> bool:
        identity = "float" if spec == BASELINE else variants.method_identity(loaded, spec, config.calib_for(spec), store)
        return all(store.has_items(tasks.TASK_ITEMS, _items_spec(loaded, identity, p.task, config), p.ids)
                   and (spec == BASELINE or store.lookup(TASK_KLD, _kld_key(p, identity)))
                   for p in plan)

    cells.offload(config, _variant_cell, [(s, (config, s)) for s in specs if not scored(s)], model=config.model,
                  loaded=loaded, store=store, trust_remote_code=config.trust_remote_code, desc="task sensitivity")


def _variant_cell(config: Config, spec: str) -> None:
    loaded, store = cells.worker()
    user_tasks.include(config.include_path, dict(config.families))
    variant = (variants.baseline(loaded) if spec == BASELINE
               else variants.parse(loaded, spec, calib=config.calib_for(spec), store=store))
    _score_variant(loaded, variant, _plan(config, loaded, tasks.resolve(config.tasks), store), config, store)


def _kld_eval_spec(loaded: models.LoadedModel, task: tasks.Task, prof: Config) -> EvalSpec:
    """The evaluation spec of a variant's KLD on a task's prompts."""
    prompts = tasks.get_task(task.prompts_of or task.name)
    n_tokens = prof.kld_tokens
    if prompts.include_path != tasks.TASK_DIR:  # a user's task may hold fewer prompt tokens than asked for
        held = len(data.text_tokens(tasks.prompts(prompts, loaded.tokenizer, loaded.info["max_length"]),
                                    loaded.tokenizer, None))
        n_tokens = min(n_tokens, held - held % min(512, n_tokens, held))
    return EvalSpec(domain=TASK_PREFIX + prompts.name, n_tokens=n_tokens, ctx=min(512, n_tokens), batch_size=4)


def _kld_key(p: _TaskPlan, identity: str) -> dict:
    prompts = tasks.get_task(p.task.prompts_of or p.task.name)
    return {"variant": identity, "eval": p.kld.key(), "yaml": tasks.fingerprint(prompts),
            "items": tasks.TASK_ITEMS.version}  # the prompts come from the items' code


def _task_kld(loaded: models.LoadedModel, p: _TaskPlan, variant: variants.Variant, store: Store) -> dict:
    result = store.get_json(TASK_KLD, _kld_key(p, variant.identity),
                            lambda: compare(variant.model, loaded, p.kld, store, label=f"KLD {p.task.name}"))
    return {"kld_mean": result["kld_mean"], "top1_agreement_pct": result["top1_agreement_pct"],
            "kld_tokens": result["n_tokens"]}
