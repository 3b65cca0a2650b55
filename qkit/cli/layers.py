"""`qkit layers scan` and `qkit layers search`: the layer-sensitivity study from the command line."""
from __future__ import annotations

import argparse
import json
import shutil

from qkit.cli import common


def _texts(args: argparse.Namespace) -> list[str]:
    from qkit.evaluation import TASK_PREFIX

    texts = [t.strip() for t in (args.eval_text or "").split(",") if t.strip()]
    return texts + [f"{TASK_PREFIX}{t.strip()}" for t in (args.tasks or "").split(",") if t.strip()]


def cmd_layers_scan(args: argparse.Namespace) -> int:
    from qkit.studies import layer_sensitivity as study

    texts = _texts(args) or None
    config = study.config(args.profile, model=args.model, format=args.format, texts=texts,
                          units=args.units.split(",") if args.units else None, eval_tokens=args.tokens,
                          prune=args.prune,
                          targets=[], anchors=[], budgets=[], reverse=[] if not args.reverse else None)
    result = study.run(config)
    if args.json:
        print(result.scan.drop(columns=["chunk_kld"]).to_json(orient="records", indent=1))
        return 0
    print(result.tables()["scan"].to_string(index=False))
    print()
    print(result.tables()["proxy check"].to_string(index=False))
    if len(result.pruning):
        print()
        print(result.tables()["pruning"].to_string(index=False))
    print("\n".join(line.replace("**", "") for line in result.findings()))
    return 0


def cmd_layers_search(args: argparse.Namespace) -> int:
    from qkit.studies import layer_sensitivity as study

    target = args.target
    config = study.config(args.profile, model=args.model, format=args.formats.split(",")[0],
                          formats=args.formats.split(","), texts=[target], targets=[target], budgets=[args.budget],
                          units=[args.units], search_units=args.units, reverse=[], anchors=[], eval_tokens=args.tokens)
    result = study.run(config)
    (mix,) = result.mixes.to_dict("records")
    (measured,) = result.mix_rows.to_dict("records")
    shutil.copyfile(mix["recipe"], args.out)
    if args.json:
        print(json.dumps({"assignment": mix["assignment"], "bits": mix["bits"], "predicted_kld": mix["predicted_kld"],
                          "kld": measured["kld_mean"], "kld_low": measured["kld_mean_low"],
                          "kld_high": measured["kld_mean_high"], "recipe": args.out}, indent=1))
        return 0
    common.print_table(("unit", "format"), list(mix["assignment"].items()))
    print(f"{mix['bits']:.3f} bits per weight (budget {args.budget:g}) on {target}: predicted KLD "
          f"{mix['predicted_kld']:.4g}, measured {measured['kld_mean']:.4g} [{measured['kld_mean_low']:.4g}, "
          f"{measured['kld_mean_high']:.4g}], top-1 {measured['top1_pct']:.1f}%")
    print(f"recipe: {args.out} (qkit evaluate --method recipe:{args.out})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    layers = sub.add_parser("layers", help="which layers hurt when quantized, and the best mix under a size budget"
                            ).add_subparsers(dest="layers_command", required=True, metavar="COMMAND")
    p = layers.add_parser("scan", help="KLD of each unit alone in a format, with CIs, and the proxy's ranking")
    common.model_args(p)
    p.add_argument("--format", default=None, help="a round-to-nearest method (default w4a16_rtn)")
    p.add_argument("--units", help="unit kinds, comma-separated: layers, types, modules (default layers,types), or units "
                                       "by name ('layer 3', 'type v_proj', a module's full name)")
    p.add_argument("--eval-text", help="eval texts, comma-separated: prose, chat, code or data files "
                                       "(default prose,code)")
    p.add_argument("--tasks", help="tasks whose prompts are scanned too, comma-separated (see `qkit tasks`)")
    p.add_argument("--tokens", type=int, help="evaluation tokens per text (default: the profile's)")
    p.add_argument("--reverse", action="store_true", help="also keep each unit in float among the rest quantized")
    p.add_argument("--prune", type=int, metavar="K",
                   help="with modules among the units: measure K modules at random, then, if the proxy ranks those "
                        "well, only the proxy's top K of the rest (default: the profile's; 0: all)")
    p.add_argument("--profile", default="quick", choices=["quick", "full"])
    p.add_argument("--json", action="store_true", help="print the scan's rows as JSON")
    p.set_defaults(func=cmd_layers_scan)
    p = layers.add_parser("search", help="the mix of formats with the least predicted KLD under a budget, "
                                         "written as an llm-compressor recipe and measured")
    common.model_args(p)
    p.add_argument("--budget", type=float, required=True, help="bits per weight of the decoder's Linear weights")
    p.add_argument("--formats", default="w4a16_rtn,w8a16_rtn",
                   help="candidate formats besides float, comma-separated (default w4a16_rtn,w8a16_rtn)")
    p.add_argument("--target", default="prose", help="what the mix protects: prose, chat, code, a data file or "
                                                     "task:NAME (default prose)")
    p.add_argument("--units", default="types", choices=["layers", "types", "modules"],
                   help="what gets one format (default types)")
    p.add_argument("--tokens", type=int, help="evaluation tokens (default: the profile's)")
    p.add_argument("--out", required=True, help="where to write the recipe YAML")
    p.add_argument("--profile", default="quick", choices=["quick", "full"])
    p.add_argument("--json", action="store_true", help="print the assignment and KLDs as JSON")
    p.set_defaults(func=cmd_layers_search)
