"""Offline, real data and a small ViT classifier: scikit-learn's bundled digits.

1,797 real 8x8 handwritten digits (no download), upsampled to 32x32x3 so that
timm ViTs with ``patch_size=4`` see 64 patches. Used by the quickstart, the
examples, the tests and the benchmarks: one data module, one split, everywhere.

Example::

    >>> import lightning as L
    >>> dm = DigitsDataModule(batch_size=64)
    >>> model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=4, logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(model, dm)
    >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)  # scikit-learn's 1,797 images, split 70/15/15
    (1259, 269, 269)
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split
from torchmetrics.classification import MulticlassAccuracy

NUM_CLASSES = 10
IMAGE_SIZE = 32


def load_digits_tensors(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(N, 3, image_size, image_size)`` floats in [-1, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The digits data set needs scikit-learn: pip install 'lightning-vitcompress[data]'") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) - 0.5) / 0.5
    return images.expand(-1, 3, -1, -1).contiguous(), torch.tensor(digits.target, dtype=torch.long)


class SplitsDataModule(pl.LightningDataModule):
    """The loaders of a data module that holds ``train_set``, ``val_set`` and ``test_set`` (the test set also
    serves ``predict``), batched by ``batch_size`` with ``num_workers``; the base of the offline data modules."""

    batch_size: int
    num_workers: int
    train_set: Any
    val_set: Any
    test_set: Any

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class DigitsDataModule(SplitsDataModule):
    """Digits upsampled to 32x32x3 with a fixed 70/15/15 train/val/test split.

    Args:
        batch_size: images per batch (all three loaders).
        image_size: side of the upsampled square images.
        split_seed: seed of the split; the default gives the split every
            test, example and benchmark here uses.
        num_workers: DataLoader workers (0: the data is tiny and in memory).
    """

    def __init__(
        self, batch_size: int = 32, image_size: int = IMAGE_SIZE, split_seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}: must be a positive number of images, e.g. 64.")
        self.batch_size = batch_size
        self.image_size = image_size
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.num_classes = NUM_CLASSES
        self.train_set: Optional[Any] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors(self.image_size)
        dataset = TensorDataset(images, labels)
        n_val = n_test = int(0.15 * len(dataset))
        lengths = [len(dataset) - n_val - n_test, n_val, n_test]
        generator = torch.Generator().manual_seed(self.split_seed)
        self.train_set, self.val_set, self.test_set = random_split(dataset, lengths, generator=generator)


def small_vit(
    model_name: str = "vit_tiny_patch16_224",
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    image_size: int = IMAGE_SIZE,
    patch_size: int = 4,
    num_classes: int = NUM_CLASSES,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm ViT/DeiT (random weights) sized for 32x32 digits: 64 patches + prefix tokens."""
    return timm.create_model(
        model_name,
        pretrained=False,
        num_classes=num_classes,
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        **timm_kwargs,
    )


class DigitsClassifier(pl.LightningModule):
    """A plain LightningModule around a timm ViT: what a user's own code looks like.

    Nothing in it knows about compression; the callbacks find ``self.model``.

    Args:
        model_name: any timm ViT/DeiT architecture name (built with ``pretrained=False``).
        lr: AdamW learning rate, cosine-annealed over ``max_epochs``.
        weight_decay: AdamW weight decay.
        embed_dim, depth, num_heads, mlp_ratio, patch_size: the ViT's shape (:func:`small_vit`).
        image_size, in_chans: the input (digits: 32x32x3; Fashion-MNIST: ``image_size=28, in_chans=1``).
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        image_size: int = IMAGE_SIZE,
        in_chans: int = 3,
        patch_size: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = small_vit(
            model_name,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            image_size=image_size,
            patch_size=patch_size,
            in_chans=in_chans,
        )
        self.val_accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_accuracy(self(images), labels)
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.test_accuracy(self(images), labels)
        self.log("test/acc", self.test_accuracy)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 10
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
