"""Hugging Face transformers ``ViTForImageClassification`` and ``DeiTForImageClassification(WithTeacher)``.

transformers is imported only when a model comes from it (``pip install
lightning-vitcompress[hf]``). Attention has separate q/k/v Linears
(``q_proj``/``k_proj``/``v_proj`` + ``o_proj`` since transformers 5;
``query``/``key``/``value`` + ``output.dense`` before), eager or SDPA. The
softmax scale is the module's ``scaling`` where it stores one, used by both
implementations, so head-dim pruning keeps it; outputs are objects with
``.logits`` (the teacher variant averages its two heads there).

Example::

    >>> import transformers
    >>> config = transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
    ...                                  num_attention_heads=4, intermediate_size=64, num_labels=10)
    >>> model = transformers.DeiTForImageClassificationWithTeacher(config)
    >>> adapter = TransformersAdapter(model)
    >>> adapter.prefix_tokens().count  # class and distillation token
    2
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress.models.base import (
    ATTENTION_MARKER,
    Capabilities,
    ModelAdapter,
    PrefixTokens,
    embedding_parameter,
    named_heads,
)
from lightning_vitcompress.models.layout import _separate_qkv


def _is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


class TransformersAdapter(ModelAdapter):
    """ViT/DeiT image classifiers from transformers (eager and SDPA attention)."""

    family = "transformers"
    #: a third-party module tree: its attributes are read dynamically (checked by tests/test_zoo.py, not mypy)
    model: Any
    capabilities = Capabilities()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
        return (
            _is_transformers_model(model)
            and isinstance(getattr(embeddings, "cls_token", None), nn.Parameter)
            and isinstance(getattr(embeddings, "patch_embeddings", None), nn.Module)
        )

    @property
    def _embeddings(self) -> Any:
        return self.model.base_model.embeddings

    def attention_blocks(self) -> list[tuple[str, nn.Module]]:
        base = self.model.base_model
        prefix = self.model.base_model_prefix + "." if base is not self.model else ""
        modules = list(base.named_modules())
        found = [
            (prefix + name, module)
            for name, module in modules
            if _separate_qkv(module) is not None
            or getattr(type(module), ATTENTION_MARKER, False)  # or NystromAttention
        ]
        for name, module in modules:  # an attention that neither is nor holds q/k/v projections: unsupported
            if "attention" in type(module).__name__.lower() and not any(
                owner is module or owner in set(module.modules()) for _, owner in found
            ):
                self.check_attention(prefix + name, module)
        return found

    def _output_projection(self, name: str, module: nn.Module) -> Optional[nn.Linear]:
        if isinstance(getattr(module, "o_proj", None), nn.Linear):
            return None
        parent = self.model.get_submodule(name.rpartition(".")[0])  # transformers < 5: ViTAttention.output.dense
        dense = getattr(getattr(parent, "output", None), "dense", None)
        return dense if isinstance(dense, nn.Linear) else None

    def patch_embedding(self) -> Optional[nn.Module]:
        return self._embeddings.patch_embeddings.projection

    def prefix_tokens(self) -> PrefixTokens:
        embeddings = self._embeddings
        distillation = getattr(embeddings, "distillation_token", None)
        parameters = [
            *embedding_parameter("cls_token", embeddings.cls_token),
            *embedding_parameter("distillation_token", distillation),
            *embedding_parameter("position_embeddings", embeddings.position_embeddings),
            *embedding_parameter("mask_token", getattr(embeddings, "mask_token", None)),
        ]
        prefix = self.model.base_model_prefix + ".embeddings."
        parameters = [type(p)(prefix + p.name, p.parameter, p.dim) for p in parameters]
        return PrefixTokens(1 + (distillation is not None), tuple(parameters))

    def classifier_heads(self) -> list[tuple[str, nn.Module]]:
        return named_heads(self.model, ("classifier", "cls_classifier", "distillation_classifier"))

    def input_shape(self) -> Optional[tuple[int, int, int]]:
        config = self.model.config
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        return (int(config.num_channels), int(height), int(width))

    def _fix_model_attributes(self) -> None:
        """Write the widths into ``config`` where every layer agrees (it is shared by all layers)."""
        config = self.model.config
        config.hidden_size = self.embed_dim()
        layouts = self.layouts()
        heads = {layout.num_heads for layout in layouts}
        head_dims = {layout.head_dim for layout in layouts}
        mlp = {linear.out_features for linear in self.mlp_input_layers()}
        if len(heads) == 1:
            config.num_attention_heads = heads.pop()
        if len(head_dims) == 1:
            config.head_dim = head_dims.pop()  # read by transformers >= 5 when rebuilding from the config
        if len(mlp) == 1:
            config.intermediate_size = mlp.pop()

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        parts = ("layernorm_before", "layernorm_after", "mlp", "dropout")
        if all(isinstance(getattr(block, part, None), nn.Module) for part in parts):
            return None
        return f"{type(block).__name__} has not all of {parts} (the transformers >= 5 ViT layer)"

    @staticmethod
    def attention_step(block: Any, x: torch.Tensor, attend: Any) -> torch.Tensor:
        return x + block.dropout(attend(block.layernorm_before(x)))

    @staticmethod
    def mlp_step(block: Any, x: torch.Tensor) -> torch.Tensor:
        return x + block.dropout(block.mlp(block.layernorm_after(x)))
