"""What a user brings as a variant: checkpoints made elsewhere (a float directory, a .gguf file, a GPTQ
checkpoint written by GPTQModel, a recipe file), each refused before any work when it is not a variant of
the base model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from qkit import data
from qkit.core.errors import QkitError
from qkit.evaluation import EvalSpec
from qkit.quant import methods, variants
from qkit.quant.backends.gptqmodel import import_gptqmodel
from qkit.studies import quantization_methods as studies

SPEC = EvalSpec(n_tokens=512, ctx=128)


def test_a_float_directory_is_a_variant_with_no_loss(tiny, tmp_path: Path) -> None:
    mine = shutil.copytree(tiny.path, tmp_path / "finetune")
    row = studies.evaluate(tiny, variants.parse(tiny, str(mine)), SPEC)
    assert row["method"] == "finetune" and row["format"] == "float" and row["kld_mean"] == pytest.approx(0, abs=1e-9)


def test_a_gguf_file_is_read_back_as_the_gguf_path_reads_it(tiny, tmp_path: Path) -> None:
    ckpt = methods.quantize(tiny, "gguf_q8_0")
    mine = shutil.copy(ckpt.path / "model.gguf", tmp_path / "mine-q8_0.gguf")
    variant = variants.parse(tiny, str(mine))
    assert variant.info["kind"] == "gguf" and variant.label == "mine-q8_0.gguf"
    row = studies.evaluate(tiny, variant, SPEC)
    ours = studies.evaluate(tiny, variants.parse(tiny, "gguf_q8_0"), SPEC)
    assert row["format"] == "gguf" and row["size_mb"] == pytest.approx(Path(mine).stat().st_size / 1e6)
    assert row["kld_mean"] == pytest.approx(ours["kld_mean"], rel=1e-6)


@pytest.mark.slow
def test_a_gptq_checkpoint_written_by_gptqmodel_is_a_variant(tiny, tmp_path: Path) -> None:
    ckpt = methods.quantize(tiny, "w4a16_gptq_gptqmodel")
    mine = tmp_path / "gptq_from_elsewhere"
    shutil.copytree(ckpt.path, mine, ignore=shutil.ignore_patterns("manifest.json"))  # no qkit trace left
    assert json.loads((mine / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    row = studies.evaluate(tiny, variants.parse(tiny, str(mine)), SPEC)
    ours = studies.evaluate(tiny, variants.parse(tiny, "w4a16_gptq_gptqmodel"), SPEC)
    assert row["format"] == "gptq" and row["kld_mean"] == pytest.approx(ours["kld_mean"], rel=1e-6)


@pytest.mark.slow
def test_an_awq_checkpoint_written_by_gptqmodel_is_a_variant(tiny, tmp_path: Path) -> None:
    # Made outside qkit, as a user would: GPTQModel's AWQ, in the Hugging Face format (quant_method awq,
    # GEMM packing). Its CPU packing kernel takes only fp16/bf16 weights, hence the fp16 load.
    gptqmodel = import_gptqmodel()
    from gptqmodel import BACKEND
    from gptqmodel.quantization import FORMAT, METHOD

    rows = [row for _, row in data.calibration_rows("prose", 8, 64, 0, tokenizer=tiny.tokenizer)]
    config = gptqmodel.QuantizeConfig(bits=4, group_size=32, quant_method=METHOD.AWQ, format=FORMAT.GEMM,
                                      offload_to_disk=False)
    model = gptqmodel.GPTQModel.load(str(tiny.path), config, dtype=torch.float16, device="cpu")
    # GPTQModel writes per-layer logs to ./logs of the working directory; keep them out of the checkout
    loop_processor = import_gptqmodel("gptqmodel.looper.loop_processor")
    with mock.patch.object(loop_processor, "_PROJECT_LOG_DIR", tmp_path / "logs"):
        model.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows], batch_size=1,
                       backend=BACKEND.AWQ_TORCH)
    mine = tmp_path / "awq_from_elsewhere"
    model.save(str(mine))
    assert json.loads((mine / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    variant = variants.parse(tiny, str(mine))
    assert variant.info["quant_method"] == "awq"
    q_proj = variant.model.model.layers[0].self_attn.q_proj
    assert q_proj.qweight.dtype == torch.int32 and "Awq" in type(q_proj).__name__  # packed INT4, not float
    row = studies.evaluate(tiny, variant, SPEC)
    weights = sum(f.stat().st_size for f in mine.glob("*.safetensors"))
    assert row["format"] == "awq" and row["size_mb"] == pytest.approx(weights / 1e6, rel=0.01)
    assert 0 < row["kld_mean"] < 0.5


def test_a_checkpoint_of_another_model_is_refused_before_any_work(tiny, tmp_path: Path) -> None:
    other = shutil.copytree(tiny.path, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(QkitError, match="is not a variant of the base model tiny: num_hidden_layers 2 vs 4"):
        variants.parse(tiny, str(other))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "notes.txt").write_text("x")
    with pytest.raises(QkitError, match=r"holds no \*.safetensors weights \(it holds: config.json, notes.txt\)"):
        variants.parse(tiny, str(empty))
    with pytest.raises(QkitError, match="neither a quantization method nor a checkpoint"):
        variants.check("./no_such_method_or_path")
    with pytest.raises(QkitError, match="is a base model, not a variant"):
        variants.parse(tiny, "tiny")


def test_a_hugging_face_id_in_the_local_cache_is_a_variant(tiny, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-finetune"
    shutil.copytree(tiny.path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    variant = variants.parse(tiny, "someone/tiny-finetune")
    assert variant.label == "someone/tiny-finetune" and not variant.info["quantized"]
    assert studies.evaluate(tiny, variant, SPEC)["kld_mean"] == pytest.approx(0, abs=1e-9)
