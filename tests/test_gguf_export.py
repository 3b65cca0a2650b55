"""GGUF export of `tiny`: names, shapes and values round-trip through transformers' GGUF loader; Q8_0's
error stays within the format's bound; the GGUF methods run through quantize / load_quantized."""
import math

import numpy as np
import pytest
import torch

from qkit import gguf_export, methods
from qkit.errors import QkitError
from qkit.store import Store

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
    with pytest.raises(QkitError, match="Q4_K_M.*not quantize.*llama-quantize") as err:
        gguf_export.check_type("Q4_K_M")
    assert "Q8_0" in err.value.fix and "Q4_0" in err.value.fix
    with pytest.raises(QkitError, match="not a GGUF tensor type"):
        gguf_export.check_type("Q9_9")
    assert gguf_export.check_type("q8_0").bits == 8.5


def test_non_llama_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(QkitError, match="gpt2"):
        gguf_export.export(tmp_path, tmp_path / "m.gguf", "Q8_0")


def test_gguf_method_quantizes_caches_and_reloads(tiny, tmp_path, monkeypatch):
    store = Store(tmp_path)
    ckpt = methods.quantize(tiny, "gguf_q4_0", store=store)
    assert ckpt.meta["backend"] == "gguf" and ckpt.meta["format"] == "gguf-q4_0"
    assert ckpt.meta["kept_at_other_type"] == {"token_embd.weight": "Q8_0"}
    assert ckpt.size_bytes == (ckpt.path / gguf_export.GGUF_FILE).stat().st_size
    # 28 Linear layers at 4.5 bits, embeddings at 8.5, norms at 16 (as if BF16), plus the header
    linear = sum(m.weight.numel() for n, m in tiny.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    embed = tiny.model.model.embed_tokens.weight.numel()
    expected = linear * 4.5 / 8 + embed * 8.5 / 8
    assert expected < ckpt.bf16_run_bytes < expected + 200_000
    model = methods.load_quantized(ckpt)
    ids = tiny.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        base = tiny.model(ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss != base and abs(loss - base) < 0.5
    assert not model.training

    monkeypatch.setattr(gguf_export, "export", lambda *a, **k: pytest.fail("export ran on a cache hit"))
    assert methods.quantize(tiny, "gguf_q4_0", store=store).path == ckpt.path
