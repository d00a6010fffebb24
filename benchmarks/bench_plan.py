"""CompressionPlan's speed model against measurement: predicted vs measured speedup of a few recipes.

The plan predicts a recipe's speed from timed parts (the whole model and one block per pruning ratio and
int8 config at a few token counts, the token-merging step) instead of timing each recipe. This checks
that prediction: the same recipes built as the callbacks build them (``build_recipe``: ``prune_vit``,
``merge_tokens``, ``quantize_model``) and timed whole, all interleaved with the uncompressed model in this one process.
Prints the CPU, the seconds the parts took to time, and per recipe: predicted, measured, ratio.

Default: timm ``vit_base_patch16_224`` (random weights; speed does not depend on them), batch 4, 2 threads,
eager fp32 and ``int8_dynamic``; ``--model`` takes any timm ViT name, ``--image-size`` its input size.

    python benchmarks/bench_plan.py [--model vit_base_patch16_224] [--batch-size 4] [--threads 2]
        [--rounds 3] [--min-run-time 0.5]
    python benchmarks/bench_plan.py --study-model --batch-size 32 --threads 1 [--ceiling]   # the plan example's setting
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

from lightning_vitcompress.digits import small_vit
from lightning_vitcompress.functional import compare_throughput
from lightning_vitcompress.functional.plan import Recipe, build_recipe, measure_speed_model
from lightning_vitcompress.functional.report import cpu_name

#: recipes checked: each technique alone and combined
RECIPES = [
    Recipe(0.5),
    Recipe(0.0, 8),
    Recipe(0.4, 8, None, "int8_dynamic"),
    Recipe(0.6, 16, None, "int8_dynamic"),
]
#: ``--study-model``: the Fashion-MNIST study's ViT (96 wide, 4 blocks, 50 tokens), where r goes up to 12
STUDY_RECIPES = [
    Recipe(0.0, 0, None, "int8_dynamic"),
    Recipe(0.0, 12),
    Recipe(0.0, 12, None, "int8_dynamic"),
    Recipe(0.25, 6),
    Recipe(0.5),
    Recipe(0.6, 12),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument(
        "--study-model", action="store_true", help="the Fashion-MNIST study's ViT (28x28x1, 96 wide, 4 blocks) instead"
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also: how fast any recipe could get (the model without its blocks; pruning up to 90%%)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipes = STUDY_RECIPES if args.study_model else RECIPES
    if args.study_model:
        args.model, args.image_size = "fashion-mnist study ViT", 28
        model = small_vit(embed_dim=96, depth=4, num_heads=3, image_size=28, in_chans=1).eval()
        x = torch.randn(args.batch_size, 1, 28, 28)
    else:
        model = timm.create_model(args.model, pretrained=False, img_size=args.image_size).eval()
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    speed = measure_speed_model(
        model,
        x,
        pruning_ratios=sorted({r.pruning_ratio for r in recipes}),
        r_values=sorted({r.r for r in recipes if r.r}),
        num_landmarks=(),
        quantization=("int8_dynamic",),
        num_threads=args.threads,
    )
    variants = {"uncompressed": model, **{r.label(): build_recipe(model, r, x) for r in recipes}}
    measured = compare_throughput(
        variants, x, num_threads=args.threads, rounds=args.rounds, min_run_time=args.min_run_time
    )
    base = measured["uncompressed"]
    print(
        f"CPU: {cpu_name()}; {args.model} at {args.image_size}, batch {args.batch_size}, {args.threads} threads, "
        f"eager; parts timed in {speed.seconds_measuring:.1f} s ({speed.tokens_in} tokens, {speed.depth} blocks)"
    )
    print(f"{'recipe':<40} {'predicted':>10} {'measured':>10} {'ratio':>7} {'pred. ms':>9} {'meas. ms':>9}")
    ms = 1e3 * args.batch_size
    print(
        f"{'uncompressed':<40} {'':>10} {'':>10} {'':>7} {speed.predict_seconds(Recipe()) * 1e3:>9.1f} {ms / base:>9.1f}"
    )
    for recipe in recipes:
        predicted = speed.speedup(recipe)
        actual = measured[recipe.label()] / base
        seconds = speed.predict_seconds(recipe) * 1e3
        print(
            f"{recipe.label():<40} {predicted:>9.2f}x {actual:>9.2f}x {predicted / actual:>7.2f} "
            f"{seconds:>9.1f} {ms / measured[recipe.label()]:>9.1f}"
        )
    if args.ceiling:
        ceiling(model, x, args.threads, args.rounds, args.min_run_time)


def ceiling(model: torch.nn.Module, x: torch.Tensor, threads: int, rounds: int, min_run_time: float) -> None:
    """What bounds any recipe's speed: the model with no blocks (patch embedding, norm, head), and the fastest
    recipe predicted when pruning goes up to 90% with the largest r (eager dispatch keeps a thin block costly)."""
    headless = copy.deepcopy(model)
    headless.blocks = torch.nn.Sequential()
    ips = compare_throughput({"full": model, "no blocks": headless}, x, num_threads=threads, rounds=rounds,
                             min_run_time=min_run_time)  # fmt: skip
    speed = measure_speed_model(
        model, x, pruning_ratios=(0.0, 0.5, 0.75, 0.9), quantization=("int8_dynamic",), num_threads=threads
    )
    fastest = max(speed.recipes(), key=speed.speedup)
    print(
        f"ceiling: the model without its {speed.depth} blocks runs {ips['no blocks'] / ips['full']:.1f}x the full one"
    )
    for (ratio, config), whole in sorted(speed.timings.whole.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        block = speed.timings.block[(ratio, config, None)][speed.tokens_in]
        print(
            f"  prune {ratio:.2f} {config or 'fp32':<13} whole {whole * 1e3:7.2f} ms, one block at all tokens "
            f"{block * 1e3:6.2f} ms"
        )
    print(f"  fastest recipe predicted: {fastest.label()} at {speed.speedup(fastest):.2f}x")


if __name__ == "__main__":
    main()
