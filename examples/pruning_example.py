"""Prune a trained ViT by 50% over a schedule while fine-tuning, then load it for inference.

Offline: scikit-learn's digits and a small timm ViT. Steps:

1. the team's ordinary training of ``DigitsClassifier``;
2. the same module fine-tuned with ``PruningSchedule`` attached: half of the
   channels removed in steps over the first epochs, fine-tuned after;
   checkpoints are written as usual;
3. ``load_compressed`` rebuilds the pruned model from the checkpoint in one call.

    python examples/pruning_example.py [--epochs 4] [--prune-epochs 4] [--fast]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import PruningSchedule, load_compressed
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.functional import count_parameters, measure_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of plain training")
    parser.add_argument("--prune-epochs", type=int, default=4, help="epochs of pruning + fine-tuning")
    parser.add_argument("--output-dir", default="outputs/pruning")
    parser.add_argument("--fast", action="store_true", help="a few batches only: checks the wiring, not accuracy")
    args = parser.parse_args()

    torch.set_num_threads(2)
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    data.setup()
    model = DigitsClassifier(embed_dim=64, depth=4, num_heads=4)
    quick = dict(limit_train_batches=4, limit_val_batches=2) if args.fast else {}
    common = dict(accelerator="cpu", default_root_dir=args.output_dir, enable_model_summary=False, logger=False)

    # (1) ordinary training
    L.Trainer(max_epochs=args.epochs, enable_checkpointing=False, **quick, **common).fit(model, data)
    dense_params = count_parameters(model.model)
    dense_accuracy = measure_accuracy(model, data.test_dataloader())

    # (2) prune 50% of the channels in steps at epochs 0..prune_epochs-2, fine-tune through the last epoch
    model.hparams.lr = 5e-4
    pruning = PruningSchedule(pruning_ratio=0.5, start_epoch=0, end_epoch=max(0, args.prune_epochs - 2))
    checkpoint = ModelCheckpoint(dirpath=Path(args.output_dir) / "checkpoints", save_last=True)
    trainer = L.Trainer(max_epochs=args.prune_epochs, callbacks=[pruning, checkpoint], **quick, **common)
    trainer.fit(model, data)

    # (3) one call rebuilds the pruned shapes and loads the weights
    pruned = load_compressed(DigitsClassifier, checkpoint.last_model_path)
    print(
        f"\ndense:  {dense_params:,} params, test accuracy {dense_accuracy:.3f}\n"
        f"pruned: {count_parameters(pruned.model):,} params, test accuracy "
        f"{measure_accuracy(pruned, data.test_dataloader()):.3f} (loaded from {checkpoint.last_model_path})"
    )


if __name__ == "__main__":
    main()
