"""`qkit calib inspect`: what a calibration set holds, before quantizing with it."""
from __future__ import annotations

import argparse
import json

from qkit.cli import common


def cmd_calib_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from qkit import models
    from qkit.data import EVAL_DOMAINS, check_seq_len, check_text, diagnostics

    spec = common.calib(args)  # bad input fails before a model loads
    texts = [t.strip() for t in args.eval_text.split(",") if t.strip()] if args.eval_text else list(EVAL_DOMAINS)
    for text in texts:
        check_text(text)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    loaded = models.resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    check_seq_len(spec.seq_len, loaded.info["max_length"])
    d = diagnostics.inspect(spec.name, spec.n_samples, spec.seq_len, spec.seed, tokenizer=loaded.tokenizer,
                            methods=methods, eval_texts=texts)
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
        print(f"  covers {domain} eval: {cov['tokens_pct']:.1f}% of tokens, {cov['types_pct']:.1f}% of token types")
    for w in d.warnings:
        print(f"  warning: {w}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    calib = sub.add_parser("calib", help="calibration data tools").add_subparsers(dest="calib_command", required=True,
                                                                                 metavar="COMMAND")
    p = calib.add_parser("inspect", help="diagnose a calibration set before quantizing with it")
    p.add_argument("calib", metavar="NAME|PATH", help="prose, chat, code, random, mixed, or a file: .jsonl (text or "
                                                      "messages), .txt or a folder of them, .parquet/.csv:COLUMN, "
                                                      "a datasets save_to_disk folder")
    common.model_args(p)
    common.calib_args(p, positional=True)
    p.add_argument("--eval-text", default=None, metavar="NAME|PATH,...",
                   help="eval texts whose vocabulary the set should cover (default: prose,chat,code)")
    p.add_argument("--methods", default="w4a16_gptq,w4a16_awq,w8a8_int8,fp8_static",
                   help="methods whose usual calibration size the set is checked against")
    p.add_argument("--json", action="store_true", help="print the diagnostics as JSON")
    p.set_defaults(func=cmd_calib_inspect)
