"""GGUF files read through transformers: checked before a long load, dequantized once to an fp32
safetensors copy (the store keeps it), with the special tokens the file names."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qkit import DEFAULT_MODEL  # noqa: E402,F401  (re-exported)
from qkit.core.errors import QkitError
from qkit.core.store import Kind
from qkit.models.hf import max_length, quiet

# A float copy of a GGUF file, as gguf_build writes it.
GGUF_MODEL = Kind("gguf_model", 1)


def _dequantizable(qtype: Any) -> bool:
    """Whether gguf's `dequantize`, which transformers calls per tensor, handles this type."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def read_gguf(path: Path) -> Any:
    """The file's reader, after checking what transformers would otherwise fail on halfway through a
    long load: an unknown architecture or a tensor type it cannot dequantize."""
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, OSError) as e:
        raise QkitError(f"{path} is not a readable GGUF file ({e})", "pass an intact .gguf model file") from e
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        # The list also holds the metadata sections "general" and "tokenizer".
        supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
        raise QkitError(f"transformers cannot load GGUF architecture {architecture!r} ({path.name})",
                        f"use a GGUF of a supported architecture ({', '.join(supported)})")
    bad = sorted({t.tensor_type.name for t in reader.tensors if not _dequantizable(t.tensor_type)})
    if bad:
        supported = [t.name for t in GGMLQuantizationType if _dequantizable(t)]
        raise QkitError(f"{path.name} holds tensors of type {', '.join(bad)}, which transformers cannot "
                        "dequantize", f"convert the GGUF to a supported type ({', '.join(supported)})")
    return reader


def drop_gguf_quantizer(model: Any) -> None:
    # A GGUF-loaded model is marked quantized although its weights are already dequantized floats, and
    # save_pretrained refuses to write a model whose quantizer it cannot serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _fix_gguf_tokenizer(tokenizer: Any, reader: Any, context: int) -> None:
    # transformers 5.17 reads SmolLM2's GGUF tokenizer with eos = <|im_start|> (id 1) although the file
    # says id 2; the special-token ids in the file are the authority.
    for role in ("bos", "eos", "unknown", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            attr = {"unknown": "unk", "padding": "pad"}.get(role, role)
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(int(field.contents())))
    tokenizer.model_max_length = context
    # Cleanup is meant for WordPiece; on a byte-level BPE it strips spaces (and transformers warns).
    tokenizer.clean_up_tokenization_spaces = False


def gguf_build(gguf_path: Path) -> Callable[[Path], dict]:
    def build(out: Path) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        reader = read_gguf(gguf_path)
        started = time.time()
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            _fix_gguf_tokenizer(tokenizer, reader, max_length(model.config))
            drop_gguf_quantizer(model)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        return {"gguf_file": gguf_path.name, "gguf_seconds": round(time.time() - started, 1),
                "gguf_tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors))}

    return build
