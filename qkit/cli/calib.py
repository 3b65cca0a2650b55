"""`qkit calib inspect`: what a calibration set holds, before quantizing with it."""
from __future__ import annotations

import argparse
import json

from qkit.cli import common


def cmd_calib_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from qkit import models
    from qkit.data import CalibSpec, check_seq_len, diagnostics

    spec = CalibSpec(args.name, args.samples, args.seq_len, args.seed)  # bad input fails before a model loads
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    loaded = models.resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    check_seq_len(spec.seq_len, loaded.info["max_length"])
    d = diagnostics.inspect(spec.name, spec.n_samples, spec.seq_len, spec.seed, tokenizer=loaded.tokenizer,
                            methods=methods)
    if args.json:
        print(json.dumps({"summary": d.summary(), "warnings": d.warnings,
                          "segment_lengths": d.segment_lengths}, indent=2))
        return 0
    q = np.percentile(d.segment_lengths, [0, 25, 50, 75, 100]).round().astype(int)
    print(f"calibration set {spec.name}: {d.n_samples} samples x {d.seq_len} tokens = {d.tokens:,} tokens "
          f"(seed {spec.seed}, {args.model})")
    print(f"  document pieces     {len(d.segment_lengths)}; tokens min/25%/median/75%/max {'/'.join(map(str, q))}")
    print("  domain mix          " + ", ".join(f"{k} {v:.0f}%" for k, v in d.domain_mix.items()))
    print(f"  duplicate rows      {d.duplicate_rows_pct:.1f}%   repeated {diagnostics.NGRAM}-token windows "
          f"{d.duplicate_ngrams_pct:.1f}%")
    print(f"  truncated rows      {d.truncated_pct:.1f}%   (a packed row ends inside a document)")
    print(f"  padding             {d.padded_pct:.1f}% of tokens")
    for domain, cov in d.coverage.items():
        print(f"  covers {domain:<6} eval  {cov['tokens_pct']:.1f}% of tokens, {cov['types_pct']:.1f}% of token types")
    for w in d.warnings:
        print(f"  warning: {w}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    calib = sub.add_parser("calib", help="calibration data tools").add_subparsers(dest="calib_command", required=True,
                                                                                 metavar="COMMAND")
    p = calib.add_parser("inspect", help="diagnose a calibration set before quantizing with it")
    p.add_argument("name", help="prose, chat, code, random or mixed")
    common.model_args(p)
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="w4a16_gptq,w4a16_awq,w8a8_int8,fp8_static",
                   help="methods whose usual calibration size the set is checked against")
    p.add_argument("--json", action="store_true", help="print the diagnostics as JSON")
    p.set_defaults(func=cmd_calib_inspect)
