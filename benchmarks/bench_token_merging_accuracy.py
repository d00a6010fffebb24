"""Does a ViT with token merging keep its accuracy once fine-tuned in the same fit? Digits (offline, real data).

A ``DigitsClassifier(embed_dim=--embed-dim, depth=4, num_heads=4)`` (patch 4 at
32x32: 64 patch tokens + the class token) is trained for ``--pretrain-epochs``
(the team's model), then fine-tuned for ``--epochs`` more in two arms that start
from the same weights, use the same learning rate and, for a given seed, see
the same batch order:

* ``unmerged``: plain fine-tuning (the reference);
* ``tome r=R``: ``TokenMerging(r=R, schedule=--schedule)`` at setup, then fine-tuning through the
  merged model. ``R`` is the smallest r whose MACs are at most ``--macs-target``
  (default 0.5) of the unmerged model's (counted with ``count_macs``), unless
  ``--r`` is given.

Also printed: the pretrained model merged at ``R`` *without* fine-tuning (what
ToMe does off the shelf). Target (issue #19): ``tome`` within 1 pt of
``unmerged`` on the test split (269 images: one image is 0.37 pt), paired per
seed over 3 seeds.

    python benchmarks/bench_token_merging_accuracy.py [--pretrain-epochs 20] [--epochs 10] [--seeds 3]
        [--r R] [--macs-target 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import torch

from lightning_vitcompress import TokenMerging
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.functional import count_macs, measure_accuracy, merge_tokens, merged_token_counts


def fit(model: DigitsClassifier, dm: DigitsDataModule, epochs: int, callbacks: list) -> None:
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir="/tmp/bench_token_merging_accuracy",
    ).fit(model, dm)


def choose_r(model: torch.nn.Module, target: float, schedule: str) -> tuple[int, float]:
    """The smallest r whose merged MACs are at most ``target`` x the unmerged model's."""
    x = torch.randn(1, 3, 32, 32)
    base = count_macs(model, x)
    for r in range(1, 64):
        merged = copy.deepcopy(model)
        try:
            merge_tokens(merged, r, schedule=schedule)
        except ValueError:
            break
        ratio = count_macs(merged, x) / base
        if ratio <= target:
            return r, ratio
    raise SystemExit(f"no r reaches MACs ratio {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--r", type=int, default=None)
    parser.add_argument("--macs-target", type=float, default=0.5)
    parser.add_argument(
        "--schedule",
        default="decreasing",
        choices=["constant", "decreasing"],
        help="4 blocks of 65 tokens: constant r reaches 0.52x MACs at most (r=15)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = DigitsDataModule(batch_size=args.batch_size)
    dm.setup()
    L.seed_everything(0, verbose=False)
    pretrained = DigitsClassifier(embed_dim=args.embed_dim, depth=4, num_heads=4)
    start = time.perf_counter()
    fit(pretrained, dm, args.pretrain_epochs, [])
    pretrained.cpu().hparams.lr = args.lr
    print(
        f"pretrained {args.pretrain_epochs} epochs in {time.perf_counter() - start:.0f}s, test acc "
        f"{measure_accuracy(pretrained, dm.test_dataloader()):.4f}",
        flush=True,
    )

    if args.r is None:
        r, ratio = choose_r(pretrained.model, args.macs_target, args.schedule)
    else:
        r = args.r
        merged = copy.deepcopy(pretrained.model)
        merge_tokens(merged, r, schedule=args.schedule)
        ratio = count_macs(merged, torch.randn(1, 3, 32, 32)) / count_macs(pretrained.model, torch.randn(1, 3, 32, 32))
    off_the_shelf = copy.deepcopy(pretrained)
    merge_tokens(off_the_shelf.model, r, schedule=args.schedule)
    tokens = merged_token_counts(off_the_shelf.model)
    no_finetune = measure_accuracy(off_the_shelf, dm.test_dataloader())
    print(
        f"r={r}: MACs ratio {ratio:.3f}, tokens after each block {tokens}; merged without fine-tuning: "
        f"{no_finetune:.4f}",
        flush=True,
    )

    arms = {"unmerged": list, f"tome r={r} {args.schedule}": lambda: [TokenMerging(r=r, schedule=args.schedule)]}
    results: dict[str, list[float]] = {name: [] for name in arms}
    for seed in range(args.seeds):
        for name, callbacks in arms.items():
            model = copy.deepcopy(pretrained)
            L.seed_everything(100 + seed, verbose=False)
            start = time.perf_counter()
            fit(model, dm, args.epochs, callbacks())
            model.cpu()
            results[name].append(measure_accuracy(model, dm.test_dataloader()))
            print(f"seed {seed} {name}: {results[name][-1]:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)

    reference = results["unmerged"]
    print(
        f"\ndigits test split ({len(dm.test_set)} images), ViT embed_dim={args.embed_dim} depth=4 heads=4 patch 4 "
        f"(65 tokens): {args.pretrain_epochs} pretrain + {args.epochs} fine-tune epochs (lr {args.lr:g}), batch "
        f"{args.batch_size}, {args.seeds} seeds; merged at setup of the fine-tuning fit"
    )
    print("| arm | MACs ratio | test acc (mean +- std) | paired diff vs unmerged per seed (pt, mean +- std) |")
    print("|---|---|---|---|")
    for name, accs in results.items():
        diffs = [100 * (a - b) for a, b in zip(accs, reference)]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diff_std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        macs = 1.0 if name == "unmerged" else ratio
        print(
            f"| {name} | {macs:.3f} | {statistics.mean(accs):.4f} +- {std:.4f} | "
            f"{statistics.mean(diffs):+.2f} +- {diff_std:.2f} (per seed {', '.join(f'{d:+.2f}' for d in diffs)}) |"
        )
    print(f"| tome r={r} {args.schedule}, no fine-tuning (pretrained, merged) | {ratio:.3f} | {no_finetune:.4f} | |")


if __name__ == "__main__":
    main()
