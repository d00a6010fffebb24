"""How much faster and smaller does QuantizeOnFit make a ViT, and does skipping the head matter?

1. CPU speed and size, one process, interleaved (A, B, A, B...), on timm
   ``vit_base_patch16_224`` and ``deit_small_patch16_224`` (random weights):
   fp32 eager = 1.0 against QuantizeOnFit's int8-dynamic (eager and
   ``torch.compile``), int8-dynamic-x86 (compiled with inductor freezing, as
   QuantizeOnFit does), int8 weight-only, the seed study's
   ``torch.ao.quantization.quantize_dynamic``, and fp32 compiled with freezing
   (how much of the x86 speed is the compiler alone).
2. CUDA (only when a GPU is present, else ``n/a``): bf16 eager = 1.0 against
   int8-dynamic, int8 weight-only, int4 weight-only and float8-dynamic
   (float8 only on compute capability >= 8.9).
3. Digits accuracy: a small ViT trained here, quantized with and without the
   classifier head (int8-dynamic and int8 weight-only).

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

from lightning_vitcompress._measure import compare_throughput, measure_accuracy, serialized_size_bytes
from lightning_vitcompress._x86_int8 import compile_frozen
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.quantization import NAMED_CONFIGS, quantize_model

MODELS = ("vit_base_patch16_224", "deit_small_patch16_224")


def quantized(model: nn.Module, config: str, **kwargs) -> nn.Module:
    model = copy.deepcopy(model)
    quantize_model(model, config, **kwargs)
    return model


def first_call_seconds(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def seed_quantize_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (the point of comparison)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def cpu_section(args: argparse.Namespace) -> None:
    x = torch.randn(args.batch_size, 3, 224, 224)
    print(f"\n## CPU: batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, fp32 eager = 1.0")
    print("| model | variant | speed | size MB | size ratio |")
    print("|---|---|---|---|---|")
    for name in MODELS:
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
            x86 = quantized(fp32, "int8_dynamic_x86")
            compile_frozen(x86)  # what QuantizeOnFit("int8_dynamic_x86") does at train end
            compile_seconds["int8_dynamic_x86"] = first_call_seconds(x86, x)
            variants["QuantizeOnFit int8_dynamic_x86 compiled"] = x86
            fp32_frozen = copy.deepcopy(fp32)
            compile_frozen(fp32_frozen)
            compile_seconds["fp32"] = first_call_seconds(fp32_frozen, x)
            variants["fp32 compiled (freezing)"] = fp32_frozen
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
        for config, spec in NAMED_CONFIGS.items():
            if "cuda" not in spec.devices:
                continue
            if spec.min_capability is not None and capability < spec.min_capability:
                print(f"| {name} | {config} | n/a (needs SM {spec.min_capability}) | n/a |")
                continue
            try:
                variants[config] = quantized(bf16, config, example_input=x)
            except Exception as err:  # noqa: BLE001 - report and go on with the others
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
                    print(f"| {name} | {variant.replace(' eager', '')} compile cost | {time.perf_counter() - start:.1f} s | |")
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
        accelerator="cpu", max_epochs=args.digits_epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, data)
    vit = model.model.eval()
    test = list(data.test_dataloader()) + list(data.val_dataloader())  # 538 images: 1 image = 0.19 pt
    images = torch.cat([batch[0] for batch in test])
    with torch.no_grad():
        reference = vit(images).argmax(-1)
    fp32_accuracy = measure_accuracy(vit, test)
    print(f"\n## Digits ({args.digits_epochs} epochs, DigitsClassifier embed 64 depth 4), val+test {len(images)} images")
    print("| variant | accuracy | change vs fp32 (pt) | predictions changed |")
    print("|---|---|---|---|")
    print(f"| fp32 | {fp32_accuracy:.4f} | | |")
    for config in ("int8_dynamic", "int8_dynamic_x86", "int8_weight_only"):
        for skip in (None, "head"):
            q = quantized(vit, config, skip=skip)
            accuracy = measure_accuracy(q, test)
            with torch.no_grad():
                changed = int((q(images).argmax(-1) != reference).sum())
            label = f"{config}, {'head kept fp32' if skip else 'all linears'}"
            print(f"| {label} | {accuracy:.4f} | {100 * (accuracy - fp32_accuracy):+.2f} | {changed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
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
