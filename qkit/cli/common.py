"""What the command groups share: model and calibration arguments, parsing, and printing as text."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import yaml

from qkit import DEFAULT_MODEL
from qkit.core.errors import QkitError


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name, local directory, .gguf file or Hugging Face id (default {DEFAULT_MODEL})")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code to run (off by default)")


def calib_args(p: argparse.ArgumentParser, positional: bool = False, profile: bool = False) -> None:
    """--calib (unless the command takes the set as its positional argument), --samples, --seq-len, --seed;
    with `profile`, each left out is None: the study profile's, which may size each method's own."""
    from qkit.data import CalibSpec

    d = CalibSpec()
    name, samples, seq_len, seed = (None,) * 4 if profile else (d.name, d.n_samples, d.seq_len, d.seed)
    shown = (lambda v: "the profile's") if profile else (lambda v: v)  # noqa: E731
    every = ", for every method" if profile else ""
    if not positional:
        p.add_argument("--calib", default=name, metavar="NAME|PATH",
                       help=f"calibration set: a built-in name or a data file (default {shown(d.name)})")
    p.add_argument("--samples", type=int, default=samples,
                   help=f"calibration samples{every} (default {shown(d.n_samples)})")
    p.add_argument("--seq-len", type=int, default=seq_len,
                   help=f"tokens per sample{every} (default {shown(d.seq_len)})")
    p.add_argument("--seed", type=int, default=seed)


def calib(args: argparse.Namespace):
    from qkit.data import CalibSpec

    return CalibSpec(args.calib, args.samples, args.seq_len, args.seed)


def given(**options: object) -> dict[str, object]:
    """The options the user gave: an argument left at None takes the library's own default, which the
    CLI then never restates."""
    return {k: v for k, v in options.items() if v is not None}


def param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    # YAML so that numbers, booleans and lists ("[fp8_dynamic, w4a16_gptq]") arrive typed.
    return key, yaml.safe_load(value)


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [list(header), *rows]) for i in range(len(header))]
    for r in [list(header), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QkitError(f"expected comma-separated whole numbers, got {text!r}", "write e.g. 4096,32768") from None


def print_result(result) -> int:
    """A study's tables and findings as text: what its notebook shows, without the figures."""
    for name, table in result.tables().items():
        print(f"== {name}")
        print(table.to_string() if len(table) else "(empty)")
        print()
    print("\n".join(line.replace("**", "") for line in result.findings()))
    return 0
