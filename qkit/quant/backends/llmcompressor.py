"""llm-compressor as a backend: a registry method's recipe through `oneshot`, saved as a compressed-tensors
checkpoint, and reloaded with `from_pretrained`; with the workarounds llm-compressor 0.14 needs on a CPU.

llm-compressor is imported only where a recipe is built or run: a cold import took 15-25 s on a busy
2-core machine, and a cache hit or `qkit methods` should not pay that."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qkit import data, models
from qkit.core.errors import QkitError
from qkit.data import CalibSpec
from qkit.quant.artifacts import measure_cost, safetensors_sizes, saved_format
from qkit.quant.registry import RECIPE_PREFIX, RELOAD_DTYPES, Method, recipe_yaml

if TYPE_CHECKING:
    from llmcompressor.modifiers import Modifier
    from transformers import PreTrainedModel


def recipe(method: Method) -> list[Modifier]:
    """The modifier objects for `oneshot`, parsed by llm-compressor from `recipe_yaml(method)`, so the
    YAML recorded in the cache key and provenance is exactly what runs."""
    _quiet_llmcompressor()
    from llmcompressor.recipe import Recipe

    try:
        return Recipe.create_instance(recipe_yaml(method)).modifiers
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # pydantic's ValidationError is a ValueError
        message = " ".join(str(e).split()).rstrip(".")
        raise QkitError(f"llm-compressor rejects the recipe of {method.name} ({method.source or 'built in'}): "
                        f"{message[:300]}", "fix the recipe; llm-compressor's examples show each modifier's "
                        "arguments") from None


def build(loaded: models.LoadedModel, method: Method, calib: CalibSpec | None, out: Path) -> dict:
    """Run `method`'s recipe with `oneshot` on a fresh float copy of `loaded` and save the compressed-tensors
    checkpoint in `out`; returns the manifest's meta (cost, format, sizes, calibration data)."""
    dataset = (data.calibration_set(calib.name, calib.n_samples, calib.seq_len, calib.seed,
                                    tokenizer=loaded.tokenizer) if calib else None)
    modifiers = recipe(method)
    from llmcompressor import oneshot

    # A fresh copy, because oneshot rewrites the model in place; fp32, because bf16 matmuls were 2-6x
    # slower on the AVX2 CPUs qkit was built on. Remote code was trusted already to load `loaded`.
    model = models.load_pretrained(loaded.path, dtype="float32",
                                   trust_remote_code=bool(getattr(loaded.model.config, "auto_map", None)))
    calib_args = ({"max_seq_length": calib.seq_len, "num_calibration_samples": calib.n_samples,
                   # the calibration set is already a seeded sample: no second, unseeded shuffle
                   "shuffle_calibration_samples": False} if calib else {})
    with _oneshot_log(out / "oneshot.log"), cpu_without_pinning(), _forget_fx_wraps(), measure_cost() as cost:
        try:
            oneshot(model=model, tokenizer=loaded.tokenizer, recipe=modifiers, dataset=dataset, **calib_args)
        except ValueError as e:
            # A modifier checks some arguments only when oneshot starts it: for a user's recipe that is
            # the recipe's fault, said in one line; for a built-in one it is qkit's, and the trace stays.
            if method.name.startswith(RECIPE_PREFIX):
                message = " ".join(str(e).split())[:300].rstrip(".")
                raise QkitError(f"llm-compressor rejects the recipe {method.source}: {message}",
                                "fix the recipe; llm-compressor's examples show each modifier's arguments") from None
            raise
    with warnings.catch_warnings():
        # oneshot leaves an hf_device_map saying "cpu", so transformers warns about offloaded modules
        # although the whole model is in RAM.
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(out, save_compressed=True)
    loaded.tokenizer.save_pretrained(out)
    del model
    _release()
    size, fp32_elements = safetensors_sizes(out)
    return {**cost, "format": saved_format(out), "size_bytes": size, "bf16_run_bytes": size - 2 * fp32_elements,
            "log": "oneshot.log", "calibration_data": data.describe(calib.name) if calib else None}


def _release() -> None:
    """Give back the quantized copy's memory once the caller dropped it: llm-compressor's session holds the
    model until the next oneshot, and glibc keeps freed pages unless asked to trim."""
    from llmcompressor.core import active_session

    active_session().reset()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _forget_fx_wraps() -> Iterator[None]:
    """Drop what torch.fx.wrap registered during the block.

    llm-compressor's sequential pipeline re-executes each traced forward in a copy of its module's
    globals holding ``self`` (the model), and torch.fx.wrap keeps every such namespace in the global
    ``torch.fx._symbolic_trace._wrapped_fns_to_patch`` for good. Each oneshot's model copy stayed alive
    through it: a calibration sweep on SmolLM2 grew ~0.85 GB per run.
    """
    from torch.fx import _symbolic_trace

    registry = _symbolic_trace._wrapped_fns_to_patch
    before = set(registry)
    try:
        yield
    finally:
        for key in set(registry) - before:
            del registry[key]


@functools.cache
def _quiet_llmcompressor() -> None:
    """Keep llm-compressor's console to errors. It logs INFO and METRIC lines for every layer, and on a
    machine without GPU warns "No accelerator available!" while importing and at every device lookup.
    It configures its console from LLM_COMPRESSOR_LOG_LEVEL at import, so this must run before the
    first import; a level the user set wins. The full log goes into each checkpoint (_oneshot_log)."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    from llmcompressor.logger import configure_logger

    configure_logger()  # for when llm-compressor was imported before the level was set


@contextlib.contextmanager
def _oneshot_log(logfile: Path) -> Iterator[None]:
    from loguru import logger

    sink = logger.add(logfile, level="INFO")
    try:
        yield
    finally:
        logger.remove(sink)


@contextlib.contextmanager
def cpu_without_pinning() -> Iterator[None]:
    """Make llm-compressor's activation-cache pinning a no-op when there is no accelerator.

    llm-compressor 0.14's AWQModifier pins its cached activations for faster host-to-GPU copies
    (`IntermediatesCache.pin_memory`, which calls `Tensor.pin_memory()` in `_pin_intermediate`,
    llmcompressor/pipelines/cache.py). Without an accelerator torch raises "Cannot access accelerator
    device when none is available". Pinning changes no value, so skipping it on CPU is safe.
    """
    if torch.accelerator.is_available():
        yield
        return
    from unittest import mock

    from llmcompressor.pipelines.cache import IntermediatesCache

    # patch.object raises AttributeError if upstream renames the method: then this workaround needs a look.
    with mock.patch.object(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None):
        yield


def load(path: Path, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """Reload a compressed-tensors checkpoint, in its format's reload dtype unless `dtype` says otherwise."""
    return models.load_pretrained(path, dtype=dtype or RELOAD_DTYPES.get(saved_format(path), "float32"))
