"""What every study compares against the baseline: a variant of the base model.

A :class:`Variant` has a label (how tables name it), a cache identity (what the store keys its results
by), a loader that runs on first use only (a run whose results are all cached loads nothing) and what is
known of it for provenance. :func:`parse` is the one place a string becomes a variant, so that every
study, notebook parameter and CLI option accepts the same things: a registry method, a user's
``recipe:FILE.yaml``, or a checkpoint made elsewhere (a directory in compressed-tensors, GPTQ, AWQ or
float; a .gguf file; a Hugging Face id in the local cache) whose architecture and tokenizer are the base
model's.
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


def method_identity(loaded: models.LoadedModel, method: str, calib: CalibSpec | None, store: Store) -> str:
    """The identity :func:`from_method`'s variant has, known without building its checkpoint."""
    return store.key(methods.CHECKPOINT, methods.checkpoint_spec(loaded, method, calib))


# What a checkpoint's config.json names as its quant_method, and who reloads it.
RELOADERS = {"compressed-tensors": "llmcompressor", "gptq": "gptqmodel", "awq": "gptqmodel"}


def check_architecture(loaded: models.LoadedModel, config: dict, name: str) -> None:
    """QkitError unless `config` (a checkpoint's config.json) has the base model's shape: a variant of
    another model would be compared token by token against the wrong one."""
    base = loaded.config_dict
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    differ = [f"{k} {config.get(k)} vs {base.get(k)}" for k in keys if config.get(k) != base.get(k)]
    if differ:
        raise QkitError(f"{name} is not a variant of the base model {loaded.spec}: {'; '.join(differ)}",
                        "pass a checkpoint made from the model given as --model, or that model as --model")


def from_directory(loaded: models.LoadedModel, path: str | Path, label: str | None = None) -> Variant:
    """A checkpoint directory made elsewhere: compressed-tensors (llm-compressor), GPTQ or AWQ in the
    Hugging Face format (reloaded through GPTQModel and optimum), or a float model (a fine-tune, a distilled
    model). Refused before any work when its architecture or its tokenizer is not the base model's."""
    path = Path(path).expanduser().resolve()
    identity = models.fingerprint(str(path))  # a directory without config.json or safetensors fails here
    config = json.loads((path / "config.json").read_text())
    check_architecture(loaded, config, str(path))
    check_tokenizers(loaded.tokenizer, models.load_tokenizer(path), str(path))
    quant = config.get("quantization_config")
    method = (quant or {}).get("quant_method")
    if quant is not None and method not in RELOADERS:
        raise QkitError(f"{path} is quantized with quant_method {method!r}, which qkit cannot reload",
                        f"pass a checkpoint in one of {', '.join(RELOADERS)}, or a float model")
    reload = (lambda: methods.backend(RELOADERS[method]).load(path)) if quant else (
        lambda: models.load_pretrained(path))
    return Variant(label or path.name, identity, reload,
                   info={"kind": "directory", "path": str(path), "quantized": quant is not None,
                         "quant_method": method})


def from_gguf(loaded: models.LoadedModel, path: str | Path, store: Store | None = None) -> Variant:
    """A llama.cpp GGUF file of the base model, read back (dequantized) as the GGUF model path reads it."""
    path = Path(path).expanduser().resolve()
    gguf = models.resolve_model(str(path), store=store)
    config = json.loads((gguf.path / "config.json").read_text())
    check_architecture(loaded, config, str(path))
    check_tokenizers(loaded.tokenizer, gguf.tokenizer, str(path))
    return Variant(path.name, gguf.info["fingerprint"], lambda: gguf.model,
                   info={"kind": "gguf", "path": str(path), "file": str(path), "quantized": True,
                         "converted": str(gguf.path)})


def with_kv_cache(loaded: models.LoadedModel, cache: str, label: str | None = None) -> Variant:
    """The float model generating with one of transformers' quantized runtime KV caches (a fresh copy,
    so that the baseline keeps its plain cache)."""
    return Variant(label or cache, f"float/{cache}", lambda: generation_with_cache(loaded, cache),
                   info={"kind": "runtime KV cache", "cache": cache})


def is_method(spec: str) -> bool:
    """Whether `spec` names a method (built in, or recipe:FILE) rather than a checkpoint."""
    return spec.startswith(registry.RECIPE_PREFIX) or any(
        spec in table for table in (registry.METHODS, registry.BACKEND_METHODS, registry.KV_METHODS))


def spec_key(spec: str) -> Any:
    """What identifies the answers of a method or a checkpoint, without loading it: the method's name and
    recipe (its checkpoint's own key holds the library versions, which a record made before an upgrade
    must not), or the checkpoint's content fingerprint."""
    if not is_method(spec):
        return models.fingerprint(spec)
    method = registry.get_method(spec)
    return {"method": method.name, "recipe": registry.recipe_yaml(method)}


def check(spec: str) -> None:
    """The QkitError :func:`parse` would raise for `spec` before it builds anything, so that a study fails on
    a typo before minutes of work."""
    if spec.startswith(registry.RECIPE_PREFIX):
        registry.get_method(spec)
    elif not is_method(spec):
        if not ("/" in spec or spec.startswith(".") or spec.endswith(".gguf") or spec in models.BUILTINS
                or Path(spec).expanduser().exists()):
            registry.get_method(spec)  # a name, not a path: "unknown quantization method", with the list
        try:
            models.locate(spec)
        except QkitError:
            raise QkitError(f"{spec!r} is neither a quantization method nor a checkpoint (a directory, a .gguf "
                            "file or a Hugging Face id in the local cache)",
                            "pass a method from `qkit methods`, recipe:FILE.yaml, or a checkpoint's path") from None


def parse(loaded: models.LoadedModel, spec: str, *, calib: CalibSpec | None = None,
          store: Store | None = None) -> Variant:
    """A variant from what a user typed: a registry method, recipe:FILE.yaml, a checkpoint directory, a
    .gguf file, or a Hugging Face id in the local cache."""
    check(spec)
    if is_method(spec):
        return from_method(loaded, spec, calib=calib, store=store)
    kind, path = models.locate(spec)
    if kind == "gguf":
        return from_gguf(loaded, path, store=store)
    if kind == "builtin":
        raise QkitError(f"{spec!r} is a base model, not a variant of one", "pass it as --model instead")
    return from_directory(loaded, path, label=spec if kind == "hub" else None)
