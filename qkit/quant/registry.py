"""The quantization methods as data: one registry, one entry per method.

llm-compressor's methods are recipe files in ``qkit/quant/recipes/``: the YAML ``oneshot(recipe=...)``
takes, with a ``qkit:`` header (title, description, native hardware, calibration need). A user's
``recipe:FILE.yaml`` is read by the same :func:`load_recipe`, so adding a method is adding a file. The
recipe, rendered back as YAML, is what goes into the cache key and the provenance, and llm-compressor
parses it into modifier objects itself. GPTQModel's and the GGUF writer's methods are entries below; each
entry names the backend that builds it (:data:`BACKENDS`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qkit.core.errors import QkitError
from qkit.quant.formats import BLOCK_TYPES, FILE_TYPES, label_of_saved

# lm_head stays in float everywhere, as in llm-compressor's examples: the output projection is the layer
# most sensitive to rounding, and small models tie it to the embeddings.
IGNORE = ("lm_head",)


@dataclass(frozen=True)
class Hardware:
    """Where a format runs on its own kernels rather than being dequantized first."""
    gpus: str
    # CUDA compute capability, comparable with torch.cuda.get_device_capability(); None: not an NVIDIA format
    min_capability: tuple[int, int] | None

    def __str__(self) -> str:
        if self.min_capability is None:
            return self.gpus
        return f"NVIDIA {self.gpus} (compute capability >= {self.min_capability[0]}.{self.min_capability[1]})"


FP8_GPUS = Hardware("Ada, Hopper, Blackwell: FP8 tensor cores", (8, 9))


INT4_GPUS = Hardware("Ampere and newer: Marlin INT4 kernels", (8, 0))


INT8_GPUS = Hardware("Ampere and newer: INT8 tensor cores", (8, 0))


FP4_GPUS = Hardware("Blackwell: FP4 tensor cores", (10, 0))


LLAMA_CPP = Hardware("CPUs, Apple Silicon and edge devices (llama.cpp)", None)


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    description: str
    recipe: tuple[dict[str, dict[str, Any]], ...]  # modifier steps of a one-stage recipe
    weight_bits: int | None  # None: not declared (a user's recipe): read from the checkpoint
    act_bits: int | None  # None: weight-only, activations stay in the model's float dtype
    group_size: int | None  # None: one scale per output channel or per tensor
    needs_calibration: bool
    native_hardware: Hardware
    expected_format: str  # compressed-tensors "format" in the saved config.json ("" if not declared)
    reload_dtype: str = "float32"
    ignore: tuple[str, ...] = IGNORE
    kv_bits: int | None = None  # None: the KV cache stays in the model's float dtype
    backend: str = "llmcompressor"  # or a key of BACKENDS
    recipe_text: str | None = None  # a recipe of another shape, as llm-compressor takes it
    in_study: bool = True  # run by the methods study by default
    source: str = ""  # the recipe file it was read from
    kind: str = "weights"  # or "kv": a KV-cache method, for the KV study

    @property
    def weight_format(self) -> str:
        """The weights' number format in the words of the seed's hardware table."""
        return label_of_saved(self.expected_format)


# Where the recipe files' `hardware:` names point.
HARDWARE: dict[str, Hardware] = {"fp8": FP8_GPUS, "int4": INT4_GPUS, "int8": INT8_GPUS, "fp4": FP4_GPUS,
                                 "llama_cpp": LLAMA_CPP}
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
# The INT4 recipes' group size (w4a16_rtn.yaml says why 64), which GPTQModel's INT4 entry matches.
INT4_GROUP = 64
RECIPE_PREFIX = "recipe:"
# The header a recipe file may carry under `qkit:`; a user's recipe without one is described by what it
# writes (format, bits and size are read from the checkpoint) and calibrated with the chosen set.
_HEADER = {"title", "description", "kind", "study", "calibration", "hardware", "weight_bits", "act_bits",
           "group_size", "format", "reload_dtype", "kv_bits"}


def _steps(recipe: dict) -> tuple[dict[str, dict[str, Any]], ...] | None:
    """A one-stage, one-group recipe as its modifier steps; None for any other shape (kept as text)."""
    if len(recipe) != 1:
        return None
    (stage,) = recipe.values()
    if not isinstance(stage, dict) or len(stage) != 1:
        return None
    (group,) = stage.values()
    if not isinstance(group, dict) or not all(isinstance(v, dict) for v in group.values()):
        return None
    return tuple({name: kwargs} for name, kwargs in group.items())


def load_recipe(path: str | Path, name: str | None = None) -> Method:
    """A method from an llm-compressor recipe file (the YAML `oneshot(recipe=...)` takes), with qkit's
    optional `qkit:` header: the built-in methods and a user's `recipe:FILE.yaml` take this one path."""
    path = Path(path).expanduser()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QkitError(f"the recipe {path} could not be read: {e.strerror}", "pass the path of a recipe YAML file"
                        ) from None
    except yaml.YAMLError as e:
        raise QkitError(f"the recipe {path} is not valid YAML: {' '.join(str(e).split())}",
                        "fix the YAML (llm-compressor's recipe format)") from None
    if not isinstance(doc, dict) or not doc:
        raise QkitError(f"the recipe {path} holds no recipe", "write stages with modifiers, as llm-compressor's "
                        "examples do (quant_stage: {quant_modifiers: {GPTQModifier: {...}}})")
    header = doc.pop("qkit", None) or {}
    unknown = sorted(set(header) - _HEADER)
    if unknown:
        raise QkitError(f"the recipe {path} has unknown qkit header fields {', '.join(unknown)}",
                        f"use {', '.join(sorted(_HEADER))}")
    text = yaml.safe_dump(doc, sort_keys=False)
    steps = _steps(doc)
    return Method(
        name=name or f"{RECIPE_PREFIX}{path.stem}", title=header.get("title", f"recipe {path.name}"),
        description=header.get("description", f"the llm-compressor recipe in {path}"),
        recipe=steps if steps is not None else (), recipe_text=None if steps is not None else text,
        weight_bits=header.get("weight_bits"), act_bits=header.get("act_bits"), group_size=header.get("group_size"),
        needs_calibration=header.get("calibration", True),
        native_hardware=HARDWARE.get(header.get("hardware"), Hardware("as its format allows", None)),
        expected_format=header.get("format", ""), reload_dtype=header.get("reload_dtype", "float32"),
        kv_bits=header.get("kv_bits"), in_study=header.get("study", True), source=str(path),
        kind=header.get("kind", "weights"))


# The recipe files, the widest weights first (then by name), as tables list them.
_RECIPES = sorted((load_recipe(p, name=p.stem) for p in RECIPE_DIR.glob("*.yaml")),
                  key=lambda m: (-(m.weight_bits or 0), m.name))
_METHODS = tuple(m for m in _RECIPES if m.kind == "weights")
_KV_METHODS = tuple(m for m in _RECIPES if m.kind == "kv")
# Who builds each method's checkpoint: a module with build(loaded, method, calib, out) -> manifest meta and
# load(path, dtype=...) -> model (see qkit.quant.methods), imported only when one of its methods runs.
BACKENDS = {"llmcompressor": "qkit.quant.backends.llmcompressor", "gguf": "qkit.quant.backends.gguf",
            "gptqmodel": "qkit.quant.backends.gptqmodel"}


def _gguf_method(file_type: str) -> Method:
    return Method(
        name=f"gguf_{file_type.lower()}", title=f"GGUF {file_type} (llama.cpp)",
        description=f"llama.cpp's {file_type}: most Linear weights in {BLOCK_TYPES[FILE_TYPES[file_type]].layout}; "
                    "the tied embeddings (and, in Q4_K_M, some attn_v and ffn_down layers) get more bits, as "
                    "llama-quantize chooses. Written from PyPI packages and read back dequantized by "
                    "transformers: the format's numerics, not llama.cpp's kernels.",
        recipe=({"gguf": {"type": file_type}},), weight_bits=int(file_type[1]), act_bits=None, group_size=32,
        needs_calibration=False, native_hardware=LLAMA_CPP, expected_format=f"gguf-{file_type.lower()}",
        ignore=(), backend="gguf")


# Not Q4_1: the default model reaches qkit as a Q4_1 GGUF, which Q4_1 would reproduce almost losslessly.
_BACKEND_METHODS = (
    Method(
        name="w4a16_gptq_gptqmodel",
        title="INT4 W4A16, GPTQ by GPTQModel",
        description="w4a16_gptq's format, group size and calibration rows, quantized by GPTQModel instead of "
                    "llm-compressor and saved in GPTQModel's GPTQ checkpoint format.",
        # damp_percent 0.01 is llm-compressor's GPTQ dampening_frac (GPTQModel's default is 0.05); GPTQModel
        # orders columns with its default group-aware reordering, llm-compressor with actorder "static".
        recipe=({"GPTQModel": {"bits": 4, "group_size": INT4_GROUP, "sym": True, "desc_act": False,
                               "damp_percent": 0.01}},),
        weight_bits=4, act_bits=None, group_size=INT4_GROUP, needs_calibration=True,
        native_hardware=INT4_GPUS, expected_format="gptq", backend="gptqmodel",
    ),
    *(_gguf_method(t) for t in ("Q8_0", "Q5_0", "Q4_0", "Q4_K_M")),
)


# The weight methods, which the methods study runs by default, and the KV-cache methods of the KV study.
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}


KV_METHODS: dict[str, Method] = {m.name: m for m in _KV_METHODS}


# Weight methods of the other backends; the methods study runs these too (STUDY_METHODS).
BACKEND_METHODS: dict[str, Method] = {m.name: m for m in _BACKEND_METHODS}


STUDY_METHODS: dict[str, Method] = {n: m for n, m in METHODS.items() if m.in_study} | BACKEND_METHODS


# A checkpoint on disk names its format, not its method; every method of one format reloads alike.
RELOAD_DTYPES: dict[str, str] = {m.expected_format: m.reload_dtype
                                  for m in _METHODS + _KV_METHODS + _BACKEND_METHODS}


def get_method(name: str) -> Method:
    """A built-in method by name, or a user's recipe file as ``recipe:PATH``."""
    if name.startswith(RECIPE_PREFIX):
        path = Path(name.removeprefix(RECIPE_PREFIX)).expanduser()
        if not path.is_file():
            raise QkitError(f"the recipe file {path} does not exist",
                            "pass recipe:PATH of an llm-compressor recipe YAML")
        return load_recipe(path, name=f"{RECIPE_PREFIX}{path.name}")
    try:
        return METHODS.get(name) or BACKEND_METHODS.get(name) or KV_METHODS[name]
    except KeyError:
        raise QkitError(f"unknown quantization method {name!r}",
                        f"use one of {', '.join(METHODS | BACKEND_METHODS | KV_METHODS)} (`qkit methods` "
                        "describes them), or recipe:FILE.yaml"
                        ) from None


def recipe_yaml(method: Method) -> str:
    """The method's recipe in llm-compressor's YAML recipe format (one stage, one modifier group), or a
    user's recipe of another shape as it was written."""
    if method.recipe_text is not None:
        return method.recipe_text
    modifiers = {name: kwargs for step in method.recipe for name, kwargs in step.items()}
    return yaml.safe_dump({"quant_stage": {"quant_modifiers": modifiers}}, sort_keys=False)
