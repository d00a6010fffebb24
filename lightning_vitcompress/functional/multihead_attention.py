"""``nn.MultiheadAttention`` self-attention with its projections as plain ``nn.Linear`` layers, so they quantize.

``nn.MultiheadAttention`` hands its raw ``in_proj_weight`` tensor (and
``out_proj.weight``) to ``F.multi_head_attention_forward``, so no quantized
layer can stand in for them: a torchvision or hand-written ViT kept about a
third of its linear work in fp32 and ran its int8 pipeline at 0.66-0.69x the
speedup of a timm ViT. :class:`MultiheadSelfAttention` computes the same
function with a fused ``qkv`` ``nn.Linear`` and ``out_proj`` ``nn.Linear``,
sharing the original's parameters (nothing is copied), and keeps its call
convention: ``attn(x, x, x, need_weights=False, ...)`` -> ``(out, weights)``.
:func:`~lightning_vitcompress.functional.quantize_model` swaps it in before
quantizing and records it, so ``load_compressed`` swaps it in again.

Example::

    >>> import torchvision
    >>> from lightning_vitcompress.functional import quantize_model
    >>> from lightning_vitcompress.functional.multihead_attention import split_multihead_attention
    >>> vit = torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
    >>> originals = split_multihead_attention(vit)
    >>> sorted(originals)
    ['encoder.layers.encoder_layer_0.self_attention', 'encoder.layers.encoder_layer_1.self_attention']
    >>> summary = quantize_model(vit, "int8_dynamic_x86")  # now also quantizes each attention's qkv and out_proj
    >>> "encoder.layers.encoder_layer_0.self_attention.qkv" in summary["quantized"]
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_vitcompress._model import set_submodule

__all__ = [
    "MultiheadSelfAttention",
    "plain_linear",
    "restore_multihead_attention",
    "split_multihead_attention",
    "split_named",
    "split_problem",
]


def plain_linear(layer: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` sharing ``layer``'s parameters (``nn.MultiheadAttention``'s ``out_proj`` is a subclass
    that quantization leaves alone); ``layer`` itself when it already is one."""
    if type(layer) is nn.Linear:
        return layer
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = layer.weight
    plain.bias = layer.bias
    return plain


class MultiheadSelfAttention(nn.Module):
    """Exact multi-head self-attention with ``nn.MultiheadAttention``'s call convention and linear projections.

    Build it from a trained module with :meth:`from_multihead`; the parameters
    are shared, so an optimizer or a DDP wrapper sees the same tensors. Masks
    (``attn_mask``, ``key_padding_mask``, boolean or additive), ``need_weights``,
    ``batch_first`` and unbatched inputs behave as in ``nn.MultiheadAttention``;
    the softmax runs in PyTorch's SDPA unless the weights are asked for.
    The fused-``qkv`` layout (``qkv``, ``proj``, ``num_heads``, ``head_dim``,
    ``scale``) is the one timm's ``Attention`` has, so pruning and token merging
    read it as they read timm's.

    Example::

        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(192, 3, batch_first=True).eval()
        >>> x = torch.randn(2, 10, 192)
        >>> before = layer(x)
        >>> layer.self_attn = MultiheadSelfAttention.from_multihead(layer.self_attn)
        >>> torch.allclose(layer(x), before, atol=1e-5)
        True
    """

    is_vitcompress_attention: ClassVar[bool] = True  # see _model.ATTENTION_MARKER

    #: what ``nn.TransformerEncoderLayer`` reads before its fused inference path; ``in_proj_bias=None``
    #: turns that path off (it would hand the raw, possibly quantized, weights to one kernel)
    _qkv_same_embed_dim: ClassVar[bool] = True
    in_proj_bias: ClassVar[None] = None

    def __init__(
        self, embed_dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0, batch_first: bool = False
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}.")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.batch_first = batch_first
        self.dropout = dropout
        self.fused_attn = True
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attn_drop = nn.Dropout(dropout)
        self.q_norm, self.k_norm, self.norm, self.proj_drop = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()

    @classmethod
    def from_multihead(cls, attention: nn.MultiheadAttention) -> MultiheadSelfAttention:
        """The same attention, sharing ``attention``'s parameters.

        Raises:
            ValueError: ``attention`` is cross-attention (``kdim``/``vdim``) or adds keys
                (``add_bias_kv``, ``add_zero_attn``); see :func:`split_problem`.
        """
        problem = split_problem(attention)
        if problem:
            raise ValueError(problem)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads = attention.embed_dim, attention.num_heads
        new.head_dim = attention.in_proj_weight.shape[0] // 3 // attention.num_heads  # after pruning too
        new.scale = new.head_dim**-0.5
        new.batch_first, new.dropout, new.fused_attn = attention.batch_first, attention.dropout, True
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        new.qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        new.qkv.weight = weight
        new.qkv.bias = bias
        new.out_proj = plain_linear(attention.out_proj)
        new.attn_drop = nn.Dropout(attention.dropout)
        new.q_norm, new.k_norm, new.norm, new.proj_drop = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
        new.train(attention.training)
        return new

    @property
    def proj(self) -> nn.Linear:
        """``out_proj`` under timm's name, for the code that reads the fused-``qkv`` layout."""
        return self.out_proj

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``nn.MultiheadAttention.forward`` for self-attention (``key`` and ``value`` are ``query`` or None)."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("MultiheadSelfAttention is self-attention: call it with key and value equal to query.")
        unbatched = query.dim() == 2
        x = query.unsqueeze(0) if unbatched else (query if self.batch_first else query.transpose(0, 1))
        if unbatched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._mask(attn_mask, key_padding_mask, batch, tokens, q.dtype)
        causal = is_causal and bias is None
        dropout = self.dropout if self.training else 0.0
        weights: Optional[torch.Tensor] = None
        if need_weights:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if causal:
                bias = torch.full((tokens, tokens), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            weights = (scores if bias is None else scores + bias).softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))
        out = out.squeeze(0) if unbatched else (out if self.batch_first else out.transpose(0, 1))
        return out, weights

    def _mask(
        self,
        attn_mask: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor],
        batch: int,
        tokens: int,
        dtype: torch.dtype,
    ) -> Optional[torch.Tensor]:
        """The masks as one additive bias of shape (batch or 1, heads or 1, tokens, tokens); True = masked out."""
        bias = None
        if attn_mask is not None:
            bias = _additive(attn_mask, dtype)
            bias = bias.reshape(batch, self.num_heads, tokens, tokens) if bias.dim() == 3 else bias
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, tokens)
            bias = padding if bias is None else bias + padding
        return bias


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


def split_problem(attention: nn.MultiheadAttention) -> Optional[str]:
    """Why ``attention`` cannot become a :class:`MultiheadSelfAttention` (None when it can)."""
    if not attention._qkv_same_embed_dim:
        return (
            f"nn.MultiheadAttention with kdim={attention.kdim}/vdim={attention.vdim} != "
            f"embed_dim={attention.embed_dim} is cross-attention; only self-attention is split."
        )
    if attention.bias_k is not None or attention.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True adds keys and is not split."
    return None


def split_multihead_attention(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Swap each self-attention ``nn.MultiheadAttention`` of ``model`` for a :class:`MultiheadSelfAttention`.

    Returns the swapped-out modules by name, for :func:`restore_multihead_attention`;
    those the swap cannot reproduce (cross-attention, extra keys) stay as they are.

    Example::

        >>> import torch
        >>> encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(64, 2, batch_first=True), 2)
        >>> originals = split_multihead_attention(encoder)
        >>> restore_multihead_attention(encoder, originals)  # the model as it was (the same parameters)
        >>> type(encoder.layers[0].self_attn).__name__
        'MultiheadAttention'
    """
    originals: dict[str, nn.MultiheadAttention] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and not split_problem(module):
            set_submodule(model, name, MultiheadSelfAttention.from_multihead(module))
            originals[name] = module
    return originals


def restore_multihead_attention(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    """Put back the modules :func:`split_multihead_attention` swapped out (their parameters were shared)."""
    for name, module in originals.items():
        set_submodule(model, name, module)


def split_named(model: nn.Module, names: list[str]) -> None:
    """Swap the ``nn.MultiheadAttention`` at each of ``names`` (a quantize record's list) for a split one."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(
                f"The checkpoint's quantize record splits attention {name!r}, which this model lacks."
            ) from err
        if isinstance(module, MultiheadSelfAttention):
            continue
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(
                f"The checkpoint's quantize record splits attention {name!r}, a {type(module).__name__}, "
                "not nn.MultiheadAttention."
            )
        set_submodule(model, name, MultiheadSelfAttention.from_multihead(module))
