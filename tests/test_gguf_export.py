"""GGUF export of `tiny`: names, shapes and values round-trip through transformers' GGUF loader; Q8_0's
error stays within the format's bound; the GGUF methods run through quantize / load_quantized."""
import math

import numpy as np
import pytest
import torch

from qkit.core.errors import QkitError
from qkit.core.store import Store
from qkit.quant import methods
from qkit.quant.backends import gguf as gguf_export

TEXT = "The king's daughter, 12 + 7 = 19. def f(x):\n    return x"


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """tiny at F16 and Q8_0, and each read back."""
    out = {}
    for qtype in ("F16", "Q8_0"):
        d = tmp_path_factory.mktemp(qtype)
        info = gguf_export.export(tiny.path, d / gguf_export.GGUF_FILE, qtype)
        out[qtype] = (d, info, gguf_export.load(d))
    return out


def test_names_and_shapes_round_trip(tiny, exported):
    import gguf

    d, info, model = exported["Q8_0"]
    ref = tiny.model.state_dict()
    back = model.state_dict()
    assert set(back) == set(ref)
    assert all(back[k].shape == ref[k].shape for k in ref)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, tiny.model.config.num_hidden_layers)
    expected = {names.get_name(k, try_suffixes=(".weight",)) for k in ref if k != "lm_head.weight"}  # tied
    reader = gguf.GGUFReader(d / gguf_export.GGUF_FILE)
    assert {t.name for t in reader.tensors} == expected
    assert info["tensor_types"] == {"Q8_0": 29, "F32": 9}  # 28 Linear + embeddings; 9 norms
    assert set(info["types_by_tensor"]) == expected


def test_f16_round_trip_is_fp16_rounding_and_keeps_the_logits(tiny, exported):
    _, _, model = exported["F16"]
    for name, w in tiny.model.state_dict().items():
        # Q and K rows are permuted on export and back on load: a wrong permutation moves whole rows
        expected = w.to(torch.float16).float() if w.dim() == 2 else w
        assert torch.equal(model.state_dict()[name], expected), name
    ids = tiny.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny.model(ids).logits, atol=1e-2)


def test_q8_0_error_is_within_the_format_bound(tiny, exported):
    # Q8_0: blocks of 32 along a row, scale d = absmax / 127 stored in FP16, values round(x / d):
    # |error| <= d / 2, plus up to 127 x the scale's FP16 rounding.
    _, _, model = exported["Q8_0"]
    back = model.state_dict()
    for name, w in tiny.model.state_dict().items():
        if w.dim() != 2:
            continue
        blocks = w.reshape(-1, 32).double().numpy()
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        bound = d / 2 + 127 * np.abs(d - d.astype(np.float16).astype(np.float64)) + 1e-12
        err = np.abs(back[name].reshape(-1, 32).double().numpy() - blocks)
        assert (err <= bound).all(), name
        assert err.max() > 0.25 * bound.max(), name  # quantized for real, and the bound is not loose


def test_tokenizer_round_trips(tiny, exported):
    from transformers import AutoTokenizer

    d, _, _ = exported["Q8_0"]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf_export.GGUF_FILE)
    assert tok(TEXT).input_ids == tiny.tokenizer(TEXT).input_ids
    assert tok.eos_token == tiny.tokenizer.eos_token


def test_types_that_cannot_be_exported_say_why():
    with pytest.raises(QkitError, match="Q5_K_M.*llama-quantize") as err:
        gguf_export.check_type("Q5_K_M")
    assert "Q8_0" in err.value.fix and "Q4_K_M" in err.value.fix
    with pytest.raises(QkitError, match="IQ4_XS"):
        gguf_export.check_type("IQ4_XS")
    assert gguf_export.check_type("q4_k_m") == "Q4_K_M"


def test_tensor_types_follow_llama_quantize():
    # Q4_K_M on a 4-layer model: use_more_bits picks layers 2 and 3 (every third after the first eighth,
    # and the last eighth) for attn_v and ffn_down; the tied embeddings are the output, at Q6_K.
    def kind(name, shape=(256, 256)):
        return gguf_export.tensor_type(name, shape, "Q4_K_M", 4, tied=True)

    assert [kind(f"blk.{i}.attn_v.weight") for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [kind(f"blk.{i}.ffn_down.weight") for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert kind("blk.0.attn_q.weight") == "Q4_K" and kind("token_embd.weight") == "Q6_K"
    assert kind("blk.0.attn_norm.weight", (256,)) == "F32"
    # SmolLM2's 576-wide rows are not whole 256-blocks: Q4_K falls back to Q5_0, Q6_K to Q8_0
    assert kind("blk.5.attn_q.weight", (576, 576)) == "Q5_0"
    assert kind("token_embd.weight", (49152, 576)) == "Q8_0"
    assert gguf_export.tensor_type("blk.0.ffn_down.weight", (576, 1536), "Q4_K_M", 30, True) == "Q6_K"
    # legacy types: the output at Q6_K, except in a Q8_0 file; untied embeddings keep the file's type
    assert gguf_export.tensor_type("output.weight", (256, 256), "Q4_0", 4, False) == "Q6_K"
    assert gguf_export.tensor_type("output.weight", (256, 256), "Q8_0", 4, False) == "Q8_0"
    assert gguf_export.tensor_type("token_embd.weight", (256, 256), "Q4_0", 4, False) == "Q4_0"
    assert gguf_export.tensor_type("blk.0.attn_q.weight", (256, 48), "Q4_0", 4, False) == "F16"


def test_k_quant_blocks_read_back_through_the_gguf_dequantizer():
    # Q4_K blocks come from GPTQModel's packer and are read by the gguf package's dequantizer, written
    # independently: a layout mismatch would give garbage, far beyond one quantization step per sub-block.
    import gguf

    x = np.random.default_rng(0).standard_t(3, (64, 512)).astype(np.float32)
    back = gguf.quants.dequantize(gguf_export._quantize(x, "Q4_K"), gguf.GGMLQuantizationType.Q4_K)
    sub = x.reshape(-1, 32)
    step = (sub.max(axis=1) - np.minimum(sub.min(axis=1), 0)) / 15
    ratio = np.abs(back.reshape(-1, 32) - sub).max(axis=1) / step
    assert ratio.max() <= 1.0 and ratio.mean() > 0.25


def test_non_llama_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(QkitError, match="gpt2"):
        gguf_export.export(tmp_path, tmp_path / "m.gguf", "Q8_0")


@pytest.mark.parametrize("name, uniform", [("gguf_q4_0", True), ("gguf_q4_k_m", False)])
def test_gguf_method_quantizes_caches_and_reloads(tiny, tmp_path, monkeypatch, name, uniform):
    store = Store(tmp_path)
    ckpt = methods.quantize(tiny, name, store=store)
    file_type = name.removeprefix("gguf_").upper()
    assert ckpt.meta["backend"] == "gguf" and ckpt.meta["format"] == f"gguf-{file_type.lower()}"
    assert ckpt.meta["peak_rss_bytes"] >= ckpt.meta["rss_growth_bytes"] >= 0
    types = ckpt.meta["types_by_tensor"]
    assert types["token_embd.weight"] == "Q6_K"  # tied: the output projection
    # Bytes: each tensor at its type's bits (norms at 16, as if BF16), plus the header and vocabulary
    weights = {n: p for n, p in tiny.model.state_dict().items() if n != "lm_head.weight"}
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, tiny.model.config.num_hidden_layers)
    expected = sum(p.numel() * (16 if p.dim() == 1 else gguf_export.BLOCK_TYPES[
        types[names.get_name(n, try_suffixes=(".weight",))]].bits) / 8 for n, p in weights.items())
    assert expected < ckpt.bf16_run_bytes < expected + 100_000
    if uniform:  # every layer tensor at the file type; Q4_K_M mixes in Q6_K
        assert {t for n, t in types.items() if "blk." in n and not n.endswith("norm.weight")} == {"Q4_0"}
    model = methods.load_quantized(ckpt)
    ids = tiny.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        base = tiny.model(ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss != base and abs(loss - base) < 0.5
    assert not model.training

    monkeypatch.setattr(gguf_export, "export", lambda *a, **k: pytest.fail("export ran on a cache hit"))
    assert methods.quantize(tiny, name, store=store).path == ckpt.path
