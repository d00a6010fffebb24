"""Pruning and int8 speedups are the same whichever library built the ViT-B/16.

For each family (timm ``vit_base_patch16_224``, torchvision ``vit_b_16``,
transformers ``ViTForImageClassification`` with SDPA attention, and a hand-written
ViT-B/16 on ``nn.TransformerEncoder``), random weights, batch 4, 2 threads: fp32
eager, pruned 50% (``prune_vit``, what PruningSchedule runs, through the family's
adapter) and pruned 50% + int8 (``quantize_model(..., "int8_dynamic_x86")`` then
``compile_frozen``, what ``QuantizeOnFit("int8_dynamic_x86")`` runs; torchao's
portable ``int8_dynamic`` runs eager, where it is slower than fp32 on this CPU).
All twelve models are timed interleaved in this one process
(``compare_throughput``); each speedup is against the family's own fp32 eager.
Target: every family's pruned and pruned + int8 speedups >= 0.9x timm's.

``--suite timm-families`` compares instead the timm architectures of issue #27 at
the same pruning ratio: ViT-S/16 (the reference), EVA-02-S/14 (whole heads:
rotary embeddings keep head dims) and Swin-T (head dims in every stage), fp32
eager and pruned 50%, at 224. Target: EVA-02 and Swin-T pruned speedups >= 0.9x
ViT-S's.

    python benchmarks/bench_families.py [--suite libraries|timm-families] [--batch-size 4] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from lightning_vitcompress import compile_frozen, prune_vit, quantize_model
from lightning_vitcompress.functional import compare_throughput, count_parameters
from lightning_vitcompress.functional.report import cpu_name
from lightning_vitcompress.models import logits_of


class HandWrittenViT(nn.Module):
    """ViT-B/16 as research code writes it: conv patches, class token, nn.TransformerEncoder, head."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12, mlp: int = 3072) -> None:
        super().__init__()
        self.img_size = 224
        self.patch = nn.Conv2d(3, width, kernel_size=16, stride=16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 197, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, mlp, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1000)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


def _transformers_vit() -> nn.Module:
    import transformers

    return transformers.ViTForImageClassification._from_config(
        transformers.ViTConfig(num_labels=1000), attn_implementation="sdpa"
    )


def _torchvision_vit() -> nn.Module:
    import torchvision

    return torchvision.models.vit_b_16(weights=None)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "timm": lambda: timm.create_model("vit_base_patch16_224", pretrained=False),
    "torchvision": _torchvision_vit,
    "transformers": _transformers_vit,
    "hand-written (nn.MultiheadAttention)": HandWrittenViT,
}


class Logits(nn.Module):
    """Times every family on the same footing: the logits tensor, whatever the model returns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(images))


#: issue #27's timm architectures at 224: (builder, prune_vit options); the first is the reference
TIMM_FAMILIES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "timm ViT-S/16": (lambda: timm.create_model("vit_small_patch16_224", pretrained=False), {}),
    "timm EVA-02-S/14": (
        lambda: timm.create_model("eva02_small_patch14_224", pretrained=False, num_classes=1000),
        {"prune_heads": True},
    ),
    "timm Swin-T": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False), {}),
}


def _variants(
    builds: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]], x: torch.Tensor, int8: bool
) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """``{"<family> | <variant>": model}`` (fp32 eager, pruned 50%, and pruned + int8 compiled) and their params."""
    variants: dict[str, nn.Module] = {}
    params: dict[str, int] = {}
    for family, (build, options) in builds.items():
        torch.manual_seed(0)
        fp32 = build().eval()
        pruned = copy.deepcopy(fp32)
        prune_vit(pruned, 0.5, x[:1], **options)
        for label, model in (("fp32 eager", fp32), ("pruned 50%", pruned)):
            variants[f"{family} | {label}"] = Logits(model).eval()
            params[f"{family} | {label}"] = count_parameters(model)
        if int8:
            both = copy.deepcopy(pruned)
            quantize_model(both, "int8_dynamic_x86")
            params[f"{family} | pruned 50% + int8"] = count_parameters(both)
            both = Logits(both).eval()
            compile_frozen(both)
            with torch.inference_mode():
                both(x)  # compile outside the timing
            variants[f"{family} | pruned 50% + int8"] = both
    return variants, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=("libraries", "timm-families"), default="libraries")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 32  # four compiled families of one wrapper class
    x = torch.randn(args.batch_size, 3, 224, 224)

    if args.suite == "libraries":
        builds = {family: (build, {}) for family, build in FAMILIES.items()}
        title = "ViT-B/16 of each family"
    else:
        builds, title = TIMM_FAMILIES, "issue #27's timm families at 224"
    reference = next(iter(builds))
    variants, params = _variants(builds, x, int8=args.suite == "libraries")
    ips = compare_throughput(variants, x, num_threads=args.threads, rounds=args.rounds, min_run_time=args.min_run_time)
    print(
        f"\n{title}, random weights, batch {args.batch_size}, {args.threads} threads, "
        f"torch {torch.__version__}, CPU: {cpu_name()}"
    )
    print(f"| family | variant | params (M) | CPU images/s | speedup vs its fp32 eager | vs {reference}'s speedup |")
    print("|---|---|---|---|---|---|")
    speedups: dict[tuple[str, str], float] = {}
    for name in variants:
        family, label = name.split(" | ")
        speedups[family, label] = ips[name] / ips[f"{family} | fp32 eager"]
    failures = []
    for name in variants:
        family, label = name.split(" | ")
        relative = speedups[family, label] / speedups[reference, label]
        if label != "fp32 eager" and relative < 0.9:
            failures.append(f"{family} {label}: {relative:.2f}x {reference}'s")
        print(
            f"| {family} | {label} | {params[name] / 1e6:.1f} | {ips[name]:.2f} | {speedups[family, label]:.2f}x "
            f"| {relative:.2f}x |"
        )
    print(
        f"target (every family >= 0.9x {reference}'s speedup):",
        "met" if not failures else "missed: " + "; ".join(failures),
    )


if __name__ == "__main__":
    main()
