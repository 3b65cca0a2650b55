"""`qkit ...`: a thin argparse layer over the same functions the notebooks call."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import yaml

from qkit import DEFAULT_MODEL
from qkit.core.errors import QkitError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name, local directory, .gguf file or Hugging Face id (default {DEFAULT_MODEL})")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code to run (off by default)")


def _calib_args(p: argparse.ArgumentParser) -> None:
    from qkit.data import CalibSpec

    d = CalibSpec()
    p.add_argument("--calib", default=d.name, help=f"calibration set (default {d.name})")
    p.add_argument("--samples", type=int, default=d.n_samples, help=f"calibration samples (default {d.n_samples})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sample (default {d.seq_len})")
    p.add_argument("--seed", type=int, default=d.seed)


def _calib(args: argparse.Namespace):
    from qkit.data import CalibSpec

    return CalibSpec(args.calib, args.samples, args.seq_len, args.seed)


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    # YAML so that numbers, booleans and lists ("[fp8_dynamic, w4a16_gptq]") arrive typed.
    return key, yaml.safe_load(value)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [list(header), *rows]) for i in range(len(header))]
    for r in [list(header), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_methods(args: argparse.Namespace) -> int:
    from qkit.quant.registry import STUDY_METHODS

    _print_table(("method", "format", "bits", "group", "calibration", "runs natively on"),
                 [(m.name, m.weight_format, f"W{m.weight_bits}A{m.act_bits or 16}", m.group_size or "-",
                   "yes" if m.needs_calibration else "no", m.native_hardware) for m in STUDY_METHODS.values()])
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qkit import models
    from qkit.quant import methods, registry

    method, calib = registry.get_method(args.method), _calib(args)  # bad input fails before a model loads
    loaded = models.resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    ckpt = methods.quantize(loaded, method, calib=calib)
    print(ckpt.path)
    print(f"size on disk: {ckpt.size_bytes / 1e6:.1f} MB ({ckpt.bf16_run_bytes / 1e6:.1f} MB had the float "
          f"parts been saved in BF16); model in BF16: {ckpt.bf16_bytes / 1e6:.1f} MB; "
          f"ratio to BF16: {ckpt.bf16_ratio:.3f} ({1 / ckpt.bf16_ratio:.2f}x smaller)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qkit import models
    from qkit.quant import variants
    from qkit.studies import quantization_methods as studies

    variants.check(args.method)  # bad input fails before a model loads
    calib = _calib(args)
    config = studies.config("quick", eval_text=args.eval_text, eval_tokens=args.tokens, ctx=args.ctx)
    loaded = models.resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    row = studies.evaluate(loaded, variants.parse(loaded, args.method, calib=calib), config.eval_spec)
    if args.json:
        print(json.dumps(row, indent=2, default=str))
        return 0
    print(f"{row['method']} on {args.model}, {row['n_tokens']} tokens of held-out {config.eval_text}")
    print(f"  perplexity       {row['ppl_quant']:.3f}  (baseline {row['ppl_base']:.3f}; "
          f"95% CI {row['ppl_quant_low']:.3f}-{row['ppl_quant_high']:.3f})")
    print(f"  KLD mean         {row['kld_mean']:.5f}  (95% CI {row['kld_mean_low']:.5f}-{row['kld_mean_high']:.5f})")
    for name in ("median", "p90", "p99", "p99.9", "max"):
        print(f"  KLD {name:<12} {row['kld_' + name]:.5f}")
    print(f"  top-1 agreement  {row['top1_pct']:.2f}%  (95% CI {row['top1_pct_low']:.2f}-{row['top1_pct_high']:.2f})")
    print(f"  mean delta p     {row['mean_dp_pct']:+.3f}%")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from qkit.evaluation import tasks

    rows = tasks.item_counts()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(("task", "family", "items", "metric", "source"),
                 [(r["task"], r["family"], r["items"], r["metric"], r["source"]) for r in rows])
    print(f"\nlm-eval include path: {tasks.TASK_DIR}  (passkey items: default lengths x depths x per-cell)")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from qkit.studies import task_sensitivity as sensitivity

    split = lambda text: [m.strip() for m in text.split(",") if m.strip()] if text else None  # noqa: E731
    calib = _calib(args)
    config = sensitivity.config(args.profile, model=args.model, methods=split(args.methods), tasks=split(args.tasks),
                                limit=args.limit, trust_remote_code=args.trust_remote_code,
                                context_lengths=_ints(args.context_lengths) if args.context_lengths else None,
                                calib=calib.name, samples=calib.n_samples, seq_len=calib.seq_len, seed=calib.seed)
    res = sensitivity.run(config)
    fam = sensitivity.family_table(res)
    if args.json:
        print(json.dumps({"families": fam.to_dict("records"), "tasks": sensitivity.task_table(res).to_dict("records"),
                          "meta": res.meta}, indent=2, default=str))
        return 0
    print(res.tables()["by family"].to_string())
    print()
    print("\n".join(line.replace("**", "").replace("*", "") for line in res.findings()))
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QkitError(f"expected comma-separated whole numbers, got {text!r}", "write e.g. 4096,32768") from None


def cmd_kv_plan(args: argparse.Namespace) -> int:
    from qkit.plan import kv

    plan = kv.plan(args.model, contexts=_ints(args.context), batches=_ints(args.batch),
                        formats=args.formats.split(","), weights=args.weights.split(","),
                        device_memory=args.device_memory)
    if args.json:
        print(plan.to_json(orient="records", indent=2))
        return 0
    print(kv.plan_table(plan).to_string())
    print()
    print("\n".join(kv.plan_summary(plan)))
    return 0


def _print_result(result) -> int:
    """A study's tables and findings as text: what its notebook shows, without the figures."""
    for name, table in result.tables().items():
        print(f"== {name}")
        print(table.to_string() if len(table) else "(empty)")
        print()
    print("\n".join(line.replace("**", "") for line in result.findings()))
    return 0


def cmd_kv_evaluate(args: argparse.Namespace) -> int:
    from qkit.studies import kv_cache as kvcache

    config = kvcache.config(args.profile, model=args.model, schemes=args.scheme.split(",") if args.scheme else None,
                            n_tokens=args.tokens, n_docs=args.docs, trust_remote_code=args.trust_remote_code,
                            context_lengths=_ints(args.context_lengths) if args.context_lengths else None)
    return _print_result(kvcache.run(config))


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


def cmd_drift_check(args: argparse.Namespace) -> int:
    import math

    from qkit import models
    from qkit.data import request_log
    from qkit.evaluation import monitor, served
    from qkit.quant import variants
    from qkit.studies import drift_monitoring as drift

    config = monitor.MonitorConfig(window=args.window)  # bad input fails before a model loads
    request_log.check_log(args.log)
    scoring = served.DriftConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    reference = models.resolve_model(args.reference, trust_remote_code=args.trust_remote_code)
    deployment = variants.parse(reference, args.quantized)
    state = drift.update(args.log, reference, deployment, scoring)
    mon = monitor.monitor(state.results, config)

    def pct(x: float) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    rows = []
    for _, w in mon.windows.iterrows():
        acc = (f"{pct(w['acc_ref'])}/{pct(w['acc_quant'])}" if "acc_ref" in w and not math.isnan(w["acc_ref"])
               else "-")
        rows.append((w["window"], f"{w['first_line']}-{w['last_line']}", w["n"], f"{w['kld']:.3g}",
                     "baseline" if w["baseline"] else f"{w['kld_ratio']:.2f}", pct(w["top1"]), pct(w["served_top1"]),
                     f"{w['ref_logprob']:.3f}", pct(w["tail_share"]), acc, "ALERT" if w["alert"] else ""))
    print(f"{args.log}: {len(state.results)} requests, {deployment.label} against {args.reference}, windows of "
          f"{config.window}")
    _print_table(("window", "lines", "n", "KLD", "xbase", "top1%", "served%", "ref_lp", "tail%", "acc ref/q%",
                  "alert"), rows)
    if state.malformed:
        print(f"{len(state.malformed)} malformed line(s) skipped (first: line {state.malformed[0][0]})")
    if state.skipped_empty:
        print(f"{state.skipped_empty} request(s) with an empty completion skipped")
    n_cut = sum(r["truncated"] for r in state.results)
    if n_cut:
        print(f"{n_cut} request(s) longer than the context: their prompts were cut from the left")
    for line in monitor.alert_lines(mon):
        print(line)
    alerts = args.alerts or drift.state_path_for(args.log, reference, deployment, scoring).with_name("alerts.json")
    drift.write_alerts(mon, state, alerts)
    print(f"alerts: {alerts}")
    return 1 if mon.alerts else 0


def cmd_drift_replay(args: argparse.Namespace) -> int:
    from qkit import models
    from qkit.data import request_log
    from qkit.studies import drift_monitoring as drift

    if args.prompts:
        request_log.check_log(args.prompts)
    reference = models.resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    out = drift.replay(reference, args.method, args.prompts, args.out, switch_to=args.switch_to,
                       switch_at=args.switch_at, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(out)
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from qkit.plan import hardware

    model = args.model if args.model or args.model_size else hardware.DEFAULT_PLAN_MODEL
    advice = hardware.advise(args.gpu, model=model, model_size=args.model_size, context=args.context,
                             batch=args.batch, memory_gb=args.memory)
    print("\n".join(hardware.summary(advice)))
    print(f"\nMemory for {advice.n_params / 1e9:.2f}B parameters"
          + (f", KV cache (BF16) at {advice.context} tokens x batch {advice.batch}" if advice.shape else
             " (give --model for the KV cache)") + ":")
    t = advice.table
    _print_table(("precision", "bits/weight", "weights GB", "KV GB", "total GB", "fits", "room for KV GB"),
                 [(p, f"{r['bits per weight']:.3g}", f"{r['weights GB']:.1f}",
                   "-" if r["KV cache GB"] is None or r["KV cache GB"] != r["KV cache GB"] else f"{r['KV cache GB']:.1f}",
                   f"{r['total GB']:.1f}", "-" if r["fits"] is None else ("yes" if r["fits"] else "no"),
                   "-" if r["room for KV GB"] is None or r["room for KV GB"] != r["room for KV GB"]
                   else f"{r['room for KV GB']:.1f}") for p, r in t.iterrows()])
    print("\nShould you quantize?")
    print("\n".join(hardware.checklist(advice)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qkit.report import run_report

    records = run_report(args.notebooks or None, dict(args.param), args.out)
    return 1 if any(r["status"] != "ok" for r in records) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkit", description="Quantize an LLM and measure what it costs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("methods", help="list the quantization methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("quantize", help="quantize a model with one method; prints the checkpoint path")
    _model_args(p)
    p.add_argument("--method", required=True, help="a method from `qkit methods`")
    _calib_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="perplexity, KL divergence and top-1 agreement against the baseline")
    _model_args(p)
    p.add_argument("--method", required=True, help="a method from `qkit methods`, or a checkpoint directory")
    _calib_args(p)
    p.add_argument("--eval-text", help="held-out text: prose, chat or code (default: the methods study's, prose)")
    p.add_argument("--tokens", type=int, help="evaluation tokens (default: the methods study's quick profile)")
    p.add_argument("--ctx", type=int, help="tokens per evaluation chunk (default: the methods study's)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tasks", help="list the offline lm-eval tasks with item counts and sources")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("sensitivity", help="score methods on arithmetic, code, long-context and summarization tasks")
    _model_args(p)
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: the profile's, fp8_dynamic,w8a8_int8,w4a16_gptq,w4a16_awq)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks or families (default: all; see `qkit tasks`)")
    p.add_argument("--profile", default="quick", help="quick (minutes on a CPU) or full (default quick)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: the profile's)")
    p.add_argument("--context-lengths", default=None, metavar="N,N,...",
                   help="passkey context lengths in tokens (default: the profile's; quick 512,1024, full to 8192)")
    _calib_args(p)
    p.add_argument("--json", action="store_true", help="print the family and task tables as JSON")
    p.set_defaults(func=cmd_sensitivity)

    calib = sub.add_parser("calib", help="calibration data tools").add_subparsers(dest="calib_command", required=True,
                                                                                 metavar="COMMAND")
    p = calib.add_parser("inspect", help="diagnose a calibration set before quantizing with it")
    p.add_argument("name", help="prose, chat, code, random or mixed")
    _model_args(p)
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="w4a16_gptq,w4a16_awq,w8a8_int8,fp8_static",
                   help="methods whose usual calibration size the set is checked against")
    p.add_argument("--json", action="store_true", help="print the diagnostics as JSON")
    p.set_defaults(func=cmd_calib_inspect)

    kv = sub.add_parser("kv", help="KV-cache memory planner and quality").add_subparsers(
        dest="kv_command", required=True, metavar="COMMAND")
    p = kv.add_parser("plan", help="KV-cache and weight memory per context, batch and precision")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name (smollm2-135m, llama-3.1-8b, llama-3.1-70b, qwen2.5-7b), hub id of one of "
                        "those, or a config.json / model directory")
    p.add_argument("--context", default="4096,8192,16384,32768,65536,131072", help="context lengths, comma-separated")
    p.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated")
    p.add_argument("--formats", default="bf16,fp8,int4", help="KV cache formats: bf16, fp8, int8, int4")
    p.add_argument("--weights", default="bf16,fp8,int4", help="weight precisions: bf16, fp8, int8, int4, nvfp4")
    p.add_argument("--device-memory", help="device memory to fit in, e.g. 80GB")
    p.add_argument("--json", action="store_true", help="print the plan's rows as JSON")
    p.set_defaults(func=cmd_kv_plan)
    p = kv.add_parser("evaluate", help="quality by position and passkey retrieval of KV-cache schemes")
    _model_args(p)
    p.add_argument("--scheme", default=None,
                   help="schemes, comma-separated: fp8_tensor, fp8_head, fp8_unit, fp8_static+fp8_head, "
                        "fp8_static, hqq_int8, hqq_int4, quanto_int4 (default: the profile's)")
    p.add_argument("--profile", default="quick", choices=["quick", "full"])
    p.add_argument("--tokens", type=int, help="tokens per long document (default: the profile's)")
    p.add_argument("--docs", type=int, help="long documents (default: the profile's)")
    p.add_argument("--context-lengths", help="passkey lengths, comma-separated (default: the profile's)")
    p.set_defaults(func=cmd_kv_evaluate)

    drift = sub.add_parser("drift", help="monitor a quantized deployment's drift from its reference on logged "
                                         "traffic").add_subparsers(dest="drift_command", required=True, metavar="COMMAND")
    p = drift.add_parser("check", help="measure a request log's new lines, print a table per window; exit 1 on an alert")
    p.add_argument("--log", required=True, help="JSONL request log (fields: see qkit.data.request_log)")
    p.add_argument("--reference", default=DEFAULT_MODEL, help=f"the unquantized model (default {DEFAULT_MODEL})")
    p.add_argument("--quantized", required=True, metavar="METHOD|DIR",
                   help="the deployed model: a method from `qkit methods` or a model directory")
    p.add_argument("--window", default="50", help="requests per window, or a duration such as 30m, 6h (default 50)")
    p.add_argument("--alerts", default=None, help="where to write the alerts as JSON (default: beside the state "
                                                   "in the store)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="greedy answer length for checkable requests and missing completions (default 32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    p.set_defaults(func=cmd_drift_check)
    p = drift.add_parser("replay", help="write a request log by serving a prompts file with a method's checkpoint")
    _model_args(p)
    p.add_argument("--method", required=True, metavar="METHOD|DIR", help="what serves the prompts")
    p.add_argument("--prompts", default=None, help="JSONL prompts (the log format; default: qkit's 64 sample "
                                                    "prompts in four tags)")
    p.add_argument("--switch-to", default=None, metavar="METHOD|DIR", help="what serves from --switch-at on")
    p.add_argument("--switch-at", type=int, default=None, help="first request served by --switch-to (default: half)")
    p.add_argument("--out", default="drift_log.jsonl", help="the log to write (default drift_log.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer, greedy (default 32)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.set_defaults(func=cmd_drift_replay)

    p = sub.add_parser("advise", help="recommend a method for a GPU (or this machine) and plan the memory")
    p.add_argument("--gpu", default=None, help="a GPU from the hardware table, e.g. A100, H100, B200, RTX 4090, "
                                               "apple, cpu (default: detect this machine)")
    p.add_argument("--model", default=None, help="built-in name or config.json / model directory (default "
                                                 "llama-3.1-8b unless --model-size is given)")
    p.add_argument("--model-size", default=None, help="parameter count such as 70B or 135M (overrides the model's)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence for the KV cache (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences in flight (default 1)")
    p.add_argument("--memory", default=None, help="device memory to plan against, e.g. 24GB (default: the table's "
                                                  "or this machine's)")
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser("report", help="execute notebooks into HTML reports under reports/")
    p.add_argument("notebooks", nargs="*", help="notebook names (default: all in notebooks/)")
    p.add_argument("-p", "--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter, value in YAML (repeatable), e.g. -p model=tiny")
    p.add_argument("--out", default="reports", help="output folder (default reports/)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QkitError as e:
        print(f"qkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
