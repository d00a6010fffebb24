"""Digits accuracy of a small ViT after a Nyström swap, before and after a short fine-tune.

A ViT (width 64, 4 blocks, 4 heads; 32x32 images, patch 4: 64 patches + a
class token = 65 tokens) is trained here on the digits data with exact
attention. Then, for each m, every block is swapped to Nyström attention with m
landmarks (the class token kept exact) and the test accuracy is measured
(a) right after the swap and (b) after fine-tuning with ``NystromSwap`` for a
few epochs. The exact model is fine-tuned for the same budget as the control,
so the "vs exact" column compares equal training. m = 64 covers all 64 patches
and is exact attention by construction.

    python benchmarks/bench_nystrom_accuracy.py [--epochs 12] [--finetune-epochs 3]
"""

from __future__ import annotations

import argparse
import copy

import lightning as L
import torch

from lightning_vitcompress._measure import measure_accuracy
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.nystrom import NystromAttention, NystromSwap

LANDMARKS = (4, 8, 16, 32, 64)


def trainer(epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )


def swapped_copy(model: DigitsClassifier, num_landmarks: int) -> DigitsClassifier:
    model = copy.deepcopy(model)
    for block in model.model.blocks:
        block.attn = NystromAttention.from_attention(
            block.attn, num_landmarks=num_landmarks, num_prefix_tokens=model.model.num_prefix_tokens
        )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12, help="epochs of exact training")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="epochs of fine-tuning after the swap")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    model = DigitsClassifier(embed_dim=64, depth=4, num_heads=4)
    trainer(args.epochs, []).fit(model, data)
    test = list(data.test_dataloader())
    exact_accuracy = measure_accuracy(model, test)

    def finetune(num_landmarks: int | None) -> float:
        L.seed_everything(1, verbose=False)
        tuned = copy.deepcopy(model)
        tuned.hparams.lr = args.finetune_lr
        callbacks = [NystromSwap(num_landmarks=num_landmarks)] if num_landmarks else []
        trainer(args.finetune_epochs, callbacks).fit(tuned, data)
        return measure_accuracy(tuned, test)

    exact_tuned = finetune(None)
    print(
        f"\nsmall ViT on digits (65 tokens = 64 patches + class token), trained {args.epochs} epochs exact; "
        f"fine-tune = {args.finetune_epochs} epochs at lr {args.finetune_lr} with NystromSwap; "
        f"test set {sum(len(b[1]) for b in test)} images"
    )
    header = f"{'attention':>12} | {'swap only':>9} | {'fine-tuned':>10} | {'fine-tuned vs exact':>19}"
    print(header)
    print("-" * len(header))
    print(f"{'exact':>12} | {exact_accuracy:>9.2%} | {exact_tuned:>10.2%} | {0:>+18.2f}pt")
    for m in LANDMARKS:
        before = measure_accuracy(swapped_copy(model, m), test)
        after = finetune(m) if m < 64 else exact_tuned  # m = 64 is exact attention
        label = f"m={m}" + (" (=N/4)" if m == 16 else " (exact)" if m == 64 else "")
        print(f"{label:>12} | {before:>9.2%} | {after:>10.2%} | {100 * (after - exact_tuned):>+18.2f}pt", flush=True)


if __name__ == "__main__":
    main()
