"""Does a ViT pruned by 50% keep its accuracy? Digits (offline, real data).

A ``DigitsClassifier(embed_dim=64, depth=4, num_heads=4)`` is trained for
``--pretrain-epochs`` (the team's model), then fine-tuned for ``--epochs`` more
in several arms that start from the same weights and see the same batches:

* unpruned: plain fine-tuning (the reference);
* ``PruningSchedule(0.5)`` one-shot (at setup / after the first gradient
  batches for Taylor) or iterative (one step per epoch over the first half of
  the epochs, linear), with L2 magnitude or Taylor importance.

Target: the pruned arms within 1.5 pt of the unpruned one on the test split.
Several seeds (of the fine-tuning data order) give mean +- std.

    python benchmarks/bench_pruning_accuracy.py [--pretrain-epochs 15] [--epochs 6] [--seeds 2]
        [--threads 2] [--batch-size 64] [--accelerator cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Optional

import lightning as L
import torch

from lightning_vitcompress._measure import count_parameters, measure_accuracy
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.pruning import PruningSchedule

MODEL = dict(embed_dim=64, depth=4, num_heads=4)


ACCELERATOR = "cpu"


def fit(model: DigitsClassifier, dm: DigitsDataModule, epochs: int, callback: Optional[Any] = None) -> None:
    L.Trainer(
        accelerator=ACCELERATOR, devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[callback] if callback else [],
        default_root_dir="/tmp/bench_pruning_accuracy",
    ).fit(model, dm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    global ACCELERATOR
    ACCELERATOR = args.accelerator
    torch.set_num_threads(args.threads)
    dm = DigitsDataModule(batch_size=args.batch_size)
    dm.setup()

    L.seed_everything(0, verbose=False)
    pretrained = DigitsClassifier(**MODEL)
    start = time.perf_counter()
    fit(pretrained, dm, args.pretrain_epochs)
    pretrained.cpu().hparams.lr = 5e-4  # fine-tuning learning rate
    print(f"pretrained {args.pretrain_epochs} epochs in {time.perf_counter() - start:.0f}s: "
          f"test acc {measure_accuracy(pretrained, dm.test_dataloader()):.4f}")

    half = max(0, args.epochs // 2 - 1)
    arms = {
        "unpruned": lambda: None,
        "L2 one-shot": lambda: PruningSchedule(0.5, importance="l2"),
        "L2 iterative": lambda: PruningSchedule(0.5, end_epoch=half, importance="l2"),
        "Taylor one-shot": lambda: PruningSchedule(0.5, importance="taylor", gradient_batches=8),
        "Taylor iterative": lambda: PruningSchedule(
            0.5, end_epoch=half, importance="taylor", gradient_batches=8
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in arms}
    params: dict[str, int] = {}
    for seed in range(args.seeds):
        for name, make in arms.items():
            model = copy.deepcopy(pretrained)
            L.seed_everything(100 + seed, verbose=False)
            start = time.perf_counter()
            fit(model, dm, args.epochs, make())
            results[name].append(measure_accuracy(model.cpu(), dm.test_dataloader()))
            params[name] = count_parameters(model.model)
            print(f"seed {seed} {name}: {results[name][-1]:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)

    reference = statistics.mean(results["unpruned"])
    print(f"\ndigits test split ({len(dm.test_set)} images), {args.pretrain_epochs} pretrain + {args.epochs} "
          f"fine-tune epochs, batch {args.batch_size}, {args.seeds} seeds, iterative = epochs 0..{half}")
    print("| arm | params | test acc (mean +- std) | vs unpruned (pt) |")
    print("|---|---|---|---|")
    for name, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mean = statistics.mean(accs)
        print(f"| {name} | {params[name]:,} | {mean:.4f} +- {std:.4f} | {100 * (mean - reference):+.2f} |")


if __name__ == "__main__":
    main()
