"""Layer sensitivity: the knapsack against brute force, units and swaps against real checkpoints, the exported
recipe through llm-compressor, additivity on `tiny`, and the one-line errors."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qkit.core.errors import QkitError
from qkit.core.store import Store
from qkit.quant import methods, mixed, registry
from qkit.studies import layer_sensitivity as L
from qkit.studies import quantization_methods


def brute_force(sizes: np.ndarray, costs: np.ndarray, budget: float) -> float:
    best = np.inf
    for picks in itertools.product(range(sizes.shape[1]), repeat=len(sizes)):
        idx = np.arange(len(sizes)), np.array(picks)
        if sizes[idx].sum() <= budget:
            best = min(best, costs[idx].sum())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_knapsack_finds_the_brute_force_optimum(seed) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 20, size=(6, 3)).astype(float)
    costs = rng.gamma(1.0, 1.0, size=(6, 3))
    budget = float(rng.integers(int(sizes.min(1).sum()), int(sizes.max(1).sum()) + 1))
    picks = mixed.solve(sizes, costs, budget)
    idx = np.arange(6), np.array(picks)
    assert sizes[idx].sum() <= budget
    assert costs[idx].sum() == pytest.approx(brute_force(sizes, costs, budget))


def test_the_knapsack_on_a_known_case_and_its_errors() -> None:
    # Three units, formats (small lossy, large lossless): the budget affords one large unit, and the unit
    # whose small format costs most should get it.
    sizes = np.array([[1, 3], [1, 3], [1, 3]], float)
    costs = np.array([[0.1, 0], [0.5, 0], [0.2, 0]])
    assert mixed.solve(sizes, costs, 5) == [0, 1, 0]
    assert mixed.solve(sizes, costs, 9) == [1, 1, 1]
    with pytest.raises(QkitError, match="below the smallest mix"):
        mixed.solve(sizes, costs, 2)
    # Large sizes take steps of budget/grid, rounded up: the answer still fits.
    big = sizes * 1e6 + np.array([[7, 11]])
    picks = mixed.solve(big, costs, 5.1e6, grid=64)
    assert big[np.arange(3), picks].sum() <= 5.1e6


def test_units_and_unit_errors(tiny) -> None:
    names = list(mixed.linear_shapes(tiny.model))
    every = mixed.units(names, ("layers", "types", "modules"))
    layers = [u for u in every if u.startswith("layer ")]
    types = [u for u in every if u.startswith("type ")]
    modules = [u for u in every if "." in u]
    assert len(layers) * 7 == len(types) * len(layers) == len(modules)
    assert sorted(every["type v_proj"]) == sorted(m for m in modules if m.endswith("v_proj"))
    assert not any("lm_head" in m for m in modules)
    named = mixed.units(names, ("layer 2", "type v_proj", modules[0]))
    assert named == {"layer 2": every["layer 2"], "type v_proj": every["type v_proj"], modules[0]: (modules[0],)}
    with pytest.raises(QkitError, match=r"no unit 'type w_proj', 'layer 9' in the model.*Fix: name a kind "
                                        r"\(layers, types, modules\), 'layer N' \(0-3\).*down_proj, gate_proj"):
        mixed.units(names, ["layers", "type w_proj", "layer 9"])


def test_formats_that_cannot_be_applied_per_module_are_refused() -> None:
    assert mixed.weight_group(registry.get_method("w4a16_rtn"))["num_bits"] == 4
    for name, why in (("w4a16_gptq", "calibrated across layers"), ("fp8_dynamic", "quantizes activations"),
                      ("gguf_q4_k_m", "not one llm-compressor modifier group")):
        with pytest.raises(QkitError, match=f"{name} cannot be applied per module: .*{why}.*w4a16_rtn"):
            mixed.weight_group(registry.get_method(name))


@pytest.mark.parametrize("overrides, match", [
    ({"format": "w4a16_gptq"}, "cannot be applied per module"),
    ({"budgets": (3.0,)}, "budget 3 bits per weight is outside"),
    ({"budgets": (17.0,)}, "budget 17 bits per weight is outside"),
    ({"targets": ("chat",)}, "search target chat is not among the texts"),
    ({"texts": ("novel",), "targets": ()}, "novel"),
    ({"prune": 4}, "prune=4 needs modules among the units"),
    ({"units": ("layers", "q_proj")}, r"no unit 'q_proj' in the model.*'type T' with T one of down_proj"),
    ({"prune": -1, "units": ("modules",)}, "prune=-1 is negative"),
])
def test_bad_configs_fail_before_any_work(overrides, match) -> None:
    with pytest.raises(QkitError, match=match):
        L.run(L.config(model="tiny", **overrides))


def test_dequantized_weights_swapped_in_give_the_checkpoints_logits(tiny, tmp_path) -> None:
    """The scan's premise: the float model with a checkpoint's dequantized weights is that checkpoint."""
    ckpt = methods.quantize(tiny, "w4a16_rtn", store=Store(tmp_path))
    weights = mixed.dequantized_weights(ckpt)
    assert set(weights) == set(mixed.linear_modules(tiny.model))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    copy = mixed.float_copy(tiny.model)
    before = copy.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.inference_mode():
        with mixed.swapped(copy, weights) as swapped:
            ours = swapped(ids).logits
        theirs = methods.load_quantized(ckpt)(ids).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    assert torch.equal(copy.model.layers[0].self_attn.q_proj.weight, before)  # restored


# The notebook test runs the same config, and finds it in the shared test cache.
TINY = {"model": "tiny", "units": ["types"], "reverse": [], "texts": ["prose"], "eval_tokens": 512, "ctx": 128,
        "budgets": [5.0], "anchors": ["w4a16_rtn", "w8a16_rtn"], "samples": 4, "seq_len": 64}


@pytest.mark.slow
def test_the_study_on_tiny_its_recipe_round_trips_and_unit_klds_add_up(tiny, monkeypatch, refuse_loading) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    store = Store()
    cfg = L.config(**TINY, targets=TINY["texts"])
    res = L.run(cfg, store=store)
    assert len(res.scan) == 7 and (res.scan["kld_low"] <= res.scan["kld_mean"]).all()
    (mix,) = res.mixes.to_dict("records")
    assert mix["bits"] <= 5.0 and mix["w4a16_rtn units"] + mix["w8a16_rtn units"] + mix["float units"] == 7
    # The exported recipe went through llm-compressor; its checkpoint reloads and its config validates.
    (checkpoint,) = res.mix_rows["checkpoint"]
    mixed_cfg = json.loads((Path(checkpoint) / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(mixed_cfg)
    assert methods.load_quantized(checkpoint) is not None
    bits = {g["weights"]["num_bits"] for g in mixed_cfg["config_groups"].values()}
    assert bits == {4, 8}
    # Additivity: the sum of the module types' KLDs against the whole model in the format, within 2x.
    whole = res.anchor_rows.set_index("method").loc["w4a16_rtn", "kld_mean"]
    assert 0.5 < res.scan["kld_mean"].sum() / whole < 2.0
    add = res.additivity()
    assert len(add) == 1 and 0.5 < add["predicted_kld"].iloc[0] / add["kld_mean"].iloc[0] < 2.0
    # The mix sits between the uniform formats in size and in KLD.
    pareto = res.pareto().set_index("method")
    assert pareto.loc["w4a16_rtn", "bf16_run_mb"] < pareto.loc[mix["mix"], "bf16_run_mb"] < pareto.loc[
        "w8a16_rtn", "bf16_run_mb"]
    assert pareto.loc["w8a16_rtn", "kld_mean"] < pareto.loc[mix["mix"], "kld_mean"] < pareto.loc["w4a16_rtn", "kld_mean"]
    assert res.findings() and res.summary().best == mix["mix"]
    assert set(res.figures()) >= {"layer x module type", "size against KLD"}
    # A rerun computes nothing: every comparison comes from the store.
    def never(*args, **kwargs):
        raise AssertionError("a cached comparison was computed again")

    monkeypatch.setattr(L, "compare", never)
    monkeypatch.setattr(quantization_methods, "compare", never)
    refuse_loading()
    again = L.run(cfg, store=store)
    assert again.scan.drop(columns="chunk_kld").equals(res.scan.drop(columns="chunk_kld"))
    pd.testing.assert_frame_equal(again.sizes, res.sizes)


def test_the_rank_check_is_spearmans_rho_per_text_and_kind() -> None:
    from scipy.stats import spearmanr

    from qkit.studies.layer_results import rank_check

    rng = np.random.default_rng(0)
    units = [f"layer {i}" for i in range(12)] + [f"model.layers.{i}.mlp.up_proj" for i in range(12)]
    proxy = pd.DataFrame({"unit": units, "proxy": rng.random(24)})
    scan = pd.DataFrame([{"text": t, "unit": u, "kind": "layer" if u.startswith("layer") else "module",
                          "kld_mean": float(rng.random())} for t in ("prose", "code") for u in units])
    out = rank_check(scan, proxy, seed=0)
    assert [tuple(r) for r in out[["text", "kind", "units"]].to_numpy()] == [
        ("prose", "layer", 12), ("prose", "module", 12), ("code", "layer", 12), ("code", "module", 12)]
    for r in out.itertuples():
        g = scan[(scan["text"] == r.text) & (scan["kind"] == r.kind)].merge(proxy, on="unit")
        assert r.spearman_rho == pytest.approx(spearmanr(g["proxy"], g["kld_mean"]).statistic, abs=1e-12)
        assert r.rho_low <= r.spearman_rho <= r.rho_high


def test_the_fisher_proxy_estimates_the_kld_of_a_small_weight_change(tiny) -> None:
    """One weight changed: the diagonal Fisher is then exact to second order, so ½ F δ² must match the KLD
    the change causes, measured from the logits on the same text (up to the label sampling's noise; 8 draws
    were measured within 0.87-1.22 of it on six elements)."""
    from qkit import data

    model = tiny.model
    batches = [torch.tensor([x["input_ids"]]) for x in data.calibration_set("prose", 16, 64, 0, tokenizer=tiny.tokenizer)]
    name = "model.layers.1.mlp.down_proj"
    weight = mixed.linear_modules(model)[name].weight
    grads = [w.requires_grad for w in model.parameters()]
    with torch.inference_mode():
        before = torch.log_softmax(torch.cat([model(input_ids=b).logits[0, :-1] for b in batches]).double(), -1)
    for row, col in ((3, 5), (100, 200), (17, 300)):
        change = torch.zeros_like(weight, dtype=torch.float32)
        change[row, col] = 1.0
        # ½ F for a change of 1, averaged over 8 draws of the labels: one draw on 1,008 tokens is within ±50%.
        unit = np.mean([mixed.fisher_klds(model, batches, {name: change}, seed=seed)[name] for seed in range(8)])
        delta = (1e-4 / unit) ** 0.5  # a change the estimate puts at 1e-4 nats: small, yet well above rounding
        with torch.inference_mode():
            weight[row, col] += delta
            after = torch.log_softmax(torch.cat([model(input_ids=b).logits[0, :-1] for b in batches]).double(), -1)
            weight[row, col] -= delta
        measured = float((before.exp() * (before - after)).sum(-1).mean())
        assert 0.75 < 1e-4 / measured < 1.33, (row, col, delta, measured)
    assert [w.requires_grad for w in model.parameters()] == grads  # left as they were


# The full profile on `tiny` (4 layers, 28 modules) on fewer tokens: its module scan draws 4 modules at
# random, then the proxy's top 4; one budget and one anchor.
FULL = {"model": "tiny", "eval_tokens": 512, "ctx": 128, "samples": 4, "seq_len": 64, "prune": 4,
        "budgets": [5.0], "anchors": ["w4a16_rtn"]}


@pytest.mark.slow
def test_the_full_profile_prunes_its_module_scan_by_the_proxy_and_cross_evaluates(tiny, monkeypatch, tmp_path) -> None:
    from qkit.studies import layer_results

    store = Store(tmp_path)  # its own, so that what the second run measures can be counted
    # 4 random modules are too few to judge the proxy by; with the bars lowered, the pruning is what is tested.
    monkeypatch.setattr(layer_results, "PRUNE_RHO", -2.0)  # below any ρ
    monkeypatch.setattr(layer_results, "PRUNE_MIN_UNITS", 4)
    res = L.run(L.config("full", **FULL), store=store)
    assert set(res.scan["text"]) == {"prose", "code"} and set(res.reverse["kind"]) == {"types", "layers"}
    proxy = res.proxy.set_index("unit")["proxy"]
    every = [u for u in proxy.index if u.startswith("model.")]
    top = set(proxy[every].nlargest(4).index)
    assert len(every) == 28
    for text, g in res.scan.groupby("text"):
        modules = g[g["kind"] == "module"].set_index("unit")
        drawn = set(modules.index[modules["picked"] == "at random"])
        assert len(g[g["kind"] == "layer"]) == 4 and len(drawn) == 4
        assert set(modules.index) == drawn | top and set(modules.index[modules["picked"] == "proxy top"]) == top - drawn
    checks = res.pruning_check().set_index("text")
    assert checks["pruned"].all() and (checks[["at_random", "modules"]].to_numpy() == [4, 28]).all()
    prose = res.scan[(res.scan["text"] == "prose") & (res.scan["kind"] == "module")].set_index("unit")
    outside = prose[(prose["picked"] == "at random") & ~prose.index.isin(top)]["kld_mean"]
    assert checks.loc["prose", "random_outside_top"] == len(outside)
    in_top = prose.loc[list(top), "kld_mean"]
    assert checks.loc["prose", "random_above_top_median"] == int((outside > in_top.median()).sum())
    rest = 24 * outside.mean()
    assert checks.loc["prose", "outside_top_kld_share"] == pytest.approx(rest / (rest + in_top.sum()))
    grids = res._module_grid()
    assert list(grids) == ["prose", "code"] and all(g.shape == (4, 7) and g.notna().sum().sum() == len(prose)
                                                    for g in grids.values())
    assert sum("pruned by the proxy" in f for f in res.findings()) == 2
    # Each text's mix scored on both texts: the cross-evaluation.
    assert res.cross().shape == (2, 2) and set(res.mixes["target"]) == {"prose", "code"}
    # The real bars: 4 random modules cannot judge the proxy, so every module is measured, those above from
    # the store.
    monkeypatch.undo()
    measured = []
    real = L.compare
    monkeypatch.setattr(L, "compare", lambda *a, **k: measured.append(1) or real(*a, **k))
    res = L.run(L.config("full", **FULL, workers=1), store=store)  # in this process, where compare is counted
    assert (res.scan[res.scan["kind"] == "module"]["picked"] != "proxy top").sum() == 56
    assert len(measured) == 2 * (28 - len(prose))
    assert sum("every one of the 28 modules was measured" in f for f in res.findings()) == 2


@pytest.mark.parametrize("argv, match", [
    (["layers", "search", "--model", "tiny", "--budget", "3", "--out", "x.yaml"], "budget 3 bits per weight"),
    (["layers", "search", "--model", "tiny", "--budget", "5", "--formats", "w4a16_awq", "--out", "x.yaml"],
     "w4a16_awq cannot be applied per module"),
    (["layers", "scan", "--model", "tiny", "--format", "nvfp4"], "nvfp4 cannot be applied per module"),
])
def test_the_cli_says_what_is_wrong_in_one_line(argv, match, capsys) -> None:
    from qkit.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err) and "Fix:" in err
