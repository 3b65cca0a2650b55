"""The quantization methods as data: one registry, one entry per method.

A method is an entry, not a code path: its recipe is a tuple of `{"ModifierClass": {kwargs}}` steps,
rendered as an llm-compressor recipe YAML (which is also what goes into the cache key and the
provenance) and parsed back into modifier objects by llm-compressor itself. Each entry names the backend
that builds it (:data:`BACKENDS`); adding a method means adding an entry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from qkit.core.errors import QkitError
from qkit.quant.formats import BLOCK_TYPES, FILE_TYPES, label_of_saved

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
        return label_of_saved(self.expected_format)


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


# Who builds each method's checkpoint: a module with build(loaded, method, calib, out) -> manifest meta and
# load(path, dtype=...) -> model (see qkit.quant.methods), imported only when one of its methods runs.
BACKENDS = {"llmcompressor": "qkit.quant.backends.llmcompressor", "gguf": "qkit.quant.backends.gguf",
            "gptqmodel": "qkit.quant.backends.gptqmodel"}


def _gguf_method(file_type: str) -> Method:
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
