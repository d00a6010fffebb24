"""The combined pipeline's speed and size on ViT-B/16: pruning 50% + int8, vs fp32 eager.

timm ``vit_base_patch16_224`` (random weights: speed and size do not depend on
them), batch 4, 2 threads, every variant in this one process, timed interleaved
(``compare_throughput``). The variants are made with the same functions the
callbacks run (``prune_vit`` for PruningSchedule, ``quantize_model`` for
QuantizeOnFit). Target: pruned 50% + int8 >= 11x fp32 eager, size <= 0.07x.
Compiled variants: torchao's portable ``int8_dynamic`` with ``torch.compile``,
and ``int8_dynamic_x86`` / ``int8_static_x86`` compiled with inductor freezing
(``compile_frozen``, what QuantizeOnFit does for those configs), also with
``inference_precision="bf16-mixed"``; the static config calibrates on two
batches of the same random inputs. The pruned fp32 model compiled with
freezing (alone and bf16-mixed) shows how much of that is the compiler and bf16.
The last column divides by what a team would run without compressing: the
unpruned fp32 model under bf16 autocast (where the CPU has native bf16) compiled
with inductor (``build_baseline(model, "bf16_compiled")``, the reference
``BenchmarkCallback(baselines=("bf16_compiled",))`` adds).

    python benchmarks/bench_pipeline.py [--batch-size 4] [--threads 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

from lightning_vitcompress import compile_frozen, quantize_model
from lightning_vitcompress.functional import INFERENCE_PRECISIONS, compare_throughput, prune_vit, serialized_size_bytes
from lightning_vitcompress.functional.baselines import build_baseline
from lightning_vitcompress.functional.measure import first_call_seconds
from lightning_vitcompress.functional.report import cpu_name

REFERENCE = "fp32 model, bf16 compiled (what you would run anyway)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # nine compiled variants of one model class: past dynamo's default recompile_limit (8) the
    # rest would silently run eager
    torch._dynamo.config.recompile_limit = 32
    x = torch.randn(args.batch_size, 3, 224, 224)

    fp32 = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    variants = {"fp32 eager": fp32}
    int8 = copy.deepcopy(fp32)
    quantize_model(int8, "int8_dynamic")
    variants["int8 dynamic"] = int8
    pruned = copy.deepcopy(fp32)
    prune_vit(pruned, 0.5, x[:1])
    variants["pruned 50%"] = pruned
    both = copy.deepcopy(pruned)
    quantize_model(both, "int8_dynamic")
    variants["pruned 50% + int8"] = both
    compile_seconds = {}
    if not args.no_compile:
        reference = build_baseline(fp32, "bf16_compiled")
        compile_seconds[REFERENCE] = first_call_seconds(reference, x)
        variants[REFERENCE] = reference
        compiled = copy.deepcopy(pruned)
        quantize_model(compiled, "int8_dynamic")
        compiled.compile()
        compile_seconds["pruned 50% + int8, compiled"] = first_call_seconds(compiled, x)
        variants["pruned 50% + int8, compiled"] = compiled
        pruned_frozen = copy.deepcopy(pruned)
        compile_frozen(pruned_frozen)
        compile_seconds["pruned 50%, compiled (freezing)"] = first_call_seconds(pruned_frozen, x)
        variants["pruned 50%, compiled (freezing)"] = pruned_frozen
        pruned_bf16 = copy.deepcopy(pruned)
        compile_frozen(pruned_bf16, autocast_dtype=torch.bfloat16)
        compile_seconds["pruned 50%, compiled bf16-mixed"] = first_call_seconds(pruned_bf16, x)
        variants["pruned 50%, compiled bf16-mixed"] = pruned_bf16
        calibration = [x, torch.randn_like(x)]
        runs = [("", fp32, "int8_dynamic_x86", "32-true"), ("", fp32, "int8_static_x86", "bf16-mixed")]
        runs += [
            ("pruned 50% + ", pruned, config, precision)
            for config in ("int8_dynamic_x86", "int8_static_x86")
            for precision in INFERENCE_PRECISIONS
        ]
        for prefix, source, config, precision in runs:
            model = copy.deepcopy(source)
            quantize_model(model, config, calibration_inputs=calibration)
            compile_frozen(model, autocast_dtype=INFERENCE_PRECISIONS[precision])
            label = f"{prefix}{config}{' bf16-mixed' if precision == 'bf16-mixed' else ''}, compiled"
            compile_seconds[label] = first_call_seconds(model, x)
            variants[label] = model

    ips = compare_throughput(variants, x, num_threads=args.threads, rounds=args.rounds, min_run_time=2.0)
    base_ips, base_size = ips["fp32 eager"], serialized_size_bytes(fp32)
    print(
        f"\nvit_base_patch16_224, batch {args.batch_size}, {args.threads} threads of {cpu_name()}, torch {torch.__version__}"
    )
    ref_ips = ips.get(REFERENCE)
    print(
        "| variant | params (M) | size (MB) | size ratio | CPU images/s | speedup vs fp32 eager "
        "| speedup vs bf16 compiled |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, model in variants.items():
        size = serialized_size_bytes(model)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        vs_ref = "n/a" if ref_ips is None else f"{ips[name] / ref_ips:.2f}x"
        print(
            f"| {name} | {params:.1f} | {size / 1e6:.1f} | {size / base_size:.3f}x | {ips[name]:.2f} "
            f"| {ips[name] / base_ips:.2f}x | {vs_ref} |"
        )
    for name, seconds in compile_seconds.items():
        print(f"first call of {name} (compile cost): {seconds:.1f} s")


if __name__ == "__main__":
    main()
