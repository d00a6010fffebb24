"""Narrowing the layers torch-pruning cannot: latent-query attention pools and gated (GLU) MLPs.

When pruning narrows the embedding, an attention pool's inner width must
follow it (:func:`narrow_attention_pool`); a gated MLP's ``fc1`` holds its value
and gate halves side by side, so its hidden channels are chosen here
(:func:`narrow_glu_mlp`). Both keep the channels with the largest L2 norm.

Example (a timm gated MLP: ``fc1`` holds 128 value and 128 gate channels)::

    >>> import torch
    >>> from timm.layers import GluMlp
    >>> from lightning_vitcompress.models.narrow import narrow_glu_mlp
    >>> mlp = GluMlp(64, 256, act_layer=torch.nn.SiLU)
    >>> narrow_glu_mlp(mlp, keep=mlp.fc2.in_features // 2)
    >>> mlp.fc1.out_features, mlp.fc2.in_features, mlp(torch.randn(2, 5, 64)).shape
    (128, 64, torch.Size([2, 5, 64]))
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress.models.layout import _int_attr

__all__ = ["is_attention_pool", "narrow_attention_pool", "narrow_glu_mlp"]


def is_attention_pool(module: nn.Module) -> bool:
    """A latent-query attention pool (timm ``AttentionPoolLatent``): ``latent``, ``q``, fused ``kv``, ``proj``."""
    return (
        isinstance(getattr(module, "latent", None), nn.Parameter)
        and isinstance(getattr(module, "kv", None), nn.Linear)
        and isinstance(getattr(module, "proj", None), nn.Linear)
        and _int_attr(module, "num_heads") is not None
    )


# ``pool`` and ``mlp`` are third-party module trees (timm's AttentionPoolLatent, GluMlp) whose
# children and attributes are read by name, so they are typed ``Any`` as in the family adapters.
def narrow_attention_pool(name: str, pool: Any, width: int) -> None:
    """Keep ``width // num_heads`` dims of each head of ``pool``'s q/k/v, by the L2 norm of their weights.

    The pool's attention output is reshaped to its input width, so after the embedding is pruned
    to ``width`` its inner width must follow. Its output width (the classifier's input) stays.
    The trained softmax scale is folded into the query rows. Nothing happens when the widths agree.

    Raises:
        TypeError: a pool this cannot narrow (no query projection, or a per-head-dim q/k norm).
        ValueError: ``width`` is not a multiple of the pool's head count (names ``round_to``).
    """
    heads, inner = int(pool.num_heads), pool.kv.out_features // 2
    if inner == width:
        return
    if not isinstance(pool.q, nn.Linear) or not isinstance(getattr(pool, "q_norm", nn.Identity()), nn.Identity):
        raise TypeError(
            f"The attention pool {type(pool).__name__} at {name!r} has no query projection or normalises q/k per "
            "head dim, so its width cannot follow the pruned embedding: pass prune_embed_dim=False."
        )
    if width % heads:
        raise ValueError(
            f"The pruned embedding width {width} is not a multiple of the {heads} heads of the attention pool "
            f"{type(pool).__name__} at {name!r}: pass round_to={heads}."
        )
    head_dim, keep = inner // heads, width // heads
    with torch.no_grad():
        q = pool.q.weight.view(heads, head_dim, -1)
        k, v = pool.kv.weight.view(2, heads, head_dim, -1)
        out = pool.proj.weight.view(-1, heads, head_dim).transpose(0, 1)
        score = (
            q.pow(2).sum(-1) + k.pow(2).sum(-1) + v.pow(2).sum(-1) + out.transpose(1, 2).pow(2).sum(-1)
        )  # (heads, head_dim)
        kept = score.topk(keep, dim=1).indices.sort(dim=1).values
        rows = (kept + torch.arange(heads, device=kept.device)[:, None] * head_dim).flatten()
        trained = float(getattr(pool, "scale", head_dim**-0.5))
        factor = trained / keep**-0.5
        _narrow_linear(pool.q, rows=rows, factor=factor)
        _narrow_linear(pool.kv, rows=torch.cat([rows, rows + inner]))
        _narrow_linear(pool.proj, columns=rows)
    pool.head_dim, pool.scale = keep, keep**-0.5


def narrow_glu_mlp(mlp: Any, keep: int) -> None:
    """Keep the ``keep`` hidden channels of a gated MLP (``fc1`` = value and gate halves) with the largest
    L2 norm over both halves of ``fc1`` and ``fc2``'s columns; its hidden norm, if any, follows."""
    hidden = mlp.fc2.in_features
    if keep >= hidden:
        return
    with torch.no_grad():
        halves = mlp.fc1.weight.view(2, hidden, -1)
        score = halves.pow(2).sum((0, 2)) + mlp.fc2.weight.pow(2).sum(0)
        kept = score.topk(keep).indices.sort().values
        _narrow_linear(mlp.fc1, rows=torch.cat([kept, kept + hidden]))
        _narrow_linear(mlp.fc2, columns=kept)
        norm = getattr(mlp, "norm", None)
        if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
            norm.weight = nn.Parameter(norm.weight[kept], requires_grad=norm.weight.requires_grad)
            if norm.bias is not None:
                norm.bias = nn.Parameter(norm.bias[kept], requires_grad=norm.bias.requires_grad)
            norm.normalized_shape = (keep,)


def _narrow_linear(
    linear: nn.Linear, rows: Optional[torch.Tensor] = None, columns: Optional[torch.Tensor] = None, factor: float = 1.0
) -> None:
    """Keep only ``rows`` (outputs) or ``columns`` (inputs) of ``linear``, in place; rows scaled by ``factor``."""
    weight = linear.weight[rows] * factor if rows is not None else linear.weight[:, columns]
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    if rows is not None and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[rows] * factor, requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape
