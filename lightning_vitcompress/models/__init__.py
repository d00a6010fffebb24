"""Model adapters: one file per model family, one registry line each.

Example::

    >>> import timm
    >>> from lightning_vitcompress.models import adapter_for
    >>> adapter = adapter_for(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    >>> adapter.family, [layout.num_heads for layout in adapter.layouts()] == [3] * 12
    ('timm', True)

Adding a family: write ``models/<family>.py`` with a :class:`ModelAdapter`
subclass and add it to :data:`ADAPTERS` (more specific families first).
"""

from __future__ import annotations

from torch import nn

from lightning_vitcompress.models.base import (
    AttentionLayout,
    Capabilities,
    EmbeddingParameter,
    ModelAdapter,
    PrefixTokens,
    logits_of,
    supported_families,
)
from lightning_vitcompress.models.beit import BeitAdapter
from lightning_vitcompress.models.cait import CaitAdapter
from lightning_vitcompress.models.eva import EvaAdapter
from lightning_vitcompress.models.mha import HandWrittenAdapter
from lightning_vitcompress.models.swin import SwinAdapter
from lightning_vitcompress.models.timm import TimmAdapter
from lightning_vitcompress.models.torchvision import TorchvisionAdapter
from lightning_vitcompress.models.transformers import TransformersAdapter

__all__ = [
    "ADAPTERS",
    "AttentionLayout",
    "BeitAdapter",
    "CaitAdapter",
    "Capabilities",
    "EmbeddingParameter",
    "EvaAdapter",
    "HandWrittenAdapter",
    "ModelAdapter",
    "PrefixTokens",
    "SwinAdapter",
    "TimmAdapter",
    "TorchvisionAdapter",
    "TransformersAdapter",
    "adapter_for",
    "logits_of",
    "supported_families",
]

#: tried in order; the first whose ``matches`` is true adapts the model
ADAPTERS: list[type[ModelAdapter]] = [
    TimmAdapter,
    EvaAdapter,
    BeitAdapter,
    CaitAdapter,
    SwinAdapter,
    TorchvisionAdapter,
    TransformersAdapter,
    HandWrittenAdapter,  # any other model with attention the adapters read: keep last
]


def _looks_like_attention(module: nn.Module) -> bool:
    """A module named like attention, or holding the projections attention has (``qkv``, ``qk``)."""
    name = type(module).__name__.lower()
    projections = (getattr(module, attr, None) for attr in ("qkv", "qk"))
    return "attention" in name or "attn" in name or any(isinstance(p, nn.Linear) for p in projections)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, from the first family in :data:`ADAPTERS` that matches.

    Raises:
        TypeError: ``model`` has attention modules of an unsupported type (names the class and where).
        ValueError: ``model`` has no attention at all (says what was looked at).
    """
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    for name, module in model.named_modules():
        if _looks_like_attention(module):
            raise TypeError(
                f"{type(model).__name__} has attention module {type(module).__name__} at {name!r}, "
                f"which no adapter supports. Supported families: {supported_families()}."
            )
    raise ValueError(
        f"No attention found in {type(model).__name__}: looked for the supported families "
        f"({supported_families()}) and for any module whose class name contains 'Attention' "
        f"among its {sum(1 for _ in model.modules())} modules."
    )
