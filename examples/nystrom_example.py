"""Swap a trained ViT's attention for Nyström attention, fine-tune, and reload it for inference.

Runs offline in about 1-2 minutes on 2 CPU cores:

    python examples/nystrom_example.py            # --fast: a few batches, checks the wiring only

1. Train a small ViT on the digits (65 tokens: 64 patches + a class token).
2. Fine-tune it with ``NystromSwap(num_landmarks=16)``: the swap happens at
   epoch 1 (``swap_epoch=1``), reusing the trained q/k/v and projection weights;
   the new depthwise-convolution parameters (``conv_kernel_size``) join the
   optimizer there. Checkpoints record the swap.
3. Reload the checkpoint with ``load_compressed`` and check it predicts the same.

Nyström attention pays off at long sequences (>= ~1000 tokens on CPU; see
benchmarks/bench_nystrom.py); at 65 tokens this example shows the workflow,
not a speed-up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import NystromSwap, load_compressed
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.functional import NystromAttention, measure_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of ordinary (exact) training")
    parser.add_argument("--swap-epochs", type=int, default=4, help="epochs of the fit that swaps at its epoch 1")
    parser.add_argument("--output-dir", default="outputs/nystrom_example")
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
    print(f"exact attention, test accuracy: {measure_accuracy(model, test):.2%}")

    model.hparams.lr = 5e-4
    checkpoint = ModelCheckpoint(dirpath=Path(args.output_dir), save_last=True)
    swap = NystromSwap(num_landmarks=16, swap_epoch=1, conv_kernel_size=5)
    L.Trainer(max_epochs=2 if args.fast else args.swap_epochs, callbacks=[swap, checkpoint], **common).fit(model, data)
    print(f"Nystrom m=16 after fine-tuning, test accuracy: {measure_accuracy(model, test):.2%}")
    print(f"swapped blocks: {swap.swapped_blocks}")

    loaded = load_compressed(DigitsClassifier, checkpoint.last_model_path)
    assert all(isinstance(block.attn, NystromAttention) for block in loaded.model.blocks)
    images = test[0][0]
    with torch.no_grad():
        same = torch.equal(loaded(images).argmax(-1), model.eval()(images).argmax(-1))
    print(f"reloaded from {checkpoint.last_model_path} with load_compressed: same predictions = {same}")


if __name__ == "__main__":
    main()
