"""Quantize a model with any registry method and cache the checkpoint in the store; reload it.

`quantize` hands each method to its backend (:data:`qkit.quant.registry.BACKENDS`: llm-compressor,
GPTQModel, GGUF), which all keep one protocol: `build(loaded, method, calib, out) -> manifest meta` and
`load(path, dtype) -> model`."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qkit import data, models
from qkit.core.store import Kind, Store
from qkit.data import CalibSpec
from qkit.quant.registry import BACKENDS, Method, get_method, recipe_yaml

CHECKPOINT = Kind("checkpoint", 1)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    method: Method
    size_bytes: int  # the safetensors files on disk
    # The same files had oneshot run in BF16, as on a GPU: qkit quantizes an fp32 copy, so the tensors left
    # unquantized (embeddings, norms, float scales) are stored in fp32; here they count 2 bytes each.
    bf16_run_bytes: int
    seconds: float  # oneshot alone, when the entry was built (not loading or saving)
    bf16_bytes: int  # the float model's size in BF16: unique parameters x 2
    meta: dict

    @property
    def bf16_ratio(self) -> float:
        """Checkpoint size relative to the same model in BF16, the usual reference, both as on a GPU."""
        return self.bf16_run_bytes / self.bf16_bytes


def quantize(loaded: models.LoadedModel, method: Method | str, *, calib: CalibSpec | None = None,
             store: Store | None = None) -> Checkpoint:
    """Build `method`'s checkpoint of `loaded` with its backend and cache it in the store (or read it back).
    Methods that need calibration get `CalibSpec()` unless told otherwise; the others ignore `calib`, and it
    is not part of their cache key."""
    method = get_method(method) if isinstance(method, str) else method
    store = store if store is not None else Store()
    calib = (calib or CalibSpec()) if method.needs_calibration else None
    if calib is not None:
        data.check_seq_len(calib.seq_len, loaded.info["max_length"])
    path = store.get_dir(CHECKPOINT, checkpoint_spec(loaded, method, calib),
                         lambda tmp: backend(method.backend).build(loaded, method, calib, tmp))
    meta = Store.manifest(path)["meta"]
    return Checkpoint(path=path, method=method, size_bytes=meta["size_bytes"],
                      bf16_run_bytes=meta["bf16_run_bytes"], seconds=meta["seconds"],
                      bf16_bytes=models.bf16_bytes(loaded.info["n_params"]), meta=meta)


def checkpoint_spec(loaded: models.LoadedModel, method: Method | str, calib: CalibSpec | None = None) -> dict:
    """The store key of `method`'s checkpoint of `loaded`: calibration belongs to it only where it is used."""
    method = get_method(method) if isinstance(method, str) else method
    calib = (calib or CalibSpec()) if method.needs_calibration else None
    return {"model": loaded.info["fingerprint"], "method": method.name, "recipe": recipe_yaml(method),
            "calibration": calib.key() if calib else None}


def load_quantized(checkpoint: Checkpoint | str | Path, *,
                   dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """Reload a checkpoint on CPU for evaluation, in eval mode, through the backend that built it, in the
    dtype its format reloads in (bfloat16 for NVFP4, float32 otherwise) unless `dtype` says otherwise."""
    path = Path(checkpoint.path if isinstance(checkpoint, Checkpoint) else checkpoint)
    return backend(_saved_backend(path)).load(path, **({"dtype": dtype} if dtype is not None else {}))


def backend(name: str) -> Any:
    """The backend module called `name` (a key of :data:`BACKENDS`), imported on first use."""
    return importlib.import_module(BACKENDS[name])


def _saved_backend(path: Path) -> str:
    """The backend that built a store checkpoint, from its manifest (llm-compressor for older entries and
    for directories from elsewhere)."""
    try:
        return Store.manifest(path)["meta"].get("backend", "llmcompressor")
    except (OSError, ValueError, KeyError, TypeError):
        return "llmcompressor"
