"""The GGUF edge path: write a float checkpoint as a llama.cpp GGUF file from PyPI packages only, and
read it back through transformers' GGUF loader for evaluation.

Blocks come from the `gguf` package's quantizers (F16, Q8_0, Q5_0/Q5_1, Q4_0/Q4_1). That package can
read the k-quants but not write them (`gguf.quants.quantize` raises NotImplementedError for Q4_K, Q6_K,
...), so qkit writes Q4_K and Q6_K blocks with GPTQModel's numpy k-quant packer, which is enough for
Q4_K_M. Its scales and minimums are each sub-block's plain min/max, where llama.cpp's llama-quantize
searches them (make_qkx2_quants): qkit's Q4_K_M errs somewhat more than llama.cpp's would. Reading back
through transformers dequantizes every tensor to float, so an evaluation measures the format's
numerics, not llama.cpp's kernels.

Layout follows llama.cpp's convert_hf_to_gguf.py for the Llama architecture (tensor names, Q and K rows
permuted to its RoPE layout, which transformers undoes, 1-D tensors in F32, a GPT-2-style BPE vocabulary)
and each tensor's type follows llama-quantize's rules (llama_tensor_get_type): the output projection, or
the token embeddings when they are tied to it, at Q6_K (Q8_0 for a Q8_0 file, or where its rows are not
whole blocks); for Q4_K_M also attn_v and ffn_down at Q6_K in the layers `use_more_bits` picks; a row
length that is not whole blocks of the chosen type falls back as there (Q4_K -> Q5_0, Q6_K -> Q8_0,
then F16).

What does not round-trip (transformers 5.17 reading it back): `rms_norm_eps` returns as its float32 value,
and the pad token and `architectures` are dropped; weights at F16 and the token ids do round-trip.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkit.core.errors import QkitError
from qkit.models.gguf import drop_gguf_quantizer, read_gguf
from qkit.models.hf import as_dtype, quiet
from qkit.quant.artifacts import measure_cost
from qkit.quant.backends.gptqmodel import import_gptqmodel
from qkit.quant.formats import BLOCK_TYPES, FALLBACK, FILE_TYPES

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel

    from qkit import models
    from qkit.quant.registry import Method


GGUF_FILE = "model.gguf"


_ARCHITECTURES = {"llama": "LLAMA"}  # model_type -> gguf.MODEL_ARCH member; what the exporter maps


def check_type(name: str) -> str:
    """The file type called `name` (case-insensitive), or a QkitError saying why it cannot be written."""
    key = name.upper()
    if key in FILE_TYPES:
        return key
    raise QkitError(f"cannot export GGUF type {name!r}: the gguf package quantizes only F16, BF16, Q8_0 and "
                    "the legacy 4/5-bit types, GPTQModel's packer adds Q4_K and Q6_K blocks (enough for "
                    "Q4_K_M), and the other k- and i-quant mixes need llama.cpp's llama-quantize, which no "
                    "PyPI package installs without a source build",
                    f"use one of {', '.join(FILE_TYPES)}")


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama-quantize's choice of layers that get more bits in the _M mixes: the first and last eighth and
    every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, n_layers: int, tied: bool) -> str:
    """The block type llama-quantize would give tensor `name` (GGUF naming) in a `file_type` file."""
    if len(shape) == 1:
        return "F32"
    base = FILE_TYPES[file_type]
    if base == "F16":
        return "F16"
    layer = int(m.group(1)) if (m := re.match(r"blk\.(\d+)\.", name)) else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        chosen = "Q8_0" if base == "Q8_0" or shape[-1] % BLOCK_TYPES[base].block else "Q6_K"
    elif file_type == "Q4_K_M" and name.endswith(("attn_v.weight", "ffn_down.weight")) \
            and _use_more_bits(layer, n_layers):
        chosen = "Q6_K"
    else:
        chosen = base
    chosen = FALLBACK.get(chosen, chosen) if shape[-1] % BLOCK_TYPES[chosen].block else chosen
    return chosen if shape[-1] % BLOCK_TYPES[chosen].block == 0 else "F16"


def _quantize(array: np.ndarray, block_type: str) -> np.ndarray:
    import gguf

    if BLOCK_TYPES.get(block_type, BLOCK_TYPES["F16"]).packer == "gguf":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType[block_type])

    packer = import_gptqmodel("gptqmodel.nn_modules.qlinear.gguf", f"writing GGUF {block_type} blocks")
    pack = {"Q4_K": packer._gguf_quantize_q4_k, "Q6_K": packer._gguf_quantize_q6_k}[block_type]
    return pack(array.reshape(-1, BLOCK_TYPES[block_type].block)).reshape(array.shape[0], -1)


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
    from safetensors import safe_open

    file_type = check_type(qtype)
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
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{file_type}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, src, config["vocab_size"])

    types: dict[str, str] = {}
    tied = bool(config.get("tie_word_embeddings"))
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name == "lm_head.weight" and tied:
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
                types[name] = tensor_type(name, array.shape, file_type, layers, tied)
                writer.add_tensor(name, _quantize(array, types[name]),
                                  raw_dtype=gguf.GGMLQuantizationType[types[name]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": dict(Counter(types.values())), "types_by_tensor": types}


def build(loaded: models.LoadedModel, method: Method, calib: Any, out: Path) -> dict:
    """The store builder for a GGUF method (calibration-free: `calib` is None): export `loaded`'s float
    checkpoint and keep its tokenizer files beside it, since qkit evaluates with the baseline's tokenizer."""
    qtype = method.recipe[0]["gguf"]["type"]
    with measure_cost() as cost:
        info = export(loaded.path, out / GGUF_FILE, qtype)
    loaded.tokenizer.save_pretrained(out)
    size = (out / GGUF_FILE).stat().st_size
    # Norms are written in F32; counted at 2 bytes, like the other checkpoints' bf16_run_bytes.
    f32_elements = sum(_f32_elements(out / GGUF_FILE))
    return {**cost, "format": f"gguf-{qtype.lower()}", "backend": "gguf",
            "size_bytes": size, "bf16_run_bytes": size - 2 * f32_elements, **info}


def _f32_elements(path: Path) -> list[int]:
    from gguf import GGMLQuantizationType, GGUFReader

    return [int(t.n_elements) for t in GGUFReader(path).tensors if t.tensor_type == GGMLQuantizationType.F32]


def load(path: str | Path, dtype: torch.dtype | str = "float32") -> PreTrainedModel:
    """Read a GGUF checkpoint back through transformers, dequantized to `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    read_gguf(path / GGUF_FILE)  # clear errors before a long load
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=as_dtype(dtype))
    drop_gguf_quantizer(model)
    return model.eval()
