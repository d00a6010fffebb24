"""timm ``SwinTransformer``: window attention in stages joined by patch merging.

What is well defined on windows: pruning head dims (each stage's embedding, its
blocks' head dims and MLP channels; the relative-position bias has one column per
head, and heads stay) and int8. Refused, naming why: whole-head pruning (the bias
table would have to follow), token merging (tokens tile fixed windows and merge 2x2
between stages), Nyström (a window holds ``window_size**2`` tokens, already few).

Example (a tiny Swin; ``swin_tiny_patch4_window7_224`` the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional import prune_vit
    >>> swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4,
    ...                          embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)
    >>> before = sum(p.numel() for p in swin.parameters())
    >>> records = prune_vit(swin, 0.5, torch.randn(1, 3, 32, 32))
    >>> sum(p.numel() for p in swin.parameters()) < 0.6 * before, swin(torch.randn(2, 3, 32, 32)).shape
    (True, torch.Size([2, 10]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch_pruning as tp
from torch import nn

from lightning_vitcompress.models.base import Capabilities, ModelAdapter, PrefixTokens, embedding_parameter, named_heads


class SwinAdapter(ModelAdapter):
    """timm Swin (v1): ``layers[i].blocks[j].attn`` is a ``WindowAttention`` with a fused ``qkv``."""

    family = "timm Swin"
    #: a third-party module tree: its attributes are read dynamically (checked by tests/test_zoo.py, not mypy)
    model: Any
    capabilities = Capabilities(
        head_pruning=False,
        why_not={"head_pruning": "each WindowAttention's relative-position bias table has one column per head."},
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    def attention_blocks(self) -> list[tuple[str, nn.Module]]:
        return [
            (f"layers.{i}.blocks.{j}.attn", self.check_attention(f"layers.{i}.blocks.{j}.attn", block.attn))
            for i, stage in enumerate(self.model.layers)
            for j, block in enumerate(stage.blocks)
        ]

    def patch_embedding(self) -> Optional[nn.Module]:
        return self.model.patch_embed.proj

    def prefix_tokens(self) -> PrefixTokens:
        position = getattr(self.model, "absolute_pos_embed", None)
        return PrefixTokens(0, tuple(embedding_parameter("absolute_pos_embed", position)))

    def classifier_heads(self) -> list[tuple[str, nn.Module]]:
        return named_heads(self.model, ("head",))

    def input_shape(self) -> Optional[tuple[int, int, int]]:
        patch_embed = self.model.patch_embed
        size = getattr(patch_embed, "img_size", None)
        if size is None or getattr(patch_embed, "dynamic_img_pad", False):
            return None
        return (patch_embed.proj.in_channels, int(size[0]), int(size[1]))

    def _patch_merging(self) -> list[nn.Module]:
        from timm.models.swin_transformer import PatchMerging

        return [stage.downsample for stage in self.model.layers if isinstance(stage.downsample, PatchMerging)]

    def residual_layers(self) -> list[nn.Module]:
        """Also each stage's patch merging, which writes the next stage's residual stream."""
        return [*super().residual_layers(), *self._patch_merging()]

    def custom_pruners(self) -> dict[type, Any]:
        from timm.models.swin_transformer import PatchMerging

        return {PatchMerging: _PatchMergingPruner()}

    def _fix_model_attributes(self) -> None:
        width = self.model.norm.weight.shape[0]
        for attr in ("num_features", "head_hidden_size"):
            if isinstance(self.model.__dict__.get(attr), int):
                setattr(self.model, attr, width)

    def nystrom_problem(self) -> Optional[str]:
        window = self.model.layers[0].blocks[0].attn.window_size
        return (
            f"WindowAttention attends within windows of {window[0]}x{window[1]} tokens, already linear in the "
            "image size, and adds a relative-position bias per (query, key) pair"
        )

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        return (
            f"{type(block).__name__} attends within fixed windows of {block.window_size} tokens that patch "
            "merging joins 2x2 between stages; merged tokens would not tile the windows"
        )


class _PatchMergingPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning for timm's ``PatchMerging`` as one unit: its input is the 2x2 neighbours' channels
    side by side (``4 x C``, neighbour-major), so a pruned input channel ``c`` is ``c + k*C`` for each ``k``."""

    @staticmethod
    def _wide(layer: Any, idxs: Sequence[int]) -> list[int]:
        width = layer.norm.normalized_shape[0] // 4
        return [k * width + int(i) for k in range(4) for i in idxs]

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        tp.prune_linear_out_channels(layer.reduction, idxs)
        layer.out_dim = layer.reduction.out_features
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        wide = self._wide(layer, idxs)
        tp.prune_layernorm_out_channels(layer.norm, wide)
        tp.prune_linear_in_channels(layer.reduction, wide)
        layer.dim = layer.norm.normalized_shape[0] // 4
        return layer

    def get_out_channels(self, layer: Any) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: Any) -> int:
        return layer.norm.normalized_shape[0] // 4
