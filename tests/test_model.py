import copy
from typing import Any

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import fast_trainer
from timm.models.vision_transformer import Block
from torch import nn

from lightning_vitcompress import NystromSwap
from lightning_vitcompress._model import (
    AmbiguousTargetError,
    check_supported_attention,
    find_attention_blocks,
    resolve_target_model,
    resolve_target_path,
)
from lightning_vitcompress.digits import DigitsClassifier, small_vit
from lightning_vitcompress.functional.nystrom import NystromAttention


class _Holder(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.head_metric = nn.Identity()
        self.net = vit


def test_finds_timm_vit_and_deit_blocks():
    vit = small_vit(depth=3)
    deit = small_vit("deit_tiny_distilled_patch16_224", depth=2)
    assert [n for n, _ in find_attention_blocks(vit)] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert len(find_attention_blocks(deit)) == 2


def test_finds_multihead_attention_transformer():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    assert len(find_attention_blocks(encoder)) == 2


def test_single_child_is_found_and_named_attribute_wins():
    holder = _Holder(small_vit(depth=1))
    assert resolve_target_path(holder) == "net"
    assert resolve_target_model(holder) is holder.net
    assert resolve_target_model(holder, "net") is holder.net


def test_two_models_with_attention_are_an_error_naming_both():
    holder = _Holder(small_vit(depth=1))
    holder.second = small_vit(depth=1)
    with pytest.raises(AmbiguousTargetError, match=r"'net' \(VisionTransformer\), 'second' \(VisionTransformer\)"):
        resolve_target_path(holder)
    assert resolve_target_path(holder, "second") == "second"


def test_an_ema_copy_is_an_error_and_model_attribute_chooses():
    lit = DigitsClassifier(depth=1, embed_dim=32, num_heads=2)
    lit.ema = copy.deepcopy(lit.model)
    with pytest.raises(
        ValueError, match=r"'model' \(VisionTransformer\), 'ema' \(VisionTransformer\).*model_attribute="
    ):
        resolve_target_path(lit)
    assert resolve_target_model(lit, "model") is lit.model


def test_a_teacher_on_the_module_is_an_error():
    lit = DigitsClassifier(depth=1, embed_dim=32, num_heads=2)
    lit.teacher = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, batch_first=True), 1, enable_nested_tensor=False
    )
    with pytest.raises(ValueError, match=r"'model' \(VisionTransformer\), 'teacher' \(TransformerEncoder\)"):
        resolve_target_path(lit)


def test_the_ambiguity_error_comes_at_setup_before_any_change(tmp_path, digits):
    lit = DigitsClassifier(depth=1, embed_dim=32, num_heads=2)
    lit.ema = copy.deepcopy(lit.model)
    with pytest.raises(ValueError, match=r"'model'.*'ema'.*model_attribute"):
        fast_trainer(tmp_path, callbacks=[NystromSwap(num_landmarks=4)]).fit(lit, datamodule=digits)
    assert not any(isinstance(m, NystromAttention) for m in lit.modules())


class _InlineViT(L.LightningModule):
    """A ViT written in the LightningModule itself: patch embedding, blocks and head are its own attributes."""

    def __init__(self, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, width))
        self.blocks = nn.ModuleList([Block(width, num_heads=2, mlp_ratio=2.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_a_vit_written_inline_is_the_module_itself(tmp_path, digits):
    lit = _InlineViT()
    assert resolve_target_path(lit) == ""
    trainer = fast_trainer(tmp_path, callbacks=[NystromSwap(num_landmarks=4)], limit_val_batches=0)
    trainer.fit(lit, datamodule=digits)
    assert all(isinstance(block.attn, NystromAttention) for block in lit.blocks)
    assert torch.isfinite(lit(next(iter(digits.val_dataloader()))[0])).all()


def test_inline_blocks_next_to_a_model_are_an_error():
    lit = _InlineViT(depth=1)
    lit.teacher = small_vit(depth=1)
    with pytest.raises(AmbiguousTargetError, match=r"'teacher' \(VisionTransformer\).*of its own in \['blocks'\]"):
        resolve_target_path(lit)


def _tiny_relpos() -> nn.Module:
    """A timm ViT whose attention (RelPosAttention) no adapter reads."""
    return timm.create_model(
        "vit_relpos_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=10,
    )


def test_unsupported_attention_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"RelPosAttention at 'blocks\.0\.attn'.*Supported families: timm"):
        check_supported_attention(_tiny_relpos())


def test_unsupported_attention_fails_at_setup(tmp_path, digits):
    class RelPosClassifier(DigitsClassifier):
        def __init__(self) -> None:
            super().__init__(depth=1)
            self.model = _tiny_relpos()

    message = r"RelPosClassifier has attention module RelPosAttention at 'model\.blocks\.0.*Supported families"
    with pytest.raises(TypeError, match=message):
        fast_trainer(tmp_path, callbacks=[NystromSwap(num_landmarks=4)]).fit(RelPosClassifier(), datamodule=digits)


@pytest.mark.parametrize("family", ["timm-deit-distilled", "torchvision", "transformers", "mha", "nystrom-swapped"])
def test_supported_families_resolve_and_pass_the_check(family):
    holder = _Holder(_family_model(family))
    assert resolve_target_path(holder) == "net"
    check_supported_attention(holder.net)


def _family_model(family: str) -> nn.Module:
    if family == "timm-deit-distilled":
        return small_vit("deit_tiny_distilled_patch16_224", depth=1)
    if family == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    if family == "transformers":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=10,
        )
        return ViTForImageClassification(config)
    layer = nn.TransformerEncoderLayer(32, 4, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    if family == "nystrom-swapped":
        encoder.layers[0].self_attn = NystromAttention.from_attention(encoder.layers[0].self_attn, num_landmarks=4)
    return encoder


def test_no_attention_error_names_what_was_looked_at():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"No attention blocks.*Sequential.*Flatten.*model_attribute"):
        resolve_target_path(model)


def test_unknown_attribute_error_lists_children():
    holder = _Holder(small_vit(depth=1))
    with pytest.raises(AttributeError, match=r"model_attribute='backbone'.*\['head_metric', 'net'\]"):
        resolve_target_path(holder, "backbone")
    with pytest.raises(ValueError, match=r"model_attribute='head_metric'.*no attention blocks"):
        resolve_target_path(holder, "head_metric")
