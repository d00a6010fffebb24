"""Merge tokens in a trained ViT (ToMe), fine-tune through the merge, and reload it for inference.

Runs offline in a few minutes on 2 CPU cores:

    python examples/token_merging_example.py      # --fast: a few batches, checks the wiring only

1. Train a small ViT on the digits (65 tokens: 64 patches + a class token).
2. Fine-tune it with ``TokenMerging(r=12, schedule="decreasing")``: from setup,
   the 4 blocks merge 24, 16, 8, 0 tokens (65 in, 17 out: about half the MACs);
   training continues through the size-weighted merges. No weight changes; the
   checkpoint records the merge settings.
3. Reload the checkpoint with ``load_compressed``: it merges the same way.

Without a Trainer: ``merge_tokens(model, r)`` (see its docstring).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import TokenMerging, load_compressed
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.functional import count_macs, measure_accuracy, merged_token_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of ordinary training")
    parser.add_argument("--merge-epochs", type=int, default=4, help="epochs of the fit that merges from setup")
    parser.add_argument("--output-dir", default="outputs/token_merging_example")
    parser.add_argument("--fast", action="store_true", help="a few batches only: checks the wiring, not accuracy")
    args = parser.parse_args()

    torch.set_num_threads(2)
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    quick = dict(limit_train_batches=4, limit_val_batches=2) if args.fast else {}
    common = dict(accelerator="cpu", enable_model_summary=False, enable_progress_bar=False, logger=False, **quick)

    model = DigitsClassifier(embed_dim=64, depth=4, num_heads=4)
    L.Trainer(max_epochs=1 if args.fast else args.epochs, enable_checkpointing=False, **common).fit(model, data)
    test = list(data.test_dataloader())
    example = test[0][0][:1]
    macs = count_macs(model.model, example)
    print(f"unmerged, test accuracy: {measure_accuracy(model, test):.2%}")

    model.hparams.lr = 5e-4
    checkpoint = ModelCheckpoint(dirpath=Path(args.output_dir), save_last=True)
    merging = TokenMerging(r=12, schedule="decreasing")
    L.Trainer(max_epochs=2 if args.fast else args.merge_epochs, callbacks=[merging, checkpoint], **common).fit(
        model, data
    )
    print(
        f"merged (r per block {merging.plan['block_r']}) after fine-tuning, test accuracy: "
        f"{measure_accuracy(model, test):.2%}; MACs {count_macs(model.model, example) / macs:.2f}x; "
        f"tokens after each block {merged_token_counts(model.model)}"
    )

    loaded = load_compressed(DigitsClassifier, checkpoint.last_model_path)
    images = test[0][0]
    with torch.no_grad():
        same = torch.equal(loaded(images).argmax(-1), model.eval()(images).argmax(-1))
    print(
        f"reloaded from {checkpoint.last_model_path} with load_compressed: tokens after each block "
        f"{merged_token_counts(loaded.model)}, same predictions = {same}"
    )


if __name__ == "__main__":
    main()
