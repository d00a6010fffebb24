"""ExportOnFit: train a small ViT on digits, prune and quantize it, ship it as one file, load it with torch alone.

Runs offline in about a minute on 2 CPU cores (most of it the ahead-of-time compile):

    python examples/export_example.py [--epochs 4] [--format pt2|onnx]

What it shows:
* PruningSchedule + QuantizeOnFit("int8_static_x86") + ExportOnFit: the file is written when training
  ends, after the int8 checkpoint, loaded back and compared with the live model before fit returns;
* BenchmarkCallback measuring the loaded file ("deployed") next to the live model;
* the loader a server runs: ``torch._inductor.aoti_load_package`` (or onnxruntime), no Lightning,
  no lightning_vitcompress, no timm, no torchao.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from lightning_vitcompress import BenchmarkCallback, ExportOnFit, PruningSchedule, QuantizeOnFit
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule


def serve(path: Path, images: torch.Tensor) -> torch.Tensor:
    """What a server does: torch (or onnxruntime) only."""
    if path.suffix == ".pt2":
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(path))(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--format", default="pt2", choices=["pt2", "onnx"])
    parser.add_argument("--output-dir", default="outputs/export")
    args = parser.parse_args()

    torch.set_num_threads(2)
    L.seed_everything(0)
    output = Path(args.output_dir)
    model = DigitsClassifier()
    data = DigitsDataModule(batch_size=32)
    path = output / f"digits-vit.{args.format}"
    callbacks = [
        PruningSchedule(0.5),
        QuantizeOnFit(
            "int8_static_x86", save_path=output / "model-int8.ckpt", save_fp32_path=output / "model-fp32.ckpt"
        ),
        ExportOnFit(path),
        BenchmarkCallback(batch_size=32, devices=("cpu",), plot=False),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=callbacks,
        default_root_dir=output,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, data)

    data.setup()
    images, labels = next(iter(data.val_dataloader()))
    with torch.inference_mode():
        logits = serve(path, images)
    print(
        f"\n{path} ({path.stat().st_size / 1e6:.2f} MB) served {len(images)} digits without the library: "
        f"accuracy {(logits.argmax(-1) == labels).float().mean():.3f}"
    )


if __name__ == "__main__":
    main()
