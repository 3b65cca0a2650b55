"""Number formats qkit writes, with their bits per weight: the GGUF block types and file types."""
from __future__ import annotations

from dataclasses import dataclass


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
