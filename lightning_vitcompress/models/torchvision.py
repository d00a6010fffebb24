"""torchvision ``VisionTransformer`` (``vit_b_16`` and friends).

``encoder.layers[i].self_attention`` is an ``nn.MultiheadAttention``, so what
torch-pruning can do is what :mod:`~lightning_vitcompress.models.mha` says:
embedding (and with it head_dim) and MLP pruning, no head or separate head-dim
pruning. After an edit, ``hidden_dim`` (read by ``_process_input``) is updated.

Example::

    >>> import torchvision
    >>> vit = torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
    >>> adapter = TorchvisionAdapter(vit)
    >>> adapter.input_shape(), [name for name, _ in adapter.attention_blocks()][0]
    ((3, 32, 32), 'encoder.layers.encoder_layer_0.self_attention')
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress.models.base import PrefixTokens, embedding_parameter
from lightning_vitcompress.models.mha import HandWrittenAdapter


def _vision_transformer_class() -> Optional[type]:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # torchvision is optional
        return None
    return VisionTransformer


class TorchvisionAdapter(HandWrittenAdapter):
    """torchvision ``VisionTransformer``: class token, ``encoder.pos_embedding``, ``conv_proj``, ``heads``."""

    family = "torchvision"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        vision_transformer = _vision_transformer_class()
        return vision_transformer is not None and isinstance(model, vision_transformer)

    def attention_blocks(self) -> list[tuple[str, nn.Module]]:
        names = [f"encoder.layers.{name}.self_attention" for name, _ in self.model.encoder.layers.named_children()]
        return [
            (name, self.check_attention(name, layer.self_attention))
            for name, layer in zip(names, self.model.encoder.layers)
        ]

    def patch_embedding(self) -> Optional[nn.Module]:
        conv = self.model.conv_proj
        return conv if isinstance(conv, nn.Conv2d) else conv.conv_last  # conv stem: its last 1x1 conv

    def prefix_tokens(self) -> PrefixTokens:
        parameters = [
            *embedding_parameter("class_token", self.model.class_token),
            *embedding_parameter("encoder.pos_embedding", self.model.encoder.pos_embedding),
        ]
        return PrefixTokens(1, tuple(parameters))

    def classifier_heads(self) -> list[tuple[str, nn.Module]]:
        return [(f"heads.{name}", m) for name, m in self.model.heads.named_children() if isinstance(m, nn.Linear)]

    def input_shape(self) -> Optional[tuple[int, int, int]]:
        conv = self.model.conv_proj
        first = conv if isinstance(conv, nn.Conv2d) else next(m for m in conv.modules() if isinstance(m, nn.Conv2d))
        return (first.in_channels, self.model.image_size, self.model.image_size)

    def _fix_model_attributes(self) -> None:
        self.model.hidden_dim = self.embed_dim()
        for layer in self.model.encoder.layers:
            layer.num_heads = layer.self_attention.num_heads

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        from torchvision.models.vision_transformer import EncoderBlock

        return None if type(block).forward is EncoderBlock.forward else f"{type(block).__name__} is not an EncoderBlock"

    @staticmethod
    def attention_step(block: Any, x: torch.Tensor, attend: Any) -> torch.Tensor:
        return x + block.dropout(attend(block.ln_1(x)))

    @staticmethod
    def mlp_step(block: Any, x: torch.Tensor) -> torch.Tensor:
        return x + block.mlp(block.ln_2(x))

    @staticmethod
    def tokens_batch_first(block: nn.Module) -> bool:
        return True
