"""Models: a spec (a built-in name, a local directory, a .gguf file, a cached Hugging Face id) resolved to
a loaded model, its tokenizer and provenance."""
from qkit.models.builtin import BUILTINS, SMOLLM2_SOURCE, TINY_CONFIG  # noqa: F401
from qkit.models.hf import bf16_bytes, load_tokenizer, max_length, n_params  # noqa: F401
from qkit.models.loader import (  # noqa: F401
    DEFAULT_MODEL,
    LoadedModel,
    fingerprint,
    load_pretrained,
    locate,
    resolve_model,
)
