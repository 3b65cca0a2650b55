"""The upgrade canary on the tiny model: a rerun in the same environment reproduces its record exactly,
a change of numerics under the same checkpoint shows, with the environment difference named, and a
record that does not belong to the check is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch

from qkit import cli
from qkit.core import provenance
from qkit.core.errors import QkitError
from qkit.core.store import Store
from qkit.data import request_log
from qkit.evaluation import canary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = canary.CanaryConfig(max_new_tokens=16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Where records go; the models come from the tests' shared cache, where `tiny` is built once."""
    return Store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """12 of the sample prompts: arithmetic (checkable), prose, code and chat."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(request_log.SAMPLE_PROMPTS.read_text().splitlines(keepends=True)[:12]))
    return path


@pytest.fixture(scope="module")
def recorded(prompts):
    return canary.make_record(canary.deployment(canary.identify("tiny", prompts=prompts)), CONFIG)


def test_record_holds_outputs_logprobs_topk_correctness_and_environment(recorded):
    assert recorded["format"] == canary.RECORD.version and len(recorded["prompts"]) == 12
    first = recorded["prompts"][0]
    assert len(first["output_ids"]) == len(first["logprobs"]) == len(first["topk_ids"]) <= 16
    assert all(len(k) == CONFIG.top_k for k in first["topk_ids"])
    # Greedy: each recorded token is its position's most likely one.
    assert [k[0] for k in first["topk_ids"]] == first["output_ids"]
    assert {p["correct"] for p in recorded["prompts"] if p["correct"] is not None} <= {0.0, 1.0}
    assert sum(p["correct"] is not None for p in recorded["prompts"]) >= 2
    env = recorded["environment"]
    assert env["dtype"] == "float32" and env["device"] == "cpu" and env["libraries"]["torch"]


def test_unchanged_environment_reproduces_the_record_and_does_not_alert(recorded, prompts):
    result = canary.check_record(recorded, canary.deployment(canary.identify("tiny", prompts=prompts)),
                                 canary.ANY_CHANGE)
    assert not result.alert and result.changed == []
    m = result.measures.set_index("measure")["value"]
    assert m["exact match"] == 1.0 and m["top-1 agreement"] == 1.0 and m["KLD (nats/token)"] == 0.0
    assert m["log-prob shift (nats/token)"] == 0.0 and m["accuracy change"] == 0.0


def test_bfloat16_against_a_float32_record_shows_and_names_the_dtype(recorded, prompts):
    result = canary.check_record(recorded, canary.deployment(canary.identify("tiny", prompts=prompts), "bfloat16"))
    assert result.changed == ["dtype: float32 → bfloat16"]
    kld = result.measures.set_index("measure").loc["KLD (nats/token)"]
    assert 0 < kld["low"] <= kld["value"] < canary.Thresholds().kld  # moved, but by float rounding only
    assert not result.alert
    strict = canary.summarize(result.per_prompt, canary.ANY_CHANGE)
    assert strict.set_index("measure").loc["KLD (nats/token)", "alert"]


def test_an_upgrade_that_perturbs_the_weights_alerts_and_names_the_library(recorded, prompts, monkeypatch):
    dep = canary.deployment(canary.identify("tiny", prompts=prompts))
    versions = provenance.library_versions()
    monkeypatch.setattr(provenance, "library_versions", lambda: {**versions, "transformers": "99.0"})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what a broken kernel of the new version would compute
        for module in dep.model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(0.5 * module.weight.std() * torch.randn(module.weight.shape, generator=g))
    result = canary.check_record(recorded, dep)
    assert result.changed == [f"libraries.transformers: {versions['transformers']} → 99.0"]
    assert result.alert, result.measures
    shift = result.measures.set_index("measure").loc["log-prob shift (nats/token)"]
    assert shift["alert"] and shift["high"] < 0


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_record_then_check(capsys, prompts, tmp_path):
    rec = tmp_path / "canary.json"
    base = ("drift", "canary", "record", "--model", "tiny", "--prompts", prompts, "--record", rec)
    code, out, err = run_cli(capsys, *base, "--max-new-tokens", 8)
    assert code == 0 and str(rec) in out, err
    check = ("drift", "canary", "check", "--model", "tiny", "--prompts", prompts, "--record", rec)
    code, out, err = run_cli(capsys, *check)
    assert code == 0 and "environment changed: nothing" in out and "ALERT" not in out, out
    code, out, err = run_cli(capsys, *check, "--dtype", "bfloat16", "--any-change")
    assert code == 1 and "dtype: float32 → bfloat16" in out and "ALERT" in out, out


@pytest.mark.parametrize("case", ["other prompts", "other variant", "older format", "no usable prompt", "no record",
                                  "dtype of a variant"])
def test_cli_bad_input_is_one_line_with_the_fix(capsys, case, prompts, recorded, tmp_path):
    rec = tmp_path / "canary.json"
    saved = {**recorded, "format": 0} if case == "older format" else recorded
    if case != "no record":
        rec.write_text(json.dumps(saved))
    argv = ["--model", "tiny", "--prompts", prompts, "--record", rec]
    if case == "other prompts":
        other = tmp_path / "other.jsonl"
        other.write_text(prompts.read_text().splitlines(keepends=True)[0])
        argv[3] = other
    elif case == "other variant":
        argv += ["--variant", "w4a16_rtn"]
    elif case == "no usable prompt":
        argv[3] = tmp_path / "empty.jsonl"
        argv[3].write_text("not json\n{}\n")
    elif case == "dtype of a variant":
        argv += ["--variant", "w4a16_rtn", "--dtype", "bfloat16"]
    command = "record" if case == "dtype of a variant" else "check"
    code, out, err = run_cli(capsys, "drift", "canary", command, *argv)
    errors = [line for line in err.splitlines() if line.startswith("qkit: error: ")]
    assert code == 2 and len(errors) == 1 and "Fix: " in errors[0], err
    expected = {"other prompts": "another prompt set", "other variant": "another variant",
                "older format": "format 0", "no usable prompt": "no usable prompt", "no record": "no canary record",
                "dtype of a variant": "--dtype applies to the model itself"}[case]
    assert expected in errors[0], errors[0]


def test_a_record_of_another_model_is_refused(recorded, prompts, tmp_path):
    path = tmp_path / "r.json"
    other = {**recorded, "identity": {**recorded["identity"], "model": "builtin:smollm2-135m:x"},
             "names": {**recorded["names"], "model": "smollm2-135m"}}
    path.write_text(json.dumps(other))
    with pytest.raises(QkitError, match=r"another model \(smollm2-135m\) than this check names \(tiny\)"):
        canary.load_record(canary.identify("tiny", prompts=prompts), path)


def test_the_default_record_lives_in_the_store_by_model_variant_and_prompts(recorded, prompts, store):
    path = canary.save_record(recorded, store=store)
    assert path.is_relative_to(store.root / canary.RECORD.name)
    assert canary.load_record(canary.identify("tiny", prompts=prompts), store=store) == (recorded, path)
