"""The GGUF edge path: write a float checkpoint as a llama.cpp GGUF file with the `gguf` PyPI package,
and read it back through transformers' GGUF loader for evaluation.

Only what the `gguf` package can *quantize* in Python is offered: F16, Q8_0 and the legacy 4/5-bit
block types (Q4_0, Q4_1, Q5_0, Q5_1). The k-quants (Q4_K, Q5_K, Q6_K, so also Q4_K_M, which mixes Q4_K
with Q6_K) and the i-quants are dequantize-only there (`gguf.quants.quantize` raises
NotImplementedError); making them needs llama.cpp's `llama-quantize`, which no PyPI package installs
without building llama.cpp from source. Reading back through transformers dequantizes every tensor to
float, so an evaluation measures the format's numerics, not llama.cpp's kernels.

Layout follows llama.cpp's convert_hf_to_gguf.py for the Llama architecture: its tensor names, Q and K
rows permuted to llama.cpp's RoPE layout (transformers undoes that when loading), 1-D tensors (norms) in
F32, and a GPT-2-style BPE vocabulary from tokenizer.json.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkit.errors import QkitError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel

    from qkit import models
    from qkit.methods import Method

GGUF_FILE = "model.gguf"


@dataclass(frozen=True)
class GGUFType:
    name: str  # llama.cpp's name, also gguf.GGMLQuantizationType's
    bits: float  # bits per weight, block scales included
    layout: str


# Bits from the block layouts in gguf.constants.GGML_QUANT_SIZES (bytes per block x 8 / weights per block).
TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("F16", 16.0, "IEEE half precision"),
    GGUFType("Q8_0", 8.5, "blocks of 32: int8 values, one FP16 scale (absmax / 127)"),
    GGUFType("Q5_1", 6.0, "blocks of 32: 5-bit values, FP16 scale and minimum"),
    GGUFType("Q5_0", 5.5, "blocks of 32: 5-bit values, one FP16 scale"),
    GGUFType("Q4_1", 5.0, "blocks of 32: 4-bit values, FP16 scale and minimum"),
    GGUFType("Q4_0", 4.5, "blocks of 32: 4-bit values, one FP16 scale"),
)}

# llama.cpp stores the output projection (here the tied token embeddings) at Q6_K when quantizing to the
# legacy types; gguf cannot write Q6_K, so it stays at Q8_0, the nearest type it can write.
EMBED_TYPE = "Q8_0"

_ARCHITECTURES = {"llama": "LLAMA"}  # model_type -> gguf.MODEL_ARCH member; what the exporter maps


def check_type(name: str) -> GGUFType:
    """The writable GGUF type called `name` (case-insensitive), or a QkitError saying why not."""
    from gguf import GGMLQuantizationType

    key = name.upper()
    if key in TYPES:
        return TYPES[key]
    known = key in GGMLQuantizationType.__members__ or key.rsplit("_", 1)[0] in GGMLQuantizationType.__members__
    why = ("the gguf package can read it but not quantize to it (its Python quantizers cover only "
           "F16, BF16, Q8_0 and the legacy 4/5-bit types; the k- and i-quants need llama.cpp's "
           "llama-quantize, which installs from no PyPI package without a source build)") if known else \
        "it is not a GGUF tensor type"
    raise QkitError(f"cannot export GGUF type {name!r}: {why}", f"use one of {', '.join(TYPES)}")


def _tensor_type(name: str, array: np.ndarray, qtype: GGUFType) -> str:
    if array.ndim == 1:
        return "F32"  # norms: llama.cpp keeps them in F32
    if qtype.name != "F16" and name in ("token_embd.weight", "output.weight"):
        return EMBED_TYPE
    # a row that is not whole blocks of 32 cannot be block-quantized; llama.cpp falls back the same way
    return qtype.name if qtype.name == "F16" or array.shape[-1] % 32 == 0 else "F16"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's Q/K rows to llama.cpp's RoPE layout (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _add_vocab(writer: Any, src: Path, vocab_size: int) -> None:
    """A byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer: tokens, types, merges, special ids."""
    import gguf

    tok = json.loads((src / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise QkitError(f"the tokenizer in {src} is {tok['model']['type']}, not byte-level BPE",
                        "export a model with a BPE tokenizer.json (Llama 3, SmolLM2, Qwen style)")
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"]: a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    by_id.update(special)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def export(src: str | Path, out_file: str | Path, qtype: str) -> dict:
    """Write the float checkpoint in `src` (config.json, safetensors, tokenizer.json) as a GGUF file of
    type `qtype`. Returns what was written: tensor types, and the tensors kept at another type."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    t = check_type(qtype)
    src, out_file = Path(src), Path(out_file)
    config = json.loads((src / "config.json").read_text())
    arch = _ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:
        raise QkitError(f"qkit exports GGUF for {', '.join(_ARCHITECTURES)} models, not "
                        f"{config.get('model_type')!r}", "use a Llama-architecture model (SmolLM2, Llama, tiny)")
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], layers)

    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    writer.add_name(src.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{t.name}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, src, config["vocab_size"])

    written: Counter[str] = Counter()
    kept: dict[str, str] = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # the tied copy of token_embd
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise QkitError(f"no GGUF name for tensor {hf_name!r} of {src}",
                                    "export a plain Llama checkpoint (no adapters or extra heads)")
                array = f.get_tensor(hf_name).float().numpy()
                if name.endswith("attn_q.weight"):
                    array = _permute(array, heads)
                elif name.endswith("attn_k.weight"):
                    array = _permute(array, kv_heads)
                ttype = _tensor_type(name, array, t)
                if ttype not in ("F32", t.name):
                    kept[name] = ttype
                qt = gguf.GGMLQuantizationType[ttype]
                writer.add_tensor(name, gguf.quants.quantize(array, qt), raw_dtype=qt)
                written[ttype] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": dict(written), "kept_at_other_type": kept}


def build(loaded: models.LoadedModel, method: Method, calib: Any, out: Path) -> dict:
    """The store builder for a GGUF method (calibration-free: `calib` is None): export `loaded`'s float
    checkpoint and keep its tokenizer files beside it, since qkit evaluates with the baseline's tokenizer."""
    qtype = method.recipe[0]["gguf"]["type"]
    started = time.perf_counter()
    info = export(loaded.path, out / GGUF_FILE, qtype)
    seconds = time.perf_counter() - started
    loaded.tokenizer.save_pretrained(out)
    size = (out / GGUF_FILE).stat().st_size
    # Norms are written in F32; counted at 2 bytes, like the other checkpoints' bf16_run_bytes.
    f32_elements = sum(_f32_elements(out / GGUF_FILE))
    return {"seconds": round(seconds, 3), "format": f"gguf-{qtype.lower()}", "backend": "gguf",
            "size_bytes": size, "bf16_run_bytes": size - 2 * f32_elements, **info}


def _f32_elements(path: Path) -> list[int]:
    from gguf import GGMLQuantizationType, GGUFReader

    return [int(t.n_elements) for t in GGUFReader(path).tensors if t.tensor_type == GGMLQuantizationType.F32]


def load(path: str | Path, dtype: torch.dtype | str = "float32") -> PreTrainedModel:
    """Read a GGUF checkpoint back through transformers, dequantized to `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    from qkit import models

    path = Path(path)
    models._read_gguf(path / GGUF_FILE)  # clear errors before a long load
    with models._quiet():
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=models._as_dtype(dtype))
    models._drop_gguf_quantizer(model)
    return model.eval()
