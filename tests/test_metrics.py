"""qkit.evaluation.metrics against independent numpy/scipy computations and closed-form cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax
from scipy.stats import entropy

from qkit.core.errors import QkitError
from qkit.evaluation import metrics as M
from qkit.evaluation.tasks import scoring

V = 1000


def random_logits(n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * scale


def perturbed(logits: torch.Tensor, seed: int, noise: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return logits + noise * torch.randn(logits.shape, generator=g)


def targets_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def kl_loop(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL(P‖Q) row by row with scipy, in float64."""
    return np.array([entropy(np.exp(np_log_softmax(a)), np.exp(np_log_softmax(b)))
                     for a, b in zip(lp.astype(np.float64), lq.astype(np.float64))])


def test_token_stats_matches_scipy_loop():
    lp, targets = random_logits(48, 2), targets_for(48, 1)
    lq = perturbed(lp, 3)
    stats = M.token_stats(lp, lq, targets)
    assert set(stats) == set(M.TOKEN_STATS)
    np.testing.assert_allclose(stats["kld"].numpy(), kl_loop(lp.numpy(), lq.numpy()), atol=1e-7)
    logp = np_log_softmax(lp.double().numpy(), -1)[np.arange(48), targets.numpy()]
    logq = np_log_softmax(lq.double().numpy(), -1)[np.arange(48), targets.numpy()]
    np.testing.assert_allclose(stats["dp"].numpy(), np.exp(logq) - np.exp(logp), atol=1e-7)
    np.testing.assert_allclose(stats["nll"].numpy(), -logq, atol=1e-6)
    np.testing.assert_allclose(stats["nll_base"].numpy(), -logp, atol=1e-6)
    np.testing.assert_array_equal(stats["same_top1"].numpy(), (lp.argmax(-1) == lq.argmax(-1)).numpy())
    assert 0 < stats["same_top1"].sum() < 48  # the noise changes some argmaxes but not all


def test_token_stats_equals_float64_log_softmax_in_blocks_with_unused_tokens(monkeypatch):
    """The blocked float32 computation against the plain float64 one it replaced (kld_exact, and NLL and Δp
    from log_softmax), over several blocks, with tokens that P, Q or both never use (-inf logits)."""
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 3 * V)  # 3 rows per block, the last block 2 rows
    lp, targets = random_logits(20, 30), targets_for(20, 3).clamp_min(10)
    lq = perturbed(lp, 31)
    lp[0, :10], lq[0, :10] = -math.inf, -math.inf  # neither uses them: they add nothing
    lp[1, :10] = -math.inf  # only P never uses them: still finite
    lq[2, 5] = -math.inf  # Q never uses a token P does: +inf
    stats, exact = M.token_stats(lp, lq, targets), M.kld_exact(lp, lq)
    assert math.isinf(stats["kld"][2]) and math.isinf(exact[2])
    finite = torch.arange(20) != 2
    torch.testing.assert_close(stats["kld"][finite], exact[finite], rtol=0, atol=1e-7)
    logp = torch.log_softmax(lp.double(), -1).gather(1, targets[:, None]).squeeze(1)
    logq = torch.log_softmax(lq.double(), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(stats["nll_base"], -logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["nll"], -logq, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["dp"], logq.exp() - logp.exp(), rtol=0, atol=1e-7)
    assert torch.equal(stats["same_top1"], lp.argmax(-1) == lq.argmax(-1))


def test_kld_exact_matches_scipy():
    lp = random_logits(32, 4)
    lq = perturbed(lp, 5, noise=1.0)
    p, q = torch.softmax(lp.double(), -1).numpy(), torch.softmax(lq.double(), -1).numpy()
    np.testing.assert_allclose(M.kld_exact(lp, lq).numpy(), entropy(p, q, axis=-1), rtol=1e-9)


@pytest.mark.parametrize("offset, scale, shift", [(0.0, 3.0, 0.0), (20.0, 3.0, -7.0), (5.0, 9.0, 3.0)])
def test_token_stats_agrees_with_float64_on_realistic_logits(offset, scale, shift):
    """LM-sized vocabulary and logit magnitudes (~20–40), and a quantized model whose logits also move by
    a constant, which leaves the KLD unchanged. Plain float32 log-softmax errs by up to ~5e-6 here."""
    g = torch.Generator().manual_seed(20)
    lp = torch.randn(64, 32768, generator=g) * scale + offset
    lq = lp + 0.3 * torch.randn(lp.shape, generator=g) + shift
    targets = torch.randint(0, 32768, (64,), generator=g)
    exact = M.kld_exact(lp, lq)
    assert exact.mean() > 1e-3
    np.testing.assert_allclose(M.token_stats(lp, lq, targets)["kld"].numpy(), exact.numpy(), rtol=0, atol=1e-6)
    shifted = M.token_stats(lp, lp + shift, targets)
    assert shifted["kld"].abs().max() < 1e-6 and shifted["same_top1"].all()


def test_identical_distributions():
    logits, targets = random_logits(20, 10), targets_for(20)
    logits[3] = 0.0  # all tied
    logits[4, [5, 9]] = 50.0  # a tie for first place
    stats = M.token_stats(logits, logits.clone(), targets)
    assert stats["kld"].abs().max() < 1e-12
    assert stats["same_top1"].all()
    assert stats["dp"].abs().max() < 1e-12
    torch.testing.assert_close(stats["nll"], stats["nll_base"], rtol=0, atol=0)
    assert M.kld_exact(logits, logits).abs().max() < 1e-12


def test_bernoulli_closed_form():
    p, q = np.array([0.9, 0.3, 0.5]), np.array([0.6, 0.35, 0.5])
    lp = torch.tensor(np.log(np.stack([p, 1 - p], -1)), dtype=torch.float32)
    lq = torch.tensor(np.log(np.stack([q, 1 - q], -1)), dtype=torch.float32)
    expected = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    stats = M.token_stats(lp, lq, torch.zeros(3, dtype=torch.long))
    np.testing.assert_allclose(stats["kld"].numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(M.kld_exact(lp, lq).numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(stats["dp"].numpy(), q - p, atol=1e-7)
    np.testing.assert_allclose(stats["nll_base"].numpy(), -np.log(p), atol=1e-7)


def test_uniform_versus_one_boosted_token_closed_form():
    a = 2.5
    uniform = torch.zeros(1, V)
    boosted = torch.zeros(1, V)
    boosted[0, 0] = a
    expected = math.log(math.exp(a) + V - 1) - math.log(V) - a / V
    assert M.kld_exact(uniform, boosted).item() == pytest.approx(expected, rel=1e-10)
    stats = M.token_stats(uniform, boosted, torch.zeros(1, dtype=torch.long))
    assert stats["kld"].item() == pytest.approx(expected, abs=1e-6)  # float32 exp: ~1e-7 × E_p|log p/q|
    assert stats["nll_base"].item() == pytest.approx(math.log(V), rel=1e-7)


def test_one_hot_versus_uniform():
    one_hot = torch.full((2, V), float("-inf"))
    one_hot[:, 0] = 0.0
    uniform = torch.zeros(2, V)
    targets = torch.zeros(2, dtype=torch.long)
    # KL(δ‖U) = log V: the tokens δ never uses add nothing.
    stats = M.token_stats(one_hot, uniform, targets)
    np.testing.assert_allclose(stats["kld"].numpy(), math.log(V), rtol=1e-7)
    np.testing.assert_allclose(M.kld_exact(one_hot, uniform).numpy(), math.log(V), rtol=1e-12)
    np.testing.assert_allclose(stats["dp"].numpy(), 1 / V - 1, rtol=1e-6)
    # KL(U‖δ) is infinite: Q gives zero probability to tokens P uses.
    stats = M.token_stats(uniform, one_hot, targets)
    assert torch.isinf(stats["kld"]).all() and torch.isinf(M.kld_exact(uniform, one_hot)).all()
    # Both one-hot on the same token, -inf everywhere else: identical, so 0 (not NaN from −inf − −inf).
    assert M.token_stats(one_hot, one_hot.clone(), targets)["kld"].tolist() == [0.0, 0.0]


def test_same_top1_detects_changed_argmax():
    lp, targets = random_logits(10, 11), targets_for(10)
    lq = lp.clone()
    changed = [1, 4, 7]
    lq[changed, (lp[changed].argmax(-1) + 1) % V] = lp[changed].max(-1).values + 1.0
    stats = M.token_stats(lp, lq, targets)
    assert stats["same_top1"].tolist() == [i not in changed for i in range(10)]


def test_chunking_does_not_change_results(monkeypatch):
    lp, targets = random_logits(37, 12), targets_for(37)
    lq = perturbed(lp, 13)
    whole_stats, whole_exact = M.token_stats(lp, lq, targets), M.kld_exact(lp, lq)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 5 * V + 1)  # 5 rows per step, last step 2 rows
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 5 * V + 1)
    for name, value in M.token_stats(lp, lq, targets).items():
        torch.testing.assert_close(value, whole_stats[name], rtol=0, atol=0)
    torch.testing.assert_close(M.kld_exact(lp, lq), whole_exact, rtol=0, atol=0)


def test_half_precision_logits_are_accepted():
    lp, targets = random_logits(8, 14).bfloat16(), targets_for(8)
    lq = perturbed(lp.float(), 15).bfloat16()
    expected = M.token_stats(lp.float(), lq.float(), targets)
    for name, value in M.token_stats(lp, lq, targets).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def llama_cpp_percentile(sorted_values: list[float], fraction: float) -> float:
    """llama.cpp perplexity.cpp: linear interpolation at fraction·(n − 1)."""
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    return (1 - (p - i)) * sorted_values[i] + (p - i) * sorted_values[min(i + 1, len(sorted_values) - 1)]


@pytest.mark.parametrize("n", [1000, 1001, 7])
def test_kld_summary_matches_llama_cpp_definitions(n):
    values = np.random.default_rng(n).exponential(0.05, n)
    s = sorted(values.tolist())
    median = s[n // 2] if n % 2 else 0.5 * (s[n // 2] + s[n // 2 - 1])
    summary = M.kld_summary(torch.tensor(values))
    assert list(summary) == ["mean", "median", "p90", "p99", "p99.9", "max"]
    assert summary["mean"] == pytest.approx(sum(s) / n)
    assert summary["median"] == pytest.approx(median)
    for key, fraction in [("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)]:
        assert summary[key] == pytest.approx(llama_cpp_percentile(s, fraction))
    assert summary["max"] == s[-1]


def test_perplexity():
    logits = torch.zeros(5, V)
    stats = M.token_stats(logits, logits, targets_for(5))
    assert M.perplexity(stats["nll"]) == pytest.approx(V, rel=1e-7)
    nll = torch.tensor([0.5, 1.0, 2.5])
    assert M.perplexity(nll) == pytest.approx(math.exp(4.0 / 3))


def test_recovery():
    assert M.recovery(0.5, 0.4) == pytest.approx(80.0)
    assert M.recovery(10.0, 12.5, higher_is_better=False) == pytest.approx(80.0)
    assert M.recovery(10.0, 10.0, higher_is_better=False) == 100.0
    for base, quant in [(0.0, 0.3), (float("nan"), 1.0), (-1.0, 2.0)]:
        with pytest.raises(QkitError):
            M.recovery(base, quant)
    with pytest.raises(QkitError):
        M.recovery(10.0, 0.0, higher_is_better=False)


def loop_bootstrap(values, n_boot, alpha, seed, f=np.mean):
    rng = np.random.default_rng(seed)
    boots = [f(values[rng.integers(0, len(values), size=len(values))]) for _ in range(n_boot)]
    return f(values), *np.quantile(boots, [alpha / 2, 1 - alpha / 2])


def test_bootstrap_ci_matches_a_plain_loop(monkeypatch):
    values = np.random.default_rng(1).normal(2.0, 1.0, 50)
    expected = loop_bootstrap(values, 300, 0.1, seed=3)
    assert M.bootstrap_ci(values, n_boot=300, alpha=0.1, seed=3) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(M, "_BOOT_ELEMENTS", 7 * 50)  # 7 resamples per step
    assert M.bootstrap_ci(torch.tensor(values), n_boot=300, alpha=0.1, seed=3) == pytest.approx(expected, rel=1e-12)
    median = loop_bootstrap(values, 200, 0.05, seed=0, f=np.median)
    assert M.bootstrap_ci(values.tolist(), stat="median", n_boot=200) == pytest.approx(median, rel=1e-12)


def test_bootstrap_ci_width_matches_standard_error():
    values = np.random.default_rng(2).normal(0.0, 1.0, 400)
    point, low, high = M.bootstrap_ci(values, n_boot=4000)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert low < point < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (point - low) == pytest.approx(half, rel=0.15) and (high - point) == pytest.approx(half, rel=0.15)
    assert M.bootstrap_ci(values, seed=5) == M.bootstrap_ci(values, seed=5) != M.bootstrap_ci(values, seed=6)


def test_paired_bootstrap_cancels_shared_variation():
    rng = np.random.default_rng(4)
    base = rng.normal(3.0, 2.0, 100)  # units differ a lot …
    quant = base + 0.1 + rng.normal(0, 0.05, 100)  # … but the change per unit is small and steady
    point, low, high = M.bootstrap_ci(quant, paired_with=base)
    assert point == pytest.approx(np.mean(quant - base))
    assert low < 0.1 < high and high - low < 0.03
    _, ulow, uhigh = M.bootstrap_ci(quant)
    assert uhigh - ulow > 10 * (high - low)


def test_weighted_scores_are_lm_evals_aggregates_and_their_ci_a_paired_bootstrap():
    rng = np.random.default_rng(7)
    ll, units = -rng.gamma(4.0, 3.0, 30), rng.integers(3, 40, 30).astype(float)
    nll = -ll / units
    # lm-eval: weighted_perplexity = exp(-sum(ll)/sum(units)), bits_per_byte = -sum(ll)/sum(units)/ln 2.
    assert scoring.weighted_score(nll, units, "weighted_perplexity") == pytest.approx(math.exp(-ll.sum() / units.sum()))
    assert scoring.weighted_score(nll, units, "bits_per_byte") == pytest.approx(-ll.sum() / units.sum() / math.log(2))
    # With equal weights bits per byte is linear in NLL: the CI is the plain paired bootstrap's, scaled.
    other = nll + rng.normal(0.05, 0.02, 30)
    ones = np.ones(30)
    expected = np.array(M.bootstrap_ci(other, paired_with=nll, seed=2)) / math.log(2)
    assert scoring.weighted_diff_ci(other, nll, ones, "bits_per_byte", seed=2) == pytest.approx(expected, rel=1e-9)
    diff, low, high = scoring.weighted_diff_ci(other, nll, units, "weighted_perplexity")
    assert diff == pytest.approx(scoring.weighted_score(other, units, "weighted_perplexity")
                                 - scoring.weighted_score(nll, units, "weighted_perplexity"))
    assert 0 < low < diff < high
    assert math.isnan(scoring.weighted_diff_ci(other[:1], nll[:1], units[:1], "bits_per_byte")[1])


@pytest.mark.parametrize(
    "kwargs",
    [dict(values=[1.0]), dict(values=[]), dict(values=[1.0, float("nan")]), dict(values=[1.0, 2.0], stat="max"),
     dict(values=[1.0, 2.0], n_boot=0), dict(values=[1.0, 2.0], alpha=1.0), dict(values=[1.0, 2.0], paired_with=[1.0])],
)
def test_bootstrap_ci_rejects_bad_input(kwargs):
    with pytest.raises(QkitError):
        M.bootstrap_ci(kwargs.pop("values"), **kwargs)


def test_flips():
    base = [True, True, False, False, True, False]
    quant = [True, False, True, False, False, False]
    assert M.flips(base, quant) == {"n": 6, "correct_to_wrong": 2, "wrong_to_correct": 1, "flips_pct": 50.0}
    assert M.flips(np.array(base), np.array(base))["flips_pct"] == 0.0
    with pytest.raises(QkitError):
        M.flips([True], [True, False])


def test_summarize_against_independent_computation():
    lp, targets = random_logits(200, 17), targets_for(200)
    lq = perturbed(lp, 18)
    summary = M.summarize(M.token_stats(lp, lq, targets))
    logp = np_log_softmax(lp.double().numpy(), -1)[np.arange(200), targets.numpy()]
    logq = np_log_softmax(lq.double().numpy(), -1)[np.arange(200), targets.numpy()]
    kld = kl_loop(lp.numpy(), lq.numpy())
    assert summary["n_tokens"] == 200
    assert summary["ppl_base"] == pytest.approx(np.exp(-logp.mean()), rel=1e-6)
    assert summary["ppl_quant"] == pytest.approx(np.exp(-logq.mean()), rel=1e-6)
    assert summary["ppl_recovery_pct"] == pytest.approx(100 * np.exp(logq.mean() - logp.mean()), rel=1e-6)
    assert summary["kld_mean"] == pytest.approx(kld.mean(), rel=1e-6)
    assert summary["kld_p99"] == pytest.approx(np.percentile(kld, 99), rel=1e-6)
    assert summary["top1_agreement_pct"] == pytest.approx(100 * np.mean(lp.argmax(-1).numpy() == lq.argmax(-1).numpy()))
    assert summary["mean_dp_pct"] == pytest.approx(100 * np.mean(np.exp(logq) - np.exp(logp)), abs=1e-6)


def test_bad_input_raises():
    lp, targets = random_logits(6, 19), targets_for(6)
    stats = M.token_stats(lp, perturbed(lp, 20), targets)
    bad_calls = [
        lambda: M.token_stats(lp[0], lp[0], targets),  # not 2-D
        lambda: M.token_stats(lp[:0], lp[:0], targets[:0]),  # no rows
        lambda: M.token_stats(lp, lp, targets[:5]),  # one target short
        lambda: M.token_stats(lp, lp, targets + V),  # ids outside the vocabulary
        lambda: M.token_stats(lp, lp[:5], targets),  # other number of tokens
        lambda: M.token_stats(lp, lp[:, :500], targets % 500),  # other vocabulary
        lambda: M.token_stats(lp, torch.full_like(lp, float("nan")), targets),
        lambda: M.token_stats(torch.full_like(lp, float("-inf")), lp, targets),
        lambda: M.token_stats(lp, lp.index_fill(1, torch.tensor([3]), float("inf")), targets),
        lambda: M.kld_exact(lp, lp[:, :10]),
        lambda: M.kld_summary(torch.tensor([])),
        lambda: M.perplexity(torch.tensor([1.0, float("nan")])),
        lambda: M.summarize({"kld": torch.zeros(6)}),
        lambda: M.summarize({**stats, "nll_base": stats["nll_base"][:3]}),
    ]
    for call in bad_calls:
        with pytest.raises(QkitError):
            call()
