"""What every study compares against the baseline: a variant of the base model.

A :class:`Variant` has a label (how tables name it), a cache identity (what the store keys its results
by), a loader that runs on first use only (a run whose results are all cached loads nothing) and what is
known of it for provenance. :func:`parse` is the one place a string becomes a variant, so that every
study, notebook parameter and CLI option accepts the same things: a registry method, or a directory
holding a checkpoint (compressed-tensors or a float model) whose tokenizer matches the base model's.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkit import models
from qkit.core.errors import QkitError
from qkit.core.store import Store
from qkit.data import CalibSpec
from qkit.models.hf import check_tokenizers
from qkit.quant import methods, registry
from qkit.quant.kv_runtime import generation_with_cache

BASELINE = "baseline"


@dataclass
class Variant:
    label: str
    identity: str  # part of every store key of its results: a checkpoint's entry name, "float", ...
    load: Callable[[], Any] = field(repr=False)
    checkpoint: methods.Checkpoint | None = field(default=None, repr=False)
    info: dict = field(default_factory=dict)  # what it is, for tables and provenance
    _model: Any = field(default=None, init=False, repr=False)

    @property
    def model(self) -> Any:
        """The model, loaded on first use and kept."""
        if self._model is None:
            self._model = self.load()
        return self._model


def baseline(loaded: models.LoadedModel) -> Variant:
    """The float model itself."""
    return Variant(BASELINE, "float", lambda: loaded.model, info={"kind": "baseline", "spec": loaded.spec})


def from_method(loaded: models.LoadedModel, method: str | registry.Method, *, calib: CalibSpec | None = None,
                store: Store | None = None) -> Variant:
    """A registry method's checkpoint of `loaded`, built (or read back) from the store."""
    ckpt = methods.quantize(loaded, method, calib=calib, store=store)
    return Variant(ckpt.method.name, ckpt.path.name, lambda: methods.load_quantized(ckpt), ckpt,
                   {"kind": "method", "method": ckpt.method.name, "checkpoint": str(ckpt.path)})


def from_directory(loaded: models.LoadedModel, path: str | Path) -> Variant:
    """A checkpoint directory made elsewhere: compressed-tensors (it names a `quantization_config`) or a
    float model; refused before any work when its tokenizer is not the base model's."""
    path = Path(path).expanduser()
    check_tokenizers(loaded.tokenizer, models.load_tokenizer(path), str(path))
    quantized = "quantization_config" in json.loads((path / "config.json").read_text())
    return Variant(str(path), models.fingerprint(str(path)),
                   lambda: methods.load_quantized(path) if quantized else models.load_pretrained(path),
                   info={"kind": "directory", "path": str(path), "quantized": quantized})


def with_kv_cache(loaded: models.LoadedModel, cache: str, label: str | None = None) -> Variant:
    """The float model generating with one of transformers' quantized runtime KV caches (a fresh copy,
    so that the baseline keeps its plain cache)."""
    return Variant(label or cache, f"float/{cache}", lambda: generation_with_cache(loaded, cache),
                   info={"kind": "runtime KV cache", "cache": cache})


def check(spec: str) -> None:
    """The QkitError :func:`parse` would raise for `spec` before it builds anything, so that a study fails on
    a typo before minutes of work."""
    if Path(spec).expanduser().is_dir():
        return
    if "/" in spec or spec.startswith("."):
        raise QkitError(f"{spec!r} is neither a quantization method nor a directory",
                        "pass a method from `qkit methods` or the path of a checkpoint directory")
    registry.get_method(spec)


def parse(loaded: models.LoadedModel, spec: str, *, calib: CalibSpec | None = None,
          store: Store | None = None) -> Variant:
    """A variant from what a user typed: a registry method or a checkpoint directory."""
    check(spec)
    if Path(spec).expanduser().is_dir():
        return from_directory(loaded, spec)
    return from_method(loaded, spec, calib=calib, store=store)
