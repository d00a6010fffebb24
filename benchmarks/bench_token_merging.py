"""Token merging on ViT-B/16 at 224: MACs and CPU throughput vs the unmerged model, alone and on the pipeline.

timm ``vit_base_patch16_224`` (random weights: speed and MACs do not depend on
them), batch 4, 2 threads, every variant in this one process, timed interleaved
(``compare_throughput``). Variants are made with the functions the callbacks
run: ``merge_tokens`` (TokenMerging), ``prune_vit`` (PruningSchedule),
``quantize_model`` + ``compile_frozen`` (QuantizeOnFit).

* ToMe r=8 and r=16 (proportional attention) vs fp32 eager: target r=16 >= 1.7x.
* The pipeline: pruned 50% + int8 (``int8_dynamic``, eager), and pruned 50% +
  ``int8_static_x86`` bf16-mixed compiled (the fastest pipeline of
  bench_pipeline.py), each without and with ToMe r=16, against fp32 eager and
  against the same pipeline without merging.

MACs are counted on the fp32 models (``count_macs``: the counter cannot see
int8 kernels); the merged pipelines' MACs are those of pruned + merged fp32.

    python benchmarks/bench_token_merging.py [--batch-size 4] [--threads 2] [--no-compile] [--rounds 3]
        [--min-run-time 2.0] [--merging-only]
"""

from __future__ import annotations

import argparse
import copy
import time

import timm
import torch

from lightning_vitcompress import compile_frozen, quantize_model
from lightning_vitcompress.functional import (
    compare_throughput,
    count_macs,
    merge_tokens,
    merged_token_counts,
    prune_vit,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--merging-only", action="store_true", help="fp32, r=8 and r=16 only (no pipelines)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 32
    x = torch.randn(args.batch_size, 3, 224, 224)

    fp32 = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    variants: dict[str, torch.nn.Module] = {"fp32 eager": fp32}
    macs: dict[str, int] = {"fp32 eager": count_macs(fp32, x[:1])}
    tokens: dict[str, list[int]] = {}
    for r in (8, 16):
        merged = copy.deepcopy(fp32)
        merge_tokens(merged, r)
        name = f"ToMe r={r}"
        variants[name], macs[name], tokens[name] = merged, count_macs(merged, x[:1]), merged_token_counts(merged)

    compile_seconds: dict[str, float] = {}
    pipelines: list[tuple[str, str, str]] = (
        [] if args.merging_only else [("pruned 50% + int8", "int8_dynamic", "eager")]
    )
    if pipelines:
        pruned = copy.deepcopy(fp32)
        prune_vit(pruned, 0.5, x[:1])
        pruned_merged = copy.deepcopy(pruned)
        merge_tokens(pruned_merged, 16)
        pipeline_macs = {False: count_macs(pruned, x[:1]), True: count_macs(pruned_merged, x[:1])}
    if pipelines and not args.no_compile:
        pipelines.append(("pruned 50% + int8 static x86 bf16-mixed, compiled", "int8_static_x86", "compiled"))
    calibration = [x, torch.randn_like(x)]
    for label, config, how in pipelines:
        for merge in (False, True):
            model = copy.deepcopy(pruned_merged if merge else pruned)
            quantize_model(model, config, calibration_inputs=calibration)
            name = label + (" + ToMe r=16" if merge else "")
            if how == "compiled":
                compile_frozen(model, autocast_dtype=torch.bfloat16)
                start = time.perf_counter()
                with torch.inference_mode():
                    model(x)
                compile_seconds[name] = time.perf_counter() - start
            variants[name], macs[name] = model, pipeline_macs[merge]
            if merge:
                tokens[name] = merged_token_counts(model)

    ips = compare_throughput(variants, x, num_threads=args.threads, rounds=args.rounds, min_run_time=args.min_run_time)
    base_ips, base_macs = ips["fp32 eager"], macs["fp32 eager"]
    print(f"\nvit_base_patch16_224, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}")
    print("| variant | GMACs / image | MACs ratio | CPU images/s | speedup vs fp32 eager | vs same without ToMe |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        without = name.replace(" + ToMe r=16", "") if name.endswith("ToMe r=16") and name != "ToMe r=16" else None
        if name.startswith("ToMe"):
            without = "fp32 eager"
        versus = f"{ips[name] / ips[without]:.2f}x" if without else ""
        print(
            f"| {name} | {macs[name] / 1e9:.2f} | {macs[name] / base_macs:.3f} | {ips[name]:.2f} "
            f"| {ips[name] / base_ips:.2f}x | {versus} |"
        )
    for name, counts in tokens.items():
        print(f"tokens after each block, {name}: {counts}")
    for name, seconds in compile_seconds.items():
        print(f"first call of {name} (compile cost): {seconds:.1f} s")


if __name__ == "__main__":
    main()
