"""Does glibc's malloc state change int8 speed? fp32 vs int8 dynamic, before and after ``settle_allocator``.

In a fresh process glibc maps every block between 128 KiB and 32 MiB afresh on each call until a larger free
raises its threshold; ``settle_allocator`` (called first by every timing function of the package) raises it.
This times the Fashion-MNIST study's ViT (96 wide, 4 blocks, 28x28x1; random weights), fp32 against
``quantize_model(..., "int8_dynamic")``, with a plain interleaved loop (not ``compare_throughput``, which would
settle the allocator itself) in this fresh process, then again after ``settle_allocator()``.

    python benchmarks/bench_allocator.py [--batch-size 32] [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from lightning_vitcompress.digits import small_vit
from lightning_vitcompress.functional import quantize_model
from lightning_vitcompress.functional.measure import settle_allocator
from lightning_vitcompress.functional.report import cpu_name


def int8_over_fp32(fp32: torch.nn.Module, int8: torch.nn.Module, x: torch.Tensor, rounds: int) -> float:
    """Throughput of int8 over fp32, median of ``rounds`` interleaved rounds of 20 calls each."""
    seconds: dict[str, list[float]] = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for model in (fp32, int8):
            model(x)
        for _ in range(rounds):
            for name, model in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                for _ in range(20):
                    model(x)
                seconds[name].append(time.perf_counter() - start)
    return statistics.median(seconds["fp32"]) / statistics.median(seconds["int8"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = small_vit(embed_dim=96, depth=4, num_heads=3, image_size=28, in_chans=1).eval()
    int8 = copy.deepcopy(fp32)
    quantize_model(int8, "int8_dynamic")
    x = torch.randn(args.batch_size, 1, 28, 28)
    fresh = int8_over_fp32(fp32, int8, x, args.rounds)
    settle_allocator()
    settled = int8_over_fp32(fp32, int8, x, args.rounds)
    print(f"CPU: {cpu_name()}; study ViT, batch {args.batch_size}, {args.threads} thread(s), eager")
    print(f"{'allocator':<28} {'int8_dynamic / fp32':>20}")
    print(f"{'fresh process':<28} {fresh:>19.2f}x")
    print(f"{'after settle_allocator()':<28} {settled:>19.2f}x")
    print(f"settled / fresh: {settled / fresh:.2f}")


if __name__ == "__main__":
    main()
