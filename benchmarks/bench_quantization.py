"""How much faster and smaller does QuantizeOnFit make a ViT, and does skipping the head matter?

1. CPU speed and size, one process, interleaved (A, B, A, B...), on timm
   ``vit_base_patch16_224`` and ``deit_small_patch16_224`` (random weights):
   fp32 eager = 1.0 against QuantizeOnFit's int8-dynamic (eager and
   ``torch.compile``), int8-dynamic-x86 and int8-static-x86 (compiled with
   inductor freezing, as QuantizeOnFit does; also with
   ``inference_precision="bf16-mixed"``), int8 weight-only, the seed study's
   ``torch.ao.quantization.quantize_dynamic``, and fp32 compiled with freezing,
   alone and bf16-mixed (how much of the speed is the compiler and bf16 alone).
   The static config calibrates on two batches of the same random inputs.
2. CUDA (only when a GPU is present, else ``n/a``): bf16 eager = 1.0 against
   int8-dynamic, int8 weight-only, int4 weight-only and float8-dynamic
   (float8 only on compute capability >= 8.9).
3. Digits accuracy: a small ViT trained here, quantized with and without the
   classifier head (every CPU config; int8-static-x86 calibrated on 8 training
   batches), and the x86 configs compiled bf16-mixed.

    python benchmarks/bench_quantization.py [--batch-size 4] [--threads 2] [--skip-compile] [--skip-digits]
                                            [--cuda-compile]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import lightning as L
import timm
import torch
from torch import nn

from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.functional import (
    INFERENCE_PRECISIONS,
    QUANTIZATION_CONFIGS,
    compare_throughput,
    compile_frozen,
    measure_accuracy,
    quantize_model,
    serialized_size_bytes,
)
from lightning_vitcompress.functional.measure import first_call_seconds

MODELS = ("vit_base_patch16_224", "deit_small_patch16_224")


def quantized(model: nn.Module, config: str, **kwargs) -> nn.Module:
    model = copy.deepcopy(model)
    quantize_model(model, config, **kwargs)
    return model


def compiled_frozen(model: nn.Module, precision: str = "32-true") -> nn.Module:
    """What QuantizeOnFit does at train end for the x86 configs (compile with inductor freezing)."""
    compile_frozen(model, autocast_dtype=INFERENCE_PRECISIONS[precision])
    return model


def seed_quantize_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (the point of comparison)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def cpu_section(args: argparse.Namespace) -> None:
    x = torch.randn(args.batch_size, 3, 224, 224)
    print(f"\n## CPU: batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, fp32 eager = 1.0")
    print("| model | variant | speed | size MB | size ratio |")
    print("|---|---|---|---|---|")
    for name in args.models:
        # every compiled variant is a recompile of the same forward code: without this, the second
        # model would pass dynamo's recompile_limit (8) and silently run eager
        torch._dynamo.reset()
        fp32 = timm.create_model(name, pretrained=False).eval()
        variants = {
            "fp32 eager": fp32,
            "QuantizeOnFit int8_dynamic eager": quantized(fp32, "int8_dynamic"),
            "QuantizeOnFit int8_weight_only eager": quantized(fp32, "int8_weight_only"),
            "torch.ao quantize_dynamic (seed)": seed_quantize_dynamic(fp32),
        }
        compile_seconds = {}
        if not args.skip_compile:
            compiled = quantized(fp32, "int8_dynamic")
            compiled.compile()
            compile_seconds["int8_dynamic"] = first_call_seconds(compiled, x)
            variants["QuantizeOnFit int8_dynamic compiled"] = compiled
            calibration = [x, torch.randn_like(x)]
            for config in ("int8_dynamic_x86", "int8_static_x86"):
                for precision in INFERENCE_PRECISIONS:
                    model = compiled_frozen(quantized(fp32, config, calibration_inputs=calibration), precision)
                    label = f"{config}{' bf16-mixed' if precision == 'bf16-mixed' else ''}"
                    compile_seconds[label] = first_call_seconds(model, x)
                    variants[f"QuantizeOnFit {label} compiled"] = model
            for precision in INFERENCE_PRECISIONS:
                label = f"fp32{' bf16-mixed' if precision == 'bf16-mixed' else ''}"
                model = compiled_frozen(copy.deepcopy(fp32), precision)
                compile_seconds[label] = first_call_seconds(model, x)
                variants[f"{label} compiled (freezing)"] = model
        speed = compare_throughput(variants, x, num_threads=args.threads, rounds=args.rounds, min_run_time=1.0)
        base_size = serialized_size_bytes(fp32)
        for variant, model in variants.items():
            size = serialized_size_bytes(model._orig_mod if hasattr(model, "_orig_mod") else model)
            ratio = speed[variant] / speed["fp32 eager"]
            print(f"| {name} | {variant} | {ratio:.2f}x | {size / 1e6:.1f} | {size / base_size:.3f} |")
        for variant, seconds in compile_seconds.items():
            print(f"| {name} | (compile cost of {variant}, first call) | {seconds:.1f} s | | |")


def cuda_section(args: argparse.Namespace) -> None:
    print(f"\n## CUDA: batch {args.cuda_batch_size}, bf16 eager = 1.0")
    print("| model | variant | speed | size ratio |")
    print("|---|---|---|---|")
    if not torch.cuda.is_available():
        for variant in ("int8_dynamic", "int8_weight_only", "int4_weight_only", "float8_dynamic"):
            print(f"| {', '.join(MODELS)} | {variant} | n/a | n/a |")
        return
    capability = torch.cuda.get_device_capability()
    print(f"({torch.cuda.get_device_name()}, compute capability {capability[0]}.{capability[1]})")
    x = torch.randn(args.cuda_batch_size, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    for name in MODELS:
        bf16 = timm.create_model(name, pretrained=False).eval().to("cuda", torch.bfloat16)
        variants = {"bf16 eager": bf16}
        for config, spec in QUANTIZATION_CONFIGS.items():
            if "cuda" not in spec.devices:
                continue
            if spec.min_capability is not None and capability < spec.min_capability:
                print(f"| {name} | {config} | n/a (needs SM {spec.min_capability}) | n/a |")
                continue
            try:
                variants[config] = quantized(bf16, config, example_input=x)
            except Exception as err:
                print(f"| {name} | {config} | failed: {type(err).__name__}: {str(err)[:120]} | n/a |")
        if name == MODELS[0] and args.cuda_compile:  # ~75-130 s of compile per variant on an H100 host
            for variant in ("bf16 eager", "int8_dynamic", "float8_dynamic"):
                if variant in variants:
                    compiled = copy.deepcopy(variants[variant])
                    compiled.compile()
                    start = time.perf_counter()
                    with torch.inference_mode():
                        compiled(x)
                    torch.cuda.synchronize()
                    print(
                        f"| {name} | {variant.replace(' eager', '')} compile cost | {time.perf_counter() - start:.1f} s | |"
                    )
                    variants[f"{variant.replace(' eager', '')} compiled"] = compiled
        speed = compare_throughput(variants, x, rounds=args.rounds, min_run_time=0.5)
        base_size = serialized_size_bytes(bf16)
        for variant, model in variants.items():
            ratio = speed[variant] / speed["bf16 eager"]
            print(f"| {name} | {variant} | {ratio:.2f}x | {serialized_size_bytes(model) / base_size:.3f} |")


def digits_section(args: argparse.Namespace) -> None:
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    model = DigitsClassifier()  # embed 64, depth 4, lr 2e-3, batch 32: the quickstart's model and recipe
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.digits_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    vit = model.model.eval()
    test = list(data.test_dataloader()) + list(data.val_dataloader())  # 538 images: 1 image = 0.19 pt
    images = torch.cat([batch[0] for batch in test])
    with torch.no_grad():
        reference_logits = vit(images)
    reference = reference_logits.argmax(-1)
    fp32_accuracy = measure_accuracy(vit, test)
    print(
        f"\n## Digits ({args.digits_epochs} epochs, DigitsClassifier embed 64 depth 4), val+test {len(images)} images"
    )
    print("| variant | accuracy | change vs fp32 (pt) | predictions changed | logits rel. change |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {fp32_accuracy:.4f} | | | |")
    calibration = [batch[0] for batch in list(data.train_dataloader())[:8]]  # QuantizeOnFit's default 8 batches

    def report(label: str, q: nn.Module) -> None:
        accuracy = measure_accuracy(q, test)
        with torch.no_grad():
            logits = q(images)
        changed = int((logits.argmax(-1) != reference).sum())
        drift = float((logits - reference_logits).norm() / reference_logits.norm())
        print(f"| {label} | {accuracy:.4f} | {100 * (accuracy - fp32_accuracy):+.2f} | {changed} | {drift:.4f} |")

    cpu_configs = [name for name, spec in QUANTIZATION_CONFIGS.items() if "cpu" in spec.devices]
    for config in cpu_configs:
        for skip in (None, "head"):
            q = quantized(vit, config, skip=skip, calibration_inputs=calibration)
            report(f"{config}, {'head kept fp32' if skip else 'all linears'}", q)
    for config in ("int8_dynamic_x86", "int8_static_x86"):
        q = compiled_frozen(quantized(vit, config, calibration_inputs=calibration), "bf16-mixed")
        report(f"{config}, all linears, compiled bf16-mixed", q)
    report("fp32 compiled bf16-mixed (no int8)", compiled_frozen(copy.deepcopy(vit), "bf16-mixed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm models of the CPU section")
    parser.add_argument("--cuda-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--digits-epochs", type=int, default=20)
    parser.add_argument("--skip-compile", action="store_true", help="CPU: no torch.compile variant")
    parser.add_argument("--cuda-compile", action="store_true", help="CUDA: add compiled bf16/int8/float8 on ViT-B")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_digits:
        digits_section(args)
    if not args.skip_cpu:
        cpu_section(args)
    cuda_section(args)


if __name__ == "__main__":
    main()
