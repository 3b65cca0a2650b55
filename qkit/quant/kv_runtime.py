"""KV-cache quantization at run time: transformers' QuantizedCache (HQQ or quanto backends), built for a
prefill or put in a model's generation config."""
from __future__ import annotations

from typing import Any

from qkit import models
from qkit.core.errors import QkitError, lookup

# Runtime caches qkit can build: transformers' DynamicCache, and its QuantizedCache with one group per
# head vector (q_group_size 64 = SmolLM2's and Llama's head_dim), scale and zero in the compute dtype.
RUNTIME_CACHES: dict[str, dict[str, Any]] = {
    "dynamic": {},
    "hqq_int8": {"backend": "hqq", "nbits": 8},
    "hqq_int4": {"backend": "hqq", "nbits": 4},
    "quanto_int4": {"backend": "quanto", "nbits": 4},
}


Q_GROUP = 64


def make_cache(name: str, config: Any) -> Any:
    """A fresh runtime cache by name (see :data:`RUNTIME_CACHES`)."""
    from transformers import DynamicCache, QuantizedCache

    kwargs = lookup(RUNTIME_CACHES, name, "runtime cache")
    if not kwargs:
        return DynamicCache(config=config)
    try:
        return QuantizedCache(config=config, q_group_size=Q_GROUP, **kwargs)
    except ImportError as e:
        raise QkitError(f"the {name} cache needs the {kwargs['backend']} package ({e})",
                        "install qkit's dependencies again: ./scripts/setup.sh") from None


def generation_with_cache(loaded: models.LoadedModel, name: str) -> Any:
    """A fresh float copy of `loaded` that generates with the runtime cache `name` (in its generation
    config), so that `loaded.model` keeps generating with its plain cache."""
    kwargs = lookup(RUNTIME_CACHES, name, "runtime cache")
    model = models.load_pretrained(loaded.path, dtype=loaded.info["dtype"])
    model.generation_config.cache_implementation = "quantized"
    model.generation_config.cache_config = {**kwargs, "q_group_size": Q_GROUP}
    return model
