"""timm ``Beit`` (BEiT, BEiT v2): attention with a relative-position bias per head.

Pruned by head dims: each block's bias table has one column per head, so heads
stay; BEiT's attention reshapes its output to its input width, so the embedding
keeps the q/k/v width (``heads x pruned head_dim``). The q/v biases kept beside
``qkv`` are folded into ``qkv.bias`` first (see :meth:`ModelAdapter.prepare_pruning`).
Token merging and Nyström are refused: the bias is a fixed ``tokens x tokens`` table.

Example (a tiny BEiT; ``beit_base_patch16_224`` the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional import prune_vit
    >>> beit = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
    ...                          num_heads=4, num_classes=10)
    >>> before = sum(p.numel() for p in beit.parameters())
    >>> records = prune_vit(beit, 0.5, torch.randn(1, 3, 32, 32))
    >>> sum(p.numel() for p in beit.parameters()) < 0.6 * before, beit(torch.randn(2, 3, 32, 32)).shape
    (True, torch.Size([2, 10]))
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_vitcompress.models.base import Capabilities
from lightning_vitcompress.models.timm import TimmAdapter


class BeitAdapter(TimmAdapter):
    """timm BEiT: ``blocks[i].attn`` with a fused ``qkv``, q/v biases and a per-head relative-position table."""

    family = "timm BEiT"
    capabilities = Capabilities(
        head_pruning=False,
        why_not={"head_pruning": "each attention's relative-position bias table has one column per head."},
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    def attention_width_is_embedding(self) -> bool:
        return True

    def nystrom_problem(self) -> Optional[str]:
        return "its attention adds a relative-position bias per (query, key) pair, which Nyström attention never forms"

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        return (
            f"{type(block).__name__} adds a relative-position bias of fixed length (a tokens x tokens table), "
            "which cannot follow merged tokens"
        )
