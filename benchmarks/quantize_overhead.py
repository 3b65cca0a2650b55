"""(a) `qkit quantize` against calling llm-compressor's `oneshot` directly: same model, recipe and data.

Both sides do the whole job a user waits for: load a fresh float copy, build the calibration set,
run oneshot, save the compressed checkpoint. qkit adds its cache bookkeeping (hashing the files into
the manifest, provenance). Target: qkit / direct <= 1.05.

    python benchmarks/quantize_overhead.py [--model smollm2-135m] [--method w4a16_gptq] [--samples 32]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from qkit import data, models
from qkit.core.store import Store
from qkit.quant import methods, registry
from qkit.quant.backends import llmcompressor as llmcompressor_backend


def direct(loaded: models.LoadedModel, method: registry.Method, calib: methods.CalibSpec, out: Path) -> float:
    from llmcompressor import oneshot

    started = time.perf_counter()
    model = models.load_pretrained(loaded.path, dtype="float32")
    dataset = data.calibration_set(calib.name, calib.n_samples, calib.seq_len, calib.seed,
                                   tokenizer=loaded.tokenizer) if method.needs_calibration else None
    kwargs = {"max_seq_length": calib.seq_len, "num_calibration_samples": calib.n_samples,
              "shuffle_calibration_samples": False} if dataset is not None else {}
    with llmcompressor_backend.cpu_without_pinning():  # AWQ cannot run on CPU without it, direct or not
        oneshot(model=model, tokenizer=loaded.tokenizer, recipe=llmcompressor_backend.recipe(method), dataset=dataset, **kwargs)
    model.save_pretrained(out, save_compressed=True)
    loaded.tokenizer.save_pretrained(out)
    return time.perf_counter() - started


def via_qkit(loaded: models.LoadedModel, method: registry.Method, calib: methods.CalibSpec, root: Path) -> float:
    started = time.perf_counter()
    methods.quantize(loaded, method, calib=calib, store=Store(root))
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="w4a16_gptq")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    loaded = models.resolve_model(args.model)
    method = registry.get_method(args.method)
    calib = methods.CalibSpec("prose", args.samples, args.seq_len, 0)
    import llmcompressor  # noqa: F401 - import cost (15-25 s) is paid once, outside both timings

    times = {"direct": [], "qkit": []}
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            # alternate the order so that neither side always runs on a warmer machine
            for side in (("direct", "qkit") if i % 2 == 0 else ("qkit", "direct")):
                if side == "direct":
                    times[side].append(direct(loaded, method, calib, Path(tmp) / "direct"))
                else:
                    times[side].append(via_qkit(loaded, method, calib, Path(tmp) / "store"))
    d, q = min(times["direct"]), min(times["qkit"])
    data_note = f"calibration prose {args.samples} x {args.seq_len}" if method.needs_calibration else "no calibration"
    print(f"{args.method} on {args.model}, {data_note}, best of {args.repeats}")
    print(f"  oneshot direct: {d:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times['direct'])})")
    print(f"  qkit quantize:  {q:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times['qkit'])})")
    print(f"  overhead ratio: {q / d:8.3f}   (target <= 1.05: {'met' if q / d <= 1.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
