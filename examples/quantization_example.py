"""QuantizeOnFit: train a small ViT on digits with QAT for the last epochs, get an int8 model, load it back.

Runs offline in about 30 seconds on 2 CPU cores:

    python examples/quantization_example.py [--epochs 16] [--qat-epochs 2] [--config int8_dynamic]
                                            [--inference-precision bf16-mixed]

For CPU deployment: ``--config int8_static_x86 --inference-precision bf16-mixed`` (the fastest
CPU path: calibrated int8 GEMMs, the rest in bf16, compiled when training ends).

What it shows:
* QAT from epoch ``epochs - qat_epochs`` (fake-quantized linears, same parameters), int8 at the end;
* the fp32 weights kept (``save_fp32_path``) and the quantized checkpoint (``save_path``);
* ``trainer.test`` after fit running the quantized model;
* ``load_compressed`` rebuilding the quantized model from its checkpoint (``weights_only`` loading).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from lightning_vitcompress import QuantizeOnFit, load_compressed
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
from lightning_vitcompress.functional import measure_accuracy, serialized_size_bytes


def describe(weight: torch.Tensor) -> str:
    """torchao's quantized tensor class, or the dtype of a plain tensor (the x86 configs' int8)."""
    data = weight.data
    return type(data).__name__ if type(data) is not torch.Tensor else str(data.dtype).replace("torch.", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--qat-epochs", type=int, default=2, help="0: post-training quantization only")
    parser.add_argument(
        "--config",
        default="int8_dynamic",
        help="int8_dynamic, int8_weight_only (CPU or CUDA); int8_dynamic_x86, int8_static_x86 (x86 CPU, compiled)",
    )
    parser.add_argument(
        "--inference-precision",
        default="32-true",
        choices=["32-true", "bf16-mixed"],
        help="bf16-mixed: x86 configs only, on CPUs with AVX512-BF16/AMX",
    )
    parser.add_argument("--output-dir", default="outputs/quantization")
    args = parser.parse_args()

    torch.set_num_threads(2)
    L.seed_everything(0)
    output = Path(args.output_dir)
    model = DigitsClassifier()  # embed 64, depth 4, lr 2e-3 at batch 32: the quickstart's model and recipe
    data = DigitsDataModule(batch_size=32)
    quantize = QuantizeOnFit(
        args.config,
        inference_precision=args.inference_precision,
        qat_start_epoch=args.epochs - args.qat_epochs if args.qat_epochs else None,
        save_path=output / f"model-{args.config}.ckpt",
        save_fp32_path=output / "model-fp32.ckpt",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[quantize],
        default_root_dir=output,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, data)
    (result,) = trainer.test(model, data, verbose=False)  # the quantized model

    fp32 = load_compressed(DigitsClassifier, output / "model-fp32.ckpt")
    loaded = load_compressed(DigitsClassifier, output / f"model-{args.config}.ckpt")
    data.setup()
    test = list(data.test_dataloader())
    summary = quantize.summary
    print(f"\nQuantizeOnFit({args.config!r}, QAT epochs: {args.qat_epochs})")
    print(f"  layers quantized: {len(summary['quantized'])}, kept in full precision: {summary['skipped'] or 'none'}")
    print(
        f"  model size: {serialized_size_bytes(fp32.model) / 1e6:.2f} MB fp32 -> "
        f"{serialized_size_bytes(loaded.model) / 1e6:.2f} MB (head: {type(loaded.model.head).__name__} "
        f"with {describe(loaded.model.head.weight)} weights)"
    )
    print(
        f"  test accuracy: fp32 {measure_accuracy(fp32, test):.4f}, quantized {result['test/acc']:.4f} "
        f"(trainer.test), reloaded {measure_accuracy(loaded, test):.4f}"
    )


if __name__ == "__main__":
    main()
