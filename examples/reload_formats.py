"""Save a compressed model the ways teams do, and load each back with ``load_compressed``.

Offline: scikit-learn's digits and a small timm ViT, one short fit per technique
(pruned 50%, Nyström-swapped, int8 quantized two ways). Each model is saved as

* a full Lightning checkpoint (``ModelCheckpoint()``: the structure records travel in it),
* a weights-only checkpoint (``ModelCheckpoint(save_weights_only=True)``: no callback state),
* a bare ``torch.save(lit.state_dict())`` and one of the ViT alone (``lit.model.state_dict()``),
* safetensors (``save_safetensors``; torchao's int8 tensors cannot go there: refused clearly),

and each file is loaded back (``weights_only=True`` throughout). The table gives
the largest difference of the reloaded model's logits from the trained model's
on a test batch::

    python examples/reload_formats.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_vitcompress import NystromSwap, PruningSchedule, QuantizeOnFit, load_compressed, save_safetensors
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule

ARCH = dict(embed_dim=64, depth=2, num_heads=4)
TECHNIQUES: dict[str, Callable[[], Any]] = {
    "pruned 50%": lambda: PruningSchedule(0.5),
    "Nystrom m=16": lambda: NystromSwap(num_landmarks=16),
    "int8_dynamic_x86": lambda: QuantizeOnFit("int8_dynamic_x86", compile=False),
    "int8_dynamic (torchao)": lambda: QuantizeOnFit("int8_dynamic"),
}


def trained(callback: Any, folder: Path, data: DigitsDataModule) -> tuple[DigitsClassifier, dict[str, Path]]:
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(**ARCH)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, data)
    # what ModelCheckpoint() and ModelCheckpoint(save_weights_only=True) write, of the final (compressed) model
    trainer.save_checkpoint(folder / "full.ckpt")
    trainer.save_checkpoint(folder / "weights.ckpt", weights_only=True)
    files = {
        "full checkpoint": folder / "full.ckpt",
        "weights-only checkpoint": folder / "weights.ckpt",
        "torch.save(lit.state_dict())": folder / "lit.pt",
        "torch.save(lit.model.state_dict())": folder / "vit.pt",
        "safetensors": folder / "lit.safetensors",
    }
    torch.save(model.state_dict(), files["torch.save(lit.state_dict())"])
    torch.save(model.model.state_dict(), files["torch.save(lit.model.state_dict())"])
    try:
        save_safetensors(model, files["safetensors"])
    except (TypeError, ValueError) as err:
        files["safetensors"] = Path(f"refused: {str(err).splitlines()[0][:70]}...")
    return model.eval(), files


def main() -> None:
    torch.set_num_threads(2)
    data = DigitsDataModule(batch_size=64)
    data.setup()
    images = next(iter(data.test_dataloader()))[0][:32]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for technique, make in TECHNIQUES.items():
            model, files = trained(make(), Path(tmp) / technique.replace(" ", "_"), data)
            with torch.no_grad():
                expected = model(images)
            for fmt, path in files.items():
                if not path.exists():
                    rows.append((technique, fmt, str(path)))
                    continue
                loaded = load_compressed(DigitsClassifier, path, **({} if "checkpoint" in fmt else ARCH))
                with torch.no_grad():
                    difference = (loaded(images) - expected).abs().max().item()
                rows.append((technique, fmt, f"max |logit difference| {difference:.2e}"))
    print("| model | saved as | load_compressed |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
