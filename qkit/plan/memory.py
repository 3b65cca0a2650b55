"""Model shapes and weight memory: how many bytes a model takes at each precision, for any model whose
config.json is at hand or that is in the small built-in table (so planning needs no download).

The KV-cache side lives in :mod:`qkit.kvcache`; the hardware advisor uses both.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qkit.core.errors import QkitError
from qkit.quant.artifacts import checkpoint_tensors
from qkit.quant.formats import WEIGHT_FORMATS

GB = 1e9  # memory figures are decimal GB, as GPU vendors quote them (an "80 GB" H100)

@dataclass(frozen=True)
class ModelShape:
    """What memory planning needs from a model's config."""

    name: str
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    max_context: int
    n_params: int | None = None

    @property
    def kv_elements_per_token(self) -> int:
        """Keys and values of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim


def builtin_shapes() -> dict[str, dict[str, Any]]:
    text = resources.files("qkit").joinpath("datafiles/model_shapes.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def shape_from_config(config: dict[str, Any], name: str = "model", n_params: int | None = None) -> ModelShape:
    """A shape from config.json fields (Llama, Qwen, Mistral, Gemma names; text_config for multimodal)."""
    config = config.get("text_config", config)
    missing = [k for k in ("num_hidden_layers", "num_attention_heads") if k not in config]
    if missing or not ("head_dim" in config or "hidden_size" in config):
        need = missing + ([] if "head_dim" in config or "hidden_size" in config else ["head_dim or hidden_size"])
        raise QkitError(f"the config of {name} lacks {', '.join(need)}, which the memory planner needs",
                        "pass the model's own config.json (a decoder-only transformer's), or a built-in name: "
                        + ", ".join(builtin_shapes()))
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return ModelShape(
        name=name, layers=int(config["num_hidden_layers"]), attention_heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        max_context=int(config.get("max_position_embeddings") or 0),
        n_params=n_params if n_params is not None else config.get("n_params"))


def shape_of(loaded: Any) -> ModelShape:
    """The shape of a model qkit has loaded (a :class:`qkit.models.LoadedModel`), named by its spec."""
    return shape_from_config(loaded.config_dict, name=loaded.spec, n_params=loaded.info["n_params"])


def get_shape(model: str | Path | dict[str, Any]) -> ModelShape:
    """A built-in name (``llama-3.1-8b``), a config.json file or model directory, or a config dict."""
    if isinstance(model, dict):
        return shape_from_config(model)
    table = builtin_shapes()
    key = str(model).lower()
    if key in table:
        return shape_from_config(table[key], name=key)
    by_hub = {v["hub_id"].lower(): k for k, v in table.items()}
    if key in by_hub:
        return shape_from_config(table[by_hub[key]], name=by_hub[key])
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        n_params = _count_safetensors(path.parent)
        return shape_from_config(config, name=str(model), n_params=n_params)
    raise QkitError(f"no model shape for {model!r}",
                    f"use a built-in name ({', '.join(table)}) or a path to a config.json or model directory")


def _count_safetensors(folder: Path) -> int | None:
    """Parameters stored next to a config.json, from the safetensors headers (no tensor is read)."""
    files = list(folder.glob("*.safetensors"))
    if not files:
        return None
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I8": 1, "U8": 1, "I32": 4, "I64": 8}
    return sum(nbytes // sizes.get(dtype, 1) for _, dtype, nbytes in checkpoint_tensors(folder))


def parse_size(text: str | float | int) -> float:
    """'70B' -> 7e10 (parameters), '135M' -> 1.35e8, '80GB' -> 8e10 (bytes); plain numbers pass through."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(B?)\s*", text.upper())
    if not m:
        raise QkitError(f"cannot read the size {text!r}", "write it like 70B, 135M, 80GB or 24GB")
    number, prefix, b = m.groups()
    if not prefix and b:  # "70B": billions
        prefix = "G"
    return float(number) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[prefix]


def weight_bytes(n_params: float, precision: str) -> float:
    """Bytes of a model's weights stored at `precision` (see :data:`qkit.quant.formats.WEIGHT_FORMATS`)."""
    if precision not in WEIGHT_FORMATS:
        raise QkitError(f"unknown weight precision {precision!r}", f"use one of {', '.join(WEIGHT_FORMATS)}")
    return n_params * WEIGHT_FORMATS[precision].bits / 8
