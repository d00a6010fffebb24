"""Where int8 starts to pay on this CPU: batch-1 latency of QuantizeOnFit()'s default config against fp32, per width.

int8 GEMMs do a quarter of the work per multiply, but each quantized layer adds
fixed costs (quantizing its input, the kernel's set-up). On a narrow ViT those
can dominate and make int8 *slower* than float32. This script measures, on this
machine, the default config (compiled) and the portable ``int8_dynamic`` (eager,
the default on CPUs without int8 dot products) against fp32 eager: timm ViTs of
depth 4, patch 16 at 224 (197 tokens), widths 64-768 (heads of 64, at least one),
batch 1, each width's variants timed in one process, interleaved.
``QuantizeOnFit()`` warns where its choice is eager and the model is narrower
than ``INT8_PAYS_FROM_WIDTH``.

    python benchmarks/bench_int8_width.py [--widths 64 128 192 256 384 768] [--threads 2] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import copy
import sys

import timm
import torch

from lightning_vitcompress import quantize_model
from lightning_vitcompress.callbacks.quantization import INT8_PAYS_FROM_WIDTH
from lightning_vitcompress.functional import QUANTIZATION_CONFIGS, compare_throughput, default_quantization
from lightning_vitcompress.functional.report import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 192, 256, 384, 768])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled model per width, all of one class
    torch.manual_seed(0)
    choice = default_quantization(torch.device("cpu"))
    spec = QUANTIZATION_CONFIGS[choice.config]
    x = torch.randn(args.batch_size, 3, 224, 224)
    print(
        f"depth-4 ViTs at 224 (197 tokens), batch {args.batch_size}, {args.threads} threads of {cpu_name()}; "
        f"default config here: {choice.config} {choice.inference_precision}; QuantizeOnFit() warns below width "
        f"{INT8_PAYS_FROM_WIDTH}\n"
    )
    print(
        "| width | fp32 eager (ms) | default int8 (ms) | default vs fp32 | portable int8_dynamic, eager (ms) "
        "| portable vs fp32 |"
    )
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        model = timm.create_model(
            "vit_base_patch16_224", pretrained=False, embed_dim=width, depth=4, num_heads=max(1, width // 64)
        ).eval()
        int8 = copy.deepcopy(model)
        quantize_model(int8, spec, example_input=x, calibration_inputs=[x, torch.randn_like(x)])
        if spec.compiled_by_default:
            spec.compile(int8, choice.inference_precision)
        portable = copy.deepcopy(model)  # what the default is on CPUs without int8 dot products
        quantize_model(portable, "int8_dynamic", example_input=x)
        with torch.inference_mode():
            int8(x)  # compiled before the timing starts
        print(f"timing width {width} ...", file=sys.stderr, flush=True)
        ips = compare_throughput(
            {"fp32": model, "int8": int8, "portable": portable}, x, rounds=args.rounds, min_run_time=args.min_run_time
        )
        print("timed", file=sys.stderr, flush=True)
        ms = {name: 1e3 * args.batch_size / value for name, value in ips.items()}
        print(
            f"| {width} | {ms['fp32']:.2f} | {ms['int8']:.2f} | {ips['int8'] / ips['fp32']:.2f}x "
            f"| {ms['portable']:.2f} | {ips['portable'] / ips['fp32']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
