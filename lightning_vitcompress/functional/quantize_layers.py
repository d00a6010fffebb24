"""Which ``nn.Linear`` layers of a model a quantization config applies to (``skip``, incompatible shapes).

Example (a tiny timm ViT)::

    >>> import timm
    >>> from lightning_vitcompress.functional.quantize_layers import select_layers
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> selected, skipped = select_layers(vit, skip=["head", "blocks.0.*"])
    >>> selected
    ['blocks.1.attn.qkv', 'blocks.1.attn.proj', 'blocks.1.mlp.fc1', 'blocks.1.mlp.fc2']
    >>> sorted(skipped)   # with why, by name
    ['blocks.0.attn.proj', 'blocks.0.attn.qkv', 'blocks.0.mlp.fc1', 'blocks.0.mlp.fc2', 'head']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_vitcompress.functional.quantize_configs import QuantizationSpec

__all__ = ["SkipSpec", "check_skip", "select_layers"]


SkipSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


def check_skip(skip: Any) -> None:
    """``skip`` is None, a callable, a non-empty pattern, or a list of them (a str is one pattern, not letters)."""
    patterns = [skip] if isinstance(skip, str) else skip
    if skip is None or callable(skip):
        return
    if (
        isinstance(skip, (bytes, Mapping))
        or not isinstance(patterns, (Sequence, set, frozenset))
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise TypeError(
            f"skip={skip!r}: pass a layer name or glob pattern ('head'), a list of them (['head', 'blocks.0.*']), "
            "or a function (name, module) -> bool."
        )


def _is_mha_out_proj(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _is_quantized_weight(weight: Any) -> bool:
    """True for torchao's quantized tensor subclasses (not fp32/bf16 parameters)."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return type(data) is not torch.Tensor


def is_quantized_layer(layer: nn.Module, spec: QuantizationSpec) -> bool:
    """A layer ``quantize_`` changed: swapped for the spec's module, or given a quantized weight."""
    if spec.module_class is not None and isinstance(layer, spec.module_class):
        return True
    weight = getattr(layer, "weight", None)
    return weight is not None and _is_quantized_weight(weight)


def check_skip_matches(model: nn.Module, skip: SkipSpec) -> None:
    """Each ``skip`` pattern names at least one ``nn.Linear`` of ``model``: a typo must not quantize a layer."""
    if skip is None or callable(skip):
        return
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for pattern in [skip] if isinstance(skip, str) else skip:
        if not any(name == pattern or fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = names if len(names) <= 8 else [*names[:8], "..."]
            raise ValueError(
                f"skip={skip!r}: {pattern!r} matches no nn.Linear layer of {type(model).__name__}; its linear "
                f"layers are {shown}. Use their names or glob patterns ('blocks.*.mlp.fc2')."
            )


def skip_matcher(skip: SkipSpec) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name, module: any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    skip: SkipSpec = None,
    group_size: Optional[int] = None,
    incompatible: Optional[Callable[[nn.Linear], Optional[str]]] = None,
) -> tuple[list[str], dict[str, str]]:
    """Names of the ``nn.Linear`` layers of ``model`` to quantize, and the skipped ones with why.

    An ``nn.MultiheadAttention``'s ``out_proj`` is skipped: MHA runs it through
    ``F.multi_head_attention_forward`` with the raw weight tensor, which torchao's
    quantized tensors do not support (torchao's own default filter skips it silently).
    :func:`~lightning_vitcompress.functional.quantize_model` first turns self-attention
    MHA into linear projections, so only cross-attention ones are left to skip.
    """
    matches_skip = skip_matcher(skip)
    selected: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _is_mha_out_proj(module):
            skipped[name] = "nn.MultiheadAttention out_proj (MHA uses its weight tensor directly; kept fp32)"
        elif matches_skip(name, module):
            skipped[name] = "skip"
        elif _is_quantized_weight(module.weight):
            skipped[name] = "already quantized"
        elif group_size is not None and module.in_features % group_size:
            skipped[name] = f"in_features={module.in_features} is not a multiple of group_size={group_size}"
        elif incompatible is not None and incompatible(module):
            skipped[name] = str(incompatible(module))
        else:
            selected.append(name)
    return selected, skipped


def is_linear(module: nn.Module, *args: Any) -> bool:
    return isinstance(module, nn.Linear)
