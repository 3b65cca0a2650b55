"""Quality-drift monitoring: how far a quantized deployment's answers drift from its reference model's on
the traffic it actually served, whether that is getting worse, and on which kind of request.

The request log's format is in :mod:`qkit.data.request_log`, the per-request measures in
:mod:`qkit.evaluation.served`.

Windows, baselines and change tests are in :mod:`qkit.evaluation.monitor`.

**Incremental**: the state (byte offset, line count, per-request results) lives in the qkit store under
``drift/<key>``, keyed by the log's path, the two models and the scoring settings; a rerun reads only
the lines added since, and a log that was rewritten or rotated (its start changed) is read afresh.

**Checks** (:func:`check`) report only the windows new since the last check with the same monitor
settings (the last window again if it has grown), and each alert once: the state also keeps, per monitor
settings, the last window checked and the alerts still open (see :mod:`qkit.evaluation.monitor`).
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from qkit import models
from qkit.core import provenance
from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store, canonical, write_json_atomic, write_text_atomic
from qkit.data.request_log import SAMPLE_PROMPTS, check_log, read_log, report_malformed
from qkit.evaluation import canary, metrics, monitor
from qkit.evaluation.monitor import Monitor, worst
from qkit.evaluation.served import DriftConfig, generate, measure
from qkit.quant import variants
from qkit.quant.variants import Variant
from qkit.studies import contract, plots
from qkit.studies.contract import Summary

# A replayed serving log: what a deployment answered to the sample prompts; and a log's monitoring state,
# the per-request scores read so far (bump when served.measure would score a request otherwise).
REPLAY = Kind("drift_replay", 1)
STATE = Kind("drift", 1)
# The upgrade canary run on a change known in advance (the report's demonstration of it).
UPGRADE_CHECK = Kind("drift_upgrade_check", 1)
REFERENCE_ANSWERS = Kind("drift_reference_answers", 1)

# Hashed to tell whether a log was rewritten under the monitor: the first bytes it already read.
_HEAD_BYTES = 4096


@dataclass
class DriftState:
    log: str
    offset: int = 0
    n_lines: int = 0
    head_sha256: str = ""
    results: list[dict] = field(default_factory=list)
    malformed: list[list] = field(default_factory=list)  # [line, why]
    skipped_empty: int = 0  # requests whose completion has no token
    meta: dict = field(default_factory=dict)
    # Per monitor settings (a digest of them): the last window checked, its requests then, the open alerts.
    checks: dict = field(default_factory=dict)


def _head_digest(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(min(n, _HEAD_BYTES))).hexdigest()


def state_path(store: Store, spec: dict) -> Path:
    return store.path(STATE, spec) / "state.json"


def _spec(log: Path, reference: models.LoadedModel, served: Variant, config: DriftConfig) -> dict:
    return {"log": str(log), "reference": reference.info["fingerprint"], "quantized": served.identity,
            "config": asdict(config)}


def state_path_for(log: str | Path, reference: models.LoadedModel, served: Variant, config: DriftConfig = DriftConfig(),
                   store: Store | None = None) -> Path:
    """Where :func:`update` keeps this log's state for these models and settings."""
    return state_path(store or Store(), _spec(Path(log).resolve(), reference, served, config))


def update(log: str | Path, reference: models.LoadedModel, served: Variant, config: DriftConfig = DriftConfig(),
           store: Store | None = None) -> DriftState:
    """Measure the log's requests not measured yet and return the whole log's state.

    The state is saved after every batch of new requests, so an interrupted run resumes where it stopped.
    """
    store = store or Store()
    log = Path(log).resolve()
    path = state_path(store, _spec(log, reference, served, config))
    state = DriftState(str(log))
    if path.exists():
        saved = DriftState(**json.loads(path.read_text()))
        size = log.stat().st_size if log.exists() else 0
        if size >= saved.offset and _head_digest(log, saved.offset) == saved.head_sha256:
            state = saved
        else:
            warnings.warn(f"{log} was rewritten since the last run (its start changed or it shrank): reading it "
                          "from the beginning", stacklevel=2)
    chunk = read_log(log, state.offset, state.n_lines + 1)
    report_malformed(chunk.malformed, log)
    known, bad = state.malformed, [list(m) for m in chunk.malformed]
    state.meta = {"reference": reference.info["spec"], "reference_fingerprint": reference.info["fingerprint"],
                  "quantized": served.label, "quantized_identity": served.identity, "config": asdict(config),
                  "provenance": provenance.collect()}
    # Saved after each group of requests, with the offset just past the group's last line.
    first_line, step = state.n_lines + 1, 4 * config.batch_size
    for i in range(0, len(chunk.requests), step):
        part = chunk.requests[i:i + step]
        new = measure(reference, served.model, part, config)
        state.skipped_empty += len(part) - len(new)
        state.results += new
        state.offset, state.n_lines = chunk.ends[part[-1].line], part[-1].line
        state.malformed = known + [m for m in bad if m[0] < state.n_lines]  # a resumed run reads the rest again
        state.head_sha256 = _head_digest(log, state.offset)
        write_json_atomic(path, asdict(state))
    state.offset, state.n_lines = chunk.end_offset, first_line - 1 + chunk.n_lines
    state.malformed = known + bad
    state.head_sha256 = _head_digest(log, state.offset)
    write_json_atomic(path, asdict(state))
    if not state.results:
        raise QkitError(f"the log {log} holds no usable request ({len(state.malformed)} malformed line(s), "
                        f"{state.skipped_empty} with an empty completion)",
                        "log one JSON object per line with at least a non-empty \"prompt\" (see qkit.drift)")
    return state


@dataclass
class Check:
    """One check of a log: the monitor of the windows it tested, with their alert events."""
    mon: Monitor
    everything: bool  # the whole log (`--all`), not only the windows new since the last check

    @property
    def new_alerts(self) -> list[dict]:
        return [e for e in self.mon.events if e["status"] == "new"]


def _settings_key(config: monitor.MonitorConfig) -> str:
    return hashlib.sha256(canonical(asdict(config)).encode()).hexdigest()[:16]


def check(state: DriftState, config: monitor.MonitorConfig, path: str | Path, everything: bool = False) -> Check:
    """Monitor the windows new since the last check of this state with these settings (the last one
    again if it has grown), each alert reported once, and save where the check got to into the state at
    `path` (:func:`state_path_for`). With `everything`, the whole log from a clean slate, saving nothing:
    a look at the history must not make a scheduled check skip what it has not reported."""
    key = _settings_key(config)
    last = None if everything else state.checks.get(key)
    sizes = monitor.assign_windows(pd.DataFrame(state.results), config).value_counts()
    first = 0 if last is None else last["window"] + int(sizes.get(last["window"], 0) <= last["n"])
    mon = monitor.monitor(state.results, config, first, [tuple(k) for k in last["open"]] if last else ())
    if not everything:
        end = int(sizes.index.max())
        state.checks[key] = {"window": end, "n": int(sizes[end]), "open": [list(k) for k in mon.open]}
        write_json_atomic(Path(path), asdict(state))
    return Check(mon, everything)


def write_alerts(result: Check, state: DriftState, path: str | Path) -> None:
    """The check's alert events as JSON (window, tag, measure, effect, threshold, p and adjusted p, and
    status: new, continuing or cleared), with what was compared and the provenance of the run."""
    tested = result.mon.windows.loc[result.mon.windows["tested"], "window"]
    write_json_atomic(Path(path), {
        "log": state.log, "alerts": result.mon.events, "open": result.mon.open, "all_windows": result.everything,
        "windows_checked": [int(tested.min()), int(tested.max())] if len(tested) else [],
        "monitor": asdict(result.mon.config), "n_requests": len(state.results),
        "malformed_lines": len(state.malformed), **state.meta})


def side_by_side(log: str | Path, mon: Monitor, reference: models.LoadedModel, n: int = 5, by: str = "served_top1",
                 max_new_tokens: int = DriftConfig.max_new_tokens, store: Store | None = None) -> pd.DataFrame:
    """The `n` worst requests by `by`: the served completion beside the reference's own greedy answer to
    the same prompt (`max_new_tokens` long). Greedy answers are deterministic in one environment, so they
    are kept in the store, keyed by the model, the prompts, the length and the hardware: a report rerun
    reads them back instead of loading the model and generating (~10 s on SmolLM2)."""
    rows = worst(mon, n, by)
    prompts = [json.loads(line)["prompt"] for line in _lines(Path(log), [int(x) for x in rows["line"]])]
    spec = {"model": reference.info["fingerprint"], "dtype": reference.info["dtype"],
            "prompts": hashlib.sha256(canonical(prompts).encode()).hexdigest(), "max_new_tokens": max_new_tokens,
            "hardware": provenance.collect()["hardware"]}
    answers = (store or Store()).get_json(REFERENCE_ANSWERS, spec, lambda: [
        a for a, _ in generate(reference.model, reference.tokenizer, prompts, max_new_tokens,
                               desc="reference answers", context=reference.info["max_length"])])
    return pd.DataFrame({"line": rows["line"].to_numpy(), "tag": rows["tag"].to_numpy(),
                         "window": rows["window"].to_numpy(), by: rows[by].round(3).to_numpy(),
                         "kld": rows["kld"].to_numpy(), "prompt (end)": [p[-160:] for p in prompts],
                         "served": rows["completion"].to_numpy(), "reference": answers})


def replay(reference: models.LoadedModel, serve: str, prompts: str | Path | None = None, out: str | Path | None = None,
           *, switch_to: str | None = None, switch_at: int | None = None,
           max_new_tokens: int = DriftConfig.max_new_tokens, batch_size: int = DriftConfig.batch_size,
           store: Store | None = None) -> Path:
    """Write a log as if `serve` (a method or model directory) had answered the prompts file (the log
    format, completions ignored); with `switch_to`, that one serves from request `switch_at` on (default:
    halfway), so a monitor can be tried on a known change. Greedy, `max_new_tokens` per answer. Without a
    prompts file, qkit's sample prompts serve (SAMPLE_PROMPTS: arithmetic, prose, code, chat). Without
    `out`, the log is kept in the store, keyed by everything that makes it, and a second call serves
    nothing: a report rerun monitors the same log and finds its measures stored."""
    prompts = Path(prompts) if prompts is not None else SAMPLE_PROMPTS
    chunk = read_log(prompts)
    report_malformed(chunk.malformed, prompts)
    reqs = chunk.requests
    if not reqs:
        raise QkitError(f"the prompts file {prompts} holds no usable prompt",
                        "write one JSON object per line with a \"prompt\"")
    if switch_at is not None and switch_to is None:
        raise QkitError("switch_at was given without switch_to", "name the method to switch to (--switch-to)")
    at = len(reqs) if switch_to is None else (len(reqs) // 2 if switch_at is None else switch_at)
    if switch_to is not None and not 0 < at < len(reqs):
        raise QkitError(f"switch_at {at} leaves one side of the switch without requests ({len(reqs)} prompts)",
                        f"pass --switch-at 1..{len(reqs) - 1}")

    def serve_all() -> str:
        raw = {r.line: json.loads(line) for r, line in zip(reqs, _lines(prompts, [r.line for r in reqs]))}
        records = []
        for spec, part in ((serve, reqs[:at]), (switch_to, reqs[at:])):
            if not part:
                continue
            served = variants.parse(reference, spec, store=store)
            answers = generate(served.model, reference.tokenizer, [r.prompt for r in part], max_new_tokens,
                               batch_size, f"serving with {served.label}", reference.info["max_length"])
            for r, (answer, ids) in zip(part, answers):
                rec = {k: v for k, v in raw[r.line].items() if k not in ("completion", "completion_ids")}
                rec.update(completion=answer, completion_ids=ids, served_by=served.label)
                rec.setdefault("timestamp", time.time())
                records.append(rec)
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    if out is not None:
        write_text_atomic(Path(out), serve_all())
        return Path(out)
    spec = {"reference": reference.info["fingerprint"], "serve": variants.spec_key(serve),
            "switch_to": variants.spec_key(switch_to) if switch_to else None, "switch_at": at,
            "prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(), "max_new_tokens": max_new_tokens,
            "batch_size": batch_size}  # left padding can move a greedy choice at a near tie
    store = store or Store()
    return store.get_dir(REPLAY, spec, lambda tmp: write_text_atomic(tmp / "log.jsonl", serve_all())) \
        / "log.jsonl"


def served_by(log: str | Path) -> dict[int, str]:
    """Line number → what served it, for the lines of a replayed log that say so (a demo's ground truth)."""
    out = {}
    with open(check_log(log), encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("served_by"), str):
                out[i] = rec["served_by"]
    return out


def _lines(path: Path, numbers: Sequence[int]) -> list[str]:
    wanted = set(numbers)
    with open(path, encoding="utf-8", errors="replace") as f:
        found = {i: line for i, line in enumerate(f, 1) if i in wanted}
    return [found[i] for i in numbers]


@dataclass(frozen=True)
class Config:
    """What the drift study monitors: a request log (None: replay the sample prompts with ``method``,
    switching the deployment to ``switch_to`` at ``switch_at``, half the prompts by default), the method
    the monitor is told is deployed, and the windows it compares."""

    model: str = models.DEFAULT_MODEL  # the reference
    method: str = "fp8_dynamic"  # a registry method or a model directory
    log: str | None = None
    switch_to: str | None = "w4a16_rtn"
    switch_at: int | None = None
    prompts: str | None = None  # JSONL prompts to replay; None: qkit's sample prompts
    window: int | str = 16  # requests per window, or a duration such as "30m"
    alpha: float = monitor.MonitorConfig.alpha  # false-alarm level: Benjamini-Hochberg over all tests
    max_new_tokens: int = DriftConfig.max_new_tokens
    batch_size: int = DriftConfig.batch_size


PROFILES = {"quick": Config(), "full": Config(max_new_tokens=128)}


def config(profile: str | Config = "quick", **overrides) -> Config:
    """A profile's config with the overrides that are not None."""
    return contract.config(PROFILES, profile, **overrides)


def run(config: Config = PROFILES["quick"], *, store: Store | None = None) -> Result:
    """Measure the log's new requests against the reference (replaying one first if none is given) and
    monitor them window by window."""
    # bad input fails before a model loads
    windows = monitor.MonitorConfig(window=config.window, alpha=config.alpha)
    reference = models.resolve_model(config.model, store=store)
    # A replayed log is kept in the store: a rerun serves nothing again and finds the measures stored.
    log = config.log or replay(reference, config.method, config.prompts, switch_to=config.switch_to,
                               switch_at=config.switch_at, max_new_tokens=config.max_new_tokens, store=store)
    deployment = variants.parse(reference, config.method, store=store)
    state = update(log, reference, deployment, DriftConfig(batch_size=config.batch_size,
                                                           max_new_tokens=config.max_new_tokens), store)
    return Result(config, Path(log), reference, deployment, state, monitor.monitor(state.results, windows),
                  store or Store())


def upgrade_check(config: Config, dtype: str = "bfloat16", store: Store | None = None) -> canary.CanaryCheck:
    """The upgrade canary on a change known in advance: a record of the reference model in float32 on the
    config's prompts, checked with the model loaded in `dtype`. Both runs are deterministic in one
    environment (a rerun reproduces a record to the bit), so the check is kept in the store, keyed by the
    model, prompts, settings and hardware (a store key holds the library versions too): a report rerun
    reads it back instead of spending two minutes generating the same answers again."""
    store = store or Store()
    ident = canary.identify(config.model, prompts=config.prompts)
    settings = canary.CanaryConfig(max_new_tokens=config.max_new_tokens)
    spec = {**ident.key, "config": asdict(settings), "dtype": dtype, "hardware": provenance.collect()["hardware"]}

    def compute() -> dict:
        saved = canary.make_record(canary.deployment(ident, store=store), settings)
        done = canary.check_record(saved, canary.deployment(ident, dtype, store=store))
        # "split", not records: the JSON is written with sorted keys, and the columns keep their order
        return {"measures": done.measures.to_dict("split"), "per_prompt": done.per_prompt.to_dict("split"),
                "changed": done.changed, "thresholds": asdict(done.thresholds)}

    kept = store.get_json(UPGRADE_CHECK, spec, compute)
    return canary.CanaryCheck(pd.DataFrame(**kept["measures"]), pd.DataFrame(**kept["per_prompt"]), kept["changed"],
                              canary.Thresholds(**kept["thresholds"]))


@dataclass
class Result:
    config: Config
    log: Path
    reference: models.LoadedModel
    deployment: Variant
    state: DriftState
    mon: monitor.Monitor
    store: Store = field(default_factory=Store, repr=False)

    def describe(self) -> str:
        s = self.state
        return (f"**{len(s.results)} requests** from `{self.log.name}`, measured against `{self.config.model}` "
                f"with `{self.deployment.label}` as the quantized model; {len(s.malformed)} malformed line(s) "
                f"skipped, {sum(r['truncated'] for r in s.results)} prompt(s) cut to the context.")

    def tables(self) -> dict[str, pd.DataFrame]:
        mon = self.mon
        cols = ["window", "first_line", "last_line", "n", "kld", "kld_ratio", "top1", "served_top1", "ref_logprob",
                "tail_share", "acc_ref", "acc_quant", "flips", "p_kld", "p_served_top1", "alert"]
        out = {"windows": mon.windows[[c for c in cols if c in mon.windows]].round(4).set_index("window")}
        truth = served_by(self.log)
        if truth:
            out["served by"] = pd.crosstab(mon.requests["window"], mon.requests["line"].map(truth).rename("served_by"))
        top1 = mon.tags.pivot(index="tag", columns="window", values="served_top1").round(3)
        kld = mon.tags.pivot(index="tag", columns="window", values="kld").map(lambda x: f"{x:.2e}")
        out["tags"] = pd.concat([top1.add_prefix("w").add_suffix(" served_top1"),
                                 kld.add_prefix("w").add_suffix(" KLD")], axis=1)
        req = mon.requests
        checked = req.dropna(subset=["correct_ref"]) if "correct_ref" in req else req.iloc[:0]
        if len(checked):
            out["flips by window"] = pd.DataFrame([
                {"window": w, **metrics.flips(g["correct_ref"].astype(bool), g["correct_quant"].astype(bool)),
                 "acc_ref": g["correct_ref"].mean(), "acc_quant": g["correct_quant"].mean()}
                for w, g in checked.groupby("window")]).set_index("window").round(3)
        return out

    def side_by_side(self, n: int = 5) -> pd.DataFrame:
        return side_by_side(self.log, self.mon, self.reference, n=n, max_new_tokens=self.config.max_new_tokens,
                            store=self.store)

    def findings(self) -> list[str]:
        return ([f"- {line}" for line in monitor.alert_lines(self.mon.events)] or ["No alert."]) + [
            monitor.resolution(self.mon)]

    def figures(self) -> plots.Figures:
        return plots.Figures({"windows": lambda: plots.drift_windows(self.mon.windows, self.mon.config)})

    def provenance(self) -> pd.DataFrame:
        meta, prov = self.state.meta, self.state.meta["provenance"]
        return pd.Series({k: v for k, v in meta.items() if k != "provenance"} | {
            "git_commit": prov["git_commit"], "hardware": str(prov["hardware"]),
            "libraries": ", ".join(f"{k} {v}" for k, v in prov["libraries"].items()),
            "log": str(self.log)}).to_frame("value")

    def summary(self) -> Summary:
        alerts = self.mon.alerts
        windows = sorted({a["window"] for a in alerts})
        headline = (f"{len(self.state.results)} requests in {len(self.mon.windows)} windows; "
                    + (f"alerts in window(s) {', '.join(map(str, windows))}" if alerts else "no alert"))
        return Summary("drift monitoring", headline, None, "alert" if alerts else "ok", "windows")
