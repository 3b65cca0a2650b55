"""GPU paths that CPU-only CI cannot check, as one script for a CUDA machine.

1. The hardware table against the device: which registry methods run natively here.
2. qkit quantizes the `tiny` model on the GPU (llm-compressor onloads layers to the accelerator) and the
   checkpoints reload on the GPU and evaluate against the CPU baseline.
3. Real FP8 kernels: the FP8 weights and per-channel scales from qkit's fp8_dynamic checkpoint, with
   per-token dynamic activation scales, through torch._scaled_mm, against the dequantized matmul; then
   FP8 against BF16 GEMM throughput at a size where tensor cores dominate.
4. vLLM, if installed.

    python benchmarks/gpu_check.py [--model tiny] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from qkit import models
from qkit.core import provenance
from qkit.evaluation import EvalSpec, compare
from qkit.quant import methods, registry

FP8 = torch.float8_e4m3fn


def native_table(capability: tuple[int, int]) -> dict[str, bool]:
    return {name: capability >= m.native_hardware.min_capability for name, m in registry.METHODS.items()}


def quantize_and_evaluate(loaded: models.LoadedModel, names: list[str]) -> dict:
    out = {}
    spec = EvalSpec(domain="prose", n_tokens=2048, ctx=256)
    for name in names:
        ckpt = methods.quantize(loaded, name, calib=methods.CalibSpec("prose", 16, 128, 0))
        model = methods.load_quantized(ckpt).to("cuda")
        result = compare(model, loaded, spec, label=name)
        linear = model.model.layers[0].self_attn.q_proj
        out[name] = {"quantize_seconds": ckpt.seconds, "format": ckpt.meta["format"],
                     "gpu_kld_mean": result["kld_mean"], "gpu_top1_pct": result["top1_agreement_pct"],
                     "layer_class": type(linear).__name__,
                     "layer_tensors": {k: str(v.dtype) for k, v in linear.state_dict().items()}}
    return out


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 scales, as FP8_DYNAMIC does per token at run time."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(FP8).max
    return (x.float() / scale).to(FP8), scale


def fp8_kernel_check(ckpt_dir: str) -> dict:
    from pathlib import Path

    from safetensors.torch import load_file

    tensors = {}
    for f in Path(ckpt_dir).glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    name = next(k for k, v in tensors.items() if k.endswith("q_proj.weight") and v.dtype == FP8)
    w = tensors[name].cuda()  # [N, K] float8_e4m3fn, as the checkpoint stores it
    w_scale = tensors[name.replace(".weight", ".weight_scale")].cuda().float().view(1, -1)  # per channel
    x = torch.randn(512, w.shape[1], device="cuda", dtype=torch.bfloat16)
    xq, x_scale = quantize_rowwise(x)
    fast = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    ref = (xq.float() * x_scale) @ (w.float() * w_scale.view(-1, 1)).t()
    rel = ((fast.float() - ref).norm() / ref.norm()).item()

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    aq, sa = quantize_rowwise(a)
    bq, sb = quantize_rowwise(b)

    def bench(fn, reps: int = 20) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    t_bf16 = bench(lambda: a @ b.t())
    t_fp8 = bench(lambda: torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.view(1, -1), out_dtype=torch.bfloat16))
    flops = 2 * n ** 3
    return {"tensor": name, "fp8_vs_dequantized_rel_error": rel,
            "gemm": n, "bf16_tflops": flops / t_bf16 / 1e12, "fp8_tflops": flops / t_fp8 / 1e12,
            "fp8_speedup": t_bf16 / t_fp8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--model", default="tiny", help="built-in name or local directory (default tiny)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths and has nothing to do here")
    report: dict = {"hardware": provenance.hardware(), "libraries": provenance.library_versions()}
    cap = torch.cuda.get_device_capability()
    report["native"] = native_table(cap)
    print(json.dumps(report, indent=1), flush=True)
    loaded = models.resolve_model(args.model)
    report["methods"] = quantize_and_evaluate(loaded, ["fp8_dynamic", "fp8_static", "w4a16_gptq", "w8a8_int8"])
    print(json.dumps(report["methods"], indent=1), flush=True)
    ckpt = methods.quantize(loaded, "fp8_dynamic")
    report["fp8_kernel"] = fp8_kernel_check(str(ckpt.path))
    print(json.dumps(report["fp8_kernel"], indent=1), flush=True)
    try:
        import vllm
        report["vllm"] = vllm.__version__
    except ImportError:
        report["vllm"] = "not installed"
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("vllm:", report["vllm"])


if __name__ == "__main__":
    main()
