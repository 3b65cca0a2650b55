"""GPTQModel as a second GPTQ backend: the same format, calibration rows and group size as llm-compressor's
w4a16_gptq, quantized by GPTQModel 7.6.0, saved in its GPTQ checkpoint format and reloaded by
transformers (which needs `optimum` for that; on CPU it picks GPTQModel's TorchAtenLinear kernel).

On CPU, GPTQModel sizes thread pools from GPTQMODEL_CPU_WORKERS; with 1 worker (or unset, on 2 cores) it
fails with "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1", so qkit sets 2
unless the user set it. The pools are Python threads; torch still computes on its own thread setting.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from unittest import mock

import torch

from qkit import data, models
from qkit.core.errors import QkitError
from qkit.quant.artifacts import measure_cost, safetensors_sizes, saved_format
from qkit.quant.registry import Method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CPU_WORKERS = "2"
LOG = "gptqmodel.log"
LAYER_LOGS = "gptqmodel_layers"


def import_gptqmodel(module: str = "gptqmodel", purpose: str = "the GPTQModel backend") -> ModuleType:
    """Import a gptqmodel module with its CPU pool sized, or say how to install it."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", CPU_WORKERS)
    try:
        # Its import prints a banner and INFO/WARN lines to stdout, which would land in a report's HTML.
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module(module)
    except ImportError as e:
        raise QkitError(f"{purpose} needs gptqmodel, which is not installed ({e})",
                        "run scripts/setup.sh, which installs gptqmodel==7.6.0 with --no-deps (its numpy pin "
                        "would downgrade the stack) and optimum") from None


def build(loaded: models.LoadedModel, method: Method, calib: data.CalibSpec, out: Path) -> dict:
    """The store builder: quantize a float copy of `loaded` with GPTQModel on the calibration rows that
    llm-compressor gets (same set, seed, order), and save the checkpoint and tokenizer."""
    gptqmodel = import_gptqmodel()
    settings = method.recipe[0]["GPTQModel"]
    rows = [row for _, row in data.calibration_rows(calib.name, calib.n_samples, calib.seq_len, calib.seed,
                                                    tokenizer=loaded.tokenizer)]
    # fp32 as for llm-compressor (GPTQModel's CPU default is bf16); no disk offload for a model in RAM
    config = gptqmodel.QuantizeConfig(**settings, offload_to_disk=False)
    loop_processor = import_gptqmodel("gptqmodel.looper.loop_processor")
    # GPTQModel prints its progress and whole configs to stdout, and writes per-layer statistics to
    # ./logs of whatever the working directory is: both go into the checkpoint, as oneshot's log does.
    # patch.object raises AttributeError if a later GPTQModel renames the folder constant.
    with open(out / LOG, "w") as log, contextlib.redirect_stdout(log), \
            mock.patch.object(loop_processor, "_PROJECT_LOG_DIR", out / LAYER_LOGS):
        model = gptqmodel.GPTQModel.load(str(loaded.path), config, dtype=torch.float32, device="cpu")
        with measure_cost() as cost:
            model.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows], batch_size=1)
        model.save(str(out))
    loaded.tokenizer.save_pretrained(out)
    del model
    size, fp32_elements = safetensors_sizes(out)
    return {**cost, "format": saved_format(out),
            "backend": "gptqmodel", "size_bytes": size, "bf16_run_bytes": size - 2 * fp32_elements,
            "gptqmodel_config": dict(settings), "log": LOG,
            "calibration_data": data.describe(calib.name)}


def load(path: str | Path, dtype: torch.dtype | str = "float32") -> PreTrainedModel:
    """A GPTQModel checkpoint through transformers (optimum + gptqmodel pick the CPU kernel)."""
    import_gptqmodel(purpose="loading a GPTQModel checkpoint")
    try:
        importlib.import_module("optimum")
    except ImportError:
        raise QkitError("transformers needs optimum to load a GPTQModel checkpoint", "pip install optimum==2.3.0"
                        ) from None
    # its log lines ("Converting GPTQ v1 to v2", kernel choice) would land in a notebook's output
    with contextlib.redirect_stdout(io.StringIO()):
        return models.load_pretrained(path, dtype=dtype)

