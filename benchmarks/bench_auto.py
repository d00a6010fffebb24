"""Does QuantizeOnFit(config="auto") choose well, and what does choosing cost?

On timm ``vit_base_patch16_224`` (random weights; speed does not depend on
them), one process:

1. "auto" selection exactly as QuantizeOnFit runs it at train end
   (:func:`~lightning_vitcompress.functional.quantize_auto.select_quantization`
   over :func:`auto_candidates` of this machine), with its table and the wall
   time it took.
2. Every fixed config "auto" could have chosen, built as QuantizeOnFit builds
   it (quantized, compiled where the config is; the copies the selection built,
   since compiling ViT-B costs 20 s to minutes each), timed again side by side,
   interleaved, with longer runs than the selection's, fp32 eager = 1.0; the
   row of "auto"'s choice is marked. The check: that row is within 5% of the
   fastest fixed config in this second, independent timing.

The static config calibrates on two batches of the same random inputs.

    python benchmarks/bench_auto.py [--model vit_base_patch16_224] [--batch-size 4] [--threads 2]
                                    [--device cpu|cuda] [--time-budget 600]
"""

from __future__ import annotations

import argparse
import copy
import time

import timm
import torch
from torch import nn

from lightning_vitcompress.functional import QUANTIZATION_CONFIGS, compare_throughput, quantize_model
from lightning_vitcompress.functional.quantize_auto import (
    AutoCandidate,
    auto_candidates,
    format_auto_table,
    select_quantization,
)
from lightning_vitcompress.functional.report import cpu_name


def build(model: nn.Module, candidate: AutoCandidate, x: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    """What QuantizeOnFit(config=candidate.config, inference_precision=...) leaves at train end."""
    spec = QUANTIZATION_CONFIGS[candidate.config]
    model = copy.deepcopy(model)
    quantize_model(model, spec, example_input=x[:1], calibration_inputs=calibration if spec.calibrates else None)
    if spec.compiles(None):
        spec.compile(model, candidate.inference_precision)
    with torch.inference_mode():
        model(x)  # compile now, not inside the timer
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--time-budget", type=float, default=600.0, help="auto_time_budget_s")
    parser.add_argument(
        "--rebuild-missing",
        action="store_true",
        help="also build the fixed configs the selection did not reach in its time budget",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    calibration = [x, torch.randn_like(x)]
    candidates = auto_candidates(device, calibration=True)

    print(
        f"## {args.model}, {device.type}, batch {args.batch_size}, {args.threads} threads of {cpu_name()}, torch {torch.__version__}"
    )
    print(f"candidates on this machine: {[c.label for c in candidates]}\n")
    torch._dynamo.reset()
    start = time.perf_counter()
    result = select_quantization(
        model,
        candidates,
        x,
        example_input=x[:1],
        calibration_inputs=calibration,
        time_budget_s=args.time_budget,
        rounds=args.rounds,
        min_run_time=args.min_run_time,
        num_threads=args.threads,
        progress=lambda line: print(f"  auto: {line}", flush=True),
        keep_models=True,
    )
    selection_seconds = time.perf_counter() - start
    print("\n### what 'auto' measured\n")
    print(format_auto_table(result))
    chosen = result["chosen"]

    print("\n### 'auto' against every fixed config, timed together (fp32 eager = 1.0)\n")
    variants: dict[str, nn.Module] = {"fp32 eager": model}
    for candidate in candidates:
        if candidate.label in result["models"]:
            variants[candidate.label] = result["models"][candidate.label]
        elif args.rebuild_missing:
            try:
                variants[candidate.label] = build(model, candidate, x, calibration)
            except Exception as err:
                print(f"| {candidate.label} | failed: {type(err).__name__}: {str(err)[:100]} |")
        else:
            print(f"({candidate.label}: not built by the selection, left out; --rebuild-missing builds it)")
    speed = compare_throughput(
        variants, x, num_threads=args.threads, rounds=args.rounds, min_run_time=args.min_run_time
    )
    print("| variant | speed vs fp32 eager |")
    print("|---|---|")
    for label, value in speed.items():
        mark = " (auto's choice)" if chosen is not None and label == chosen.label else ""
        print(f"| {label}{mark} | {value / speed['fp32 eager']:.2f}x |")
    fixed = {label: value for label, value in speed.items() if label != "fp32 eager"}
    fastest = max(fixed, key=fixed.__getitem__)
    if chosen is None:
        ratio = 1.0 / (fixed[fastest] / speed["fp32 eager"])
        print(f"\n'auto' kept the model unquantized: {ratio:.3f}x the fastest fixed config ({fastest}); ", end="")
    elif chosen.label not in fixed:
        print(f"\n'auto' chose {chosen.label}, which is not among the timed fixed configs; ", end="")
        ratio = float("nan")
    else:
        ratio = fixed[chosen.label] / fixed[fastest]
        print(
            f"\n'auto' chose {chosen.label}: {ratio:.3f}x the fastest fixed config ({fastest}) in this timing "
            f"-> {'within' if ratio >= 0.95 else 'NOT within'} 5%; ",
            end="",
        )
    print(f"selection took {selection_seconds:.0f} s (budget {args.time_budget:.0f} s)")


if __name__ == "__main__":
    main()
