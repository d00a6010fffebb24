"""Nyström attention swapped into a trained Vision Transformer, fine-tuned in the same fit.

Softmax attention costs O(N^2) in the number of tokens N. Nyström attention
(Xiong et al., 2021, "Nyströmformer") approximates the N x N softmax matrix
from ``m`` *landmarks* (segment means of the queries and keys) at O(N m):

    softmax(Q K^T) V  ~  softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V

where ``pinv`` is an iterative Moore-Penrose pseudo-inverse. The speed win
lives at long sequences (high resolution, small patches); at 197 tokens it is
slower than fused exact attention. Swapping without retraining loses accuracy,
so :class:`~lightning_vitcompress.NystromSwap` swaps, then lets training continue.

How the details are handled (see :class:`NystromAttention`):

* **Prefix tokens** (class, distillation, register tokens; the model's
  ``num_prefix_tokens``) are kept *exact*: each prefix key is its own landmark
  and each prefix query attends to all tokens exactly (its row is computed
  anyway as a landmark row, so this costs nothing). Only the patch tokens are
  averaged into ``m`` segment landmarks.
* **Sequence lengths not divisible by m** (196 patches, m = 64): the patch
  tokens are split into ``m`` contiguous segments whose sizes differ by at most
  one (e.g. 4 segments of 4 and 60 of 3); no padding, so no padding artefacts.
* **m >= number of patch tokens**: the approximation would have no advantage,
  so exact attention (PyTorch SDPA, with the trained softmax scale) is used; the
  output equals the original module's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention as TimmAttention
from torch import nn

from lightning_vitcompress._checks import check_int
from lightning_vitcompress.functional.multihead_attention import plain_linear
from lightning_vitcompress.models.base import is_attention_module, read_layout

__all__ = [
    "AttentionMaskError",
    "NystromAttention",
    "iterative_pinv",
    "nystrom_settings",
    "segment_means",
    "swap_problem",
]


def _check_landmarks(num_landmarks: Any) -> None:
    check_int(num_landmarks, "num_landmarks", minimum=1, example="64 (about a quarter of the patch tokens)")


def _check_options(pinv_iterations: Any, conv_kernel_size: Any, num_prefix_tokens: Any) -> None:
    check_int(pinv_iterations, "pinv_iterations", minimum=1, example="6")
    check_int(conv_kernel_size, "conv_kernel_size", minimum=1, example="33", allow_none=True)
    if conv_kernel_size is not None and conv_kernel_size % 2 == 0:
        raise ValueError(
            f"conv_kernel_size={conv_kernel_size!r}: pass an odd positive int (e.g. 33) for the depthwise "
            "convolution residual on V, or None for none."
        )
    check_int(
        num_prefix_tokens, "num_prefix_tokens", example="1 (the class token; None reads the model's)", allow_none=True
    )


#: where :meth:`NystromAttention.from_attention` keeps the module it replaced (see ``functional.nystrom.exact_attention``)
REPLACED_ATTRIBUTE = "_vitcompress_replaced"


class AttentionMaskError(ValueError):
    """A Nyström attention block was called with a mask or with keys/values other than its queries."""


def segment_means(x: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Means of ``num_segments`` contiguous segments along dim -2, without padding.

    With ``n = q * num_segments + r`` tokens, the first ``r`` segments hold
    ``q + 1`` tokens and the others ``q``, so every landmark averages real tokens.
    """
    n = x.shape[-2]
    size, remainder = divmod(n, num_segments)
    if remainder == 0:
        return x.unflatten(-2, (num_segments, size)).mean(-2)
    split = remainder * (size + 1)
    long_segments = x[..., :split, :].unflatten(-2, (remainder, size + 1)).mean(-2)
    short_segments = x[..., split:, :].unflatten(-2, (num_segments - remainder, size)).mean(-2)
    return torch.cat([long_segments, short_segments], dim=-2)


def iterative_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of square matrices (batched over leading dims), iteratively.

    The cubically convergent iteration of Razavi et al. (2014) used by
    Nyströmformer, started from ``A^T / (||A||_1 ||A||_inf)`` of *each* matrix
    (so one sample's result never depends on the rest of the batch). Computed
    in float32 whatever the input dtype: half precision diverges here.
    """
    size = matrix.shape[-1]
    a = matrix.reshape(-1, size, size).float()
    norms = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)
    z = a.transpose(1, 2) / norms[:, None, None]
    eye = torch.eye(size, device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = torch.bmm(a, z)
        t = torch.sub(7 * eye, az)  # 7I - AZ
        t = torch.baddbmm(15 * eye, az, t, alpha=-1)  # 15I - AZ(7I - AZ)
        t = torch.baddbmm(3.25 * eye, az, t, alpha=-0.25)  # (13I - AZ(...)) / 4
        z = torch.bmm(z, t)
    return z.reshape(matrix.shape).to(matrix.dtype)


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nyström approximation; a drop-in for timm's ``Attention``.

    Keeps timm's attribute names (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``,
    ``norm``, ``proj``, ``proj_drop``, ``num_heads``, ``head_dim``, ``attn_dim``,
    ``scale``), so a trained model's weights load unchanged and structured
    pruning treats it like timm's module; ``forward`` reads the head layout at
    every call, so pruned heads/head dims just work. Build it from a trained
    module with :meth:`from_attention` (timm ``Attention`` or a batch-first-or-not
    ``nn.MultiheadAttention`` self-attention); the constructor builds fresh weights.

    Args:
        dim: token width.
        num_heads: attention heads.
        num_landmarks: ``m``, the segment-mean landmarks of the patch tokens.
        num_prefix_tokens: class/distillation/register tokens in front of the
            patches; they stay exact (their own landmarks, exact attention rows).
        pinv_iterations: iterations of the pseudo-inverse (6 is usual).
        conv_kernel_size: odd kernel of an optional depthwise convolution over
            the token axis of V, added to the output (a residual, per head). It
            starts at zero, so the swap alone does not change the output.
        qkv_bias, proj_bias, attn_drop, proj_drop: as in timm's ``Attention``.

    Example::

        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2).eval()
        >>> vit.blocks[0].attn = NystromAttention.from_attention(vit.blocks[0].attn, num_landmarks=16,
        ...                                                      num_prefix_tokens=vit.num_prefix_tokens)
        >>> vit(torch.randn(2, 3, 64, 64)).shape  # 65 tokens attend through 16 landmarks in block 0
        torch.Size([2, 1000])
    """

    is_vitcompress_attention: ClassVar[bool] = True  # see _model.ATTENTION_MARKER
    attn_drop: nn.Module  # nn.Dropout, or nn.Identity when swapped in for an attention without dropout
    proj_drop: nn.Module
    # set only on a swapped-in nn.MultiheadAttention: what nn.TransformerEncoderLayer reads before its fast path
    _qkv_same_embed_dim: bool
    in_proj_bias: Optional[torch.Tensor]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_landmarks: int = 64,
        num_prefix_tokens: int = 0,
        pinv_iterations: int = 6,
        conv_kernel_size: Optional[int] = None,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        _check_landmarks(num_landmarks)
        _check_options(pinv_iterations, conv_kernel_size, num_prefix_tokens)
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.num_landmarks = num_landmarks
        self.num_prefix_tokens = num_prefix_tokens
        self.pinv_iterations = pinv_iterations
        self.conv_kernel_size = conv_kernel_size
        #: the call convention of the module it replaced: "timm" (``attn(x)``), "multihead"
        #: (``attn(q, k, v, ...) -> (out, None)``) or "transformers" (``attn(x, attention_mask) -> (out, None)``)
        self.interface = "timm"
        self.batch_first = True
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm: nn.Module = nn.Identity()
        self.gate: Optional[nn.Module] = None
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.conv = self._make_conv()

    def _make_conv(self) -> Optional[nn.Conv2d]:
        if self.conv_kernel_size is None:
            return None
        k = self.conv_kernel_size
        conv = nn.Conv2d(self.num_heads, self.num_heads, (k, 1), padding=(k // 2, 0), groups=self.num_heads, bias=False)
        nn.init.zeros_(conv.weight)
        return conv

    # ---------------------------------------------------------------- building
    @classmethod
    def from_attention(
        cls,
        attention: nn.Module,
        num_landmarks: int = 64,
        num_prefix_tokens: int = 0,
        pinv_iterations: int = 6,
        conv_kernel_size: Optional[int] = None,
    ) -> NystromAttention:
        """A Nyström module that reuses ``attention``'s trained modules (shared, not copied).

        ``attention`` is a timm ``Attention`` (ViT, DeiT, with qk-norm, scale-norm
        or gating), a self-attention ``nn.MultiheadAttention`` with equal
        q/k/v widths and no ``add_bias_kv`` / ``add_zero_attn``, or a transformers
        ViT/DeiT attention (separate q/k/v, fused here into one ``qkv`` Linear).

        Raises:
            TypeError: another attention type (name what is supported).
            ValueError: an ``nn.MultiheadAttention`` the approximation cannot reproduce.
        """
        _check_landmarks(num_landmarks)
        _check_options(pinv_iterations, conv_kernel_size, num_prefix_tokens)
        problem = swap_problem(attention)
        if problem:
            raise (TypeError if "supports" in problem else ValueError)(problem)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_landmarks = num_landmarks
        new.num_prefix_tokens = num_prefix_tokens
        new.pinv_iterations = pinv_iterations
        new.conv_kernel_size = conv_kernel_size
        new.gate = None
        new.batch_first = True
        if isinstance(attention, nn.MultiheadAttention):
            new.interface = "multihead"
            new.batch_first = attention.batch_first
            new.num_heads = attention.num_heads
            new.head_dim = attention.head_dim
            new.attn_dim = attention.embed_dim
            new.scale = attention.head_dim**-0.5
            bias = attention.in_proj_bias is not None
            new.qkv = nn.Linear(attention.embed_dim, 3 * attention.embed_dim, bias=bias)
            new.qkv.weight = attention.in_proj_weight
            if bias:
                new.qkv.bias = attention.in_proj_bias
            new.q_norm, new.k_norm, new.norm = nn.Identity(), nn.Identity(), nn.Identity()
            new.attn_drop = nn.Dropout(attention.dropout)
            new.proj = plain_linear(attention.out_proj)  # MHA's own subclass is left alone by quantization
            new.proj_drop = nn.Identity()
            # what nn.TransformerEncoderLayer inspects before its fused fast path; in_proj_bias=None
            # turns that path off (it would run the exact attention with the old weights' layout)
            new._qkv_same_embed_dim = True
            new.in_proj_bias = None
        elif not isinstance(attention, TimmAttention):  # transformers: separate q/k/v, output projection o_proj
            layout = read_layout("", attention)
            new.interface = "transformers"
            new.num_heads, new.head_dim, new.attn_dim = layout.num_heads, layout.head_dim, layout.attn_dim
            new.scale = layout.effective_scale
            parts = (layout.query, layout.key, layout.value)
            bias = all(part.bias is not None for part in parts)  # type: ignore[union-attr]
            weight = layout.query.weight  # type: ignore[union-attr]
            new.qkv = nn.Linear(
                layout.embed_dim, 3 * layout.attn_dim, bias=bias, device=weight.device, dtype=weight.dtype
            )
            with torch.no_grad():
                new.qkv.weight.copy_(torch.cat([part.weight for part in parts]))  # type: ignore[union-attr]
                if bias:
                    new.qkv.bias.copy_(torch.cat([part.bias for part in parts]))  # type: ignore[union-attr]
            new.q_norm, new.k_norm, new.norm = nn.Identity(), nn.Identity(), nn.Identity()
            new.attn_drop = nn.Dropout(float(getattr(attention, "attention_dropout", 0.0) or 0.0))
            new.proj = layout.out_proj
            new.proj_drop = nn.Identity()
        else:
            new.interface = "timm"
            new.num_heads = attention.num_heads
            new.head_dim = attention.head_dim
            new.attn_dim = attention.attn_dim
            new.scale = attention.scale  # the trained scale, also after head-dim pruning
            new.qkv = attention.qkv
            new.q_norm, new.k_norm = attention.q_norm, attention.k_norm
            new.attn_drop = attention.attn_drop
            new.norm = attention.norm
            new.gate = getattr(attention, "gate", None)
            new.proj = attention.proj
            new.proj_drop = attention.proj_drop
        new.conv = new._make_conv()
        if new.conv is not None:
            new.conv.to(device=new.qkv.weight.device, dtype=new.qkv.weight.dtype)
        # the module it replaced, outside the module tree (no state-dict keys): what a swap back restores
        new.__dict__[REPLACED_ATTRIBUTE] = attention
        return new

    # ------------------------------------------------------------- state dict
    def get_extra_state(self) -> torch.Tensor:
        """The settings, as ``<name>._extra_state`` in a state dict: it marks a Nyström block.

        An int64 tensor (see :func:`nystrom_settings`), not a dict, so that a
        state dict of a swapped model still goes to safetensors and loads with
        ``torch.load(weights_only=True)``. A timm ``Attention`` swapped for this
        module keeps its parameter keys (``qkv``, ``proj``); this key is what
        tells a bare state dict apart.
        """
        settings = {
            **{name: int(getattr(self, name) or 0) for name in _SETTINGS[1:-1] if name != "interface"},
            "interface": _INTERFACES.index(self.interface),
            "version": 1,
        }
        settings["scale_bits"] = int(torch.tensor(float(self.scale), dtype=torch.float64).view(torch.int64))
        return torch.tensor([settings[name] for name in _SETTINGS], dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        settings = nystrom_settings(state)
        if settings["conv_kernel_size"] != self.conv_kernel_size:
            raise ValueError(
                f"The saved Nyström settings have conv_kernel_size={settings['conv_kernel_size']}, this module "
                f"{self.conv_kernel_size}: rebuild it with the saved settings before loading."
            )
        for name, value in settings.items():
            setattr(self, name, value)

    def extra_repr(self) -> str:
        conv = f", conv_kernel_size={self.conv_kernel_size}" if self.conv_kernel_size else ""
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_landmarks={self.num_landmarks}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, pinv_iterations={self.pinv_iterations}{conv}"
        )

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        **kwargs: Any,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, None]]:
        """``attn(x)`` like timm's ``Attention``; ``attn(x, x, x, ...)`` -> ``(out, None)`` when
        built from ``nn.MultiheadAttention``; ``attn(x, attention_mask)`` -> ``(out, None)`` when built
        from a transformers attention (attention weights are never materialized)."""
        if self.interface == "transformers":  # its second positional argument is the attention mask
            mask = key if key is not None else kwargs.get("attention_mask")
            # ViT/DeiT take no padding mask: eager passes None, but under torch.compile/export transformers
            # materializes the all-visible mask it would otherwise skip, which is safe to ignore there
            if mask is not None and not torch.compiler.is_compiling():
                raise AttentionMaskError(
                    "NystromAttention does not support attention masks: landmarks average over all tokens. "
                    "Keep masked blocks exact (NystromSwap(blocks=[...]))."
                )
            return self._attend(x), None
        if kwargs:
            raise TypeError(f"NystromAttention.forward() got unexpected keyword arguments {sorted(kwargs)}")
        if (key is not None and key is not x) or (value is not None and value is not x):
            raise AttentionMaskError(
                "NystromAttention is self-attention only: call it with key and value equal to query."
            )
        if attn_mask is not None or key_padding_mask is not None or is_causal:
            raise AttentionMaskError(
                "NystromAttention does not support attention masks (attn_mask, key_padding_mask, is_causal): "
                "landmarks average over all tokens. Keep masked blocks exact (NystromSwap(blocks=[...]))."
            )
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = self._attend(x)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, None) if self.interface == "multihead" else out

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        prefix = min(self.num_prefix_tokens, tokens)
        if self.num_landmarks >= tokens - prefix:
            dropout = self.attn_drop.p if self.training and isinstance(self.attn_drop, nn.Dropout) else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        else:
            out = self._nystrom(q * self.scale, k, v, prefix)
        if self.conv is not None:
            out = out + self.conv(v)
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def _nystrom(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
        """``q`` is already scaled; shapes (B, H, N, D)."""
        q_landmarks = segment_means(q[:, :, prefix:], self.num_landmarks)
        k_landmarks = segment_means(k[:, :, prefix:], self.num_landmarks)
        if prefix:  # prefix tokens are their own landmarks
            q_landmarks = torch.cat([q[:, :, :prefix], q_landmarks], dim=-2)
            k_landmarks = torch.cat([k[:, :, :prefix], k_landmarks], dim=-2)
        kernel_1 = self.attn_drop(torch.softmax(q[:, :, prefix:] @ k_landmarks.transpose(-2, -1), dim=-1))
        kernel_2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-2, -1), dim=-1)
        kernel_3 = torch.softmax(q_landmarks @ k.transpose(-2, -1), dim=-1)
        landmark_values = kernel_3 @ v  # its first `prefix` rows are the prefix tokens' exact attention
        patch_out = kernel_1 @ (iterative_pinv(kernel_2, self.pinv_iterations) @ landmark_values)
        if not prefix:
            return patch_out
        return torch.cat([landmark_values[:, :, :prefix], patch_out], dim=-2)


#: :attr:`NystromAttention.interface` by its code in the extra state (0 and 1 were a "multihead" flag)
_INTERFACES = ("timm", "multihead", "transformers")

#: the fields of :meth:`NystromAttention.get_extra_state`, in order (``scale_bits``: the float64 bits of ``scale``)
_SETTINGS = (
    "version",
    "num_landmarks",
    "num_prefix_tokens",
    "pinv_iterations",
    "conv_kernel_size",
    "interface",
    "batch_first",
    "num_heads",
    "head_dim",
    "attn_dim",
    "scale_bits",
)


def nystrom_settings(extra_state: Any) -> dict[str, Any]:
    """Decode a :class:`NystromAttention`'s ``_extra_state`` into its settings (plain Python values).

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
        >>> vit.blocks[0].attn = NystromAttention.from_attention(vit.blocks[0].attn, num_landmarks=16,
        ...                                                      num_prefix_tokens=1)
        >>> settings = nystrom_settings(vit.state_dict()["blocks.0.attn._extra_state"])
        >>> settings["num_landmarks"], settings["num_prefix_tokens"]
        (16, 1)
    """
    values = extra_state.tolist() if isinstance(extra_state, torch.Tensor) else None
    if not isinstance(values, list) or len(values) != len(_SETTINGS) or values[0] != 1:
        raise ValueError(
            f"Not the extra state of a NystromAttention (an int64 tensor of {len(_SETTINGS)} settings, "
            f"version 1): {extra_state!r}"
        )
    raw = dict(zip(_SETTINGS, values))
    settings: dict[str, Any] = {name: raw[name] for name in _SETTINGS[1:-1]}
    settings["conv_kernel_size"] = settings["conv_kernel_size"] or None
    settings["interface"] = _INTERFACES[settings["interface"]]
    settings["batch_first"] = bool(settings["batch_first"])
    settings["scale"] = torch.tensor(raw["scale_bits"], dtype=torch.int64).view(torch.float64).item()
    return settings


def swap_problem(attention: nn.Module) -> Optional[str]:
    """Why ``attention`` cannot become a :class:`NystromAttention` (None when it can)."""
    if isinstance(attention, TimmAttention) and type(attention).forward is TimmAttention.forward:
        return None
    if isinstance(attention, nn.MultiheadAttention):
        if not attention._qkv_same_embed_dim:
            return (
                f"nn.MultiheadAttention with kdim={attention.kdim}/vdim={attention.vdim} != "
                f"embed_dim={attention.embed_dim} is cross-attention; Nystrom attention here is self-attention only."
            )
        if attention.bias_k is not None or attention.add_zero_attn:
            return "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True cannot be swapped (extra keys)."
        return None
    if is_attention_module(attention) and type(attention).__module__.startswith("transformers."):
        return None  # ViT/DeiT attention: separate q/k/v, o_proj, the softmax scale in `scaling`
    return (
        f"NystromAttention supports timm's Attention, nn.MultiheadAttention and transformers' ViT/DeiT "
        f"attention, not {type(attention).__name__} "
        "(it may compute attention differently, e.g. with rotary embeddings)."
    )
