"""Compress a Hugging Face transformers ViT inside a LightningModule, then load it for inference.

A team's own LightningModule around ``ViTForImageClassification`` (its forward
returns the output object, its training_step reads ``.logits``): the callbacks
prune it 50%, distil from the unpruned model, swap Nyström attention into its
last block, quantize it int8 when training ends and benchmark it; nothing in the
module knows. Offline: scikit-learn's digits and a small ``ViTConfig`` with
random weights. With internet, start from the hub instead:
``ViTForImageClassification.from_pretrained("google/vit-base-patch16-224", num_labels=10,
ignore_mismatched_sizes=True)`` (and 224x224 inputs).

    pip install -e ".[hf,examples]" && python examples/transformers_example.py [--epochs 6] [--fast]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import ViTConfig, ViTForImageClassification

from lightning_vitcompress import (
    BenchmarkCallback,
    DistillationTeacher,
    NystromSwap,
    PruningSchedule,
    QuantizeOnFit,
    load_compressed,
)
from lightning_vitcompress.digits import DigitsDataModule
from lightning_vitcompress.functional import count_parameters, measure_accuracy


class HFViTClassifier(L.LightningModule):
    """What a transformers user writes: nothing here knows about compression."""

    def __init__(self, hidden_size: int = 64, layers: int = 4, heads: int = 4, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = ViTConfig(
            image_size=32,
            patch_size=4,
            num_channels=3,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden_size,
            num_labels=10,
        )
        self.vit = ViTForImageClassification._from_config(config, attn_implementation="sdpa")

    def forward(self, pixel_values: torch.Tensor) -> Any:
        return self.vit(pixel_values=pixel_values)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images).logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val/acc", (self(images).logits.argmax(-1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of plain training, then of compression")
    parser.add_argument("--output-dir", default="outputs/transformers")
    parser.add_argument("--fast", action="store_true", help="a few batches only: checks the wiring, not accuracy")
    args = parser.parse_args()

    torch.set_num_threads(2)
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    data.setup()
    quick = dict(limit_train_batches=3, limit_val_batches=2) if args.fast else {}
    common = dict(accelerator="cpu", default_root_dir=args.output_dir, enable_model_summary=False, logger=False)

    # (1) the team's ordinary training
    module = HFViTClassifier()
    L.Trainer(max_epochs=args.epochs, enable_checkpointing=False, **quick, **common).fit(module, data)
    teacher = copy.deepcopy(module.vit).eval()  # the uncompressed model teaches the pruned one
    dense_params = count_parameters(module.vit)

    # (2) the same module, compressed while it fine-tunes
    checkpoint = ModelCheckpoint(dirpath=Path(args.output_dir) / "checkpoints", save_last=True)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[
            PruningSchedule(0.5, start_epoch=0),  # embedding, head dims and MLP of every block, at setup
            DistillationTeacher(teacher, mode="soft", alpha=0.5),  # reads the teacher's .logits
            NystromSwap(num_landmarks=16, blocks=[-1]),  # 64 patches -> 16 landmarks in the last block
            QuantizeOnFit("int8_dynamic"),
            BenchmarkCallback(batch_size=32, output_dir=args.output_dir, plot=False),
            checkpoint,
        ],
        **quick,
        **common,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(Path(args.output_dir) / "compressed.ckpt")  # after QuantizeOnFit: the int8 model

    # (3) one call rebuilds the pruned, swapped, quantized transformers model for inference
    loaded = load_compressed(HFViTClassifier, Path(args.output_dir) / "compressed.ckpt")
    images = next(iter(data.test_dataloader()))[0][:8]
    with torch.no_grad():
        same = torch.allclose(loaded(images).logits, module.eval()(images).logits, atol=1e-4)
    accuracy = measure_accuracy(loaded, data.test_dataloader())
    print(
        f"params {dense_params / 1e3:.0f}k -> {count_parameters(loaded.vit) / 1e3:.0f}k; "
        f"test top-1 of the reloaded model {100 * accuracy:.2f}%; reload gives the same logits: {same}"
    )


if __name__ == "__main__":
    main()
