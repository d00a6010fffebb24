"""Distil a bigger ViT into a small DeiT student with its distillation token, offline on digits.

Three fits, about 2-3 minutes on 2 CPU cores, no download:

    python examples/distillation_example.py          # --fast: a few batches, checks the wiring only

1. Train a teacher (``DigitsClassifier(embed_dim=64, depth=4)``) as usual and
   save a checkpoint.
2. Train a small DeiT-distilled student alone (the reference).
3. Train the same student with ``DistillationTeacher("teacher.ckpt", mode="deit")``:
   its class token learns from the labels, its distillation token from the
   teacher; the student's ``training_step`` is the plain cross-entropy one, and
   evaluation averages both heads.

With a pretrained timm teacher at 224 the callback line would read (weights
from a local file, student images resized to the teacher's size)::

    DistillationTeacher("deit_base_patch16_224", teacher_weights="deit_b_finetuned.safetensors",
                        teacher_kwargs=dict(num_classes=10), input_adapter=224, mode="deit")
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from lightning_vitcompress import DistillationTeacher
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.functional import measure_accuracy

STUDENT = dict(model_name="deit_tiny_distilled_patch16_224", embed_dim=32, depth=2, num_heads=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--output-dir", default="outputs/distillation")
    parser.add_argument("--fast", action="store_true", help="a few batches only: checks the wiring, not accuracy")
    args = parser.parse_args()

    torch.set_num_threads(2)
    data = DigitsDataModule(batch_size=64)
    data.setup()
    epochs = 1 if args.fast else args.epochs
    common = dict(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **(dict(limit_train_batches=3) if args.fast else {}),
    )

    # (1) the teacher, trained as usual; its checkpoint is all the callback needs
    L.seed_everything(0)
    teacher = DigitsClassifier(embed_dim=64, depth=4, num_heads=4)
    trainer = L.Trainer(**common)
    trainer.fit(teacher, data)
    teacher_path = Path(args.output_dir) / "teacher.ckpt"
    trainer.save_checkpoint(teacher_path)

    # (2) the student alone
    L.seed_everything(1)
    alone = DigitsClassifier(**STUDENT)
    L.Trainer(**common).fit(alone, data)

    # (3) the same student, distilled: nothing in DigitsClassifier changes
    L.seed_everything(1)
    student = DigitsClassifier(**STUDENT)
    distill = DistillationTeacher(str(teacher_path), mode="deit", alpha=0.5, cache_teacher_logits=True)
    L.Trainer(callbacks=[distill], **common).fit(student, data)

    test = data.test_dataloader()
    print(f"\ntest accuracy after {epochs} epochs:")
    for name, model in (("teacher (64x4)", teacher), ("DeiT 32x2 alone", alone), ("DeiT 32x2 distilled", student)):
        print(f"  {name:<20} {100 * measure_accuracy(model, test):5.1f}%")


if __name__ == "__main__":
    main()
