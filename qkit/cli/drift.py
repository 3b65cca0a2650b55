"""`qkit drift check` and `qkit drift replay`: drift monitoring of a deployment's request log."""
from __future__ import annotations

import argparse

from qkit import DEFAULT_MODEL
from qkit.cli import common


def cmd_drift_check(args: argparse.Namespace) -> int:
    import math

    from qkit import models
    from qkit.data import request_log
    from qkit.evaluation import monitor, served
    from qkit.quant import variants
    from qkit.studies import drift_monitoring as drift

    # bad input fails before a model loads
    config = monitor.MonitorConfig(**common.given(window=args.window, alpha=args.alpha))
    request_log.check_log(args.log)
    scoring = served.DriftConfig(**common.given(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens))
    reference = models.resolve_model(args.reference, trust_remote_code=args.trust_remote_code)
    deployment = variants.parse(reference, args.quantized)
    state = drift.update(args.log, reference, deployment, scoring)
    path = drift.state_path_for(args.log, reference, deployment, scoring)
    result = drift.check(state, config, path, everything=args.all)
    mon = result.mon

    def pct(x: float) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    rows = []
    for _, w in mon.windows[mon.windows["tested"]].iterrows():
        acc = (f"{pct(w['acc_ref'])}/{pct(w['acc_quant'])}" if "acc_ref" in w and not math.isnan(w["acc_ref"])
               else "-")
        rows.append((w["window"], f"{w['first_line']}-{w['last_line']}", w["n"], f"{w['kld']:.3g}",
                     "baseline" if w["baseline"] else f"{w['kld_ratio']:.2f}", pct(w["top1"]), pct(w["served_top1"]),
                     f"{w['ref_logprob']:.3f}", pct(w["tail_share"]), acc, "ALERT" if w["alert"] else ""))
    print(f"{args.log}: {len(state.results)} requests, {deployment.label} against {args.reference}, windows of "
          f"{config.window}" + ("" if args.all or mon.first_window == 0 else
                                f"; windows new since the last check: from {mon.first_window} on"))
    common.print_table(("window", "lines", "n", "KLD", "xbase", "top1%", "served%", "ref_lp", "tail%", "acc ref/q%",
                  "alert"), rows)
    if state.malformed:
        print(f"{len(state.malformed)} malformed line(s) skipped (first: line {state.malformed[0][0]})")
    if state.skipped_empty:
        print(f"{state.skipped_empty} request(s) with an empty completion skipped")
    n_cut = sum(r["truncated"] for r in state.results)
    if n_cut:
        print(f"{n_cut} request(s) longer than the context: their prompts were cut from the left")
    if not rows:
        print(f"no window new since the last check (through window {len(mon.windows) - 1}); --all shows them all")
    for line in monitor.alert_lines(mon.events):
        print(line)
    alerts = args.alerts or path.with_name("alerts.json")
    drift.write_alerts(result, state, alerts)
    print(f"alerts: {alerts}")
    return 1 if result.new_alerts else 0


def cmd_drift_replay(args: argparse.Namespace) -> int:
    from qkit import models
    from qkit.data import request_log
    from qkit.studies import drift_monitoring as drift

    if args.prompts:
        request_log.check_log(args.prompts)
    reference = models.resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    out = drift.replay(reference, args.method, args.prompts, args.out, switch_to=args.switch_to,
                       switch_at=args.switch_at,
                       **common.given(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
    print(out)
    return 0


def _canary(args: argparse.Namespace):
    from qkit.data import request_log
    from qkit.evaluation import canary

    if args.prompts:
        request_log.check_log(args.prompts)
    return canary.identify(args.model, args.variant, args.prompts)


def _load(args: argparse.Namespace, ident):
    from qkit.evaluation import canary

    return canary.deployment(ident, args.dtype, trust_remote_code=args.trust_remote_code)


def cmd_canary_record(args: argparse.Namespace) -> int:
    from qkit.evaluation import canary

    config = canary.CanaryConfig(**common.given(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                                top_k=args.top_k))
    dep = _load(args, _canary(args))
    saved = canary.make_record(dep, config)
    path = canary.save_record(saved, args.record)
    env = saved["environment"]
    print(f"recorded {len(saved['prompts'])} prompts of {dep.id.names['prompts']} on {env['device']} in "
          f"{env['dtype']}, torch {env['torch_build']['version']}: {path}")
    return 0


def cmd_canary_check(args: argparse.Namespace) -> int:
    from qkit.evaluation import canary

    ident = _canary(args)
    saved, path = canary.load_record(ident, args.record)  # a wrong record fails before a model loads
    result = canary.check_record(saved, _load(args, ident),
                                 canary.ANY_CHANGE if args.any_change else canary.Thresholds())
    print(f"{path}: {len(result.per_prompt)} prompts rerun against their record")
    print("environment changed: " + ("; ".join(result.changed) if result.changed else "nothing"))
    rows = [(m["measure"], m["n"], f"{m['value']:.4g}", f"[{m['low']:.4g}, {m['high']:.4g}]", f"{m['threshold']:.4g}",
             "ALERT" if m["alert"] else "") for _, m in result.measures.iterrows()]
    common.print_table(("measure", "n", "now", "95% CI", "alert past", "alert"), rows)
    if result.alert:
        print("ALERT: the numbers moved past a threshold" + (" with the environment change above" if result.changed
                                                              else ", with no environment change qkit can see"))
    return 1 if result.alert else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    drift = sub.add_parser("drift", help="monitor a quantized deployment's drift from its reference on logged "
                                         "traffic").add_subparsers(dest="drift_command", required=True, metavar="COMMAND")
    p = drift.add_parser("check", help="measure a request log's new lines, print a table per new window; exit 1 on "
                                       "an alert that opened in them")
    p.add_argument("--log", required=True, help="JSONL request log (fields: see qkit.data.request_log)")
    p.add_argument("--reference", default=DEFAULT_MODEL, help=f"the unquantized model (default {DEFAULT_MODEL})")
    p.add_argument("--quantized", required=True, metavar="METHOD|DIR",
                   help="the deployed model: a method from `qkit methods` or a model directory")
    p.add_argument("--window", help="requests per window, or a duration such as 30m, 6h (default: the monitor's, 50)")
    p.add_argument("--alpha", type=float, help="false-alarm level of the check, Benjamini-Hochberg over all its "
                                               "tests (default 0.01)")
    p.add_argument("--alerts", default=None, help="where to write the alerts as JSON (default: beside the state "
                                                   "in the store)")
    p.add_argument("--all", action="store_true", help="check and report every window of the log, as if for the "
                                                      "first time (the next scheduled check is not affected)")
    p.add_argument("--batch-size", type=int, help="requests per forward pass (default 8)")
    p.add_argument("--max-new-tokens", type=int,
                   help="greedy answer length for checkable requests and missing completions (default 32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    p.set_defaults(func=cmd_drift_check)
    p = drift.add_parser("replay", help="write a request log by serving a prompts file with a method's checkpoint")
    common.model_args(p)
    p.add_argument("--method", required=True, metavar="METHOD|DIR", help="what serves the prompts")
    p.add_argument("--prompts", default=None, help="JSONL prompts (the log format; default: qkit's 64 sample "
                                                    "prompts in four tags)")
    p.add_argument("--switch-to", default=None, metavar="METHOD|DIR", help="what serves from --switch-at on")
    p.add_argument("--switch-at", type=int, default=None, help="first request served by --switch-to (default: half)")
    p.add_argument("--out", default="drift_log.jsonl", help="the log to write (default drift_log.jsonl)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per answer, greedy (default 32)")
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default 8)")
    p.set_defaults(func=cmd_drift_replay)
    canary = drift.add_parser("canary", help="does the same checkpoint still compute the same after an upgrade?"
                              ).add_subparsers(dest="canary_command", required=True, metavar="COMMAND")
    for name, help_text in (("record", "run a fixed prompt set and record outputs, log-probs, top-k, correctness "
                                       "and the environment"),
                            ("check", "rerun a record's prompts here and compare; exit 1 past a threshold")):
        p = canary.add_parser(name, help=help_text)
        common.model_args(p)
        p.add_argument("--variant", default=None, metavar="METHOD|DIR",
                       help="the deployed variant of --model (default: --model itself)")
        p.add_argument("--prompts", default=None, help="JSONL prompts (the log format; default: qkit's 64 sample "
                                                        "prompts)")
        p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="the dtype --model runs in (default float32; not for a --variant)")
        p.add_argument("--record", default=None, help="the record's file (default: in the store, keyed by model, "
                                                       "variant and prompts)")
        if name == "record":
            p.add_argument("--max-new-tokens", type=int, help="greedy tokens per prompt (default 32)")
            p.add_argument("--batch-size", type=int, help="prompts per forward pass (default 8)")
            p.add_argument("--top-k", type=int, help="entries of each position's distribution kept (default 8)")
            p.set_defaults(func=cmd_canary_record)
        else:
            p.add_argument("--any-change", action="store_true",
                           help="alert on any change its CI shows, however small (thresholds 0)")
            p.set_defaults(func=cmd_canary_check)
