"""Reading an attention module: its widths and projections, the same way for every model family.

Attention modules come in three structures, read here once for every family:
a fused ``qkv`` Linear (timm ``Attention`` and modules marked
``is_vitcompress_attention`` such as our ``NystromAttention``), the fused
``in_proj_weight`` of ``nn.MultiheadAttention``, and separate q/k/v Linears
(Hugging Face transformers: ``q_proj``/``k_proj``/``v_proj`` since 5.0,
``query``/``key``/``value`` before). :func:`read_layout` returns an
:class:`AttentionLayout`; the adapters (:mod:`~lightning_vitcompress.models.base`)
decide which modules are the attention blocks.

Example (a tiny timm ViT; any family the same way)::

    >>> import timm
    >>> from lightning_vitcompress.models.layout import read_layout
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> layout = read_layout("blocks.0.attn", vit.blocks[0].attn)
    >>> layout.kind, layout.num_heads, layout.head_dim
    ('qkv', 3, 64)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, cast

from timm.layers.attention import Attention as TimmAttention
from torch import nn

__all__ = ["ATTENTION_MARKER", "SEPARATE_QKV_NAMES", "AttentionLayout", "is_attention_module", "read_layout"]

#: same marker as ``lightning_vitcompress._model.ATTENTION_MARKER`` (our NystromAttention sets it)
ATTENTION_MARKER = "is_vitcompress_attention"

#: (query, key, value) attribute names of separate projections, newest transformers naming first
SEPARATE_QKV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),  # the last: timm CaiT's ClassAttn
)


@dataclass(frozen=True)
class AttentionLayout:
    """Widths and projection layers of one attention block, read from its weights.

    Exactly one of ``qkv`` (fused Linear), ``in_proj_weight`` (``nn.MultiheadAttention``)
    or ``query``/``key``/``value`` (separate Linears) is set.

    Example::

        >>> import timm
        >>> from lightning_vitcompress.models import adapter_for
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> layout = adapter_for(vit).layouts()[0]
        >>> (layout.name, layout.embed_dim, layout.num_heads, layout.head_dim)
        ('blocks.0.attn', 192, 3, 64)
    """

    name: str
    module: nn.Module = field(repr=False)
    embed_dim: int
    num_heads: int
    head_dim: int
    out_proj: nn.Linear = field(repr=False)
    qkv: Optional[nn.Linear] = field(default=None, repr=False)
    in_proj_weight: Optional[nn.Parameter] = field(default=None, repr=False)
    in_proj_bias: Optional[nn.Parameter] = field(default=None, repr=False)
    query: Optional[nn.Linear] = field(default=None, repr=False)
    key: Optional[nn.Linear] = field(default=None, repr=False)
    value: Optional[nn.Linear] = field(default=None, repr=False)
    #: the softmax scale the module stores and applies on every path; None: it applies 1/sqrt(head_dim)
    scale: Optional[float] = None

    @property
    def kind(self) -> str:
        """``"qkv"``, ``"in_proj"`` or ``"separate"``."""
        if self.qkv is not None:
            return "qkv"
        return "in_proj" if self.in_proj_weight is not None else "separate"

    @property
    def attn_dim(self) -> int:
        """Width of q (= k = v): ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def effective_scale(self) -> float:
        """The softmax scale the module computes with."""
        return self.scale if self.scale is not None else self.head_dim**-0.5

    @property
    def head_projections(self) -> list[nn.Module]:
        """Layers whose output channels are grouped by head (torch-pruning's ``num_heads`` keys)."""
        if self.qkv is not None:
            return [self.qkv]
        if self.query is not None:
            return [self.query, self.key, self.value]  # type: ignore[list-item]
        return []  # nn.MultiheadAttention: torch-pruning prunes it as one unit (see HandWrittenAdapter)


def _is_fused_qkv(module: nn.Module) -> bool:
    return isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "proj", None), nn.Linear)


def _separate_qkv(module: nn.Module) -> Optional[tuple[nn.Linear, nn.Linear, nn.Linear]]:
    for names in SEPARATE_QKV_NAMES:
        layers = [getattr(module, n, None) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return layers[0], layers[1], layers[2]  # type: ignore[return-value]
    return None


def _int_attr(module: nn.Module, *names: str) -> Optional[int]:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def is_attention_module(module: nn.Module) -> bool:
    """True for a self-attention module the adapters read without knowing its family.

    ``nn.MultiheadAttention``, timm's ``Attention`` (also inside a ViT of one's
    own), a module marked ``is_vitcompress_attention`` (our ``NystromAttention``),
    and transformers' q/k/v attention with an ``o_proj`` and a head count. Other
    modules with the same weight names may compute something else (Swin's window
    attention adds a relative-position bias per head) and are not taken.
    """
    if isinstance(module, (nn.MultiheadAttention, TimmAttention)) or getattr(type(module), ATTENTION_MARKER, False):
        return True
    return (
        type(module).__module__.startswith("transformers.")
        and _separate_qkv(module) is not None
        and isinstance(getattr(module, "o_proj", None), nn.Linear)
        and _int_attr(module, "num_attention_heads", "num_heads") is not None
    )


def read_layout(name: str, module: nn.Module, out_proj: Optional[nn.Linear] = None) -> AttentionLayout:
    """The :class:`AttentionLayout` of ``module``; widths come from the weights, the head count from the module.

    ``out_proj`` is needed only where the output projection lives outside the
    module (transformers < 5: ``ViTSelfOutput.dense``).

    Raises:
        TypeError: ``module`` has none of the three supported structures (says why, without naming it).
    """
    if isinstance(module, nn.MultiheadAttention):
        heads = module.num_heads
        if module.in_proj_weight is None:
            raise TypeError("its kdim/vdim differ from embed_dim (cross-attention); only self-attention is supported")
        attn_dim = module.in_proj_weight.shape[0] // 3
        return AttentionLayout(
            name,
            module,
            module.in_proj_weight.shape[1],
            heads,
            attn_dim // heads,
            module.out_proj,
            in_proj_weight=module.in_proj_weight,
            in_proj_bias=module.in_proj_bias,
        )
    if _is_fused_qkv(module):
        heads = _int_attr(module, "num_heads")
        if heads is None:
            raise TypeError(
                "it has a fused qkv Linear but no int num_heads attribute (the head count); set "
                "self.num_heads = <heads> in its __init__, as timm's Attention does"
            )
        # _is_fused_qkv checked that both are nn.Linear (nn.Module.__getattr__ types them Tensor | Module)
        qkv, proj = cast(nn.Linear, module.qkv), cast(nn.Linear, module.proj)
        attn_dim = qkv.out_features // 3
        scale = getattr(module, "scale", None)
        return AttentionLayout(
            name,
            module,
            qkv.in_features,
            heads,
            attn_dim // heads,
            proj,
            qkv=qkv,
            scale=float(scale) if isinstance(scale, (int, float)) else None,
        )
    separate = _separate_qkv(module)
    out = out_proj if out_proj is not None else getattr(module, "o_proj", getattr(module, "proj", None))
    if separate is not None and isinstance(out, nn.Linear):
        query, key, value = separate
        heads = _int_attr(module, "num_attention_heads", "num_heads")
        if heads is None:
            raise TypeError("it has q/k/v Linears but no num_attention_heads/num_heads attribute")
        scaling = getattr(module, "scaling", None)
        return AttentionLayout(
            name,
            module,
            query.in_features,
            heads,
            query.out_features // heads,
            out,
            query=query,
            key=key,
            value=value,
            scale=float(scaling) if isinstance(scaling, (int, float)) else None,
        )
    raise TypeError("it has neither a fused qkv Linear, an in_proj_weight, nor q/k/v Linears with an output projection")
