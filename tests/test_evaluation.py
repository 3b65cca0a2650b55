"""qkit.evaluation against independent full-logit computations on the tiny and the default model."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from qkit import data
from qkit import evaluation as E
from qkit.core.errors import QkitError
from qkit.core.store import Store
from qkit.evaluation.metrics import kld_exact, token_stats
from qkit.models import resolve_model

SPEC = E.EvalSpec(domain="prose", n_tokens=1024, ctx=128, batch_size=3)  # 8 chunks: batches of 3, 3, 2


@pytest.fixture(scope="module")
def perturbed(tiny):
    """The tiny model with noise as large as the weights themselves added to every decoder Linear: the
    tiny model shrugs off less (KLD ~1e-2, top-1 agreement ~92% on one build)."""
    model = copy.deepcopy(tiny.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(module.weight.std() * torch.randn(module.weight.shape, generator=g))
    return model


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """All chunks in one forward pass (compare batches them), last position dropped, float64."""
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].double()
    return logits.reshape(-1, logits.shape[-1])


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_head_logits_reproduces_the_models_logits(tiny):
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tiny.model(ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    torch.testing.assert_close(E.head_logits(tiny.model, hidden), out.logits, rtol=0, atol=0)
    # the tiny model ties its embeddings, so the head is the embedding matrix
    manual = hidden @ tiny.model.model.embed_tokens.weight.T
    torch.testing.assert_close(E.head_logits(tiny.model, hidden), manual, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("field, value, expected", [
    ("final_logit_softcapping", 3.0, lambda z: 3.0 * torch.tanh(z / 3.0)),  # Gemma 2/3
    ("logit_scale", 0.25, lambda z: 0.25 * z),  # Cohere
    ("logits_scaling", 8.0, lambda z: z / 8.0),  # Granite
])
def test_head_logits_applies_scaling_and_softcapping(tiny, field, value, expected):
    model = copy.deepcopy(tiny.model)
    setattr(model.config, field, value)
    hidden = torch.randn(5, tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    plain = hidden @ model.lm_head.weight.detach().T
    torch.testing.assert_close(E.head_logits(model, hidden), expected(plain), rtol=1e-5, atol=1e-5)


def test_baseline_stores_final_hidden_states(tiny, tmp_path):
    ref = E.baseline(tiny, SPEC, Store(tmp_path))
    ids = data.eval_tokens("prose", tiny.tokenizer, 1024).view(-1, 128)
    with torch.no_grad():
        hidden = tiny.model(ids, output_hidden_states=True).hidden_states[-1][:, :-1]
    assert ref.hidden.dtype == torch.float32 and ref.hidden.shape == (8 * 127, tiny.model.config.hidden_size)
    torch.testing.assert_close(ref.hidden, hidden.reshape(-1, hidden.shape[-1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.targets, ids[:, 1:].reshape(-1), rtol=0, atol=0)
    (entry,) = (tmp_path / "baseline").iterdir()
    size = (entry / "baseline.safetensors").stat().st_size
    assert size == pytest.approx(8 * 127 * (4 * tiny.model.config.hidden_size + 8), abs=1024)  # + header


def test_compare_of_the_baseline_itself(tiny, tmp_path):
    s = E.compare(tiny.model, tiny, SPEC, Store(tmp_path))
    assert s["n_tokens"] == 8 * 127 and s["n_chunks"] == 8 and len(s["chunk_kld"]) == 8
    assert s["kld_max"] <= 1e-6 and abs(s["kld_mean"]) <= 1e-6
    assert s["top1_agreement_pct"] == 100.0
    assert s["ppl_quant"] == s["ppl_base"] and s["mean_dp_pct"] == 0.0
    assert s["chunk_nll"] == s["chunk_nll_base"] and s["chunk_top1"] == [1.0] * 8


def test_compare_matches_an_independent_full_computation(tiny, perturbed, tmp_path):
    s = E.compare(perturbed, tiny, SPEC, Store(tmp_path))
    ids = data.eval_tokens("prose", tiny.tokenizer, 1024).view(-1, 128)
    targets = ids[:, 1:].reshape(-1)
    base, quant = full_logits(tiny.model, ids), full_logits(perturbed, ids)
    kld = kld_exact(base, quant)
    assert kld.mean() > 1e-3  # the perturbation really changed the model, 100× the tolerance
    assert s["kld_mean"] == pytest.approx(kld.mean().item(), abs=1e-5)
    assert s["kld_max"] == pytest.approx(kld.max().item(), abs=1e-5)
    np.testing.assert_allclose(s["chunk_kld"], kld.view(8, 127).mean(1).numpy(), rtol=0, atol=1e-5)
    nll_base = torch.nn.functional.cross_entropy(base, targets, reduction="none")
    nll_quant = torch.nn.functional.cross_entropy(quant, targets, reduction="none")
    np.testing.assert_allclose(s["chunk_nll_base"], nll_base.view(8, 127).mean(1).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(s["chunk_nll"], nll_quant.view(8, 127).mean(1).numpy(), rtol=0, atol=1e-5)
    assert s["ppl_base"] == pytest.approx(nll_base.mean().exp().item(), rel=1e-5)
    assert s["ppl_quant"] == pytest.approx(nll_quant.mean().exp().item(), rel=1e-5)
    same = (base.argmax(-1) == quant.argmax(-1)).double()
    assert 0 < same.mean() < 1
    np.testing.assert_allclose(s["chunk_top1"], same.view(8, 127).mean(1).numpy(), rtol=0, atol=0)


def test_compare_equals_float64_on_each_models_own_logits(tiny, perturbed, tmp_path):
    """compare (final hidden states → output head → token stats in row blocks) against the computation it
    replaced, to float rounding: each model's own full logits, KLD by kld_exact and NLL by log_softmax,
    both in float64, top-1 from the logits' argmax."""
    s = E.compare(perturbed, tiny, SPEC, Store(tmp_path))
    ids = data.eval_tokens("prose", tiny.tokenizer, 1024).view(-1, 128)
    targets = ids[:, 1:].reshape(-1, 1)
    base, quant = full_logits(tiny.model, ids), full_logits(perturbed, ids)
    nll_base = -torch.log_softmax(base, -1).gather(1, targets).view(8, 127)
    nll = -torch.log_softmax(quant, -1).gather(1, targets).view(8, 127)
    np.testing.assert_allclose(s["chunk_kld"], kld_exact(base, quant).view(8, 127).mean(1), rtol=0, atol=1e-7)
    np.testing.assert_allclose(s["chunk_nll_base"], nll_base.mean(1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(s["chunk_nll"], nll.mean(1), rtol=0, atol=1e-6)
    assert s["ppl_quant"] == pytest.approx(nll.mean().exp().item(), rel=1e-6)
    assert s["mean_dp_pct"] == pytest.approx(100 * (nll.neg().exp() - nll_base.neg().exp()).mean().item(), abs=1e-6)
    same = (base.argmax(-1) == quant.argmax(-1)).double().view(8, 127).mean(1)
    np.testing.assert_array_equal(s["chunk_top1"], same.numpy())


def test_baseline_is_computed_once_and_text_tokenized_once_per_call(tiny, perturbed, tmp_path, monkeypatch):
    loaded = dataclasses.replace(tiny, _model=copy.deepcopy(tiny.model))  # a hook of its own
    baseline_forwards = count_forwards(loaded.model)
    tokenizations = [0]
    eval_tokens = data.eval_tokens

    def counting_eval_tokens(*args, **kwargs):
        tokenizations[0] += 1
        return eval_tokens(*args, **kwargs)

    monkeypatch.setattr(data, "eval_tokens", counting_eval_tokens)
    store = Store(tmp_path)
    first = E.compare(perturbed, loaded, SPEC, store)
    assert baseline_forwards[0] == 3 and tokenizations[0] == 1  # one forward per batch of chunks
    second = E.compare(perturbed, loaded, SPEC, store)
    assert baseline_forwards[0] == 3 and tokenizations[0] == 2
    assert {k: v for k, v in first.items() if k not in ("seconds", "tokens_per_second")} == \
           {k: v for k, v in second.items() if k not in ("seconds", "tokens_per_second")}


def test_cached_baseline_of_other_tokens_is_refused(tiny, tmp_path, monkeypatch):
    store = Store(tmp_path)
    E.baseline(tiny, SPEC, store)
    eval_tokens = data.eval_tokens
    monkeypatch.setattr(data, "eval_tokens", lambda *a, **k: eval_tokens(*a, **k).roll(1))  # the text changed
    with pytest.raises(QkitError, match="other tokens"):
        E.baseline(tiny, SPEC, store)


def test_a_model_whose_logits_cannot_be_rebuilt_is_refused(tiny, tmp_path):
    model = copy.deepcopy(tiny.model)
    model.config.final_logit_softcapping = 2.0  # head_logits applies it; LlamaForCausalLM does not
    with pytest.raises(QkitError, match="cannot rebuild this model's logits"):
        E.baseline(dataclasses.replace(tiny, _model=model), SPEC, Store(tmp_path))
    assert not (tmp_path / "baseline").exists() or not any((tmp_path / "baseline").iterdir())


@pytest.mark.parametrize("kwargs", [
    dict(domain="poetry"), dict(n_tokens=0), dict(ctx=-1), dict(batch_size=0), dict(n_tokens=100, ctx=128),
])
def test_eval_spec_rejects_bad_input(kwargs):
    with pytest.raises(QkitError):
        E.EvalSpec(**kwargs)


def test_ctx_beyond_the_models_length_is_refused(tiny, tmp_path):
    too_long = 2 * tiny.info["max_length"]
    with pytest.raises(QkitError):
        E.compare(tiny.model, tiny, E.EvalSpec(n_tokens=too_long, ctx=too_long), Store(tmp_path))


# --- the default model: the accuracy requirement (KLD within 1e-3 nats of exact per token) ---


def fake_quantize(weight: torch.Tensor, bits: int, group: int = 128) -> torch.Tensor:
    """Symmetric round-to-nearest per group of `group` input columns with an absmax scale.

    SmolLM2's width 576 is not a multiple of 128, so each row is zero-padded to a whole number of groups;
    the last group is then 64 real values (zeros change no absmax).
    """
    rows, cols = weight.shape
    groups = torch.nn.functional.pad(weight, (0, -cols % group)).reshape(rows, -1, group)
    qmax = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return ((groups / scale).round().clamp(-qmax - 1, qmax) * scale).reshape(rows, -1)[:, :cols]


@pytest.mark.slow
def test_cached_baseline_kld_is_exact_on_default_model(tmp_path):
    loaded = resolve_model("smollm2-135m")
    quant = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for module in quant.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize(module.weight, bits=4))
    spec = E.EvalSpec(domain="prose", n_tokens=1024, ctx=512, batch_size=2)
    store = Store(tmp_path)
    summary = E.compare(quant, loaded, spec, store)

    ids = data.eval_tokens("prose", loaded.tokenizer, 1024).view(-1, 512)
    base_logits, quant_logits = full_logits(loaded.model, ids), full_logits(quant, ids)
    exact = kld_exact(base_logits, quant_logits)
    print(f"\nSmolLM2 INT4 RTN g128, {exact.numel()} tokens: exact mean KLD {exact.mean():.4f}")
    assert exact.mean() > 0.1  # INT4 really changed the model
    # Per token, through the cached reference: stored hidden states → baseline logits → token stats.
    ref = E.baseline(loaded, spec, store)
    cached = token_stats(E.head_logits(loaded.model, ref.hidden), quant_logits, ref.targets)["kld"]
    gap = (cached - exact).abs()
    print(f"max |cached − exact| per token: {gap.max():.2e}")
    assert gap.max() <= 1e-5  # the issue asks for 1e-3; what is left is float rounding
    assert summary["kld_mean"] == pytest.approx(exact.mean().item(), abs=1e-5)
    assert summary["kld_max"] == pytest.approx(exact.max().item(), abs=1e-5)
    np.testing.assert_allclose(summary["chunk_kld"], exact.view(2, 511).mean(1).numpy(), rtol=0, atol=1e-5)


def test_compare_in_row_blocks_that_split_batches_gives_the_same_numbers(tiny, perturbed, tmp_path, monkeypatch):
    whole = E.compare(perturbed, tiny, SPEC, Store(tmp_path))  # 381 rows per batch of 3: two blocks of 256
    monkeypatch.setattr(E.teacher_forced, "_HEAD_ROWS", 7)
    split = E.compare(perturbed, tiny, SPEC, Store(tmp_path))
    for key in ("kld_mean", "ppl_quant", "ppl_base", "top1_agreement_pct", "mean_dp_pct", "chunk_kld", "chunk_nll"):
        assert split[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key


def test_a_model_under_test_whose_logits_cannot_be_rebuilt_is_refused(tiny, tmp_path):
    model = copy.deepcopy(tiny.model)
    model.config.final_logit_softcapping = 2.0
    with pytest.raises(QkitError, match=r"cannot rebuild this model.s logits from its hidden states \(capped"):
        E.compare(model, tiny, SPEC, Store(tmp_path), label="capped")
