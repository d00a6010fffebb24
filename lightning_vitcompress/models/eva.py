"""timm ``Eva``: EVA, EVA-02 and the RoPE ViTs (``vit_*_rope_*``), attention with rotary position embeddings.

Their blocks are timm-style (a fused ``qkv`` and ``proj`` in ``blocks[i].attn``) but
differ from ``VisionTransformer`` in three ways the techniques must know:

* rotary position embeddings (RoPE) rotate fixed pairs of each head's dims by the
  token's grid position: whole heads can be removed, head dims cannot; merged tokens
  have no single position, so token merging and Nyström landmarks do not apply;
* ``EvaAttention`` reshapes its attention output to its *input* width, so its
  q/k/v width is the embedding's: heads and embedding are pruned together (to
  ``kept heads x head_dim``);
* ``EvaAttention`` keeps the q/v biases beside ``qkv`` (``q_bias``/``v_bias``, a zero
  ``k_bias`` buffer) and calls ``F.linear`` with ``qkv.weight``: before pruning they
  are folded into ``qkv.bias`` (:meth:`ModelAdapter.prepare_pruning`, the same function).

Example (a tiny EVA-02; ``eva02_tiny_patch14_224`` the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional import prune_vit
    >>> eva = timm.create_model("eva02_tiny_patch14_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    >>> before = sum(p.numel() for p in eva.parameters())
    >>> records = prune_vit(eva, 0.5, torch.randn(1, 3, 32, 32), prune_heads=True)
    >>> sum(p.numel() for p in eva.parameters()) < 0.6 * before, eva(torch.randn(2, 3, 32, 32)).shape
    (True, torch.Size([2, 10]))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

from torch import nn

from lightning_vitcompress.models.base import Capabilities
from lightning_vitcompress.models.timm import TimmAdapter

_ROPE = "rotary position embeddings (RoPE) rotate fixed pairs of each head's dims by the token's grid position"


class EvaAdapter(TimmAdapter):
    """timm ``Eva`` models (EVA, EVA-02, ``vit_*_rope_*``): whole-head pruning only, the embedding tied to
    ``EvaAttention``'s width, no token merging or Nyström (RoPE)."""

    family = "timm EVA"
    capabilities = Capabilities(
        head_dim_pruning=False,
        why_not={"head_dim_pruning": f"{_ROPE}."},
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def attention_width_is_embedding(self) -> bool:
        from timm.models.eva import EvaAttention

        return any(isinstance(block.attn, EvaAttention) for block in self.model.blocks)

    def pruning_problem(self) -> Optional[str]:
        rope = getattr(self.model, "rope", None)
        if isinstance(rope, nn.Module) and any(True for _ in rope.parameters()):
            return (
                f"its rotary embedding {type(rope).__name__} learns frequencies per head, which whole-head "
                "pruning would have to follow; supported: fixed (non-learned) RoPE, e.g. EVA-02"
            )
        return None

    @contextlib.contextmanager
    def tracing(self) -> Iterator[nn.Module]:
        """Without RoPE: it concatenates prefix and rotated patch tokens, which torch-pruning reads as a
        channel concat; the rotation changes no width."""
        rope = self.model.rope
        self.model.rope = None
        try:
            with super().tracing():
                yield self.model
        finally:
            self.model.rope = rope

    def nystrom_problem(self) -> Optional[str]:
        return f"{_ROPE}; Nyström landmarks (segment means of tokens) have no single position"

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        rope = getattr(self.model, "rope", None)
        if rope is not None:
            return f"{type(block).__name__} applies {_ROPE}; merged tokens have no single position"
        return f"{type(block).__name__} is not timm's Block"
