"""KV-cache quantization: what a cache costs in memory (the planner) and in quality (the study).

Memory: every generated or prompt token keeps a key and a value vector per layer and KV head, so

    KV bytes = 2 x layers x kv_heads x head_dim x bytes per element x tokens x batch.

A quantized cache stores each group of ``group`` elements as ``bits`` each plus a scale and a zero point
(transformers' QuantizedCache, one group per head vector), and keeps the newest ``residual`` tokens
unquantized until it requantizes. The formulas are checked against the bytes the caches really hold.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from qkit import memory
from qkit.errors import QkitError, lookup
from qkit.memory import GB, ModelShape


@dataclass(frozen=True)
class CacheFormat:
    """How a KV cache stores one element."""

    name: str
    bits: float
    group: int | None = None  # elements per scale + zero point; None: no per-group metadata
    meta_bytes: int = 2  # bytes of each scale and each zero point (the model's compute dtype)

    def bytes_per_element(self) -> float:
        return self.bits / 8 + (2 * self.meta_bytes / self.group if self.group else 0.0)


# What the planner compares. FP8 is what vLLM stores with `kv_cache_dtype="fp8"` (one scale per tensor or
# per head: negligible bytes); int4 is transformers' QuantizedCache (group 64 = a SmolLM2/Llama head
# vector, BF16 scale and zero on a GPU).
FORMATS: dict[str, CacheFormat] = {
    "bf16": CacheFormat("bf16", 16),
    "fp8": CacheFormat("fp8", 8),  # vLLM kv_cache_dtype=fp8, per-tensor or per-head scales
    "int8": CacheFormat("int8", 8, group=64),  # transformers QuantizedCache, HQQ backend
    "int4": CacheFormat("int4", 4, group=64),  # transformers QuantizedCache, HQQ or quanto backend
}


def get_format(name: str) -> CacheFormat:
    return lookup(FORMATS, name, "KV cache format")


def kv_bytes(shape: ModelShape, tokens: int, batch: int = 1, fmt: str | CacheFormat = "bf16", *,
             residual: int = 0, residual_bytes: int = 2) -> float:
    """Bytes a KV cache holds for `tokens` tokens of each of `batch` sequences. For a quantized format,
    `residual` of those tokens sit unquantized at `residual_bytes` per element."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if tokens < 0 or batch < 1 or not 0 <= residual <= tokens:
        raise QkitError(f"cannot size a cache of {tokens} tokens x batch {batch} with {residual} residual",
                        "use tokens >= 0, batch >= 1 and 0 <= residual <= tokens")
    per_token = shape.kv_elements_per_token * batch
    return per_token * ((tokens - residual) * fmt.bytes_per_element() + residual * residual_bytes)


def check_context(shape: ModelShape, tokens: int) -> None:
    if shape.max_context and tokens > shape.max_context:
        raise QkitError(f"a context of {tokens} tokens is beyond {shape.name}'s maximum of {shape.max_context}",
                        f"ask for at most {shape.max_context} tokens")


CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 8, 32)


def plan(model: str | ModelShape, contexts: Sequence[int] = CONTEXTS, batches: Sequence[int] = BATCHES,
         formats: Sequence[str] = ("bf16", "fp8", "int4"), weights: Sequence[str] = ("bf16", "fp8", "int4"),
         device_memory: float | str | None = None):
    """KV-cache memory (GB) per context, batch and cache format, one row each, with the total next to the
    weights at each precision and, given `device_memory` (bytes or text such as "80GB"), whether it fits.
    Contexts beyond the model's maximum are left out (and must not all be)."""
    import pandas as pd

    shape = model if isinstance(model, ModelShape) else memory.get_shape(model)
    for fmt in formats:
        get_format(fmt)
    usable = [c for c in contexts if not shape.max_context or c <= shape.max_context]
    if not usable:
        check_context(shape, min(contexts))
    device = memory.parse_size(device_memory) / GB if device_memory is not None else None
    weight_gb = ({w: memory.weight_bytes(shape.n_params, w) / GB for w in weights} if shape.n_params else {})
    rows = []
    for context in usable:
        for batch in batches:
            for fmt in formats:
                kv = kv_bytes(shape, context, batch, fmt) / GB
                row = {"context": context, "batch": batch, "kv_format": fmt, "kv_gb": kv}
                for w, wgb in weight_gb.items():
                    row[f"total_gb_{w}"] = wgb + kv
                    if device:
                        row[f"fits_{w}"] = wgb + kv <= device
                rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs.update(model=shape, weights_gb=weight_gb, device_gb=device,
                    dropped_contexts=[c for c in contexts if c not in usable])
    return df


def plan_table(df, weights: str | None = None):
    """The plan as a grid: one row per (context, batch), one column per cache format, KV GB in each cell;
    with a device, a cell whose cache does not fit beside `weights` (default: the first precision) is
    marked "✗"."""
    device, wgb = df.attrs["device_gb"], df.attrs["weights_gb"]
    weights = weights or next(iter(wgb), None)
    order = list(dict.fromkeys(df["kv_format"]))

    def cell(r) -> str:
        text = f"{r['kv_gb']:.2f}"
        if device and weights:
            text += "" if r[f"fits_{weights}"] else " ✗"
        return text

    out = df.assign(cell=df.apply(cell, axis=1)).pivot(index=["context", "batch"], columns="kv_format",
                                                         values="cell")[order]
    out.columns = [f"KV GB, {f}" for f in order]
    return out


def plan_summary(df, weights: str | None = None) -> list[str]:
    """What a reader of the plan wants in words: KV per token, weights, the room left on the device."""
    shape: ModelShape = df.attrs["model"]
    wgb, device = df.attrs["weights_gb"], df.attrs["device_gb"]
    lines = [f"{shape.name}: {shape.layers} layers x {shape.kv_heads} KV heads x head_dim {shape.head_dim} = "
             f"{shape.kv_elements_per_token:,} cached elements per token, "
             f"{kv_bytes(shape, 1, 1, 'bf16') / 1024:.1f} KiB per token at BF16."]
    if wgb:
        lines.append("Weights: " + ", ".join(f"{w} {g:.3g} GB" for w, g in wgb.items()) + ".")
    else:
        lines.append("Weights: unknown (no parameter count for this model).")
    if device and wgb:
        weights = weights or next(iter(wgb))
        lines.append(f"On a {device:g} GB device, room left for the KV cache: "
                     + ", ".join(f"{max(device - g, 0):.1f} GB beside {w} weights" for w, g in wgb.items())
                     + f". ✗ marks a cache that does not fit beside {weights} weights.")
    if df.attrs["dropped_contexts"]:
        lines.append(f"Left out contexts beyond the model's maximum of {shape.max_context}: "
                     + ", ".join(str(c) for c in df.attrs["dropped_contexts"]) + ".")
    return lines


# ---------------------------------------------------------------- bytes a real cache holds


def held_bytes(cache: Any) -> int:
    """Bytes of the tensors a transformers Cache holds: keys and values, and for a quantized cache its
    packed data, scales and zero points (quanto's QTensors are opened up to their parts)."""
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> int:
        if isinstance(obj, torch.Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
                names, _ = obj.__tensor_flatten__()
                return sum(walk(getattr(obj, n), depth + 1) for n in names)
            return obj.numel() * obj.element_size()
        if depth > 4 or isinstance(obj, (str, bytes, int, float, type)) or obj is None:
            return 0
        if isinstance(obj, dict):
            return sum(walk(v, depth + 1) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v, depth + 1) for v in obj)
        if hasattr(obj, "__dict__"):
            return sum(walk(v, depth + 1) for v in vars(obj).values())
        return 0

    return sum(walk(layer, 0) for layer in cache.layers)


# Runtime caches qkit can build: transformers' DynamicCache, and its QuantizedCache with one group per
# head vector (q_group_size 64 = SmolLM2's and Llama's head_dim), scale and zero in the compute dtype.
RUNTIME_CACHES: dict[str, dict[str, Any]] = {
    "dynamic": {},
    "hqq_int8": {"backend": "hqq", "nbits": 8},
    "hqq_int4": {"backend": "hqq", "nbits": 4},
    "quanto_int4": {"backend": "quanto", "nbits": 4},
}
Q_GROUP = 64


def make_cache(name: str, config: Any) -> Any:
    """A fresh runtime cache by name (see :data:`RUNTIME_CACHES`)."""
    from transformers import DynamicCache, QuantizedCache

    kwargs = lookup(RUNTIME_CACHES, name, "runtime cache")
    if not kwargs:
        return DynamicCache(config=config)
    try:
        return QuantizedCache(config=config, q_group_size=Q_GROUP, **kwargs)
    except ImportError as e:
        raise QkitError(f"the {name} cache needs the {kwargs['backend']} package ({e})",
                        "install qkit's dependencies again: ./scripts/setup.sh") from None


def cache_format(name: str, dtype: torch.dtype) -> CacheFormat:
    """The planner's format for a runtime cache whose model computes in `dtype`."""
    size = torch.tensor([], dtype=dtype).element_size()
    kwargs = RUNTIME_CACHES[name]
    if not kwargs:
        return CacheFormat(str(dtype).removeprefix("torch."), 8 * size)
    return CacheFormat(name, kwargs["nbits"], group=Q_GROUP, meta_bytes=size)


def measure_bytes(loaded: Any, lengths: Sequence[int] = (128, 512, 2048),
                  caches: Sequence[str] = tuple(RUNTIME_CACHES)):
    """The planner against the bytes each runtime cache holds after one forward pass (prefill) of
    `lengths` tokens: one row per (cache, length). After a prefill a quantized cache has no residual."""
    import pandas as pd

    shape = memory.shape_of(loaded)
    dtype = next(loaded.model.parameters()).dtype
    rows = []
    for length in lengths:
        check_context(shape, length)
        ids = torch.randint(0, loaded.model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        for name in caches:
            cache = make_cache(name, loaded.model.config)
            with torch.inference_mode():
                loaded.model(ids, past_key_values=cache, use_cache=True)
            rows.append({"cache": name, "tokens": length, "measured_bytes": held_bytes(cache),
                         "planned_bytes": round(kv_bytes(shape, length, 1, cache_format(name, dtype)))})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- quality: the study


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
    from qkit import methods

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
    from qkit import data

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
    from qkit.evaluation import final_hidden

    if cache is None:
        return final_hidden(model, ids[None])[0].float()
    past = make_cache(cache, model.config)
    return torch.cat([final_hidden(model, ids[None, i:i + chunk], past_key_values=past, use_cache=True)[0].float()
                      for i in range(0, len(ids), chunk)])


def position_stats(model: Any, loaded: Any, docs: torch.Tensor, base_hidden: torch.Tensor, cache: str | None,
                   chunk: int = 256) -> dict[str, list[list[float]]]:
    """Per document, per block of BLOCK positions: mean KLD to the baseline, NLL and top-1 agreement."""
    from qkit import metrics
    from qkit.evaluation import head_logits

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
class Profile:
    """How much of the KV study to run."""

    name: str
    schemes: tuple[str, ...]
    n_tokens: int  # tokens per long document (the farthest position measured)
    n_docs: int
    chunk: int  # prefill chunk for runtime caches
    context_lengths: tuple[int, ...]  # passkey retrieval
    depths: tuple[float, ...]
    calib_samples: int = 16
    calib_seq_len: int = 512
    tasks: tuple[str, ...] = ("qkit_passkey",)  # retrieval tasks of qkit.tasks


PROFILES = {
    # Two 4K-token documents, four schemes, passkey at 1K and 2K (a 4K passkey item costs as much as a
    # scheme's whole position pass, and there are 15 of them). Cold on SmolLM2 with 2 idle cores: 9 min 36 s.
    "quick": Profile("quick", ("fp8_tensor", "fp8_head", "fp8_unit", "hqq_int4"), n_tokens=4096, n_docs=2,
                     chunk=512, context_lengths=(1024, 2048), depths=(0.0, 0.5, 1.0)),
    # The model's full context (8K for SmolLM2), every scheme, more documents and depths.
    "full": Profile("full", tuple(SCHEMES), n_tokens=8192, n_docs=6, chunk=256,
                    context_lengths=(1024, 2048, 4096, 8192), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                    calib_samples=64, calib_seq_len=2048, tasks=("qkit_passkey", "qkit_passkey_multi")),
}


def get_profile(profile: str | Profile) -> Profile:
    return profile if isinstance(profile, Profile) else lookup(PROFILES, profile, "profile")


@dataclass
class KVResult:
    blocks: Any  # DataFrame: scheme, doc, start (first position of the block), kld, nll, nll_base, top1
    retrieval: Any  # DataFrame: scheme, length, depth, id, score (passkey exact match), output
    meta: dict


def quality(model: str = "smollm2-135m", profile: str | Profile = "quick", *, schemes: Sequence[str] | None = None,
            n_tokens: int | None = None, n_docs: int | None = None, context_lengths: Sequence[int] | None = None,
            store: Any = None, trust_remote_code: bool = False) -> KVResult:
    """Per-position quality of each scheme on long documents against the float baseline (cached per
    scheme), and passkey retrieval by length and depth."""
    import pandas as pd
    from tqdm.auto import tqdm

    from qkit import methods, models, provenance
    from qkit.data import CalibSpec
    from qkit.store import Store

    prof = get_profile(profile)
    if context_lengths is not None:
        prof = replace(prof, context_lengths=tuple(context_lengths))
    names = list(schemes or prof.schemes)
    chosen = [get_scheme(n) for n in names]
    n_tokens, n_docs = n_tokens or prof.n_tokens, n_docs or prof.n_docs
    store = store or Store()
    loaded = models.resolve_model(model, store=store, trust_remote_code=trust_remote_code)
    shape = memory.shape_of(loaded)
    check_context(shape, max(n_tokens, *prof.context_lengths))
    calib = CalibSpec("prose", prof.calib_samples, min(prof.calib_seq_len, shape.max_context or prof.calib_seq_len))
    docs = long_documents(loaded.tokenizer, n_tokens, n_docs)
    doc_key = {"model": loaded.info["fingerprint"], "dtype": loaded.info["dtype"], "n_tokens": n_tokens,
               "n_docs": n_docs, "docs": hashlib.sha256(docs.numpy().tobytes()).hexdigest()[:16]}
    base_hidden = _baseline_hidden(loaded, docs, doc_key, store)
    rows = []
    for scheme in tqdm(chosen, desc="KV schemes", unit="scheme"):
        ident = (store.key("checkpoint", methods.checkpoint_spec(loaded, scheme.method, calib))
                 if scheme.method else "float")
        spec = {**doc_key, "scheme": scheme.name, "variant": ident, "unit_scales": scheme.unit_scales,
                "cache": scheme.cache, "chunk": prof.chunk if scheme.cache else None, "block": BLOCK,
                "version": 1}  # bump when position_stats changes
        res = store.get_json("kv_quality", spec, lambda s=scheme: position_stats(
            load_scheme(loaded, s, calib, store), loaded, docs, base_hidden, s.cache, prof.chunk))
        for d in range(n_docs):
            for b in range(len(res["kld"][d])):
                rows.append({"scheme": scheme.name, "doc": d, "start": b * BLOCK,
                             **{k: res[k][d][b] for k in res}})
    retrieval = _retrieval(loaded, chosen, prof, calib, store)
    meta = {"model": loaded.info, "profile": prof.name, "n_tokens": n_tokens, "n_docs": n_docs,
            "calibration": calib.__dict__, "schemes": {s.name: s.title for s in chosen},
            "provenance": provenance.collect()}
    return KVResult(pd.DataFrame(rows), retrieval, meta)


def _baseline_hidden(loaded: Any, docs: torch.Tensor, doc_key: dict, store: Any) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    def build(tmp) -> dict:
        hidden = torch.stack([_hidden(loaded.model, d, None, 0) for d in docs])
        save_file({"hidden": hidden.contiguous()}, str(tmp / "hidden.safetensors"))
        return {"shape": list(hidden.shape)}

    path = store.get_dir("kv_baseline", doc_key, build)
    return load_file(str(path / "hidden.safetensors"))["hidden"]


def _generation_model(loaded: Any, scheme: Scheme, calib: Any, store: Any) -> Any:
    """A model that generates with the scheme's KV cache: a runtime cache goes in the generation config,
    on a fresh copy so that `loaded.model` keeps generating with its plain cache."""
    from qkit import models

    if scheme.cache is None:
        return load_scheme(loaded, scheme, calib, store)
    model = models.load_pretrained(loaded.path, dtype=loaded.info["dtype"])
    model.generation_config.cache_implementation = "quantized"
    model.generation_config.cache_config = {**RUNTIME_CACHES[scheme.cache], "q_group_size": Q_GROUP}
    return model


def _retrieval(loaded: Any, chosen: Sequence[Scheme], prof: Profile, calib: Any, store: Any):
    """Passkey retrieval of the baseline and each scheme, through the task-sensitivity machinery."""
    from qkit import methods, sensitivity

    plain = {s.method: s.name for s in chosen if s.method and not s.unit_scales}
    extra = [(s.name, (store.key("checkpoint", methods.checkpoint_spec(loaded, s.method, calib)) + "/unit")
              if s.method else f"float/{s.cache}", lambda s=s: _generation_model(loaded, s, calib, store))
             for s in chosen if s.unit_scales or s.cache]
    sprof = sensitivity.Profile("kv", limit=None, context_lengths=prof.context_lengths, depths=prof.depths,
                                per_cell=1, kld_tokens=256, max_gen_toks=16, batch_size=1)
    res = sensitivity.run(loaded, list(plain), list(prof.tasks), profile=sprof, calib=calib, store=store,
                          extra=extra)
    df = res.items.assign(scheme=lambda d: d["method"].map(lambda m: plain.get(m, m)))
    parts = df["id"].str.split("/", expand=True)  # passkey{keys}/{length}/{depth}/{j}
    return df.assign(length=parts[1].astype(int), depth=parts[2].astype(float))[
        ["scheme", "task", "length", "depth", "id", "score", "output"]]


# ---------------------------------------------------------------- analysis


def _bucket(start: int) -> str:
    for lo, hi in zip(BUCKETS, BUCKETS[1:]):
        if lo <= start < hi:
            return f"{lo}-{hi}"
    return f">={BUCKETS[-1]}"


def by_position(res: KVResult, metric: str = "kld"):
    """Mean of `metric` per scheme and position bucket, with a 95% bootstrap CI over the blocks of
    BLOCK positions in the bucket; perplexity from the mean NLL."""
    import pandas as pd

    from qkit import metrics

    d = res.blocks.assign(bucket=res.blocks["start"].map(_bucket))
    rows = []
    for (scheme, bucket), g in d.groupby(["scheme", "bucket"], sort=False):
        mean, lo, hi = metrics.mean_ci(g[metric].to_numpy(), n_boot=1000, seed=0)
        rows.append({"scheme": scheme, "bucket": bucket, "from": int(g["start"].min()), metric: mean,
                     "low": lo, "high": hi, "ppl": math.exp(g["nll"].mean()), "ppl_base": math.exp(g["nll_base"].mean()),
                     "top1_pct": 100 * g["top1"].mean(), "blocks": len(g)})
    return pd.DataFrame(rows).sort_values(["scheme", "from"], key=lambda c: c.map(
        {s: i for i, s in enumerate(dict.fromkeys(res.blocks["scheme"]))}) if c.name == "scheme" else c)


def compare(res: KVResult, a: str = "fp8_tensor", b: str = "fp8_head", metric: str = "kld"):
    """Per position bucket, `a` minus `b` in `metric`, paired by document and block, with a 95% bootstrap
    CI: a CI that excludes 0 is a real difference at this sample size."""
    import pandas as pd

    from qkit import metrics

    d = res.blocks.assign(bucket=res.blocks["start"].map(_bucket))
    for name in (a, b):
        if name not in set(d["scheme"]):
            raise QkitError(f"scheme {name!r} is not in this result", f"run it: schemes=[..., {name!r}]")
    pa = d[d["scheme"] == a].set_index(["doc", "start"])
    pb = d[d["scheme"] == b].set_index(["doc", "start"])
    rows = []
    for bucket, g in pa.groupby("bucket", sort=False):
        x, y = g[metric].to_numpy(), pb.loc[g.index, metric].to_numpy()
        diff, lo, hi = metrics.mean_ci(x, paired_with=y, n_boot=1000, seed=0)
        rows.append({"bucket": bucket, f"{a}": x.mean(), f"{b}": y.mean(), "difference": diff, "low": lo,
                     "high": hi, "verdict": ("one block, no CI" if math.isnan(lo) else "no difference"
                                             if lo <= 0 <= hi else f"{b} better" if diff > 0 else f"{a} better")})
    return pd.DataFrame(rows)


def findings(res: KVResult) -> list[str]:
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
        out.append("**per-tensor against per-head scales**: " + "; ".join(
            f"{r['bucket']}: {r['difference']:+.3g} [{r['low']:+.3g}, {r['high']:+.3g}] ({r['verdict']})"
            for _, r in c.iterrows()) + ".")
    if len(res.retrieval):
        acc = res.retrieval.groupby("scheme", sort=False)["score"].agg(["mean", "count"])
        out.append("**passkey retrieval**: " + ", ".join(f"{s} {100 * r['mean']:.0f}% of {int(r['count'])}"
                                                          for s, r in acc.iterrows()) + ".")
    return out


def retrieval_table(res: KVResult):
    """Passkey accuracy (%) per scheme (and task, where several), by context length and depth."""
    r = res.retrieval
    index = ["scheme", "task"] if r["task"].nunique() > 1 else ["scheme"]
    return (100 * r.pivot_table(index=index, columns=["length", "depth"], values="score", aggfunc="mean",
                                sort=False)).round(0)


def provenance(res: KVResult):
    """Where the result came from: model, documents, calibration, commit, hardware, library versions."""
    import pandas as pd

    prov = res.meta["provenance"]
    return pd.Series({"model": res.meta["model"]["spec"], "profile": res.meta["profile"],
                      "documents": f"{res.meta['n_docs']} x {res.meta['n_tokens']} tokens of held-out prose",
                      "calibration": str(res.meta["calibration"]), "git commit": prov["git_commit"],
                      "hardware": str(prov["hardware"]), **prov["libraries"]}).to_frame("value")
