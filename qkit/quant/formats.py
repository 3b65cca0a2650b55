"""The one table of weight formats and their bits: what the planner, the advisor, the registry and the
figures read. :data:`WEIGHT_FORMATS` holds the storage precisions a model is planned and compared in;
the GGUF block and file types below are the llama.cpp formats qkit writes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFormat:
    """A storage precision of a model's weights."""

    name: str  # as the planner and the advisor name it
    label: str  # the number format in the words of the seed's hardware table
    bits: float  # per weight, scales included
    rule_of_thumb: float | None  # the seed's reduction against BF16, weights only
    saved_as: tuple[str, ...] = ()  # compressed-tensors "format" of a checkpoint in it


# Bits per weight, scales included: INT4 and FP8/INT8 with one BF16 (or FP32) scale per group of 128 or
# per output channel, NVFP4 with one FP8 scale per 16 weights plus a tensor scale. Rows are what
# llm-compressor's schemes store; the per-channel scales are < 0.1% and are left out. GGUF: Q8_0 stores
# 32 int8 values and one FP16 scale (34 bytes per 32 weights); Q4_K_M mixes Q4_K super-blocks (4.5 bits)
# with Q6_K (6.5625) for attn_v and half of ffn_down, and llama.cpp's quantize table gives about 4.85 bits
# for Llama models, an average rather than an exact figure.
WEIGHT_FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("bf16", "BF16", 16.0, 1.0),
    WeightFormat("fp8", "FP8", 8.0, 2.0, ("float-quantized",)),
    WeightFormat("int8", "INT8", 8.0, 2.0, ("int-quantized",)),
    WeightFormat("int4", "INT4", 4.0 + 16 / 128, 4.0, ("pack-quantized", "gptq")),  # W4A16, group 128
    WeightFormat("nvfp4", "NVFP4", 4.0 + 8 / 16, 3.3, ("nvfp4-pack-quantized",)),  # E2M1, E4M3 scale per 16
    WeightFormat("mxfp4", "MXFP4", 4.0 + 8 / 32, None, ("mxfp4-pack-quantized",)),  # E2M1, E8M0 scale per 32
    WeightFormat("gguf_q8_0", "GGUF", 8.5, None),
    WeightFormat("gguf_q4_k_m", "GGUF", 4.85, None),
)}


def label_of_saved(saved: str) -> str:
    """The number format of a checkpoint saved as `saved` (a compressed-tensors format, or a GGUF file type
    as qkit names it), in the hardware table's words."""
    return next((f.label for f in WEIGHT_FORMATS.values() if saved in f.saved_as), saved.upper())


def rule_of_thumb(label: str) -> float | None:
    """The seed's size reduction against BF16 for a number format's label, where it gives one."""
    return next((f.rule_of_thumb for f in WEIGHT_FORMATS.values() if f.label == label), None)


@dataclass(frozen=True)
class BlockType:
    """A tensor type qkit can write."""
    name: str  # llama.cpp's name, also gguf.GGMLQuantizationType's
    bits: float  # bits per weight, block scales included (gguf.constants.GGML_QUANT_SIZES)
    block: int  # weights per block; a row must be whole blocks
    layout: str
    packer: str = "gguf"  # who writes the blocks: the gguf package, or GPTQModel's k-quant packer


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("F16", 16.0, 1, "IEEE half precision"),
    BlockType("Q8_0", 8.5, 32, "blocks of 32: int8 values, one FP16 scale (absmax / 127)"),
    BlockType("Q6_K", 6.5625, 256, "super-blocks of 256: 6-bit values, an int8 scale per 16, FP16 super-scale",
              packer="gptqmodel"),
    BlockType("Q5_1", 6.0, 32, "blocks of 32: 5-bit values, FP16 scale and minimum"),
    BlockType("Q5_0", 5.5, 32, "blocks of 32: 5-bit values, one FP16 scale"),
    BlockType("Q4_1", 5.0, 32, "blocks of 32: 4-bit values, FP16 scale and minimum"),
    BlockType("Q4_0", 4.5, 32, "blocks of 32: 4-bit values, one FP16 scale"),
    BlockType("Q4_K", 4.5, 256, "super-blocks of 256: 4-bit values, 6-bit scale and minimum per 32, FP16 "
                                "super-scales", packer="gptqmodel"),
)}


# The file types qkit exports: llama-quantize's names, each with the block type most tensors get.
FILE_TYPES: dict[str, str] = {"F16": "F16", "Q8_0": "Q8_0", "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q4_1": "Q4_1",
                              "Q4_0": "Q4_0", "Q4_K_M": "Q4_K"}


# llama-quantize's replacement for a type whose blocks do not divide a tensor's rows.
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
