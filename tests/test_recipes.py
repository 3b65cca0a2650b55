"""Methods as recipe files: the built-in llm-compressor methods and a user's `recipe:FILE.yaml` take one
loader, a recipe is cached by its content, and a recipe llm-compressor rejects is a one-line error."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qkit.core.errors import QkitError
from qkit.quant import registry, variants
from qkit.quant.backends import llmcompressor as backend
from qkit.quant.methods import checkpoint_spec

RTN = """quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}
"""


def test_every_builtin_recipe_file_is_a_method_with_its_header() -> None:
    files = sorted(registry.RECIPE_DIR.glob("*.yaml"))
    names = {p.stem for p in files}
    assert names == set(registry.METHODS) | set(registry.KV_METHODS)
    for path in files:
        header = yaml.safe_load(path.read_text())["qkit"]
        method = registry.get_method(path.stem)
        assert method.title == header["title"] and method.needs_calibration == header["calibration"]
        assert method.native_hardware is registry.HARDWARE[header["hardware"]]
        assert method.source == str(path) and method.recipe_text is None  # one stage: kept as steps
        assert (method.name in registry.STUDY_METHODS) == (header["study"] and header["kind"] == "weights")


def test_a_users_recipe_takes_the_builtin_path(tmp_path: Path) -> None:
    path = tmp_path / "my_rtn.yaml"
    path.write_text(RTN)
    method = registry.get_method(f"recipe:{path}")
    assert method.name == "recipe:my_rtn.yaml" and method.needs_calibration  # calibrated with the chosen set
    assert method.recipe == registry.METHODS["w4a16_rtn"].recipe  # the same steps as the built-in RTN
    assert method.weight_bits is None and method.expected_format == ""  # read from the checkpoint instead
    variants.check(f"recipe:{path}")
    two_stage = tmp_path / "two.yaml"
    two_stage.write_text(RTN + RTN.replace("quant_stage", "second_stage"))
    assert registry.get_method(f"recipe:{two_stage}").recipe_text == yaml.safe_dump(
        yaml.safe_load(two_stage.read_text()), sort_keys=False)


def test_a_recipe_is_cached_by_its_content(tmp_path: Path, tiny) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RTN)
    before = checkpoint_spec(tiny, registry.get_method(f"recipe:{path}"))
    path.write_text(RTN.replace("group_size: 64", "group_size: 32"))
    assert checkpoint_spec(tiny, registry.get_method(f"recipe:{path}"))["recipe"] != before["recipe"]


@pytest.mark.parametrize("content, expected", [
    ("a: [unclosed\n", "is not valid YAML"),
    ("", "holds no recipe"),
    ("qkit: {colour: red}\n" + RTN, "unknown qkit header fields colour"),
])
def test_bad_recipe_files_are_one_line_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(QkitError, match=expected) as e:
        registry.get_method(f"recipe:{path}")
    assert "\n" not in str(e.value)
    with pytest.raises(QkitError, match="does not exist"):
        registry.get_method(f"recipe:{tmp_path / 'missing.yaml'}")


def test_a_recipe_llmcompressor_rejects_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nonsense.yaml"
    path.write_text("quant_stage:\n  quant_modifiers:\n    NoSuchModifier: {}\n")
    with pytest.raises(QkitError, match=f"llm-compressor rejects the recipe of recipe:nonsense.yaml \\({path}\\)"
                       ".*NoSuchModifier") as e:
        backend.recipe(registry.get_method(f"recipe:{path}"))
    assert "\n" not in str(e.value)
