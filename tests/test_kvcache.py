"""The KV planner against hand computation and against the bytes real caches hold; the KV study on tiny."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from qkit.core.errors import QkitError
from qkit.plan import kv, memory
from qkit.quant import variants
from qkit.studies import kv_cache as K


def test_kv_bytes_by_hand() -> None:
    llama = memory.get_shape("llama-3.1-8b")
    # 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes x 32768 tokens: the well-known 4 GiB.
    assert kv.kv_bytes(llama, 32768, 1, "bf16") == 2 * 32 * 8 * 128 * 2 * 32768 == 4 * 2**30
    assert kv.kv_bytes(llama, 32768, 8, "fp8") == 4 * 2**30 * 8 / 2
    # int4 with a 2-byte scale and zero per 64 elements: 0.5 + 4/64 bytes per element.
    assert kv.kv_bytes(llama, 1000, 2, "int4") == 2 * 32 * 8 * 128 * 1000 * 2 * (0.5 + 4 / 64)
    # residual tokens stay at full width
    assert kv.kv_bytes(llama, 100, 1, "int4", residual=100) == kv.kv_bytes(llama, 100, 1, "bf16")
    assert memory.get_shape("meta-llama/Llama-3.1-70B-Instruct").n_params > 7e10


def test_plan_table_and_what_fits() -> None:
    plan = kv.plan("llama-3.1-8b", contexts=[32768, 131072], batches=[1, 8], device_memory="80GB")
    row = plan[(plan["context"] == 32768) & (plan["batch"] == 8) & (plan["kv_format"] == "fp8")].iloc[0]
    assert row["kv_gb"] == pytest.approx(2 * 32 * 8 * 128 * 32768 * 8 / 1e9)
    assert row["total_gb_bf16"] == pytest.approx(row["kv_gb"] + 8030261248 * 2 / 1e9)
    assert row["fits_bf16"]
    big = plan[(plan["context"] == 131072) & (plan["batch"] == 8) & (plan["kv_format"] == "bf16")].iloc[0]
    assert not big["fits_bf16"]  # 137 GB of cache
    table = kv.plan_table(plan)
    assert table.loc[(131072, 8), "KV GB, bf16"].endswith("✗") and not table.loc[(32768, 1), "KV GB, bf16"].endswith("✗")
    assert any("room left" in line for line in kv.plan_summary(plan))


def test_planner_equals_the_bytes_real_caches_hold_on_tiny(tiny) -> None:
    m = kv.measure_bytes(tiny, lengths=[17, 64, 300])
    assert set(m["cache"]) == set(kv.RUNTIME_CACHES) and len(m) == 3 * len(kv.RUNTIME_CACHES)
    assert (m["measured_bytes"] == m["planned_bytes"]).all(), m
    dyn = m[(m["cache"] == "dynamic") & (m["tokens"] == 64)]["measured_bytes"].item()
    c = tiny.model.config
    assert dyn == 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 64 * 4


def test_the_measured_bytes_are_kept_in_the_store(tiny, tmp_path, monkeypatch) -> None:
    import pandas as pd

    from qkit.core.store import Store

    store = Store(tmp_path)
    first = K.measured_bytes(tiny, [17, 64], store)
    pd.testing.assert_frame_equal(first, kv.measure_bytes(tiny, lengths=[17, 64]))
    monkeypatch.setattr(kv, "measure_bytes", lambda *a, **k: pytest.fail("measured again"))
    pd.testing.assert_frame_equal(K.measured_bytes(tiny, [17, 64], store), first)


@pytest.mark.slow
def test_planner_equals_the_bytes_real_caches_hold_on_the_default_model() -> None:
    from qkit import models

    loaded = models.resolve_model(models.DEFAULT_MODEL)
    m = kv.measure_bytes(loaded, lengths=[100, 1000, 3000])
    assert (m["measured_bytes"] == m["planned_bytes"]).all(), m


def test_chunked_prefill_with_a_plain_cache_equals_one_pass(tiny) -> None:
    ids = torch.randint(0, tiny.model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    one = K._hidden(tiny.model, ids, None, 0)
    chunked = K._hidden(tiny.model, ids, "dynamic", 64)
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(K._hidden(tiny.model, ids, "hqq_int4", 64), one, atol=1e-4)


def test_per_head_scales_have_the_shape_compressed_tensors_expects(tiny, tmp_path) -> None:
    from safetensors import safe_open

    from qkit.core.store import Store
    from qkit.data import CalibSpec
    from qkit.quant import methods

    calib = CalibSpec("prose", 2, 64)
    heads = tiny.model.config.num_key_value_heads
    for name, shape in (("kv_fp8_head", [heads, 1, 1]), ("kv_fp8_tensor", [1])):
        ckpt = methods.quantize(tiny, name, calib=calib, store=Store(tmp_path))
        with safe_open(str(next(ckpt.path.glob("*.safetensors"))), "pt") as f:
            scales = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith(("k_scale", "v_scale"))}
        assert len(scales) == 2 * tiny.model.config.num_hidden_layers
        assert all(s == shape for s in scales.values()), (name, scales)
        saved = json.loads((ckpt.path / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
        assert saved["strategy"] == ("attn_head" if name == "kv_fp8_head" else "tensor")
        assert saved["num_bits"] == 8 and saved["type"] == "float"


def test_bad_input_names_the_problem() -> None:
    smol = memory.get_shape("smollm2-135m")
    with pytest.raises(QkitError, match="beyond smollm2-135m's maximum of 8192"):
        kv.check_context(smol, 32768)
    with pytest.raises(QkitError, match="beyond smollm2-135m's maximum of 8192"):
        kv.plan("smollm2-135m", contexts=[16384, 32768])
    with pytest.raises(QkitError, match="unknown KV scheme 'fp8_row'.*fp8_head"):
        K.get_scheme("fp8_row")
    with pytest.raises(QkitError, match="unknown KV cache format 'fp4'"):
        kv.plan("smollm2-135m", formats=["fp4"])
    with pytest.raises(QkitError, match="lacks num_hidden_layers"):
        memory.shape_from_config({"hidden_size": 64, "num_attention_heads": 4}, name="odd")
    with pytest.raises(QkitError, match="lacks head_dim or hidden_size"):
        memory.get_shape({"num_hidden_layers": 2, "num_attention_heads": 4})
    with pytest.raises(QkitError, match="no model shape for 'gpt-9'"):
        memory.get_shape("gpt-9")


def test_quality_on_tiny_is_cached_and_compares_schemes(tiny, store_with_tiny, tmp_path, monkeypatch,
                                                        refuse_loading) -> None:
    store = store_with_tiny(tmp_path)
    prof = K.Config(("fp8_tensor", "fp8_head", "hqq_int4"), n_tokens=512, n_docs=2, chunk=64,
                    context_lengths=(256,), depths=(1.0,), calib_samples=2, calib_seq_len=64, model="tiny")
    res = K.run(prof, store=store)
    assert set(res.blocks["scheme"]) == {"fp8_tensor", "fp8_head", "hqq_int4"}
    assert len(res.blocks) == 3 * 2 * (511 // K.BLOCK)
    fp8 = res.blocks[res.blocks["scheme"] != "hqq_int4"]
    assert (fp8["kld"] > 0).all()  # fake-quantized K and V change the output in every block
    # The runtime cache's first chunk attends to its own unquantized keys; later chunks to the int4 cache.
    hqq = res.blocks[res.blocks["scheme"] == "hqq_int4"]
    assert (hqq[hqq["start"] < prof.chunk]["kld"] == 0).all() and (hqq[hqq["start"] >= prof.chunk]["kld"] > 0).all()
    assert set(res.retrieval["scheme"]) == {"baseline", "fp8_tensor", "fp8_head", "hqq_int4"}
    table = K.by_position(res)
    assert list(table["bucket"].unique()) == ["0-256", "256-512"] and (table["low"] <= table["kld"]).all()
    c = K.compare(res)
    assert list(c["bucket"]) == ["0-256", "256-512"]
    assert c["difference"].to_numpy() == pytest.approx((c["fp8_tensor"] - c["fp8_head"]).to_numpy())
    assert len(K.findings(res)) == 5

    monkeypatch.setattr(K, "position_stats", lambda *a, **k: pytest.fail("recomputed"))
    refuse_loading()
    again = K.run(prof, store=store)
    assert again.blocks["kld"].equals(res.blocks["kld"])
    pd.testing.assert_frame_equal(again.retrieval, res.retrieval)


def test_runtime_cache_schemes_generate_with_the_quantized_cache(tiny) -> None:
    # Passkey retrieval runs through lm-eval's generate: the scheme must reach it via the generation config.
    model = variants.with_kv_cache(tiny, "hqq_int4").model
    assert model is not tiny.model and tiny.model.generation_config.cache_implementation is None
    ids = tiny.tokenizer("The pass key is 12345. The pass key is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert {type(layer).__name__ for layer in out.past_key_values.layers} == {"HQQQuantizedLayer"}


def test_retrieval_table_by_length_and_depth_and_its_figure() -> None:
    import pandas as pd

    from qkit.studies import plots

    rows = [{"scheme": s, "task": t, "length": n, "depth": d, "id": f"x/{n}/{d}", "score": float(s == "fp8_head"),
             "output": ""} for s in ("baseline", "fp8_head") for t in ("qkit_passkey", "qkit_passkey_multi")
            for n in (1024, 4096) for d in (0.0, 1.0)]
    res = K.Result(K.PROFILES["quick"], pd.DataFrame(), pd.DataFrame(rows), {})
    table = K.retrieval_table(res)
    assert table.shape == (4, 4) and table.loc[("fp8_head", "qkit_passkey_multi"), (4096, 1.0)] == 100
    assert table.loc[("baseline", "qkit_passkey"), (1024, 0.0)] == 0
    fig = plots.kv_retrieval(table)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0] == "baseline / qkit_passkey"
