"""The parts of a ViT around its attention blocks: prefix tokens, embedding parameters, classifier heads, logits.

Example (a tiny timm DeiT with its distillation head, and one without)::

    >>> import timm
    >>> from lightning_vitcompress.models.heads import named_heads
    >>> deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> [name for name, _ in named_heads(deit, ("head", "head_dist"))]
    ['head', 'head_dist']
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0)
    >>> named_heads(vit, ("head", "head_dist"))  # an Identity head holds no parameters: skipped
    []
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["EmbeddingParameter", "PrefixTokens", "embedding_parameter", "logits_of", "named_heads"]


@dataclass(frozen=True)
class EmbeddingParameter:
    """A bare parameter with one dimension along the embedding (class/dist/register token, position embedding)."""

    name: str
    parameter: nn.Parameter
    dim: int


@dataclass(frozen=True)
class PrefixTokens:
    """The tokens in front of the patch tokens and the parameters holding them.

    ``count`` is 1 for a ViT, 2 for distilled DeiT, ``1 + R`` with ``R`` registers.
    ``parameters`` also lists position embeddings (they share the embedding dim).
    """

    count: int
    parameters: tuple[EmbeddingParameter, ...]


def logits_of(output: Any) -> torch.Tensor:
    """The logits in what a classifier returned: a tensor, a tuple/list (first element), or ``.logits``.

    Example::

        >>> import torch, transformers
        >>> from lightning_vitcompress.models.heads import logits_of
        >>> config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
        ...                                 num_attention_heads=4, intermediate_size=64, num_labels=10)
        >>> hf_vit = transformers.ViTForImageClassification(config)
        >>> output = hf_vit(torch.randn(2, 3, 32, 32))
        >>> type(output).__name__, logits_of(output).shape
        ('ImageClassifierOutput', torch.Size([2, 10]))
        >>> logits_of((torch.zeros(2, 10), torch.zeros(2, 10))).shape  # a tuple: its first element
        torch.Size([2, 10])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise TypeError(f"Cannot read logits from a {type(output).__name__}: expected a tensor, a tuple or .logits.")


def named_heads(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the children called ``names`` that hold parameters (Identity heads are skipped)."""
    found = []
    for name in names:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            found.append((name, module))
    return found


def embedding_parameter(name: str, parameter: Optional[nn.Parameter]) -> list[EmbeddingParameter]:
    """``[EmbeddingParameter]`` for a present token/position parameter (last dim is the embedding), else ``[]``."""
    if not isinstance(parameter, nn.Parameter):
        return []
    return [EmbeddingParameter(name, parameter, parameter.dim() - 1)]
