"""Does a ViT pruned by 50% keep its accuracy? Digits (offline, real data).

A ``DigitsClassifier(embed_dim=--embed-dim, depth=4, num_heads=4)`` is trained
for ``--pretrain-epochs`` (the team's model), then fine-tuned for ``--epochs``
more in several arms that start from the same weights, use the same learning
rate (``--lr``, cosine over ``--epochs``) and, for a given seed, see the same
batch order:

* ``unpruned``: plain fine-tuning (the reference: same total number of epochs);
* ``<importance>-<schedule>``: ``PruningSchedule(0.5)`` with ``l2`` magnitude
  or ``taylor`` importance, ``oneshot`` (at setup / after the first
  ``--gradient-batches`` batches for Taylor) or ``iter`` (``--iter-steps``
  steps over epochs ``0..--iter-end``, ``--schedule`` shape; by default one
  step per epoch over the first half of the run, so the second half fine-tunes
  the final shape);
* ``...+distil``: the same, while distilling (soft, ``--alpha``,
  ``--temperature``) from a frozen copy of the pretrained unpruned model;
* with ``--int8``, every arm's final model is also measured after
  ``quantize_model(model, "int8_dynamic")`` (no training: a cheap extra row),
  which makes ``<pruned>+distil + int8`` the combined pipeline of issue #7.

Target (issues #4 and #7): the pruned / combined arms within 1.5 pt of the
unpruned one on the test split (269 images: one image is 0.37 pt). Several
seeds (of the fine-tuning data order) give mean +- std; the last column is the
per-seed paired difference to the unpruned arm (same seed, same batches).

    python benchmarks/bench_pruning_accuracy.py [--embed-dim 64] [--pretrain-epochs 20] [--epochs 12]
        [--seeds 3] [--lr 5e-4] [--arms unpruned,l2-oneshot,l2-iter,taylor-oneshot,taylor-iter,l2-iter+distil]
        [--iter-end E] [--iter-steps N] [--schedule linear|cubic] [--int8] [--cache-dir /tmp/...]
        [--threads 1] [--batch-size 32] [--accelerator cpu]

On a shared CPU use ``--threads 1``: with other processes on the cores, two
threads per process were ~10x slower here than one.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any, Optional

import lightning as L
import torch

from lightning_vitcompress import DistillationTeacher, PruningSchedule
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.functional import count_parameters, measure_accuracy

ACCELERATOR = "cpu"
DEFAULT_ARMS = "unpruned,l2-oneshot,l2-iter,taylor-oneshot,taylor-iter,l2-iter+distil"


def fit(model: DigitsClassifier, dm: DigitsDataModule, epochs: int, callbacks: list[Any]) -> None:
    L.Trainer(
        accelerator=ACCELERATOR,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir="/tmp/bench_pruning_accuracy",
    ).fit(model, dm)


def make_callbacks(arm: str, args: argparse.Namespace, teacher: Any) -> list[Any]:
    """``unpruned``, ``<l2|taylor|l1|random>-<oneshot|iter>``, optionally ``+distil``."""
    base, _, extra = arm.partition("+")
    if extra not in ("", "distil"):
        raise ValueError(f"arm {arm!r}: the only suffix is '+distil'")
    callbacks: list[Any] = []
    if base != "unpruned":
        importance, _, schedule = base.partition("-")
        kwargs: dict[str, Any] = dict(importance=importance, gradient_batches=args.gradient_batches)
        if schedule == "iter":
            kwargs.update(end_epoch=args.iter_end, num_steps=args.iter_steps, schedule=args.schedule)
        elif schedule != "oneshot":
            raise ValueError(f"arm {arm!r}: use <importance>-oneshot or <importance>-iter")
        callbacks.append(PruningSchedule(args.ratio, **kwargs))
    if extra == "distil":
        callbacks.append(
            DistillationTeacher(
                copy.deepcopy(teacher),
                mode="soft",
                alpha=args.alpha,
                temperature=args.temperature,
                cache_teacher_logits=True,
            )
        )
    return callbacks


def evaluation_batches(dm: DigitsDataModule, split: str) -> Any:
    """The split accuracy is measured on: ``test``, or ``val`` for choosing settings (never trained on here)."""
    return dm.val_dataloader() if split == "val" else dm.test_dataloader()


def int8_accuracy(model: torch.nn.Module, dm: DigitsDataModule, split: str) -> Optional[float]:
    from lightning_vitcompress.functional import quantize_model

    quantized = copy.deepcopy(model).cpu().eval()
    summary = quantize_model(quantized, "int8_dynamic")
    assert summary["quantized"], f"nothing was quantized: {summary['skipped']}"
    return measure_accuracy(quantized, evaluation_batches(dm, split))


def pretrain(args: argparse.Namespace, dm: DigitsDataModule) -> DigitsClassifier:
    model_kwargs = dict(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads)
    L.seed_everything(0, verbose=False)
    pretrained = DigitsClassifier(**model_kwargs)
    cache = None
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
        cache = os.path.join(
            args.cache_dir,
            f"digits_e{args.embed_dim}_d{args.depth}_h{args.heads}_ep{args.pretrain_epochs}_b{args.batch_size}.pt",
        )
    if cache and os.path.exists(cache):
        pretrained.load_state_dict(torch.load(cache))
        print(f"pretrained weights loaded from {cache}")
    else:
        start = time.perf_counter()
        fit(pretrained, dm, args.pretrain_epochs, [])
        print(f"pretrained {args.pretrain_epochs} epochs in {time.perf_counter() - start:.0f}s")
        if cache:
            torch.save(pretrained.state_dict(), cache)
    pretrained.cpu().hparams.lr = args.lr  # fine-tuning learning rate
    print(
        f"pretrained test acc {measure_accuracy(pretrained, dm.test_dataloader()):.4f}, "
        f"{count_parameters(pretrained.model):,} params",
        flush=True,
    )
    return pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=12, help="fine-tune epochs, the same for every arm")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (all arms)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated (default {DEFAULT_ARMS})")
    parser.add_argument("--iter-end", type=int, default=None, help="last pruning epoch (default epochs//2 - 1)")
    parser.add_argument("--iter-steps", type=int, default=None, help="pruning steps (default one per epoch)")
    parser.add_argument("--schedule", default="linear", choices=["linear", "cubic"])
    parser.add_argument("--gradient-batches", type=int, default=8, help="Taylor: batches of gradients")
    parser.add_argument("--alpha", type=float, default=0.5, help="+distil: weight of the distillation term")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--int8", action="store_true", help="also measure each final model after int8 dynamic")
    parser.add_argument("--cache-dir", default=None, help="keep/reuse the pretrained weights here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="where accuracy is measured: choose settings on val, report them on test",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    if args.iter_end is None:
        args.iter_end = max(0, args.epochs // 2 - 1)
    global ACCELERATOR
    ACCELERATOR = args.accelerator
    torch.set_num_threads(args.threads)
    dm = DigitsDataModule(batch_size=args.batch_size)
    dm.setup()
    pretrained = pretrain(args, dm)
    teacher = copy.deepcopy(pretrained.model).eval()

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for arm in arms:
        make_callbacks(arm, args, teacher)  # validate names before training anything
    if "unpruned" not in arms:
        arms.insert(0, "unpruned")
    results: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    seconds: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for arm in arms:
            model = copy.deepcopy(pretrained)
            L.seed_everything(100 + seed, verbose=False)
            start = time.perf_counter()
            fit(model, dm, args.epochs, make_callbacks(arm, args, teacher))
            elapsed = time.perf_counter() - start
            model.cpu()
            results.setdefault(arm, []).append(measure_accuracy(model, evaluation_batches(dm, args.split)))
            seconds.setdefault(arm, []).append(elapsed)
            params[arm] = count_parameters(model.model)
            line = f"seed {seed} {arm}: {results[arm][-1]:.4f} ({elapsed:.0f}s)"
            if args.int8:
                name = f"{arm} + int8"
                results.setdefault(name, []).append(int8_accuracy(model.model, dm, args.split))
                params[name] = params[arm]
                line += f", int8 {results[name][-1]:.4f}"
            print(line, flush=True)

    reference = results["unpruned"]
    evaluated = dm.val_set if args.split == "val" else dm.test_set
    print(
        f"\ndigits {args.split} split ({len(evaluated)} images), ViT embed_dim={args.embed_dim} depth={args.depth} "
        f"heads={args.heads}: {args.pretrain_epochs} pretrain + {args.epochs} fine-tune epochs (lr {args.lr:g}), "
        f"batch {args.batch_size}, {args.seeds} seeds; prune {args.ratio:.0%} of channels; iterative = "
        f"{args.iter_steps or args.iter_end + 1} {args.schedule} steps over epochs 0..{args.iter_end}; "
        f"distil: soft, alpha {args.alpha:g}, T {args.temperature:g}, teacher = the pretrained unpruned model"
    )
    print(
        f"| arm | params | {args.split} acc (mean +- std) | vs unpruned (pt) | paired diff per seed (pt, mean +- std) |"
    )
    print("|---|---|---|---|---|")
    for name, accs in results.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diffs = [100 * (a - r) for a, r in zip(accs, reference)]
        diff_std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        print(
            f"| {name} | {params[name]:,} | {mean:.4f} +- {std:.4f} | {100 * (mean - statistics.mean(reference)):+.2f} "
            f"| {statistics.mean(diffs):+.2f} +- {diff_std:.2f} |"
        )


if __name__ == "__main__":
    main()
