"""Quickstart: train a small ViT on real digits offline, compress it, print the before/after table.

Runs in about 1-2 minutes on 2 CPU cores with no download:

    python examples/quickstart.py            # --fast: a few batches, checks the wiring only

Two fits, as a team would do it: (1) train the ViT as usual; (2) fine-tune it
for a few epochs with the compression callbacks attached. The benchmark's
baseline is the trained model as it entered fit (2). The LightningModule
(``DigitsClassifier``) is ordinary user code: compression happens only through
the callbacks.
"""

from __future__ import annotations

import argparse
import copy

import lightning as L
import torch

from lightning_vitcompress import BenchmarkCallback, DistillationTeacher, PruningSchedule, QuantizeOnFit
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20, help="epochs of plain training")
    parser.add_argument("--compress-epochs", type=int, default=8, help="epochs of fine-tuning while compressing")
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--quantize", action="store_true", help="also int8-quantize at the end (QuantizeOnFit)")
    parser.add_argument("--fast", action="store_true", help="a few batches only: checks the wiring, not accuracy")
    args = parser.parse_args()

    torch.set_num_threads(2)
    L.seed_everything(0)
    model = DigitsClassifier(embed_dim=64, depth=4, num_heads=4)
    data = DigitsDataModule(batch_size=32)
    quick = dict(limit_train_batches=4, limit_val_batches=2) if args.fast else {}
    common = dict(accelerator="cpu", default_root_dir=args.output_dir, enable_model_summary=False, logger=False)

    # (1) the team's ordinary training
    L.Trainer(max_epochs=1 if args.fast else args.epochs, enable_checkpointing=False, **quick, **common).fit(
        model, data
    )

    # (2) the same module, fine-tuned at a lower learning rate with compression callbacks attached
    model.hparams.lr = 5e-4
    teacher = copy.deepcopy(model.model)  # the unpruned trained ViT teaches its pruned self
    epochs = 1 if args.fast else args.compress_epochs
    bench = BenchmarkCallback(batch_size=32, num_threads=2, output_dir=args.output_dir)
    callbacks = [
        PruningSchedule(pruning_ratio=0.5, start_epoch=0, end_epoch=max(0, epochs // 2 - 1)),
        DistillationTeacher(teacher, mode="soft", alpha=0.5, temperature=2.0),
        bench,
    ]
    if args.quantize:
        # the default: the int8 config that is fast on this machine (compiled x86 int8 where the CPU has
        # VNNI/AMX, which pays even at this 64-wide model: benchmarks/bench_int8_width.py)
        callbacks.append(QuantizeOnFit())
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **quick, **common)
    trainer.fit(model, data)
    # the table was printed on rank zero by BenchmarkCallback; its dict is on the callback too
    print(f"\nreport written to {bench.report_path}")


if __name__ == "__main__":
    main()
