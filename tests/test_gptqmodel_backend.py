"""GPTQModel as the second GPTQ backend, on `tiny`: same calibration rows and group size as llm-compressor's
w4a16_gptq, a checkpoint that reloads through qkit, and a clear message when gptqmodel is missing."""
import importlib
import json
import math

import pytest
import torch

from qkit.core.errors import QkitError
from qkit.core.store import Store
from qkit.data import CalibSpec
from qkit.quant import methods, registry
from qkit.quant.backends import gptqmodel as gptqmodel_backend

CALIB = CalibSpec("prose", 16, 128)


def test_same_format_settings_as_llmcompressor_gptq():
    ours, theirs = registry.get_method("w4a16_gptq_gptqmodel"), registry.get_method("w4a16_gptq")
    settings = ours.recipe[0]["GPTQModel"]
    (group,) = theirs.recipe[0]["GPTQModifier"]["config_groups"].values()
    assert settings["group_size"] == group["weights"]["group_size"] == registry.INT4_GROUP
    assert settings["bits"] == group["weights"]["num_bits"] and settings["sym"] == group["weights"]["symmetric"]
    assert ours.needs_calibration and ours.weight_format == theirs.weight_format == "INT4"
    # the same CalibSpec gives both backends the same store key part
    assert methods.checkpoint_spec(_Fake(), ours, CALIB)["calibration"] == \
        methods.checkpoint_spec(_Fake(), theirs, CALIB)["calibration"]


class _Fake:
    info = {"fingerprint": "fake:0"}


def test_missing_gptqmodel_says_how_to_install(monkeypatch):
    real = importlib.import_module

    def no_gptqmodel(name, *args):
        if name.startswith("gptqmodel"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_gptqmodel)
    with pytest.raises(QkitError, match="needs gptqmodel") as err:
        gptqmodel_backend.import_gptqmodel()
    assert "setup.sh" in err.value.fix


@pytest.mark.slow
def test_gptqmodel_quantizes_tiny_and_reloads_through_qkit(tiny, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # GPTQModel would write ./logs here; qkit must keep it in the checkpoint
    store = Store(tmp_path)
    ckpt = methods.quantize(tiny, "w4a16_gptq_gptqmodel", calib=CALIB, store=store)
    assert ckpt.meta["backend"] == "gptqmodel" and ckpt.meta["format"] == "gptq"
    config = json.loads((ckpt.path / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"]) == (4, registry.INT4_GROUP, True)
    assert (ckpt.path / gptqmodel_backend.LOG).stat().st_size > 0
    assert list((ckpt.path / gptqmodel_backend.LAYER_LOGS).glob("gptq_log_*.log"))
    assert Store.manifest(ckpt.path)["spec"]["calibration"]["n_samples"] == 16
    linear = sum(m.weight.numel() for n, m in tiny.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    expected = linear * 4 / 8 + (tiny.info["n_params"] - linear) * 2
    assert expected <= ckpt.bf16_run_bytes <= 1.15 * expected

    model = methods.load_quantized(ckpt)
    text = "The king's daughter went to the market, and the price of bread"
    ids = tiny.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        base = tiny.model(ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss != base and abs(loss - base) < 0.5

    assert not (tmp_path / "logs").exists()
    monkeypatch.setattr(gptqmodel_backend, "build", lambda *a: pytest.fail("GPTQModel ran on a cache hit"))
    assert methods.quantize(tiny, "w4a16_gptq_gptqmodel", calib=CALIB, store=store).path == ckpt.path
