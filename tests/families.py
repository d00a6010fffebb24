"""Tiny ViTs of every supported family, and one LightningModule that trains any of them on digits.

Import as ``from families import FAMILIES, FamilyClassifier, build_family``. Every
model: 2 blocks, width 32, 4 heads of 8, MLP 64, 32x32 images, 10 classes, random
weights built offline (``pretrained=False``, ``XConfig(...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vitcompress.models import logits_of

WIDTH, HEADS, DEPTH, MLP, CLASSES, IMAGE, PATCH = 32, 4, 2, 64, 10, 32, 8


def timm_vit(name: str = "vit_tiny_patch16_224", **kwargs: Any) -> nn.Module:
    return timm.create_model(
        name,
        pretrained=False,
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / WIDTH,
        num_classes=CLASSES,
        **kwargs,
    )


def torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=IMAGE,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=WIDTH,
        mlp_dim=MLP,
        num_classes=CLASSES,
    )


def hf_vit(class_name: str, attn_implementation: str = "eager") -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    config_class = transformers.DeiTConfig if class_name.startswith("DeiT") else transformers.ViTConfig
    config = config_class(
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=3,
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        num_labels=CLASSES,
    )
    return getattr(transformers, class_name)._from_config(config, attn_implementation=attn_implementation)


class MHAViT(nn.Module):
    """A hand-written ViT on nn.TransformerEncoderLayer (what many research repos look like)."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.img_size = IMAGE
        self.batch_first = batch_first
        tokens = (IMAGE // PATCH) ** 2 + 1
        self.patch = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, MLP, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.encoder(x if self.batch_first else x.transpose(0, 1))
        x = x if self.batch_first else x.transpose(0, 1)
        return self.head(self.norm(x[:, 0]))


#: family name -> builder; every test that says "each family" parametrizes over this
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "timm-vit": timm_vit,
    "timm-registers": lambda: timm_vit(reg_tokens=4),
    "timm-deit-distilled": lambda: timm_vit("deit_tiny_distilled_patch16_224"),
    "torchvision": torchvision_vit,
    "hf-vit-eager": lambda: hf_vit("ViTForImageClassification"),
    "hf-vit-sdpa": lambda: hf_vit("ViTForImageClassification", "sdpa"),
    "hf-deit": lambda: hf_vit("DeiTForImageClassification", "sdpa"),
    "hf-deit-teacher": lambda: hf_vit("DeiTForImageClassificationWithTeacher"),
    "mha-batch-first": MHAViT,
    "mha-seq-first": lambda: MHAViT(batch_first=False),
}


def build_family(family: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model of ``family`` with seeded random weights (train mode)."""
    torch.manual_seed(seed)
    return FAMILIES[family]()


class FamilyClassifier(L.LightningModule):
    """A plain LightningModule around a tiny ViT of any family: the user's own code, unaware of compression.

    Logits are read with :func:`logits_of`, so transformers' output objects and
    DeiT's (cls, dist) tuples train like a tensor.
    """

    def __init__(self, family: str = "timm-vit", lr: float = 2e-3, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_family(family, seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(images))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val/acc", (self(images).argmax(-1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
