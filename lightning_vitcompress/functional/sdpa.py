"""Attention as matmul -> softmax -> matmul inside compiled bf16 CPU models.

Under CPU autocast to bf16 (the "int8-mixed-bf16" recipe of
:func:`~lightning_vitcompress.functional.x86_int8.compile_frozen` and the
``.pt2`` export), ``F.scaled_dot_product_attention`` reaches ATen's fused CPU
flash-attention kernel, which is tuned for long sequences: on a ViT's 50-600
tokens with 32-64 wide heads it took about half the time of a pruned int8
ViT-B/16 here. Written out as two batched matmuls and a softmax, inductor fuses
the scaling and softmax and oneDNN runs both matmuls in bf16:
``benchmarks/bench_attention.py`` measures the model-level effect (AMD EPYC,
pruned 50% int8 ViT-B/16, batch 4: 73 -> 109 img/s, 1.04x OpenVINO int8 by hand).

:class:`DecomposedAttention` does the rewriting as a ``TorchFunctionMode``, so
it reaches every attention that calls ``F.scaled_dot_product_attention``
(timm's, torchvision's through ``nn.MultiheadAttention``, transformers' SDPA
path, ours) while ``torch.compile`` or ``torch.export`` traces the model; the
traced graph holds the plain ops, so an exported ``.pt2`` needs nothing from
this library. Calls it cannot rewrite exactly (dropout, tensors off the CPU,
sequences longer than ``max_tokens``) go to the fused kernel unchanged.

Example::

    >>> import torch, torch.nn.functional as F
    >>> from lightning_vitcompress.functional.sdpa import DecomposedAttention
    >>> q, k, v = (torch.randn(2, 3, 50, 32) for _ in range(3))
    >>> with DecomposedAttention():
    ...     out = F.scaled_dot_product_attention(q, k, v)
    >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["DECOMPOSED_ATTENTION_MAX_TOKENS", "DecomposedAttention", "decomposed_attention"]

#: longest key sequence written out as matmuls; longer ones keep the fused kernel, which never materializes the
#: (tokens x tokens) score matrix (12 heads x 2048^2 in bf16: 100 MB per image). The written-out form was faster
#: up to the longest measured, ViT-B/16 at 720 px (2026 tokens, bench_attention.py).
DECOMPOSED_ATTENTION_MAX_TOKENS = 2048


def decomposed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` without dropout, as ``softmax(q k^T * scale + mask) v``.

    Same arguments and result (boolean masks keep where True, float masks are added to the scores).
    """
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores.softmax(dim=-1) @ value


class DecomposedAttention(TorchFunctionMode):
    """Runs ``F.scaled_dot_product_attention`` on CPU tensors as :func:`decomposed_attention` while active.

    Args:
        max_tokens: longest key sequence to rewrite; longer ones (and dropout, non-CPU tensors) keep the
            fused kernel.
    """

    def __init__(self, max_tokens: int = DECOMPOSED_ATTENTION_MAX_TOKENS) -> None:
        super().__init__()
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}: must be at least 1 (the longest key sequence to rewrite).")
        self.max_tokens = max_tokens

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Optional[dict] = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = _sdpa_arguments(*args, **kwargs)
            if self._rewrites(bound):
                bound.pop("dropout_p")
                return decomposed_attention(**bound)
        return func(*args, **kwargs)

    def _rewrites(self, bound: dict[str, Any]) -> bool:
        query, key = bound["query"], bound["key"]
        return (
            bound["dropout_p"] == 0.0
            and query.device.type == "cpu"
            and query.dim() >= 3
            and key.shape[-2] <= self.max_tokens
        )


def _sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> dict[str, Any]:
    """``F.scaled_dot_product_attention``'s arguments by name (its signature, positional or keyword)."""
    return dict(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )
