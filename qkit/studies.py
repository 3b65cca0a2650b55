"""Studies: one function each, returning a tidy results table that its notebook and the CLI both use."""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qkit import metrics, methods, models
from qkit.evaluation import EvalSpec, compare
from qkit.errors import QkitError
from qkit.methods import CalibSpec
from qkit.store import Store

CI_BOOT = 1000


def _ci(values: Sequence[float], paired_with: Sequence[float] | None = None, seed: int = 0
        ) -> tuple[float, float, float]:
    return metrics.bootstrap_ci(np.asarray(values), n_boot=CI_BOOT, seed=seed,
                                paired_with=None if paired_with is None else np.asarray(paired_with))


def _row(result: dict, seed: int) -> dict:
    """Flatten one evaluation into table columns, with 95% bootstrap CIs over chunks."""
    kld, kld_lo, kld_hi = _ci(result["chunk_kld"], seed=seed)
    nll, nll_lo, nll_hi = _ci(result["chunk_nll"], seed=seed)
    top1, top1_lo, top1_hi = _ci(result["chunk_top1"], seed=seed)
    dnll, dnll_lo, dnll_hi = _ci(result["chunk_nll"], paired_with=result["chunk_nll_base"], seed=seed)
    row = {k: v for k, v in result.items() if not k.startswith("chunk_")}
    row.update(
        kld_mean=kld, kld_low=kld_lo, kld_high=kld_hi,
        ppl_low=math.exp(nll_lo), ppl_high=math.exp(nll_hi),
        top1_pct=100 * top1, top1_pct_low=100 * top1_lo, top1_pct_high=100 * top1_hi,
        delta_nll=dnll, delta_nll_low=dnll_lo, delta_nll_high=dnll_hi,
    )
    return row


def evaluate_method(loaded: models.LoadedModel, method: str, *, calib: CalibSpec | None = None,
                    eval_spec: EvalSpec = EvalSpec(), store: Store | None = None, seed: int = 0) -> dict:
    """Quantize (or reuse the cached checkpoint), evaluate against the baseline, and describe the result."""
    store = store or Store()
    m = methods.get_method(method)
    ckpt = methods.quantize(loaded, m, calib=calib, store=store)
    result = store.get_json(
        "evaluation", {"checkpoint": ckpt.path.name, "eval": dataclasses.asdict(eval_spec)},
        lambda: compare(methods.load_quantized(ckpt), loaded, eval_spec, store, label=m.name))
    bf16 = models.bf16_bytes(loaded.model)
    return {
        "method": m.name, "title": m.title, "weight_format": m.weight_format,
        "weight_bits": m.weight_bits, "act_bits": m.act_bits, "group_size": m.group_size,
        "needs_calibration": m.needs_calibration, "native_hardware": m.native_hardware,
        "format": ckpt.meta.get("format"), "size_mb": ckpt.size_bytes / 1e6,
        "bf16_mb": bf16 / 1e6, "reduction_vs_bf16": bf16 / ckpt.size_bytes,
        "quant_seconds": ckpt.seconds, "quant_peak_rss_mb": ckpt.meta.get("peak_rss_mb"),
        "checkpoint": str(ckpt.path), **_row(result, seed), "error": None,
    }


def methods_study(model: str = "smollm2-135m", method_names: Sequence[str] | None = None, *,
                  calib: CalibSpec | None = None, eval_spec: EvalSpec = EvalSpec(),
                  store: Store | None = None, seed: int = 0) -> pd.DataFrame:
    """Quantize `model` with each method and measure what it costs against the float baseline.

    A method that fails is kept in the table with its error, so the others still report; every finished
    step sits in the store, so a rerun resumes where this one stopped.
    """
    store = store or Store()
    names = list(method_names or methods.METHODS)
    for name in names:
        methods.get_method(name)  # fail on a typo before spending minutes on the first methods
    loaded = models.resolve_model(model, store=store)
    rows = []
    for name in tqdm(names, desc="methods", unit="method"):
        try:
            rows.append(evaluate_method(loaded, name, calib=calib, eval_spec=eval_spec, store=store, seed=seed))
        except QkitError:
            raise
        except Exception as e:  # noqa: BLE001 - one method's failure must not hide the others' results
            warnings.warn(f"{name} failed: {type(e).__name__}: {e}", stacklevel=2)
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
    df = pd.DataFrame(rows)
    df.attrs["model"] = loaded.info
    return df
