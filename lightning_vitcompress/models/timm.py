"""timm ``VisionTransformer`` (ViT, DeiT, with registers) and ``VisionTransformerDistilled``.

Example::

    >>> import timm
    >>> vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> adapter = TimmAdapter(vit)
    >>> adapter.prefix_tokens().count  # class and distillation token
    2
    >>> [name for name, _ in adapter.classifier_heads()]
    ['head', 'head_dist']
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_vitcompress.models.base import (
    Capabilities,
    ModelAdapter,
    PrefixTokens,
    embedding_parameter,
    is_attention_pool,
    named_heads,
)


class TimmAdapter(ModelAdapter):
    """timm ViTs: ``blocks[i].attn`` with a fused ``qkv``; torch-pruning prunes heads, head dims, embed and MLP."""

    family = "timm"
    #: a third-party module tree: its attributes are read dynamically (checked by tests/test_zoo.py, not mypy)
    model: Any
    capabilities = Capabilities()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def attention_blocks(self) -> list[tuple[str, nn.Module]]:
        return [
            (f"blocks.{i}.attn", self.check_attention(f"blocks.{i}.attn", block.attn))
            for i, block in enumerate(self.model.blocks)
        ]

    def patch_embedding(self) -> Optional[nn.Module]:
        return self.model.patch_embed.proj

    def prefix_tokens(self) -> PrefixTokens:
        model = self.model
        parameters = [
            *embedding_parameter("cls_token", model.cls_token),
            *embedding_parameter("reg_token", getattr(model, "reg_token", None)),
            *embedding_parameter("dist_token", getattr(model, "dist_token", None)),
            *embedding_parameter("pos_embed", model.pos_embed),
        ]
        return PrefixTokens(int(model.num_prefix_tokens), tuple(parameters))

    def classifier_heads(self) -> list[tuple[str, nn.Module]]:
        return named_heads(self.model, ("head", "head_dist"))

    def attention_pools(self) -> list[tuple[str, Any]]:  # Any: timm modules, narrowed by name
        pool = getattr(self.model, "attn_pool", None)
        return [("attn_pool", pool)] if isinstance(pool, nn.Module) and is_attention_pool(pool) else []

    def input_shape(self) -> Optional[tuple[int, int, int]]:
        patch_embed = self.model.patch_embed
        size = getattr(patch_embed, "img_size", None)
        if size is None or getattr(patch_embed, "dynamic_img_size", False):
            return None
        return (patch_embed.proj.in_channels, int(size[0]), int(size[1]))

    def _fix_model_attributes(self) -> None:
        width = self.embed_dim()
        for attr in ("embed_dim", "num_features", "head_hidden_size"):
            if isinstance(self.model.__dict__.get(attr), int):
                setattr(self.model, attr, width)

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        from timm.models.vision_transformer import Block

        return None if type(block).forward is Block.forward else f"{type(block).__name__} is not timm's Block"

    @staticmethod
    def attention_step(block: Any, x: torch.Tensor, attend: Any) -> torch.Tensor:
        return x + block.drop_path1(block.ls1(attend(block.norm1(x))))

    @staticmethod
    def mlp_step(block: Any, x: torch.Tensor) -> torch.Tensor:
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
