"""Three proxies for a module's KLD against every module measured: the layer study's Fisher estimate
(labels drawn from the model), the empirical Fisher (the text's own next tokens as labels) and the output
error ``tr(ΔW XᵀX ΔWᵀ)`` on the same calibration activations; Spearman's ρ with a 95% CI per unit kind,
and each proxy's sum against the summed measured KLDs.

The scan measures every Linear alone in the format (the layer study's quick settings, 210 modules for
SmolLM2: ~45 min on one core, cached; a rerun takes a minute).

    python benchmarks/layer_proxy.py [--model smollm2-135m] [--format w4a16_rtn] [--workers 1]
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch

from qkit import data, models
from qkit.core.store import Store
from qkit.quant import mixed
from qkit.studies import layer_sensitivity as L
from qkit.studies.layer_results import rank_check


def output_errors(model: torch.nn.Module, batches: list[torch.Tensor], deltas: dict[str, torch.Tensor]
                  ) -> dict[str, float]:
    """``tr(ΔW XᵀX ΔWᵀ)`` per module, X its inputs over `batches`."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def add(module, args, out) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in mixed.linear_modules(model).items()]
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {n: float(((d.double() @ grams[n]) * d.double()).sum()) for n, d in deltas.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="w4a16_rtn")
    ap.add_argument("--workers", type=int, default=1, help="processes for the scan's cells")
    args = ap.parse_args()
    config = L.config(model=args.model, format=args.format, units=("layers", "types", "modules"), reverse=(),
                      targets=(), budgets=(), anchors=(), workers=args.workers)
    result = L.run(config)
    store = Store()
    loaded = models.resolve_model(args.model, store=store)
    study = L.Study(config, loaded, store)
    deltas = study.weight_changes(config.format)
    samples = data.calibration_set(config.calib, config.samples, config.seq_len, config.seed, tokenizer=loaded.tokenizer)
    batches = [torch.tensor([x["input_ids"]]) for x in samples]
    proxies = {"fisher (drawn labels)": study.per_module_proxy(),
               "fisher (text labels)": mixed.fisher_klds(loaded.model, batches, deltas, seed=config.seed, labels="text"),
               "output error": output_errors(loaded.model, batches, deltas)}
    scan = result.scan
    measured = scan[scan["kind"] == "module"]["kld_mean"].sum()
    rows = []
    for label, per_module in proxies.items():
        units = mixed.units(study.shapes, ("layers", "types"))
        table = pd.DataFrame([{"unit": u, "proxy": sum(per_module[m] for m in mods)} for u, mods in units.items()]
                             + [{"unit": m, "proxy": v} for m, v in per_module.items()])
        for r in rank_check(scan, table, config.seed).to_dict("records"):
            in_nats = label.startswith("fisher")  # the output error is in squared activations, not nats
            rows.append({"proxy": label, **r,
                         "sum / measured": sum(per_module.values()) / measured if in_nats else float("nan")})
    print(f"{args.model}, {args.format}, {config.eval_tokens} {config.texts[0]} tokens per unit; proxies on "
          f"{config.samples} x {config.seq_len} {config.calib} tokens")
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    print(f"summed measured KLD: modules {measured:.4f}, module types "
          f"{scan[scan['kind'] == 'type']['kld_mean'].sum():.4f}, layers {scan[scan['kind'] == 'layer']['kld_mean'].sum():.4f}")


if __name__ == "__main__":
    main()
