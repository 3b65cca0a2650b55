"""Transformers' loading helpers shared by every kind of model: dtypes, quiet loads, context length,
sizes, and the tokenizer."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qkit import DEFAULT_MODEL  # noqa: E402,F401  (re-exported)
from qkit.core.errors import QkitError

_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                   "n_ctx", "max_seq_len")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def bf16_bytes(n_params: int) -> int:
    """Size of a model of `n_params` unique parameters in bf16, the reference for compression ratios."""
    return 2 * n_params


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise QkitError(f"unsupported dtype {dtype!r}", f"use one of {', '.join(_DTYPES)} or a torch.dtype")


@contextmanager
def quiet() -> Iterator[None]:
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


def check_tokenizer_files(path: Path) -> None:
    """QkitError unless `path` holds a tokenizer."""
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        raise QkitError(f"{path} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})",
                        "save the tokenizer there too: tokenizer.save_pretrained(DIR)")


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside a model in a local directory."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    check_tokenizer_files(path)
    with quiet():
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)


# Text that tells two tokenizers apart when their vocabularies look alike: digits, code, accents, a symbol.
_PROBE = "Quantization drift: 12 + 7 = 19.\ndef f(x):\n    return x ** 2  # café ✓"


def check_tokenizers(reference: Any, other: Any, other_name: str) -> None:
    """QkitError unless the two tokenizers turn text into the same ids: teacher forcing needs one text."""
    same = (reference.get_vocab() == other.get_vocab()
            and reference(_PROBE)["input_ids"] == other(_PROBE)["input_ids"])
    if not same:
        raise QkitError(f"the quantized model {other_name} has another tokenizer than the reference "
                        f"({len(other.get_vocab())} vs {len(reference.get_vocab())} tokens, or other ids "
                        "for the same text), so their per-token measures would not be comparable",
                        "pass a checkpoint quantized from the reference model (--quantized METHOD does so)")
