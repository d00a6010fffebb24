"""Where Nyström attention starts to pay on this machine: what ``NystromSwap(min_tokens="auto")`` measures.

One attention module of a ViT-S (width 384, 6 heads) and of a ViT-B (width 768,
12 heads), random weights, against its Nyström swap (m landmarks, 1 class token
kept exact), at each token count: images/s of both measured interleaved in one
process (:func:`~lightning_vitcompress.functional.nystrom.nystrom_break_even`,
which runs ``compare_throughput``). The table prints Nyström / exact per count
and the break-even ``min_tokens="auto"`` would use (the smallest timed count from
which Nyström is faster at every larger timed count).

    python benchmarks/bench_nystrom_break_even.py [--threads 2] [--landmarks 64] [--tokens 197 577 1025 2049 4097]
"""

from __future__ import annotations

import argparse
import time

import torch
from timm.layers.attention import Attention

from lightning_vitcompress.functional.nystrom import NystromConfig, nystrom_break_even

WIDTHS = {"ViT-S (384, 6 heads)": (384, 6), "ViT-B (768, 12 heads)": (768, 12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--landmarks", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[197, 577, 1025, 2049, 4097])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"threads {args.threads}, batch {args.batch_size}, m={args.landmarks}, CPU only; Nyström / exact images/s")
    print("| model | " + " | ".join(f"{t} tokens" for t in args.tokens) + " | break-even | seconds |")
    print("|---|" + "---|" * (len(args.tokens) + 2))
    for label, (width, heads) in WIDTHS.items():
        attention = Attention(width, num_heads=heads, qkv_bias=True).eval()
        start = time.perf_counter()
        result = nystrom_break_even(
            attention,
            NystromConfig(num_landmarks=args.landmarks),
            1,
            args.tokens,
            batch_size=args.batch_size,
            num_threads=args.threads,
            min_run_time=0.2,
            rounds=3,
        )
        cells = [f"{result['speedups'][t]:.2f}x" if t in result["speedups"] else "n/a" for t in args.tokens]
        even = result["break_even"] or "not reached"
        print(f"| {label} | " + " | ".join(cells) + f" | {even} | {time.perf_counter() - start:.0f} |")


if __name__ == "__main__":
    main()
