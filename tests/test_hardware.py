"""The hardware advisor: the seed's recommendations per GPU generation, memory against hand computation,
and a clear message for each kind of bad input."""
import json

import pytest

from qkit import cli
from qkit.core.errors import QkitError
from qkit.plan import hardware, memory
from qkit.quant.formats import WEIGHT_FORMATS


@pytest.mark.parametrize("gpu, precision, method", [
    ("A100", "int4", "w4a16_awq"),       # Ampere: Marlin INT4, no FP8
    ("RTX 3090", "int4", "w8a8_int8"),   # Ampere: INT8 tensor cores as the compute-bound option
    ("L40S", "fp8", "fp8_dynamic"),      # Ada: FP8 from compute capability 8.9
    ("H100", "fp8", "fp8_dynamic"),      # Hopper
    ("B200", "nvfp4", "nvfp4a16"),       # Blackwell: FP4 tensor cores
    ("RTX 5090", "nvfp4", "nvfp4"),      # consumer Blackwell (12.0)
    ("cpu", "gguf_q4_k_m", "gguf_q8_0"),
    ("apple", "gguf_q4_k_m", "gguf_q8_0"),
])
def test_recommendation_per_generation(gpu, precision, method):
    rule = hardware.recommend(hardware.get_device(gpu))
    assert rule.precision == precision and method in rule.methods


def test_every_recommended_method_is_in_the_registry():
    from qkit.quant.registry import get_method

    for rule in hardware.rules():
        for name in rule.methods:
            get_method(name)
        assert rule.precision in WEIGHT_FORMATS and rule.alternative in WEIGHT_FORMATS


def test_native_kernels_follow_the_capability_thresholds():
    a100, l4, b200 = (hardware.get_device(n) for n in ("A100", "L4", "B200"))
    assert a100.kernels == {"FP8": False, "INT8": True, "Marlin INT4": True, "FP4": False}
    assert l4.kernels["FP8"] and not l4.kernels["FP4"]  # 8.9 is FP8's threshold, exactly
    assert all(b200.kernels.values())
    assert not any(hardware.get_device("cpu").kernels.values())


def test_an_old_gpu_gets_no_quantized_kernel_recommendation():
    t4 = hardware.Device("T4", "nvidia", "Turing", (7, 5), 16)
    assert hardware.recommend(t4).precision == "bf16"


def test_names_match_without_case_spaces_or_dashes():
    assert hardware.get_device("rtx-4090").name == "RTX 4090"
    assert hardware.get_device("l40s").name == "L40S"


def test_seed_example_70b_at_bf16_and_int4():
    a = hardware.advise("A100", model_size="70B")
    assert a.table.loc["bf16", "weights GB"] == pytest.approx(140.0)
    # INT4 with one BF16 scale per 128 weights: 4.125 bits; "about 35 GB" in the seed
    assert a.table.loc["int4", "weights GB"] == pytest.approx(70e9 * 4.125 / 8 / 1e9)
    assert 34 < a.table.loc["int4", "weights GB"] < 37
    assert a.table.loc["nvfp4", "weights GB"] == pytest.approx(70e9 * 4.5 / 8 / 1e9)
    assert not a.fits("bf16") and a.fits("int4")
    assert a.table.loc["int4", "room for KV GB"] == pytest.approx(80 - 36.09375)


def test_kv_cache_against_hand_computation():
    # Llama-3.1-8B: 32 layers x 8 KV heads x head_dim 128, keys and values, 2 bytes each
    a = hardware.advise("L4", model="llama-3.1-8b", context=8192, batch=2)
    kv = 2 * 32 * 8 * 128 * 2 * 8192 * 2 / 1e9
    assert a.table.loc["fp8", "KV cache GB"] == pytest.approx(kv)
    weights = 8030261248 * 8 / 8 / 1e9
    assert a.table.loc["fp8", "total GB"] == pytest.approx(weights + kv)
    assert a.fits("fp8") == (weights + kv <= 24)


def test_memory_override_changes_the_fit():
    small = hardware.advise("H100", model_size="70B", memory_gb="24GB")
    assert small.device.memory_gb == pytest.approx(24) and not small.fits("int4")
    assert any("does not fit" in line for line in hardware.summary(small))


def test_detect_on_this_machine_gives_a_device_with_a_recommendation():
    device = hardware.detect()
    assert device.detected and hardware.recommend(device).precision


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(QkitError, match="unknown GPU.*A100.*H100"):
        hardware.get_device("V100")


def test_model_without_parameter_count(tmp_path):
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QkitError, match="no parameter count.*--model-size"):
        hardware.advise("A100", model=tmp_path)
    assert hardware.advise("A100", model=tmp_path, model_size="1M").n_params == 1e6


def test_bad_plans():
    with pytest.raises(QkitError, match="no model"):
        hardware.advise("A100")
    with pytest.raises(QkitError, match="maximum"):
        hardware.advise("A100", model="smollm2-135m", context=100_000)
    with pytest.raises(QkitError, match="batch"):
        hardware.advise("A100", model_size="7B", batch=0)
    with pytest.raises(QkitError, match="size"):
        memory.parse_size("70Q")


def test_cli_advise(capsys):
    assert cli.main(["advise", "--gpu", "A100", "--model-size", "70B"]) == 0
    out = capsys.readouterr().out
    assert "Recommended: int4" in out and "Marlin" in out
    assert "bf16         16           140.0" in out and "Should you quantize?" in out
    assert cli.main(["advise", "--gpu", "V100"]) == 2
    assert "unknown GPU" in capsys.readouterr().err


@pytest.mark.parametrize("cuda_name, capability, row, precision", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "Hopper", "fp8"),
    ("NVIDIA L40S", (8, 9), "Ada", "fp8"),          # not the L4 row
    ("NVIDIA A100-SXM4-40GB", (8, 0), "Ampere", "int4"),
    ("Tesla T4", (7, 5), "unknown", "bf16"),        # not in the table: capability decides
])
def test_detect_a_cuda_gpu_through_torch(monkeypatch, cuda_name, capability, row, precision):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: cuda_name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: types.SimpleNamespace(total_memory=40e9))
    device = hardware.detect()
    assert (device.name, device.capability, device.generation) == (cuda_name, capability, row)
    assert device.memory_gb == pytest.approx(40) and hardware.recommend(device).precision == precision
