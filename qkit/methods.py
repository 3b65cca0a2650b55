"""Quantization methods as data, and the one function that runs any of them through llm-compressor.

A method is an entry in METHODS, not a code path: its recipe is a tuple of `{"ModifierClass": {kwargs}}`
steps, rendered as an llm-compressor recipe YAML (which is also what goes into the cache key and the
provenance) and parsed back into modifier objects by llm-compressor itself. Adding a method means
adding an entry; `quantize` runs every entry the same way and caches the compressed-tensors checkpoint
in the store.

llm-compressor is imported only where a recipe is built or run: a cold import took 15-25 s on a busy
2-core machine, and a cache hit or `qkit methods` should not pay that.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import json
import os
import resource
import struct
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from qkit import data, models
from qkit.data import CalibSpec  # noqa: F401  (part of this module's API)
from qkit.errors import QkitError
from qkit.store import Store

if TYPE_CHECKING:
    from llmcompressor.modifiers import Modifier
    from transformers import PreTrainedModel


# lm_head stays in float everywhere, as in llm-compressor's examples: the output projection is the layer
# most sensitive to rounding, and small models tie it to the embeddings.
IGNORE = ("lm_head",)


@dataclass(frozen=True)
class Hardware:
    """Where a format runs on its own kernels rather than being dequantized first."""
    gpus: str
    # CUDA compute capability, comparable with torch.cuda.get_device_capability(); None: not an NVIDIA format
    min_capability: tuple[int, int] | None

    def __str__(self) -> str:
        if self.min_capability is None:
            return self.gpus
        return f"NVIDIA {self.gpus} (compute capability >= {self.min_capability[0]}.{self.min_capability[1]})"


FP8_GPUS = Hardware("Ada, Hopper, Blackwell: FP8 tensor cores", (8, 9))
INT4_GPUS = Hardware("Ampere and newer: Marlin INT4 kernels", (8, 0))
INT8_GPUS = Hardware("Ampere and newer: INT8 tensor cores", (8, 0))
FP4_GPUS = Hardware("Blackwell: FP4 tensor cores", (10, 0))
LLAMA_CPP = Hardware("CPUs, Apple Silicon and edge devices (llama.cpp)", None)


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    description: str
    recipe: tuple[dict[str, dict[str, Any]], ...]
    weight_bits: int
    act_bits: int | None  # None: weight-only, activations stay in the model's float dtype
    group_size: int | None  # None: one scale per output channel or per tensor
    needs_calibration: bool
    native_hardware: Hardware
    expected_format: str  # compressed-tensors "format" in the saved config.json
    reload_dtype: str = "float32"
    ignore: tuple[str, ...] = IGNORE
    kv_bits: int | None = None  # None: the KV cache stays in the model's float dtype
    backend: str = "llmcompressor"  # or a key of BACKENDS

    @property
    def weight_format(self) -> str:
        """The weights' number format in the words of the seed's hardware table."""
        return {"float-quantized": "FP8", "int-quantized": "INT8", "pack-quantized": "INT4", "gptq": "INT4",
                "nvfp4-pack-quantized": "NVFP4"}.get(self.expected_format, self.expected_format.upper())


def _quantize_step(modifier: str, scheme: str) -> dict[str, dict[str, Any]]:
    """The recipe step that quantizes every Linear layer but IGNORE with an llm-compressor preset."""
    return {modifier: {"targets": ["Linear"], "scheme": scheme, "ignore": list(IGNORE)}}


# SmolLM2-135M's linear layers take 576 inputs, and llm-compressor 0.14 refuses any group size that does not
# divide a layer's input width (576 = 4.5 x 128), so the INT4 entries use group 64 instead of the presets'
# 128. 64 also divides every width of a typical Llama (4096, 14336, ...).
INT4_GROUP = 64


def _int4_step(modifier: str, *, symmetric: bool) -> dict[str, dict[str, Any]]:
    """Like the W4A16 / W4A16_ASYM presets, with group INT4_GROUP instead of their 128."""
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": INT4_GROUP}
    return {modifier: {"ignore": list(IGNORE),
                       "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}}


_METHODS = (
    Method(
        name="fp8_dynamic",
        title="FP8 W8A8, dynamic activations",
        description="Weights are cast to 8-bit floating point with one scale per output channel; activations "
                    "are cast to FP8 on the fly with one scale per token. No calibration data is needed.",
        recipe=(_quantize_step("QuantizationModifier", "FP8_DYNAMIC"),),
        weight_bits=8, act_bits=8, group_size=None, needs_calibration=False,
        native_hardware=FP8_GPUS, expected_format="float-quantized",
    ),
    Method(
        name="fp8_static",
        title="FP8 W8A8, static activations",
        description="Weights and activations in FP8 with one scale per tensor; the activation scales are "
                    "fixed from calibration data, which saves work at runtime but can clip inputs unlike "
                    "the calibration set.",
        recipe=(_quantize_step("QuantizationModifier", "FP8"),),
        weight_bits=8, act_bits=8, group_size=None, needs_calibration=True,
        native_hardware=FP8_GPUS, expected_format="float-quantized",
    ),
    Method(
        name="w8a8_int8",
        title="INT8 W8A8, SmoothQuant + GPTQ",
        description="SmoothQuant first migrates activation outliers into the weights, then GPTQ rounds the "
                    "weights to INT8 per output channel; activations are quantized to INT8 per token at "
                    "runtime.",
        # 0.8 is llm-compressor's example strength for W8A8; its default 0.5 leaves more outliers in activations.
        recipe=({"SmoothQuantModifier": {"smoothing_strength": 0.8}}, _quantize_step("GPTQModifier", "W8A8")),
        weight_bits=8, act_bits=8, group_size=None, needs_calibration=True,
        native_hardware=INT8_GPUS, expected_format="int-quantized",
    ),
    # The INT4 entries use group 64 (INT4_GROUP). SmolLM2-135M, the default model, reaches qkit as a Q4_1
    # GGUF whose weights already sit on an asymmetric 4-bit grid in blocks of 32, so INT4 with group 32 could
    # reproduce them and look falsely lossless. Measured on its layer-10 weights, symmetric RTN's relative
    # error at group 64 is like a Gaussian matrix's of the same shape (q_proj 0.112 vs 0.108, down_proj
    # 0.115 vs 0.108).
    Method(
        name="w4a16_rtn",
        title="INT4 W4A16, round-to-nearest",
        description="Weights rounded to the nearest 4-bit integer with one scale per group of 64 inputs; "
                    "activations stay in 16 bits. No calibration: the baseline smarter INT4 methods must beat.",
        recipe=(_int4_step("QuantizationModifier", symmetric=True),),
        weight_bits=4, act_bits=None, group_size=INT4_GROUP, needs_calibration=False,
        native_hardware=INT4_GPUS, expected_format="pack-quantized",
    ),
    Method(
        name="w4a16_gptq",
        title="INT4 W4A16, GPTQ",
        description="The RTN format, but GPTQ rounds each weight column in turn and corrects the columns not yet "
                    "rounded for its error, using second-order statistics of calibration activations.",
        recipe=(_int4_step("GPTQModifier", symmetric=True),),
        weight_bits=4, act_bits=None, group_size=INT4_GROUP, needs_calibration=True,
        native_hardware=INT4_GPUS, expected_format="pack-quantized",
    ),
    Method(
        name="w4a16_awq",
        title="INT4 W4A16, AWQ",
        description="AWQ searches per-channel scales that protect the weights meeting the largest "
                    "activations and folds them into the previous layer; the weights are then rounded to "
                    "4 bits with a zero point.",
        # Since llm-compressor 0.14 AWQModifier only rescales; a following quantization modifier rounds the
        # weights. Asymmetric (zero point) as in the AWQ paper and llm-compressor's AWQ examples.
        recipe=({"AWQModifier": {}}, _int4_step("QuantizationModifier", symmetric=False)),
        weight_bits=4, act_bits=None, group_size=INT4_GROUP, needs_calibration=True,
        native_hardware=INT4_GPUS, expected_format="pack-quantized",
    ),
    Method(
        name="nvfp4a16",
        title="NVFP4 weights, 16-bit activations",
        description="Weights in 4-bit floating point (E2M1) with an FP8 scale per 16 values and one FP32 "
                    "scale per tensor; activations stay in 16 bits. No calibration data is needed.",
        recipe=(_quantize_step("QuantizationModifier", "NVFP4A16"),),
        weight_bits=4, act_bits=None, group_size=16, needs_calibration=False,
        # NVFP4 weights decompress to bfloat16 on CPU, so an fp32 reload fails at the first matmul with
        # "expected m1 and m2 to have the same dtype".
        native_hardware=FP4_GPUS, expected_format="nvfp4-pack-quantized", reload_dtype="bfloat16",
    ),
    Method(
        name="nvfp4",
        title="NVFP4 W4A4",
        description="Weights and activations both in NVFP4 (4-bit floats, an FP8 scale per 16 values); the "
                    "activations' per-tensor scales come from calibration data.",
        recipe=(_quantize_step("QuantizationModifier", "NVFP4"),),
        weight_bits=4, act_bits=4, group_size=16, needs_calibration=True,
        native_hardware=FP4_GPUS, expected_format="nvfp4-pack-quantized", reload_dtype="bfloat16",
    ),
)

# KV-cache quantization: llm-compressor's kv_cache_scheme calibrates the FP8 scales of the keys and values
# (after RoPE) on the calibration set, one per layer (`tensor`) or one per KV head (`attn_head`); vLLM
# then stores the cache in FP8. On reload, compressed-tensors fake-quantizes K and V in every attention
# forward with those scales, so the quality cost is measurable on CPU.
def _kv_scheme(strategy: str) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}


def _kv_step(strategy: str, scheme: str | None = None) -> dict[str, dict[str, Any]]:
    step: dict[str, Any] = {"kv_cache_scheme": _kv_scheme(strategy)}
    if scheme:
        step.update(targets=["Linear"], scheme=scheme, ignore=list(IGNORE))
    return {"QuantizationModifier": step}


_KV_METHODS = (
    Method(
        name="kv_fp8_tensor",
        title="KV cache FP8, per-tensor scales",
        description="Weights stay in float; keys and values are stored in FP8 with one calibrated scale per "
                    "layer for K and one for V.",
        recipe=(_kv_step("tensor"),), weight_bits=16, act_bits=None, group_size=None, needs_calibration=True,
        native_hardware=FP8_GPUS, expected_format="dense", kv_bits=8,
    ),
    Method(
        name="kv_fp8_head",
        title="KV cache FP8, per-head scales",
        description="Like kv_fp8_tensor with one scale per KV head, so a head with small keys is not rounded "
                    "on the grid of the head with the largest.",
        recipe=(_kv_step("attn_head"),), weight_bits=16, act_bits=None, group_size=None, needs_calibration=True,
        native_hardware=FP8_GPUS, expected_format="dense", kv_bits=8,
    ),
    Method(
        name="fp8_static_kv_fp8_head",
        title="FP8 W8A8 static + KV cache FP8 per head",
        description="fp8_static's weights and activations with kv_fp8_head's cache: the all-FP8 deployment "
                    "on Hopper.",
        recipe=(_kv_step("attn_head", "FP8"),), weight_bits=8, act_bits=8, group_size=None,
        needs_calibration=True, native_hardware=FP8_GPUS, expected_format="float-quantized", kv_bits=8,
    ),
)

# Backends other than llm-compressor, each a module with build(loaded, method, calib, out) -> manifest meta
# and load(path, dtype) -> model; imported only when one of their methods runs.
BACKENDS = {"gguf": "qkit.gguf_export", "gptqmodel": "qkit.gptqmodel_backend"}


def _gguf_method(file_type: str) -> Method:
    from qkit.gguf_export import BLOCK_TYPES, FILE_TYPES

    return Method(
        name=f"gguf_{file_type.lower()}", title=f"GGUF {file_type} (llama.cpp)",
        description=f"llama.cpp's {file_type}: most Linear weights in {BLOCK_TYPES[FILE_TYPES[file_type]].layout}; "
                    "the tied embeddings (and, in Q4_K_M, some attn_v and ffn_down layers) get more bits, as "
                    "llama-quantize chooses. Written from PyPI packages and read back dequantized by "
                    "transformers: the format's numerics, not llama.cpp's kernels.",
        recipe=({"gguf": {"type": file_type}},), weight_bits=int(file_type[1]), act_bits=None, group_size=32,
        needs_calibration=False, native_hardware=LLAMA_CPP, expected_format=f"gguf-{file_type.lower()}",
        ignore=(), backend="gguf")


# Not Q4_1: the default model reaches qkit as a Q4_1 GGUF, which Q4_1 would reproduce almost losslessly.
_BACKEND_METHODS = (
    Method(
        name="w4a16_gptq_gptqmodel",
        title="INT4 W4A16, GPTQ by GPTQModel",
        description="w4a16_gptq's format, group size and calibration rows, quantized by GPTQModel instead of "
                    "llm-compressor and saved in GPTQModel's GPTQ checkpoint format.",
        # damp_percent 0.01 is llm-compressor's GPTQ dampening_frac (GPTQModel's default is 0.05); GPTQModel
        # orders columns with its default group-aware reordering, llm-compressor with actorder "static".
        recipe=({"GPTQModel": {"bits": 4, "group_size": INT4_GROUP, "sym": True, "desc_act": False,
                               "damp_percent": 0.01}},),
        weight_bits=4, act_bits=None, group_size=INT4_GROUP, needs_calibration=True,
        native_hardware=INT4_GPUS, expected_format="gptq", backend="gptqmodel",
    ),
    *(_gguf_method(t) for t in ("Q8_0", "Q5_0", "Q4_0", "Q4_K_M")),
)

# The weight methods, which the methods study runs by default, and the KV-cache methods of the KV study.
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}
KV_METHODS: dict[str, Method] = {m.name: m for m in _KV_METHODS}
# Weight methods of the other backends; the methods study runs these too (STUDY_METHODS).
BACKEND_METHODS: dict[str, Method] = {m.name: m for m in _BACKEND_METHODS}
STUDY_METHODS: dict[str, Method] = METHODS | BACKEND_METHODS

# A checkpoint on disk names its format, not its method; every method of one format reloads alike.
RELOAD_DTYPES: dict[str, str] = {m.expected_format: m.reload_dtype
                                  for m in _METHODS + _KV_METHODS + _BACKEND_METHODS}


def get_method(name: str) -> Method:
    try:
        return METHODS.get(name) or BACKEND_METHODS.get(name) or KV_METHODS[name]
    except KeyError:
        raise QkitError(f"unknown quantization method {name!r}",
                        f"use one of {', '.join(STUDY_METHODS | KV_METHODS)} (`qkit methods` describes them)"
                        ) from None


def recipe_yaml(method: Method) -> str:
    """The method's recipe in llm-compressor's YAML recipe format (one stage, one modifier group)."""
    modifiers = {name: kwargs for step in method.recipe for name, kwargs in step.items()}
    return yaml.safe_dump({"quant_stage": {"quant_modifiers": modifiers}}, sort_keys=False)


def recipe(method: Method) -> list[Modifier]:
    """The modifier objects for `oneshot`, parsed by llm-compressor from `recipe_yaml(method)`, so the
    YAML recorded in the cache key and provenance is exactly what runs."""
    _quiet_llmcompressor()
    from llmcompressor.recipe import Recipe

    return Recipe.create_instance(recipe_yaml(method)).modifiers


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    method: Method
    size_bytes: int  # the safetensors files on disk
    # The same files had oneshot run in BF16, as on a GPU: qkit quantizes an fp32 copy, so the tensors left
    # unquantized (embeddings, norms, float scales) are stored in fp32; here they count 2 bytes each.
    bf16_run_bytes: int
    seconds: float  # oneshot alone, when the entry was built (not loading or saving)
    bf16_bytes: int  # the float model's size in BF16: unique parameters x 2
    meta: dict

    @property
    def bf16_ratio(self) -> float:
        """Checkpoint size relative to the same model in BF16, the usual reference, both as on a GPU."""
        return self.bf16_run_bytes / self.bf16_bytes


def quantize(loaded: models.LoadedModel, method: Method | str, *, calib: CalibSpec | None = None,
             store: Store | None = None) -> Checkpoint:
    """Run `method` on a fresh copy of `loaded` with llm-compressor's oneshot and cache the compressed
    checkpoint. Methods that need calibration get `CalibSpec()` unless told otherwise; the others ignore
    `calib`, and it is not part of their cache key."""
    method = get_method(method) if isinstance(method, str) else method
    store = store if store is not None else Store()
    calib = (calib or CalibSpec()) if method.needs_calibration else None
    if calib is not None:
        data.check_seq_len(calib.seq_len, loaded.info["max_length"])
    spec = checkpoint_spec(loaded, method, calib)

    def build(tmp: Path) -> dict:
        if method.backend in BACKENDS:
            return _backend(method).build(loaded, method, calib, tmp)
        return _build_checkpoint(loaded, method, calib, tmp)

    path = store.get_dir("checkpoint", spec, build)
    meta = Store.manifest(path)["meta"]
    return Checkpoint(path=path, method=method, size_bytes=meta["size_bytes"],
                      bf16_run_bytes=meta["bf16_run_bytes"], seconds=meta["seconds"],
                      bf16_bytes=models.bf16_bytes(loaded.model), meta=meta)


def checkpoint_spec(loaded: models.LoadedModel, method: Method | str, calib: CalibSpec | None = None) -> dict:
    """The store key of `method`'s checkpoint of `loaded`: calibration belongs to it only where it is used."""
    method = get_method(method) if isinstance(method, str) else method
    calib = (calib or CalibSpec()) if method.needs_calibration else None
    return {"model": loaded.info["fingerprint"], "method": method.name, "recipe": recipe_yaml(method),
            "calibration": asdict(calib) if calib else None}


def _build_checkpoint(loaded: models.LoadedModel, method: Method, calib: CalibSpec | None, out: Path) -> dict:
    dataset = (data.calibration_set(calib.name, calib.n_samples, calib.seq_len, calib.seed,
                                    tokenizer=loaded.tokenizer) if calib else None)
    modifiers = recipe(method)
    from llmcompressor import oneshot

    # A fresh copy, because oneshot rewrites the model in place; fp32, because bf16 matmuls were 2-6x
    # slower on the AVX2 CPUs qkit was built on. Remote code was trusted already to load `loaded`.
    model = models.load_pretrained(loaded.path, dtype="float32",
                                   trust_remote_code=bool(getattr(loaded.model.config, "auto_map", None)))
    calib_args = ({"max_seq_length": calib.seq_len, "num_calibration_samples": calib.n_samples,
                   # the calibration set is already a seeded sample: no second, unseeded shuffle
                   "shuffle_calibration_samples": False} if calib else {})
    with _oneshot_log(out / "oneshot.log"), _cpu_without_pinning(), _forget_fx_wraps(), measure_cost() as cost:
        oneshot(model=model, tokenizer=loaded.tokenizer, recipe=modifiers, dataset=dataset, **calib_args)
    with warnings.catch_warnings():
        # oneshot leaves an hf_device_map saying "cpu", so transformers warns about offloaded modules
        # although the whole model is in RAM.
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(out, save_compressed=True)
    loaded.tokenizer.save_pretrained(out)
    del model
    _release()
    size, fp32_elements = _safetensors_sizes(out)
    return {**cost, "format": saved_format(out), "size_bytes": size, "bf16_run_bytes": size - 2 * fp32_elements, "log": "oneshot.log",
            "calibration_data": data.describe(calib.name) if calib else None}


def load_quantized(checkpoint: Checkpoint | str | Path, *,
                   dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """Reload a compressed-tensors checkpoint on CPU for evaluation, in eval mode, in its format's reload
    dtype (bfloat16 for NVFP4, float32 otherwise) unless `dtype` says otherwise."""
    path = Path(checkpoint.path if isinstance(checkpoint, Checkpoint) else checkpoint)
    backend = _saved_backend(path)
    if backend in BACKENDS:
        return _backend(backend).load(path, dtype=dtype or "float32")
    fmt = saved_format(path)
    return models.load_pretrained(path, dtype=dtype or RELOAD_DTYPES.get(fmt, "float32"))


def _backend(method: Method | str) -> Any:
    return importlib.import_module(BACKENDS[method.backend if isinstance(method, Method) else method])


def _saved_backend(path: Path) -> str:
    """The backend that built a store checkpoint, from its manifest (llm-compressor for older entries and
    for directories from elsewhere)."""
    try:
        return Store.manifest(path)["meta"].get("backend", "llmcompressor")
    except (OSError, ValueError, KeyError, TypeError):
        return "llmcompressor"


def saved_format(path: Path) -> str:
    """The compressed-tensors format a checkpoint directory was saved in."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text())["quantization_config"]["format"]
    except (OSError, ValueError, KeyError, TypeError):
        raise QkitError(f"{path} is not a compressed-tensors checkpoint (no quantization_config format "
                        "in config.json)",
                        "pass a directory made by qkit.methods.quantize (Checkpoint.path)") from None


def checkpoint_tensors(path: Path) -> list[tuple[str, str, int]]:
    """(name, dtype, bytes) of every tensor in a directory's safetensors files, read from their headers."""
    out = []
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        out += [(name, t["dtype"], t["data_offsets"][1] - t["data_offsets"][0])
                for name, t in header.items() if name != "__metadata__"]
    return out


def _safetensors_sizes(path: Path) -> tuple[int, int]:
    """(bytes on disk, number of float32 elements) of a directory's safetensors files."""
    size = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    return size, sum(nbytes // 4 for _, dtype, nbytes in checkpoint_tensors(path) if dtype == "F32")


@contextlib.contextmanager
def measure_cost() -> Iterator[dict[str, float]]:
    """Wall time and resident memory of a block, filled in on exit as a checkpoint manifest's fields:
    seconds, peak_rss_bytes and rss_growth_bytes (the peak above the block's start)."""
    cost: dict[str, float] = {}
    started = time.perf_counter()
    with _rss_sampler() as rss:
        yield cost
    cost.update(seconds=round(time.perf_counter() - started, 3), peak_rss_bytes=rss["peak"],
                rss_growth_bytes=rss["peak"] - rss["start"])


@contextlib.contextmanager
def _rss_sampler(interval_s: float = 0.05) -> Iterator[dict[str, int]]:
    """Resident memory at the start of the block and its peak during it, sampled from /proc.

    ru_maxrss would give the process's peak so far, which in a sweep of many runs in one process repeats
    the largest earlier run. Where /proc is missing (macOS) that is what is reported.
    """
    statm = Path("/proc/self/statm")
    if not statm.exists():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"start": 0, "peak": peak if sys.platform == "darwin" else peak * 1024}
        yield out
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(statm.read_text().split()[1]) * page

    out = {"start": rss(), "peak": rss()}
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            out["peak"] = max(out["peak"], rss())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = max(out["peak"], rss())


def _release() -> None:
    """Give back the quantized copy's memory once the caller dropped it: llm-compressor's session holds the
    model until the next oneshot, and glibc keeps freed pages unless asked to trim."""
    from llmcompressor.core import active_session

    active_session().reset()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _forget_fx_wraps() -> Iterator[None]:
    """Drop what torch.fx.wrap registered during the block.

    llm-compressor's sequential pipeline re-executes each traced forward in a copy of its module's
    globals holding ``self`` (the model), and torch.fx.wrap keeps every such namespace in the global
    ``torch.fx._symbolic_trace._wrapped_fns_to_patch`` for good. Each oneshot's model copy stayed alive
    through it: a calibration sweep on SmolLM2 grew ~0.85 GB per run.
    """
    from torch.fx import _symbolic_trace

    registry = _symbolic_trace._wrapped_fns_to_patch
    before = set(registry)
    try:
        yield
    finally:
        for key in set(registry) - before:
            del registry[key]


@functools.cache
def _quiet_llmcompressor() -> None:
    """Keep llm-compressor's console to errors. It logs INFO and METRIC lines for every layer, and on a
    machine without GPU warns "No accelerator available!" while importing and at every device lookup.
    It configures its console from LLM_COMPRESSOR_LOG_LEVEL at import, so this must run before the
    first import; a level the user set wins. The full log goes into each checkpoint (_oneshot_log)."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    from llmcompressor.logger import configure_logger

    configure_logger()  # for when llm-compressor was imported before the level was set


@contextlib.contextmanager
def _oneshot_log(logfile: Path) -> Iterator[None]:
    from loguru import logger

    sink = logger.add(logfile, level="INFO")
    try:
        yield
    finally:
        logger.remove(sink)


@contextlib.contextmanager
def _cpu_without_pinning() -> Iterator[None]:
    """Make llm-compressor's activation-cache pinning a no-op when there is no accelerator.

    llm-compressor 0.14's AWQModifier pins its cached activations for faster host-to-GPU copies
    (`IntermediatesCache.pin_memory`, which calls `Tensor.pin_memory()` in `_pin_intermediate`,
    llmcompressor/pipelines/cache.py). Without an accelerator torch raises "Cannot access accelerator
    device when none is available". Pinning changes no value, so skipping it on CPU is safe.
    """
    if torch.accelerator.is_available():
        yield
        return
    from unittest import mock

    from llmcompressor.pipelines.cache import IntermediatesCache

    # patch.object raises AttributeError if upstream renames the method: then this workaround needs a look.
    with mock.patch.object(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None):
        yield
