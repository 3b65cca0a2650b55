"""The upgrade canary on one model: a record in float32, then checks in the same environment, in
bfloat16, and with the weights perturbed (Gaussian noise of `--noise` times each decoder Linear's weight
spread, what a broken kernel would compute) under a faked new transformers version.

    QKIT_CACHE=... python benchmarks/drift_canary.py [--model tiny] [--prompts FILE] [--noise 0.5]
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch

from qkit.core import provenance
from qkit.evaluation import canary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--noise", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ident = canary.identify(args.model, prompts=args.prompts)
    saved = canary.make_record(canary.deployment(ident))
    perturbed = canary.deployment(ident)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in perturbed.model.get_decoder().layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(args.noise * module.weight.std() * torch.randn(module.weight.shape, generator=g))
    versions = provenance.library_versions()
    upgraded = {**versions, "transformers": "99.0"}
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        for name, dep in (("same environment", canary.deployment(ident)),
                          ("bfloat16", canary.deployment(ident, "bfloat16")), ("perturbed weights", perturbed)):
            if dep is perturbed:
                provenance.library_versions = lambda: upgraded
            result = canary.check_record(saved, dep)
            print(f"\n{name}: alert {result.alert}; environment changed: {result.changed or 'nothing'}")
            print(result.measures.round(6).to_string(index=False))


if __name__ == "__main__":
    main()
