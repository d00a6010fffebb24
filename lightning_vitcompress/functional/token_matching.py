"""The tensor side of token merging (ToMe): bipartite soft matching, and attention that weighs tokens by size.

:func:`bipartite_soft_matching` pairs the patch tokens (alternately into sets A
and B, each A token to its most similar B token) and returns the functions that
merge the ``r`` most similar pairs; :func:`merge_weighted_average` merges by
size. :func:`_attend` runs an attention module (timm's fused ``qkv``,
``nn.MultiheadAttention``'s ``in_proj``, transformers' separate q/k/v) with the
``+ log(size)`` bias on its logits and returns the keys the matching uses.
:mod:`~lightning_vitcompress.functional.token_merging` patches the blocks of a
model with them.

Example (a class token and 16 patch tokens)::

    >>> import torch
    >>> from lightning_vitcompress.functional.token_matching import bipartite_soft_matching, merge_weighted_average
    >>> keys, x = torch.randn(2, 17, 32), torch.randn(2, 17, 64)   # keys: (B, N, C)
    >>> merge = bipartite_soft_matching(keys, r=8, num_prefix_tokens=1)
    >>> x, size = merge_weighted_average(merge, x, None)   # (B, N - 8, C) and the tokens' sizes
    >>> x.shape, size.sum(1).flatten().tolist()   # every token counted once
    (torch.Size([2, 9, 64]), [17.0, 17.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["bipartite_soft_matching", "merge_weighted_average", "token_schedule"]


# ---------------------------------------------------------------------------- the math
def _no_merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """The merge of a matching with nothing to merge: ``x`` unchanged."""
    return x


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_prefix_tokens: int = 0
) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """ToMe's matching: a function that merges ``r`` tokens of any ``(B, N, C)`` tensor laid out like ``metric``.

    The first ``num_prefix_tokens`` tokens are left out of the matching and stay
    in front. The patch tokens alternate into sets A (even) and B (odd); the
    ``r`` A tokens most similar (cosine) to their best B token are merged into
    it. Returns ``merge(x, mode)`` (``mode`` is ``"sum"`` or ``"mean"``), giving
    ``(B, N - r, C)``: prefix tokens, unmerged A tokens, then the B tokens.
    ``r`` is capped at the size of A.
    """
    patches = metric.shape[1] - num_prefix_tokens
    r = min(r, (patches + 1) // 2)
    if r <= 0:
        return _no_merge
    with torch.no_grad():
        metric = metric[:, num_prefix_tokens:]
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric[:, ::2], metric[:, 1::2]
        if b.shape[1] == 0:
            return _no_merge
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unmerged_idx, source_idx = edge_idx[:, r:], edge_idx[:, :r]
        destination_idx = node_idx[..., None].gather(1, source_idx)

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        prefix, x = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        source, destination = x[:, ::2], x[:, 1::2]
        batch, count, channels = source.shape
        unmerged = source.gather(1, unmerged_idx.expand(batch, count - r, channels))
        source = source.gather(1, source_idx.expand(batch, r, channels))
        destination = destination.scatter_reduce(1, destination_idx.expand(batch, r, channels), source, reduce=mode)
        return torch.cat([prefix, unmerged, destination], dim=1)

    return merge


def merge_weighted_average(
    merge: Callable[[torch.Tensor, str], torch.Tensor], x: torch.Tensor, size: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` as size-weighted averages; return the merged tokens and their sizes ``(B, N', 1)``."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def token_schedule(num_tokens: int, num_prefix_tokens: int, block_r: Sequence[int]) -> list[int]:
    """The tokens after each block when ``num_tokens`` enter and block ``i`` asks to merge ``block_r[i]``."""
    counts = []
    for r in block_r:
        num_tokens -= min(r, (num_tokens - num_prefix_tokens + 1) // 2 if num_tokens - num_prefix_tokens > 1 else 0)
        counts.append(num_tokens)
    return counts


# ---------------------------------------------------------------------------- attention with sizes
def _size_bias(size: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if size is None else size.log().to(dtype)[:, None, None, :, 0]  # (B, 1, 1, N)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    dropout: float,
    scale: Optional[float],
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


# The attentions below are third-party module trees whose children and attributes are read by name
# (as in the family adapters), so they are typed ``Any``.
def _timm_attention(m: Any, x: torch.Tensor, size: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` (fused qkv), computed as it does, plus the size bias; returns (output, keys)."""
    batch, tokens, _ = x.shape
    gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None
    q, k, v = m.qkv(x).reshape(batch, tokens, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    bias = _size_bias(size, q.dtype)
    dropout = m.attn_drop.p if m.training else 0.0
    if m.fused_attn:
        out = _sdpa(q, k, v, bias, dropout, None)
    else:
        attn = (q * m.scale) @ k.transpose(-2, -1)
        attn = (attn if bias is None else attn + bias).softmax(dim=-1)
        out = m.attn_drop(attn) @ v
    out = m.norm(out.transpose(1, 2).reshape(batch, tokens, m.num_heads * m.head_dim))
    if gate is not None:
        out = out * gate
    return m.proj_drop(m.proj(out)), k.mean(1)


def _mha_attention(
    m: nn.MultiheadAttention, x: torch.Tensor, size: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.MultiheadAttention`` self-attention on batch-first ``x``, plus the size bias."""
    batch, tokens, _ = x.shape
    heads = m.num_heads
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = _sdpa(q, k, v, _size_bias(size, q.dtype), m.dropout if m.training else 0.0, None)
    return m.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), k.mean(1)


def _separate_attention(m: Any, x: torch.Tensor, size: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers >= 5 ViT/DeiT attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``), plus the size bias."""
    batch, tokens, _ = x.shape
    heads = m.num_attention_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, tokens, heads, -1).transpose(1, 2)

    q, k, v = split(m.q_proj(x)), split(m.k_proj(x)), split(m.v_proj(x))
    dropout = m.attention_dropout if m.training else 0.0
    out = _sdpa(q, k, v, _size_bias(size, q.dtype), dropout, m.scaling)
    return m.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), k.mean(1)


def _attend(module: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of any supported structure on batch-first ``x`` with sizes; (output, matching metric)."""
    if getattr(type(module), "is_vitcompress_attention", False) and hasattr(module, "num_landmarks"):
        nystrom: Any = module  # a NystromAttention, recognized by its class flag (no import of that module here)
        return nystrom._attend(x), x  # Nyström (batch-first core): no size bias; match on the block's input
    if isinstance(module, nn.MultiheadAttention):
        return _mha_attention(module, x, size)
    if isinstance(getattr(module, "qkv", None), nn.Module):
        return _timm_attention(module, x, size)
    return _separate_attention(module, x, size)


def _attention_problem(module: nn.Module) -> Optional[str]:
    """Why :func:`_attend` cannot run ``module`` with sizes (None: it can)."""
    for name, _ in [*module.named_parameters(), *module.named_buffers()]:
        if "rel" in name or "pos" in name or "rope" in name:
            return (
                f"it holds {name!r}, a position bias of fixed length inside the block, which cannot follow "
                "merged tokens"
            )
    if isinstance(module, nn.MultiheadAttention):
        separate_kv = module.kdim != module.embed_dim or module.vdim != module.embed_dim
        if separate_kv or module.bias_k is not None or module.add_zero_attn:
            return "nn.MultiheadAttention with kdim/vdim, bias_k/bias_v or add_zero_attn"
        return None
    if getattr(type(module), "is_vitcompress_attention", False):
        return None
    if isinstance(getattr(module, "qkv", None), nn.Module):
        missing = [
            a
            for a in ("num_heads", "head_dim", "q_norm", "k_norm", "norm", "proj", "proj_drop", "fused_attn")
            if not hasattr(module, a)
        ]
        return f"a fused-qkv attention without {missing}" if missing else None
    if all(isinstance(getattr(module, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    return f"{type(module).__name__} is not an attention token merging can run (fused qkv, in_proj or q/k/v/o_proj)"
