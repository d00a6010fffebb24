"""timm ``Cait`` (CaiT): talking-heads self-attention blocks, then class-attention blocks.

The self-attention blocks (``TalkingHeadAttn``: fused ``qkv``, and ``proj_l``/``proj_w``
mixing the heads' attention maps) and the class-attention blocks (``ClassAttn``:
separate ``q``/``k``/``v`` Linears, the class token as the only query) both split
their input width into heads, so their q/k/v width is the embedding's: heads stay
(the talking-heads projections are per head), head dims and embedding are pruned
together. Token merging and Nyström are refused: talking heads mix the full
attention maps of all heads, which neither keeps.

Example (a tiny CaiT; ``cait_xxs24_224`` the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional import prune_vit
    >>> cait = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
    ...                          depth_token_only=1, num_heads=4, init_values=1.0, num_classes=10)
    >>> before = sum(p.numel() for p in cait.parameters())
    >>> records = prune_vit(cait, 0.5, torch.randn(1, 3, 32, 32))
    >>> sum(p.numel() for p in cait.parameters()) < 0.6 * before, cait(torch.randn(2, 3, 32, 32)).shape
    (True, torch.Size([2, 10]))
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress.models.base import Capabilities, PrefixTokens
from lightning_vitcompress.models.timm import TimmAdapter


class CaitAdapter(TimmAdapter):
    """timm CaiT: ``blocks[i].attn`` (talking heads) and ``blocks_token_only[j].attn`` (class attention)."""

    family = "timm CaiT"
    capabilities = Capabilities(
        head_pruning=False,
        why_not={"head_pruning": "the talking-heads projections (proj_l, proj_w) mix a fixed number of heads."},
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.cait import Cait

        return isinstance(model, Cait)

    def attention_blocks(self) -> list[tuple[str, nn.Module]]:
        return [
            (name, self.check_attention(name, block.attn))
            for prefix in ("blocks", "blocks_token_only")
            for name, block in ((f"{prefix}.{i}.attn", b) for i, b in enumerate(getattr(self.model, prefix)))
        ]

    @contextlib.contextmanager
    def tracing(self) -> Iterator[nn.Module]:
        """Talking-heads attention traced as plain attention (``unbind`` q/k/v, no ``proj_l``/``proj_w``):
        torch-pruning misreads its ``qkv[0]`` indexing as channels, and the head mixing maps heads to
        heads, which pruning never changes. The same layers and channel couplings, another forward."""
        talking = [b.attn for b in self.model.blocks if isinstance(getattr(b.attn, "proj_l", None), nn.Linear)]
        for attn in talking:
            attn.forward = types.MethodType(_traced_talking_heads, attn)
        try:
            with super().tracing():
                yield self.model
        finally:
            for attn in talking:
                del attn.forward

    def attention_width_is_embedding(self) -> bool:
        return True

    def prefix_tokens(self) -> PrefixTokens:
        """No prefix token in the self-attention blocks: the class token joins in the class-attention blocks."""
        return PrefixTokens(0, super().prefix_tokens().parameters)

    def nystrom_problem(self) -> Optional[str]:
        return "talking heads mix the heads' full attention maps, which Nyström attention never forms"

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        return (
            f"{type(block).__name__}'s attention mixes the attention maps of its heads (talking heads or class "
            "attention), which merged tokens do not keep"
        )


def _traced_talking_heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """What torch-pruning traces for a ``TalkingHeadAttn``: its ``qkv`` and ``proj`` around plain attention."""
    batch, tokens, width = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))
