"""What ships vs what runs in-process: the exported files against the same model compiled live, on ViT-B/16.

timm ``vit_base_patch16_224`` (random weights: speed and size do not depend on
them), pruned 50% (``prune_vit``) and ``int8_static_x86`` (``quantize_model``,
calibrated on two batches), ``bf16-mixed`` where the CPU has bf16 math, in one
process:

* **pt2**: the loaded AOTInductor package (``export_compressed``) vs the same
  model compiled in-process with ``compile_frozen`` (what QuantizeOnFit does),
  timed interleaved; the package's load + first call vs the compile's first
  call; file size vs the fp32 state dict. Target: throughput >= 0.95x.
* **onnx**: the pruned fp32 model under onnxruntime vs torch eager, interleaved.

    python benchmarks/bench_export.py [--batch-size 4] [--threads 2] [--rounds 3] [--out /tmp/bench_export]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time
from pathlib import Path

import timm
import torch

from lightning_vitcompress import compile_frozen, export_compressed, load_artifact, quantize_model
from lightning_vitcompress.functional import INFERENCE_PRECISIONS, compare_throughput, prune_vit, serialized_size_bytes
from lightning_vitcompress.functional.measure import first_call_seconds
from lightning_vitcompress.functional.report import cpu_name
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_export_"))
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(args.batch_size, 3, 224, 224)
    precision = "bf16-mixed" if cpu_supports_bfloat16() else "32-true"

    fp32 = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    fp32_size = serialized_size_bytes(fp32)
    pruned = copy.deepcopy(fp32)
    prune_vit(pruned, 0.5, x[:1])
    del fp32
    int8 = copy.deepcopy(pruned)
    quantize_model(int8, "int8_static_x86", example_input=x, calibration_inputs=[x, torch.randn_like(x)])

    # the pt2 file: exported, AOT-compiled, checked (export_compressed), then loaded afresh as a server would
    summary = export_compressed(int8, out / "vit-pruned-int8.pt2", x, inference_precision=precision)
    start = time.perf_counter()
    deployed = load_artifact(summary["path"])
    load_seconds = time.perf_counter() - start
    deployed_first = first_call_seconds(deployed, x)

    # the same model compiled in this process, as QuantizeOnFit leaves it
    live = copy.deepcopy(int8)
    compile_frozen(live, autocast_dtype=INFERENCE_PRECISIONS[precision])
    compile_first = first_call_seconds(live, x)

    ips = compare_throughput(
        {"compiled in-process": live, "loaded .pt2": deployed}, x, rounds=args.rounds, min_run_time=args.min_run_time
    )
    print(
        f"\nvit_base_patch16_224 pruned 50% + int8_static_x86 ({precision}), batch {args.batch_size}, "
        f"{args.threads} threads of {cpu_name()}, torch {torch.__version__}"
    )
    print("| variant | CPU images/s | vs compiled | start-up (s) | size (MB) | size vs fp32 state dict |")
    print("|---|---|---|---|---|---|")
    int8_size = serialized_size_bytes(int8)
    print(
        f"| compiled in-process | {ips['compiled in-process']:.2f} | 1.000x | {compile_first:.1f} (compile + first call) "
        f"| {int8_size / 1e6:.1f} (state dict) | {int8_size / fp32_size:.3f}x |"
    )
    print(
        f"| loaded .pt2 | {ips['loaded .pt2']:.2f} | {ips['loaded .pt2'] / ips['compiled in-process']:.3f}x "
        f"| {load_seconds + deployed_first:.2f} (load {load_seconds:.2f} + first call {deployed_first:.2f}) "
        f"| {summary['size_bytes'] / 1e6:.1f} (file) | {summary['size_bytes'] / fp32_size:.3f}x |"
    )
    print(
        f"export + AOT compile (once, at train end): {summary['export_seconds']:.1f} s; "
        f"logits vs live model {summary['relative_error']:.2g} (tolerance {summary['tolerance']:g})"
    )
    del live, deployed

    if args.no_onnx or importlib.util.find_spec("onnxruntime") is None:
        print("\nONNX: skipped (pip install onnx onnxscript onnxruntime)")
        return
    onnx = export_compressed(pruned, out / "vit-pruned.onnx", x)
    runtime = load_artifact(onnx["path"])
    ips = compare_throughput(
        {"torch eager": pruned, "onnxruntime": runtime}, x, rounds=args.rounds, min_run_time=args.min_run_time
    )
    print(f"\nvit_base_patch16_224 pruned 50%, fp32, batch {args.batch_size}, {args.threads} threads")
    print("| variant | CPU images/s | vs torch eager | size (MB) |")
    print("|---|---|---|---|")
    print(
        f"| torch eager | {ips['torch eager']:.2f} | 1.000x | {serialized_size_bytes(pruned) / 1e6:.1f} (state dict) |"
    )
    print(
        f"| onnxruntime | {ips['onnxruntime']:.2f} | {ips['onnxruntime'] / ips['torch eager']:.3f}x "
        f"| {onnx['size_bytes'] / 1e6:.1f} (file) |"
    )
    print(f"onnx export: {onnx['export_seconds']:.1f} s; logits vs live model {onnx['relative_error']:.2g}")


if __name__ == "__main__":
    main()
