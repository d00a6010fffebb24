"""Nyström attention vs exact attention (PyTorch SDPA): whole-model CPU speed and peak memory.

A ``vit_small``-sized ViT (width 384, 6 heads, mlp 4x; random weights) at
N = 197, 577, 1025 and 4097 tokens (224/16, 384/16, 256/8, 512/8), batch 1:

* ``exact``: timm's ``Attention`` (fused SDPA);
* ``m=32/64/128``: every block swapped to ``NystromAttention`` (1 class token kept exact);
* ``unfused`` (memory only): timm's non-fused path, which materializes the N x N
  attention matrix, for reference: CPU SDPA does not;
* ``no-core``: the attention core removed (q/k/v and projection kept, output = V):
  the ceiling any attention approximation can reach.

Speed: images/s of all variants measured interleaved in one process
(``compare_throughput``, median of rounds); the table prints ratios to exact.
Memory: the first forward pass's peak resident memory above what the built
model already holds, in a fresh subprocess per variant: the kernel's high-water
mark (VmHWM, reset just before the forward via /proc/self/clear_refs) minus
VmRSS before it. It counts every allocation torch makes (tracemalloc sees only
Python objects; torch has no CPU allocator statistics). glibc's mmap threshold
is fixed so freed large blocks leave RSS. Weights are the same for all
variants and excluded. Linux only.

The depth defaults to 4 blocks (not 12) to keep the run short on a shared
2-core machine; every block is identical, so the whole-model ratios are those
of 12 blocks up to the (small, fixed) patch-embedding and head cost.

    python benchmarks/bench_nystrom.py [--depth 4] [--threads 2] [--tokens 197 577 1025 4097]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import timm
import torch
from torch import nn

from lightning_vitcompress.functional import NystromAttention, compare_throughput

#: tokens -> (image size, patch size); one class token
GEOMETRY = {197: (224, 16), 577: (384, 16), 1025: (256, 8), 4097: (512, 8)}
LANDMARKS = (32, 64, 128)


class NoCoreAttention(nn.Module):
    """timm Attention without its core: qkv projection, then V straight to the output projection."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj, self.attn_dim = attention.qkv, attention.proj, attention.attn_dim

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        v = self.qkv(x)[..., 2 * self.attn_dim :]
        return self.proj(v)


def build(variant: str, tokens: int, depth: int) -> nn.Module:
    image_size, patch_size = GEOMETRY[tokens]
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=image_size,
        patch_size=patch_size,
        depth=depth,
        num_classes=10,
    ).eval()
    for block in model.blocks:
        if variant == "unfused":
            block.attn.fused_attn = False  # materializes the N x N attention matrix
        elif variant == "no-core":
            block.attn = NoCoreAttention(block.attn)
        elif variant.startswith("m="):
            block.attn = NystromAttention.from_attention(
                block.attn, num_landmarks=int(variant[2:]), num_prefix_tokens=model.num_prefix_tokens
            )
    return model


def variants() -> list[str]:
    return ["exact", *[f"m={m}" for m in LANDMARKS], "no-core"]


def example(tokens: int) -> torch.Tensor:
    image_size, _ = GEOMETRY[tokens]
    return torch.randn(1, 3, image_size, image_size)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def peak_forward_mib(variant: str, tokens: int, depth: int, threads: int) -> float:
    """In this (fresh) process: peak resident memory of one batch-1 forward above the built model, MiB.

    Linux only: writing "5" to /proc/self/clear_refs resets the high-water mark
    (VmHWM) to the current resident size, so VmHWM after the forward minus VmRSS
    before it is the forward's peak.
    """
    torch.set_num_threads(threads)
    model, x = build(variant, tokens, depth), example(tokens)
    with torch.inference_mode():
        model(x)  # warm-up: one-time allocations and library pages are not the forward's memory
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _status_kib("VmRSS")
        model(x)
    return (_status_kib("VmHWM") - before) / 1024


def measure_memory_in_subprocess(variant: str, tokens: int, depth: int, threads: int) -> float:
    args = [sys.executable, __file__, "--memory-child", variant, str(tokens), str(depth), str(threads)]
    # a fixed mmap threshold: freed large blocks go back to the OS instead of staying resident in an arena
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return float(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="blocks (vit_small has 12)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: on a busy shared machine, 2-thread runs of small ops wait for busy cores)",
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=list(GEOMETRY), choices=list(GEOMETRY))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        variant, tokens, depth, threads = args.memory_child
        print(json.dumps(peak_forward_mib(variant, int(tokens), int(depth), int(threads))))
        return

    torch.set_num_threads(args.threads)
    names = variants()
    print(
        f"vit_small-sized ViT (width 384, 6 heads, {args.depth} blocks), batch 1, {args.threads} threads, CPU; "
        "speed = images/s ratio to exact (interleaved, median of "
        f"{args.rounds} rounds); mem = peak forward RSS growth, MiB"
    )
    header = (
        f"{'tokens':>6} | "
        + " | ".join(f"{n:>8}" for n in names[1:])
        + " | "
        + " | ".join(f"mem {n:>7}" for n in [*names, "unfused"])
    )
    print(header)
    print("-" * len(header))
    results = {}
    for tokens in args.tokens:
        memory = {
            name: measure_memory_in_subprocess(name, tokens, args.depth, args.threads) for name in [*names, "unfused"]
        }
        models = {name: build(name, tokens, args.depth) for name in names}
        ips = compare_throughput(models, example(tokens), num_threads=args.threads, rounds=args.rounds)
        ratios = {name: ips[name] / ips["exact"] for name in names}
        results[tokens] = dict(ips=ips, ratios=ratios, memory=memory)
        print(
            f"{tokens:>6} | "
            + " | ".join(f"{ratios[n]:>7.2f}x" for n in names[1:])
            + " | "
            + " | ".join(f"{memory[n]:>11.1f}" for n in [*names, "unfused"]),
            flush=True,
        )
        del models
    print("\nexact images/s:", ", ".join(f"N={t}: {r['ips']['exact']:.2f}" for t, r in results.items()))
    print(
        "attention core share of exact forward time (1 - exact/no-core time):",
        ", ".join(f"N={t}: {1 - 1 / r['ratios']['no-core']:.0%}" for t, r in results.items()),
    )
    for m in LANDMARKS:
        faster = [t for t, r in results.items() if r["ratios"][f"m={m}"] > 1.0]
        print(f"m={m}: faster than exact at N in {faster or 'none of the measured sizes'}")


if __name__ == "__main__":
    main()
