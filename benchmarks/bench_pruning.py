"""How much faster and smaller does structured pruning make ViT-B/16 on the CPU?

timm ``vit_base_patch16_224`` (random weights; speed and size do not depend on
them) pruned with ``prune_vit`` (what ``PruningSchedule`` runs at each step) at
ratios 0.3 and 0.5, against the unpruned model, all timed interleaved in one
process (``compare_throughput``). One more row runs the 0.5 model on timm's
eager attention path (``fused_attn=False``) to show what keeping the fused SDPA
path is worth (we fold the trained softmax scale into the query weights instead
of switching it off). Another prunes half of the *heads* (6 heads of 64) instead
of half of every head's dimensions (12 heads of 32): the same parameter count,
fewer and larger attention matmuls. Targets at 0.5: >= 4x throughput, <= 0.26x size.

    python benchmarks/bench_pruning.py [--batch-size 4] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

from lightning_vitcompress.functional import (
    compare_throughput,
    count_macs,
    count_parameters,
    prune_vit,
    serialized_size_bytes,
)
from lightning_vitcompress.functional.report import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    example = torch.randn(1, 3, 224, 224)
    models = {"unpruned": base}
    for ratio in (0.3, 0.5):
        pruned = copy.deepcopy(base)
        prune_vit(pruned, ratio, example)
        models[f"pruned {ratio}"] = pruned.eval()
    heads = copy.deepcopy(base)
    prune_vit(heads, 0.5, example, prune_heads=True)
    models["pruned 0.5, whole heads"] = heads.eval()
    eager = copy.deepcopy(models["pruned 0.5"])
    for block in eager.blocks:
        block.attn.fused_attn = False
    models["pruned 0.5, eager attention"] = eager

    images = torch.randn(args.batch_size, 3, 224, 224)
    with torch.inference_mode():  # the eager row computes the same function
        torch.testing.assert_close(eager(images), models["pruned 0.5"](images), rtol=1e-4, atol=1e-4)
    ips = compare_throughput(
        models, images, num_threads=args.threads, rounds=args.rounds, min_run_time=args.min_run_time
    )
    base_size, base_params = serialized_size_bytes(base), count_parameters(base)
    base_macs = count_macs(base, example)
    print(
        f"\nvit_base_patch16_224, batch {args.batch_size}, {args.threads} threads, fp32 eager, "
        f"{cpu_name()}, torch {torch.__version__}, interleaved x{args.rounds}"
    )
    print(
        "| model | embed / heads x head_dim / mlp | params (M) | MACs/img (G) | size MB (MiB) | size ratio | img/s | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        size, params, macs = serialized_size_bytes(model), count_parameters(model), count_macs(model, example)
        attn = model.blocks[0].attn
        widths = f"{model.embed_dim} / {attn.num_heads}x{attn.head_dim} / {model.blocks[0].mlp.fc1.out_features}"
        print(
            f"| {name} | {widths} | {params / 1e6:.1f} ({params / base_params:.3f}x) | "
            f"{(macs or 0) / 1e9:.2f} ({(macs or 0) / base_macs:.3f}x) | {size / 1e6:.1f} ({size / 2**20:.1f}) | "
            f"{size / base_size:.3f}x | {ips[name]:.2f} | {ips[name] / ips['unpruned']:.2f}x |"
        )


if __name__ == "__main__":
    main()
