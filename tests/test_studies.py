import pytest

from qkit.core.errors import QkitError
from qkit.data import CalibSpec
from qkit.evaluation import EvalSpec
from qkit.quant import variants
from qkit.studies import quantization_methods as studies

SPEC = EvalSpec(n_tokens=1024, ctx=256)


@pytest.fixture(scope="module")
def rows(tiny):
    return [studies.evaluate(tiny, variants.from_method(tiny, m, calib=CalibSpec("prose", 8, 128)), SPEC)
            for m in ("fp8_dynamic", "w4a16_rtn")]


def test_rows_carry_cis_that_bracket_the_point(rows):
    for r in rows:
        for metric in ("kld_mean", "top1_pct", "delta_nll"):
            assert r[f"{metric}_low"] <= r[metric] <= r[f"{metric}_high"], metric
        assert r["ppl_quant_low"] <= r["ppl_quant"] <= r["ppl_quant_high"]
        assert r["kld_mean"] > 0 and r["reduction_vs_bf16"] > 1


def test_size_breakdown_accounts_for_every_byte_and_the_int4_weights(tiny, rows):
    from pathlib import Path

    import pandas as pd
    from safetensors import safe_open

    df = pd.DataFrame(rows)
    parts = studies.size_breakdown(df)
    for r in rows:
        total = 0
        for f in Path(r["checkpoint"]).glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                total += sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())
        assert parts.loc[r["method"]].sum() * 1e6 == pytest.approx(total, abs=0.005e6 * parts.shape[1])  # 2-decimal MB
    linear_weights = sum(m.weight.numel() for n, m in tiny.model.named_modules()
                         if type(m).__name__ == "Linear" and not n.endswith("lm_head"))
    assert parts.loc["w4a16_rtn", "quantized weights (MB)"] == pytest.approx(linear_weights / 2 / 1e6, abs=0.01)
    assert parts.loc["fp8_dynamic", "quantized weights (MB)"] == pytest.approx(linear_weights / 1e6, abs=0.01)


def test_results_table_and_methods_table(rows):
    import pandas as pd

    table = studies.results_table(pd.DataFrame(rows))
    assert list(table.index) == ["fp8_dynamic", "w4a16_rtn"]
    assert "KLD mean" in table.columns and "error" not in table.columns
    assert set(studies.methods_table().index) >= {"fp8_dynamic", "nvfp4"}


def test_one_chunk_gives_the_estimates_without_a_ci(tiny) -> None:
    import math

    from qkit import evaluation
    from qkit.quant import methods

    spec = EvalSpec(n_tokens=256, ctx=256)
    r = studies.evaluate(tiny, variants.parse(tiny, "fp8_dynamic"), spec)
    direct = evaluation.compare(methods.load_quantized(methods.quantize(tiny, "fp8_dynamic")), tiny, spec)
    assert r["kld_mean"] == pytest.approx(direct["chunk_kld"][0])
    assert r["delta_nll"] == pytest.approx(direct["chunk_nll"][0] - direct["chunk_nll_base"][0])
    assert all(math.isnan(r[f"{m}_{end}"]) for m in ("kld_mean", "top1_pct", "delta_nll") for end in ("low", "high"))


def test_a_checkpoint_directory_is_a_variant_beside_the_methods(tiny, tmp_path) -> None:
    """A compressed-tensors checkpoint made outside the study (here: a copy of one) is evaluated like a
    method, and gives the same numbers as the method whose files it holds."""
    import shutil

    from qkit.quant import methods

    ckpt = methods.quantize(tiny, "fp8_dynamic")
    mine = tmp_path / "my_checkpoint"
    shutil.copytree(ckpt.path, mine)
    theirs = studies.evaluate(tiny, variants.parse(tiny, str(mine)), SPEC)
    ours = studies.evaluate(tiny, variants.parse(tiny, "fp8_dynamic"), SPEC)
    assert theirs["method"] == "my_checkpoint" and theirs["format"] == "float-quantized"
    assert theirs["kld_mean"] == pytest.approx(ours["kld_mean"]) and theirs["size_mb"] == pytest.approx(ours["size_mb"])
    with pytest.raises(QkitError, match="neither a quantization method nor a checkpoint"):
        variants.check("./no_such_checkpoint")


def test_calibration_sizes_per_method_and_a_size_given_for_every_method() -> None:
    quick = studies.config("quick")
    assert quick.calib_for("w4a16_awq") == CalibSpec("prose", 4, 128) != quick.calib_for("w4a16_gptq")
    assert quick.calib_for("w4a16_gptq") == CalibSpec("prose", quick.samples, quick.seq_len)
    # a size the user gives holds for every method, unless they size methods too
    assert studies.config("quick", samples=64).calib_for("w4a16_awq") == CalibSpec("prose", 64, 512)
    given = studies.config("quick", seq_len=256, calib_sizes={"w4a16_gptq": [8, 64]})  # as a notebook passes it
    assert given.calib_sizes == (("w4a16_gptq", (8, 64)),) and hash(given)
    assert given.calib_for("w4a16_awq") == CalibSpec("prose", 32, 256)
    with pytest.raises(QkitError, match="unknown quantization method 'w4a16_awk'"):
        studies.config("quick", calib_sizes={"w4a16_awk": (4, 128)})
    with pytest.raises(QkitError, match="calib_sizes must pair each method with"):
        studies.config("quick", calib_sizes=[4, 128])
    with pytest.raises(QkitError, match="n_samples must be a positive integer"):
        studies.config("quick", calib_sizes={"w4a16_awq": (0, 128)})


def test_the_task_study_calibrates_its_methods_as_the_methods_study_does() -> None:
    """Same calibration, same cache key: notebook 04 reuses notebook 02's checkpoints instead of building
    them again."""
    from qkit.studies import task_sensitivity

    methods, tasks = studies.config("quick"), task_sensitivity.config("quick")
    for name in tasks.methods:
        assert tasks.calib_for(name) == methods.calib_for(name), name


def test_a_method_calibrated_on_its_own_size_is_built_once_for_both_studies(store_with_tiny, tmp_path) -> None:
    from qkit.studies import task_sensitivity

    store = store_with_tiny(tmp_path)
    sizes = {"fp8_static": (2, 32)}
    config = studies.config(model="tiny", methods=["fp8_static", "nvfp4"], samples=4, seq_len=64, calib_sizes=sizes,
                            eval_tokens=512, ctx=256, workers=1)
    res = studies.run(config, store=store)
    calibration = res.provenance()["calibration"]
    assert calibration["fp8_static"].startswith("prose, 2 x 32 tokens, seed 0")
    assert calibration["nvfp4"].startswith("prose, 4 x 64 tokens, seed 0")
    assert list(res.tables()["methods"]["calibration"]) == ["prose, 2 x 32", "prose, 4 x 64"]
    built = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())

    tasks = task_sensitivity.config(model="tiny", methods=["fp8_static"], tasks=["qkit_arithmetic"], limit=2,
                                    samples=4, seq_len=64, calib_sizes=sizes, kld_tokens=256, max_gen_toks=4,
                                    workers=1)
    scored = task_sensitivity.run(tasks, store=store)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == built
    assert scored.meta["checkpoints"]["fp8_static"] == res.rows.set_index("method").loc["fp8_static", "checkpoint"]


def test_a_rerun_whose_results_are_all_stored_loads_no_weights(store_with_tiny, tmp_path, refuse_loading) -> None:
    store = store_with_tiny(tmp_path)
    config = studies.config(model="tiny", methods=["fp8_dynamic", "w4a16_rtn"], eval_tokens=512, ctx=256, workers=1)
    first = studies.run(config, store=store)
    refuse_loading()
    again = studies.run(config, store=store)
    same = [c for c in first.rows.columns if c != "seconds"]
    assert again.rows[same].equals(first.rows[same])


def test_the_findings_say_which_methods_calibrated_on_a_size_of_their_own() -> None:
    config = studies.config("quick")
    (line,) = studies.calibration_findings(config, ["w4a16_rtn", "w4a16_awq", "w4a16_gptq", "fp8_static"])
    assert "w4a16_awq 4 x 128, fp8_static 4 x 128; the others (w4a16_gptq) 32 x 512" in line
    assert studies.calibration_findings(config, ["w4a16_rtn", "w4a16_gptq"]) == []
    assert studies.calibration_findings(studies.config("full"), ["w4a16_awq", "w4a16_gptq"]) == []
