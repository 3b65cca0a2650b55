"""KV-cache quantization, the study: per-position quality of each scheme on long documents against the
float baseline, and passkey retrieval by context length and depth. The memory side is
:mod:`qkit.plan.kv`."""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from qkit import data, models
from qkit.core.errors import QkitError, lookup
from qkit.core.provenance import collect as collect_provenance
from qkit.core.store import Kind, Store
from qkit.data import CalibSpec
from qkit.evaluation import final_hidden, head_logits, metrics
from qkit.plan import kv, memory
from qkit.plan.kv import check_context, make_cache
from qkit.quant import methods, variants
from qkit.quant.kv_runtime import RUNTIME_CACHES
from qkit.studies import cells, contract, plots
from qkit.studies import task_sensitivity as sensitivity
from qkit.studies.contract import Summary

# Per-position quality of one scheme (position_stats), and the float model's hidden states it is scored against.
KV_QUALITY = Kind("kv_quality", 1)
KV_BASELINE = Kind("kv_baseline", 1)
# The bytes real caches hold after a prefill, against the planner's: shapes and library code decide them.
KV_BYTES = Kind("kv_bytes", 1)
# The long documents' token ids, so that a warm run loads no tokenizer: importing transformers' AutoTokenizer
# took ~5 s of this notebook's ~14 s warm.
KV_DOCUMENTS = Kind("kv_documents", 1)


@dataclass(frozen=True)
class Scheme:
    """One way to quantize the KV cache: a qkit KV method's checkpoint (llm-compressor kv_cache_scheme,
    fake-quantized in every attention forward), optionally with its scales set to 1 as vLLM does without
    calibration; or a runtime cache of transformers' on the float model."""

    name: str
    title: str
    method: str | None = None
    unit_scales: bool = False
    cache: str | None = None  # a RUNTIME_CACHES name


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("fp8_tensor", "FP8, one calibrated scale per layer", method="kv_fp8_tensor"),
    Scheme("fp8_head", "FP8, one calibrated scale per KV head", method="kv_fp8_head"),
    Scheme("fp8_unit", "FP8, unit scales (vLLM without calibration)", method="kv_fp8_tensor", unit_scales=True),
    Scheme("fp8_static+fp8_head", "FP8 W8A8 static weights + FP8 per-head KV", method="fp8_static_kv_fp8_head"),
    Scheme("fp8_static", "FP8 W8A8 static weights alone (reference for the line above)", method="fp8_static"),
    Scheme("hqq_int8", "transformers quantized cache, HQQ int8", cache="hqq_int8"),
    Scheme("hqq_int4", "transformers quantized cache, HQQ int4", cache="hqq_int4"),
    Scheme("quanto_int4", "transformers quantized cache, quanto int4", cache="quanto_int4"),
)}


def get_scheme(name: str) -> Scheme:
    return lookup(SCHEMES, name, "KV scheme")


def load_scheme(loaded: Any, scheme: Scheme, calib: Any = None, store: Any = None) -> Any:
    """The model a scheme evaluates: a reloaded checkpoint (scales set to 1 for unit scales) or `loaded`'s
    own float model for a runtime cache."""

    if scheme.method is None:
        return loaded.model
    model = methods.load_quantized(methods.quantize(loaded, scheme.method, calib=calib, store=store))
    if scheme.unit_scales:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("k_scale", "v_scale")):
                    p.fill_(1.0)
    return model


# Position buckets of the quality-by-position table: doubling widths, since a KV error that grows with
# distance should show at the far end first.
BUCKETS = (0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


BLOCK = 64  # per-token statistics are kept as means over blocks of this many positions


def long_documents(tokenizer: Any, n_tokens: int, n_docs: int) -> torch.Tensor:
    """[n_docs, n_tokens]: the first n_tokens of the held-out prose documents that are that long."""

    rows = []
    for text in data.documents("prose", "heldout"):
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=n_tokens).input_ids
        if len(ids) == n_tokens:
            rows.append(ids)
        if len(rows) == n_docs:
            return torch.tensor(rows, dtype=torch.long)
    raise QkitError(f"the held-out prose has {len(rows)} documents of at least {n_tokens} tokens, "
                    f"not the {n_docs} asked for", f"ask for at most {len(rows)} documents, or fewer tokens")


def _hidden(model: Any, ids: torch.Tensor, cache: str | None, chunk: int) -> torch.Tensor:
    """Final hidden states [L, H] of one sequence. With a runtime cache the sequence is fed in chunks, so
    each chunk attends to the cache's (quantized) copy of the ones before, as in chunked prefill and
    decoding; without one, in one pass."""

    if cache is None:
        return final_hidden(model, ids[None])[0].float()
    past = make_cache(cache, model.config)
    return torch.cat([final_hidden(model, ids[None, i:i + chunk], past_key_values=past, use_cache=True)[0].float()
                      for i in range(0, len(ids), chunk)])


def position_stats(model: Any, loaded: Any, docs: torch.Tensor, base_hidden: torch.Tensor, cache: str | None,
                   chunk: int = 256) -> dict[str, list[list[float]]]:
    """Per document, per block of BLOCK positions: mean KLD to the baseline, NLL and top-1 agreement."""

    out: dict[str, list[list[float]]] = {"kld": [], "nll": [], "nll_base": [], "top1": []}
    for d in range(len(docs)):
        hidden = _hidden(model, docs[d], cache, chunk)
        targets = docs[d, 1:]
        per: dict[str, list[torch.Tensor]] = {k: [] for k in out}
        for i in range(0, len(targets), 512):
            rows = slice(i, min(i + 512, len(targets)))
            s = metrics.token_stats(head_logits(loaded.model, base_hidden[d, rows]), head_logits(model, hidden[rows]),
                                    targets[rows])
            for k, v in (("kld", s["kld"]), ("nll", s["nll"]), ("nll_base", s["nll_base"]),
                         ("top1", s["same_top1"].double())):
                per[k].append(v)
        for k, parts in per.items():
            x = torch.cat(parts)
            n = len(x) // BLOCK * BLOCK
            out[k].append(x[:n].view(-1, BLOCK).mean(1).tolist())
    return out


@dataclass(frozen=True)
class Config(cells.Placement):
    """What the KV study runs: the schemes, the long documents their quality is measured on, and the
    passkey retrieval items. Each scheme whose position pass is missing from the store is a cell (see
    :class:`qkit.studies.cells.Placement`) that also runs its retrieval items."""

    schemes: tuple[str, ...]
    n_tokens: int  # tokens per long document (the farthest position measured)
    n_docs: int
    chunk: int  # prefill chunk for runtime caches
    context_lengths: tuple[int, ...]  # passkey retrieval
    depths: tuple[float, ...]
    calib_samples: int = 16
    calib_seq_len: int = 512
    tasks: tuple[str, ...] = ("qkit_passkey",)  # retrieval tasks of qkit.evaluation.tasks
    model: str = models.DEFAULT_MODEL
    trust_remote_code: bool = False


PROFILES = {
    # Five 4K-token documents, four schemes, passkey at 1K and 2K (a 4K passkey item costs as much as a
    # scheme's whole position pass, and there are 15 of them). With two documents (9 min 36 s cold on
    # SmolLM2, 2 idle cores) per-tensor minus per-head at 2048-4096 had a CI half-width of 0.0072 nats;
    # five should bring it to ~0.0046 (x sqrt(2/5)), under the 0.005 that tells the two apart.
    "quick": Config(("fp8_tensor", "fp8_head", "fp8_unit", "hqq_int4"), n_tokens=4096, n_docs=5,
                    chunk=512, context_lengths=(1024, 2048), depths=(0.0, 0.5, 1.0)),
    # The model's full context (8K for SmolLM2), every scheme, more documents and depths.
    "full": Config(tuple(SCHEMES), n_tokens=8192, n_docs=6, chunk=256,
                   context_lengths=(1024, 2048, 4096, 8192), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                   calib_samples=64, calib_seq_len=2048, tasks=("qkit_passkey", "qkit_passkey_multi")),
}


@dataclass
class Result:
    config: Config
    blocks: pd.DataFrame  # scheme, doc, start (first position of the block), kld, nll, nll_base, top1
    retrieval: pd.DataFrame  # scheme, length, depth, id, score (passkey exact match), output
    meta: dict

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {"by position": by_position(self).set_index(["scheme", "bucket"]).round(5),
               "retrieval": retrieval_table(self)}
        if {"fp8_tensor", "fp8_head"} <= set(self.blocks["scheme"]):
            out["per-tensor against per-head"] = compare(self, "fp8_tensor", "fp8_head").set_index("bucket")
        return out

    def findings(self) -> list[str]:
        return findings(self)

    def figures(self) -> plots.Figures:
        return plots.Figures({"by position": lambda: plots.kv_by_position(by_position(self)),
                              "retrieval": lambda: plots.kv_retrieval(retrieval_table(self))})

    def provenance(self) -> pd.DataFrame:
        return provenance(self)

    def summary(self) -> Summary:
        table = by_position(self)
        far = table[table["from"] == table["from"].max()].sort_values("kld")
        best = far.iloc[0]
        grows = [f for f in findings(self) if "grows with distance" in f]
        return Summary("KV cache", f"at positions {best['bucket']}, least KLD: {best['scheme']} "
                       f"({best['kld']:.3g} [{best['low']:.3g}, {best['high']:.3g}]); KLD grows with distance for "
                       f"{len(grows)} of {table['scheme'].nunique()} schemes", best["scheme"],
                       "ok" if grows else "no effect resolved", "by position")


def config(profile: str | Config = "quick", **overrides) -> Config:
    """A profile's config with the overrides that are not None (lists become tuples)."""
    return contract.config(PROFILES, profile, **overrides)


def run(config: Config = PROFILES["quick"], *, store: Store | None = None) -> Result:
    """Per-position quality of each scheme on long documents against the float baseline (cached per
    scheme), and passkey retrieval by length and depth."""
    prof = config
    chosen = [get_scheme(n) for n in prof.schemes]
    store = store or Store()
    loaded = models.resolve_model(prof.model, store=store, trust_remote_code=prof.trust_remote_code)
    check_context(memory.shape_of(loaded), max(prof.n_tokens, *prof.context_lengths))
    inputs = _inputs(prof, loaded, store)
    todo = [s for s in chosen if store.lookup(KV_QUALITY, _quality_spec(loaded, s, inputs, prof, store)) is None]
    cells.offload(prof, _scheme_cell, [(s.name, (prof, s.name)) for s in todo], model=prof.model, loaded=loaded,
                  store=store, trust_remote_code=prof.trust_remote_code, desc="KV schemes")
    rows = []
    for scheme in tqdm(chosen, desc="KV schemes", unit="scheme"):
        res = _quality(loaded, scheme, inputs, prof, store)
        for d in range(prof.n_docs):
            for b in range(len(res["kld"][d])):
                rows.append({"scheme": scheme.name, "doc": d, "start": b * BLOCK,
                             **{k: res[k][d][b] for k in res}})
    retrieval = _retrieval(loaded, chosen, prof, inputs.calib, store)
    meta = {"model": loaded.info, "config": asdict(prof), "n_tokens": prof.n_tokens, "n_docs": prof.n_docs,
            "calibration": inputs.calib.__dict__, "schemes": {s.name: s.title for s in chosen},
            "provenance": collect_provenance()}
    return Result(prof, pd.DataFrame(rows), retrieval, meta)


def measured_bytes(loaded: Any, lengths: Sequence[int], store: Store | None = None) -> pd.DataFrame:
    """:func:`qkit.plan.kv.measure_bytes` (a prefill per length and runtime cache, ~40 s on SmolLM2 up to
    2,048 tokens), kept in the store: the bytes follow from the model's shapes, the dtype and the cache
    classes of the library versions the store key holds, so a rerun reads them back."""
    spec = {"model": loaded.info["fingerprint"], "dtype": loaded.info["dtype"], "lengths": list(lengths),
            "caches": {name: str(kwargs) for name, kwargs in RUNTIME_CACHES.items()}}
    # "split", not records: the JSON is written with sorted keys, and the columns keep their order
    kept = (store or Store()).get_json(KV_BYTES, spec, lambda: kv.measure_bytes(loaded, lengths).to_dict("split"))
    return pd.DataFrame(**kept)


@dataclass(frozen=True)
class _Inputs:
    calib: CalibSpec  # of the schemes whose checkpoint calibrates
    docs: torch.Tensor  # [n_docs, n_tokens] token ids
    doc_key: dict  # what identifies the documents (and the baseline's hidden states on them)
    base_hidden: torch.Tensor


def _inputs(prof: Config, loaded: Any, store: Store) -> _Inputs:
    max_context = memory.shape_of(loaded).max_context
    calib = CalibSpec("prose", prof.calib_samples, min(prof.calib_seq_len, max_context or prof.calib_seq_len))
    spec = {"model": loaded.info["fingerprint"], "n_tokens": prof.n_tokens, "n_docs": prof.n_docs}
    docs = torch.tensor(store.get_json(KV_DOCUMENTS, spec, lambda: long_documents(
        loaded.tokenizer, prof.n_tokens, prof.n_docs).tolist()), dtype=torch.long)
    doc_key = {"model": loaded.info["fingerprint"], "dtype": loaded.info["dtype"], "n_tokens": prof.n_tokens,
               "n_docs": prof.n_docs, "docs": hashlib.sha256(docs.numpy().tobytes()).hexdigest()[:16]}
    return _Inputs(calib, docs, doc_key, _baseline_hidden(loaded, docs, doc_key, store))


def _quality_spec(loaded: Any, scheme: Scheme, inputs: _Inputs, prof: Config, store: Store) -> dict:
    ident = (variants.method_identity(loaded, scheme.method, inputs.calib, store) if scheme.method else "float")
    return {**inputs.doc_key, "scheme": scheme.name, "variant": ident, "unit_scales": scheme.unit_scales,
            "cache": scheme.cache, "chunk": prof.chunk if scheme.cache else None, "block": BLOCK}


def _quality(loaded: Any, scheme: Scheme, inputs: _Inputs, prof: Config, store: Store) -> dict:
    return store.get_json(KV_QUALITY, _quality_spec(loaded, scheme, inputs, prof, store), lambda: position_stats(
        load_scheme(loaded, scheme, inputs.calib, store), loaded, inputs.docs, inputs.base_hidden, scheme.cache,
        prof.chunk))


def _scheme_cell(prof: Config, name: str) -> None:
    loaded, store = cells.worker()
    inputs, scheme = _inputs(prof, loaded, store), get_scheme(name)
    _quality(loaded, scheme, inputs, prof, store)
    _retrieval(loaded, [scheme], prof, inputs.calib, store)


def _baseline_hidden(loaded: Any, docs: torch.Tensor, doc_key: dict, store: Any) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    def build(tmp) -> dict:
        hidden = torch.stack([_hidden(loaded.model, d, None, 0) for d in docs])
        save_file({"hidden": hidden.contiguous()}, str(tmp / "hidden.safetensors"))
        return {"shape": list(hidden.shape)}

    path = store.get_dir(KV_BASELINE, doc_key, build)
    return load_file(str(path / "hidden.safetensors"))["hidden"]


def _retrieval(loaded: Any, chosen: Sequence[Scheme], prof: Config, calib: Any, store: Any):
    """Passkey retrieval of the baseline and each scheme, through the task-sensitivity study."""
    compared = []
    for s in chosen:
        if s.cache:
            compared.append(variants.with_kv_cache(loaded, s.cache, s.name))
        elif s.unit_scales:
            ckpt = methods.quantize(loaded, s.method, calib=calib, store=store)
            compared.append(variants.Variant(s.name, ckpt.path.name + "/unit",
                                             lambda s=s: load_scheme(loaded, s, calib, store), ckpt))
        else:
            v = variants.from_method(loaded, s.method, calib=calib, store=store)
            compared.append(dataclasses.replace(v, label=s.name))
    sconfig = sensitivity.Config(max_items=None, context_lengths=prof.context_lengths, depths=prof.depths,
                                 per_cell=1, kld_tokens=256, max_gen_toks=16, batch_size=1, methods=(),
                                 tasks=tuple(prof.tasks), calib=calib.name, samples=calib.n_samples,
                                 seq_len=calib.seq_len, seed=calib.seed)
    res = sensitivity.score(sconfig, loaded, store=store, compared=compared)
    df = res.items.rename(columns={"method": "scheme"})
    parts = df["id"].str.split("/", expand=True)  # passkey{keys}/{length}/{depth}/{j}
    return df.assign(length=parts[1].astype(int), depth=parts[2].astype(float))[
        ["scheme", "task", "length", "depth", "id", "score", "output"]]


def _bucket(start: int) -> str:
    for lo, hi in zip(BUCKETS, BUCKETS[1:]):
        if lo <= start < hi:
            return f"{lo}-{hi}"
    return f">={BUCKETS[-1]}"


def by_position(res: Result, metric: str = "kld"):
    """Mean of `metric` per scheme and position bucket, with a 95% bootstrap CI over the blocks of
    BLOCK positions in the bucket; perplexity from the mean NLL."""

    d = res.blocks.assign(bucket=res.blocks["start"].map(_bucket))
    rows = []
    for (scheme, bucket), g in d.groupby(["scheme", "bucket"], sort=False):
        mean, lo, hi = metrics.mean_ci(g[metric].to_numpy(), seed=0)
        rows.append({"scheme": scheme, "bucket": bucket, "from": int(g["start"].min()), metric: mean,
                     "low": lo, "high": hi, "ppl": math.exp(g["nll"].mean()), "ppl_base": math.exp(g["nll_base"].mean()),
                     "top1_pct": 100 * g["top1"].mean(), "blocks": len(g)})
    return pd.DataFrame(rows).sort_values(["scheme", "from"], key=lambda c: c.map(
        {s: i for i, s in enumerate(dict.fromkeys(res.blocks["scheme"]))}) if c.name == "scheme" else c)


def compare(res: Result, a: str = "fp8_tensor", b: str = "fp8_head", metric: str = "kld"):
    """Per position bucket, `a` minus `b` in `metric`, paired by document and block, with a 95% bootstrap
    CI: a CI that excludes 0 is a real difference at this sample size."""

    d = res.blocks.assign(bucket=res.blocks["start"].map(_bucket))
    for name in (a, b):
        if name not in set(d["scheme"]):
            raise QkitError(f"scheme {name!r} is not in this result", f"run it: schemes=[..., {name!r}]")
    pa = d[d["scheme"] == a].set_index(["doc", "start"])
    pb = d[d["scheme"] == b].set_index(["doc", "start"])
    rows = []
    for bucket, g in pa.groupby("bucket", sort=False):
        x, y = g[metric].to_numpy(), pb.loc[g.index, metric].to_numpy()
        diff, lo, hi = metrics.mean_ci(x, paired_with=y, seed=0)
        rows.append({"bucket": bucket, f"{a}": x.mean(), f"{b}": y.mean(), "difference": diff, "low": lo,
                     "high": hi, "verdict": ("one block, no CI" if math.isnan(lo) else "no difference"
                                             if lo <= 0 <= hi else f"{b} better" if diff > 0 else f"{a} better")})
    return pd.DataFrame(rows)


def findings(res: Result) -> list[str]:
    """What the run shows, each claim from its numbers: does KLD grow with distance, per scheme; per-tensor
    against per-head scales; retrieval."""
    out = []
    table = by_position(res)
    for scheme, g in table.groupby("scheme", sort=False):
        first, last = g.iloc[0], g.iloc[-1]
        if len(g) < 2:
            continue
        grows = last["low"] > first["high"]
        shrinks = last["high"] < first["low"]
        verdict = ("cannot be compared with distance: a bucket holds a single block, so no CI (use longer "
                   "documents or more of them)" if math.isnan(first["low"]) or math.isnan(last["low"])
                   else "grows with distance" if grows else "falls with distance" if shrinks
                   else "does not change with distance beyond the CIs")
        out.append(f"**{scheme}**: mean KLD {first['kld']:.3g} [{first['low']:.3g}, {first['high']:.3g}] at positions "
                   f"{first['bucket']} and {last['kld']:.3g} [{last['low']:.3g}, {last['high']:.3g}] at "
                   f"{last['bucket']}: it {verdict}.")
    schemes = set(res.blocks["scheme"])
    if {"fp8_tensor", "fp8_head"} <= schemes:
        c = compare(res)
        far = c.iloc[-1]
        out.append("**per-tensor against per-head scales**: " + "; ".join(
            f"{r['bucket']}: {r['difference']:+.3g} [{r['low']:+.3g}, {r['high']:+.3g}] ({r['verdict']})"
            for _, r in c.iterrows()) + f". At positions {far['bucket']} this run resolves a difference larger "
            f"than ±{(far['high'] - far['low']) / 2:.2g} nats (its CI's half-width); smaller ones it cannot.")
    if len(res.retrieval):
        acc = res.retrieval.groupby("scheme", sort=False)["score"].agg(["mean", "count"])
        out.append("**passkey retrieval**: " + ", ".join(f"{s} {100 * r['mean']:.0f}% of {int(r['count'])}"
                                                          for s, r in acc.iterrows()) + ".")
    return out


def retrieval_table(res: Result):
    """Passkey accuracy (%) per scheme (and task, where several), by context length and depth."""
    r = res.retrieval
    index = ["scheme", "task"] if r["task"].nunique() > 1 else ["scheme"]
    return (100 * r.pivot_table(index=index, columns=["length", "depth"], values="score", aggfunc="mean",
                                sort=False)).round(0)


def provenance(res: Result):
    """Where the result came from: model, documents, calibration, commit, hardware, library versions."""
    prov = res.meta["provenance"]
    return pd.Series({"model": res.meta["model"]["spec"], "schemes": ", ".join(dict.fromkeys(res.blocks["scheme"])),
                      "documents": f"{res.meta['n_docs']} x {res.meta['n_tokens']} tokens of held-out prose",
                      "calibration": str(res.meta["calibration"]), "git commit": prov["git_commit"],
                      "hardware": str(prov["hardware"]), **prov["libraries"]}).to_frame("value")
