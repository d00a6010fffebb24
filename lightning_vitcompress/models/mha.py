"""Hand-written ViTs: ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``, or timm-style blocks.

:class:`HandWrittenAdapter` reads any model whose attention modules have one of the
three structures :func:`~lightning_vitcompress.models.base.is_attention_module`
knows (``nn.MultiheadAttention``, a fused ``qkv`` such as timm's ``Attention`` used
in a ViT of one's own, separate q/k/v Linears with ``o_proj``).

What torch-pruning (1.6) can do with ``nn.MultiheadAttention``: its MHA pruner
removes the *same* channel indices from the embedding (input columns) and from
each of q, k and v (rows of ``in_proj_weight``), and keeps ``num_heads``. So the
embedding width and ``head_dim`` shrink together; whole heads cannot be removed,
and head dims cannot be pruned apart from the embedding. The removed indices
are not balanced per head: the kept q/k/v channels are re-split into heads, so
channels of different heads can end up in one head. Passing an MHA in
``num_heads`` makes torch-pruning skip the embedding group altogether.

Example::

    >>> import torch
    >>> from torch import nn
    >>> class TinyViT(nn.Module):  # conv patch embedding, cls token, nn.TransformerEncoder, head
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.patch_embed = nn.Conv2d(3, 64, kernel_size=8, stride=8)
    ...         self.cls_token = nn.Parameter(torch.zeros(1, 1, 64))
    ...         self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, batch_first=True), 2)
    ...         self.head = nn.Linear(64, 10)
    ...     def forward(self, images):
    ...         x = self.patch_embed(images).flatten(2).transpose(1, 2)
    ...         x = self.encoder(torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1))
    ...         return self.head(x[:, 0])
    >>> adapter = HandWrittenAdapter(TinyViT())
    >>> [name for name, _ in adapter.attention_blocks()]
    ['encoder.layers.0.self_attn', 'encoder.layers.1.self_attn']
    >>> adapter.capabilities.require("head_pruning", "prune_heads=True", adapter.family)
    Traceback (most recent call last):
    ...
    ValueError: prune_heads=True is not possible on hand-written models: ...Turn off prune_heads=True.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress.models.base import (
    Capabilities,
    EmbeddingParameter,
    ModelAdapter,
    PrefixTokens,
    is_attention_module,
    named_heads,
)

_MHA_CAPABILITIES = Capabilities(
    head_pruning=False,
    head_dim_pruning=False,
    why_not={
        "head_pruning": "torch-pruning prunes nn.MultiheadAttention only along the embedding and keeps num_heads.",
        "head_dim_pruning": (
            "torch-pruning prunes nn.MultiheadAttention's q/k/v only together with the embedding "
            "(prune the embedding instead)."
        ),
    },
)

#: module types whose parameters are not bare tokens
_LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.MultiheadAttention, nn.BatchNorm2d, nn.GroupNorm)


class HandWrittenAdapter(ModelAdapter):
    """Any model whose attention blocks the adapters can read (``nn.MultiheadAttention``, batch_first
    or not; timm-style fused ``qkv``; separate q/k/v): a ViT of one's own.

    Pruning capabilities follow the attention: with ``nn.MultiheadAttention`` no head or
    separate head-dim pruning (see the module docstring), else everything.

    Heads are the children called ``head``/``heads``/``head_dist``/``fc``/``classifier``;
    prefix tokens are bare ``(1, n, E)`` parameters whose name has no ``pos``, unless
    the model states ``num_prefix_tokens``; the input shape comes from an
    ``img_size``/``image_size`` attribute and the first Conv2d's ``in_channels``.
    """

    family = "hand-written"
    #: a third-party module tree: its attributes are read dynamically (checked by tests/test_zoo.py, not mypy)
    model: Any

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._width = self.embed_dim()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(is_attention_module(m) for m in model.modules())

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """Those of ``nn.MultiheadAttention`` where the model has one, else full."""
        if any(isinstance(m, nn.MultiheadAttention) for m in self.model.modules()):
            return _MHA_CAPABILITIES
        return Capabilities()

    def attention_blocks(self) -> list[tuple[str, nn.Module]]:
        return [
            (name, self.check_attention(name, m)) for name, m in self.model.named_modules() if is_attention_module(m)
        ]

    def patch_embedding(self) -> Optional[nn.Module]:
        return next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)

    def prefix_tokens(self) -> PrefixTokens:
        width = self.embed_dim()
        owners = {p for m in self.model.modules() if isinstance(m, _LAYER_TYPES) for p in m.parameters()}
        found = [
            EmbeddingParameter(name, p, p.dim() - 1)
            for name, p in self.model.named_parameters()
            if p not in owners and p.dim() >= 2 and p.shape[-1] == width
        ]
        stated = getattr(self.model, "num_prefix_tokens", None)
        if isinstance(stated, int):
            count = stated
        else:
            count = sum(p.parameter.numel() // width for p in found if "pos" not in p.name.rpartition(".")[2])
        return PrefixTokens(count, tuple(found))

    def classifier_heads(self) -> list[tuple[str, nn.Module]]:
        return named_heads(self.model, ("head", "heads", "head_dist", "fc", "classifier"))

    def input_shape(self) -> Optional[tuple[int, int, int]]:
        size = getattr(self.model, "img_size", getattr(self.model, "image_size", None))
        patch = self.patch_embedding()
        if size is None or not isinstance(patch, nn.Conv2d):
            return None
        height, width = (size, size) if isinstance(size, int) else size
        return (patch.in_channels, int(height), int(width))

    def pruning_problem(self) -> Optional[str]:
        widths = sorted({layout.embed_dim for layout in self.layouts()})
        if len(widths) > 1:
            return (
                f"its attention blocks have widths {widths} (a model in stages joined by pooling layers, such as "
                "PiT), and this adapter prunes one residual width; supported: single-width ViTs, and timm Swin"
            )
        return None

    def embed_multiple_of(self) -> Optional[int]:
        heads = [layout.num_heads for layout in self.layouts() if layout.kind == "in_proj"]
        return math.lcm(*heads) if heads else None

    def _fix_model_attributes(self) -> None:
        width = self.embed_dim()
        for attr in ("embed_dim", "hidden_dim", "dim"):
            if self.model.__dict__.get(attr) == self._width:
                setattr(self.model, attr, width)
        self._width = width

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        if type(block).forward is not nn.TransformerEncoderLayer.forward:
            return f"{type(block).__name__} is not an nn.TransformerEncoderLayer"
        return None

    @staticmethod
    def attention_step(block: Any, x: torch.Tensor, attend: Any) -> torch.Tensor:
        if block.norm_first:
            return x + block.dropout1(attend(block.norm1(x)))
        return block.norm1(x + block.dropout1(attend(x)))

    @staticmethod
    def mlp_step(block: Any, x: torch.Tensor) -> torch.Tensor:
        if block.norm_first:
            return x + block._ff_block(block.norm2(x))
        return block.norm2(x + block._ff_block(x))

    @staticmethod
    def tokens_batch_first(block: nn.Module) -> bool:
        attention = getattr(block, "self_attn", None)  # nn.TransformerEncoderLayer; else the block's own attention
        if attention is None:
            attention = next((m for m in block.modules() if isinstance(m, nn.MultiheadAttention)), None)
        return bool(getattr(attention, "batch_first", True))
