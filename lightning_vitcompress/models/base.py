"""The model-adapter interface: what a compression technique may ask of a Vision Transformer.

A technique never asks "is this timm?". It asks an adapter (one per model
family, see :func:`lightning_vitcompress.models.adapter_for`) for the attention
blocks and their :class:`AttentionLayout`, the prefix tokens, the classifier
heads, the layers structured pruning acts on, the input shape and the logits,
and after a structural edit it calls :meth:`ModelAdapter.fix_attributes`.

Example (torch-pruning driven by the adapter alone, on a tiny timm ViT)::

    >>> import timm, torch_pruning
    >>> from lightning_vitcompress.models import adapter_for
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    >>> adapter = adapter_for(model)
    >>> before = sum(p.numel() for p in model.parameters())
    >>> pruner = torch_pruning.pruner.MetaPruner(
    ...     model, adapter.example_input(),
    ...     importance=torch_pruning.importance.MagnitudeImportance(p=2),
    ...     pruning_ratio=0.5,
    ...     ignored_layers=[head for _, head in adapter.classifier_heads()],
    ...     num_heads=adapter.head_groups(),
    ...     unwrapped_parameters=adapter.unwrapped_parameters(),
    ...     round_to=adapter.embed_multiple_of(),
    ...     output_transform=adapter.logits,
    ... )
    >>> for group in pruner.step(interactive=True):
    ...     group.prune()
    >>> adapter.fix_attributes(pruner.num_heads)
    >>> logits = adapter.logits(model(adapter.example_input()))
    >>> model.embed_dim, logits.shape, sum(p.numel() for p in model.parameters()) < 0.3 * before
    (96, torch.Size([1, 10]), True)

The adapter's parts live beside it: reading an attention module
(:mod:`~lightning_vitcompress.models.layout`), the prefix tokens, heads and
logits (:mod:`~lightning_vitcompress.models.heads`), and narrowing the layers
torch-pruning cannot (:mod:`~lightning_vitcompress.models.narrow`). Their
names are re-exported here.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from lightning_vitcompress.models.heads import (
    EmbeddingParameter,
    PrefixTokens,
    embedding_parameter,
    logits_of,
    named_heads,
)
from lightning_vitcompress.models.layout import (
    ATTENTION_MARKER,
    SEPARATE_QKV_NAMES,
    AttentionLayout,
    _int_attr,
    is_attention_module,
    read_layout,
)
from lightning_vitcompress.models.narrow import is_attention_pool, narrow_attention_pool, narrow_glu_mlp

__all__ = [  # the adapter interface, and its parts' names (re-exported: adapters and techniques import them here)
    "ATTENTION_MARKER",
    "SEPARATE_QKV_NAMES",
    "AttentionLayout",
    "Capabilities",
    "EmbeddingParameter",
    "ModelAdapter",
    "PrefixTokens",
    "embedding_parameter",
    "is_attention_module",
    "is_attention_pool",
    "logits_of",
    "named_heads",
    "narrow_attention_pool",
    "narrow_glu_mlp",
    "read_layout",
    "supported_families",
]


@dataclass(frozen=True)
class Capabilities:
    """What structured pruning can do on a family; ``why_not`` explains each ``False``."""

    head_pruning: bool = True
    head_dim_pruning: bool = True
    embed_pruning: bool = True
    mlp_pruning: bool = True
    why_not: Mapping[str, str] = field(default_factory=dict)

    def require(self, capability: str, option: str, family: str, model_class: str = "") -> None:
        """Raise ``ValueError`` naming ``option`` when ``capability`` is missing.

        Example (BEiT's relative-position bias has a column per head: its heads cannot be pruned)::

            >>> import timm
            >>> from lightning_vitcompress.models import adapter_for
            >>> beit = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2,
            ...                          embed_dim=64, num_heads=4)
            >>> adapter = adapter_for(beit)
            >>> adapter.capabilities.require("mlp_pruning", "prune_mlp=True", adapter.family)  # possible: no error
            >>> adapter.capabilities.require("head_pruning", "prune_heads=True", adapter.family)
            Traceback (most recent call last):
            ...
            ValueError: prune_heads=True is not possible on timm BEiT models: each attention's relative-position bias table has one column per head. Turn off prune_heads=True.
        """
        if not getattr(self, capability):
            reason = self.why_not.get(capability, "")
            which = f" ({model_class})" if model_class else ""
            raise ValueError(f"{option} is not possible on {family} models{which}: {reason} Turn off {option}.")


def supported_families() -> str:
    """The supported families, for messages."""
    return (
        "timm VisionTransformer/VisionTransformerDistilled (SigLIP's attention-pool head too), timm Eva "
        "(EVA, EVA-02, RoPE ViTs), timm Beit, timm Cait, timm SwinTransformer, torchvision VisionTransformer, "
        "transformers ViTForImageClassification/DeiTForImageClassification(WithTeacher), "
        "hand-written ViTs built on nn.MultiheadAttention or timm-style attention"
    )


class ModelAdapter(ABC):
    """One model family's answers to what compression techniques need to know.

    Build it before a structural edit and call :meth:`fix_attributes` on the
    same adapter after it: the adapter remembers each attention's softmax
    scale, so that an edit that shrinks ``head_dim`` does not silently change
    attention where the module computes its scale from ``head_dim``.

    Subclasses implement the ``where`` methods (blocks, heads, tokens, input
    shape, model attributes); reading layouts, finding MLP and residual layers,
    reading logits and fixing attention attributes are shared here.
    """

    #: short family name used in messages ("timm", "torchvision", ...)
    family: ClassVar[str] = ""
    #: what structured pruning with torch-pruning can do on this family
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._scales = {layout.name: layout.effective_scale for layout in self.layouts()}

    # ------------------------------------------------------------------ family-specific
    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter handles ``model`` (cheap; must not import optional libraries needlessly)."""

    @abstractmethod
    def attention_blocks(self) -> list[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of every attention block, in forward order.

        Raises:
            TypeError: an attention module of a type no adapter supports (names it).
        """

    @abstractmethod
    def patch_embedding(self) -> Optional[nn.Module]:
        """The layer that writes patch embeddings into the residual stream (a Conv2d), if any."""

    @abstractmethod
    def prefix_tokens(self) -> PrefixTokens:
        """Class/distillation/register tokens and the parameters holding them (with position embeddings)."""

    @abstractmethod
    def classifier_heads(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the classifier head(s): never pruned, never swapped."""

    @abstractmethod
    def input_shape(self) -> Optional[tuple[int, int, int]]:
        """``(C, H, W)`` when the model states it, else None."""

    def attention_width_is_embedding(self) -> bool:
        """True where an attention reshapes its output to its input width (timm ``EvaAttention``): its
        q/k/v width must stay the embedding's, so heads and embedding are pruned together."""
        return False

    def prepare_pruning(self, saved: Optional[Mapping[str, Any]] = None) -> None:
        """Make the model's structure one torch-pruning can trace, computing the same function.

        Attention that keeps its q/v biases beside a bias-free ``qkv`` (timm EVA, BEiT: ``q_bias``,
        ``v_bias`` and a zero ``k_bias`` buffer, handed to ``F.linear`` with ``qkv.weight``) gets them
        folded into ``qkv.bias``. Run before pruning and before replaying a prune; with ``saved`` (the
        state dict being loaded) only the attentions it holds folded are folded.
        """
        for name, attn in self.attention_blocks():
            q_bias, qkv = getattr(attn, "q_bias", None), getattr(attn, "qkv", None)
            if not isinstance(q_bias, nn.Parameter) or not isinstance(qkv, nn.Linear) or qkv.bias is not None:
                continue
            if saved is not None and f"{name}.qkv.bias" not in saved:
                continue
            with torch.no_grad():
                bias = torch.cat((q_bias, torch.zeros_like(q_bias), attn.v_bias))
            qkv.bias = nn.Parameter(bias, requires_grad=q_bias.requires_grad)
            attn.q_bias = attn.v_bias = attn.k_bias = None

    @contextlib.contextmanager
    def tracing(self) -> Iterator[nn.Module]:
        """The model as torch-pruning should trace it: parts whose graph it misreads, and whose widths
        pruning never changes, are replaced by constants inside the block.

        Relative-position biases (timm Swin, BEiT: a ``(distances, heads)`` table gathered into a
        ``heads x tokens x tokens`` bias) would be read as a parameter to prune along its last dim,
        the heads, tangling the head-dim groups: each attention's ``_get_rel_pos_bias`` returns its
        value as a constant while tracing. Subclasses add their own (RoPE's token concat).
        """
        shadowed = []
        for module in self.model.modules():
            if isinstance(getattr(module, "relative_position_bias_table", None), nn.Parameter) and callable(
                getattr(module, "_get_rel_pos_bias", None)
            ):
                attention: Any = module  # a timm attention: its bias getter is read and shadowed by name
                with torch.no_grad():
                    constant = attention._get_rel_pos_bias().detach()
                attention._get_rel_pos_bias = lambda constant=constant: constant
                shadowed.append(module)
        try:
            yield self.model
        finally:
            for module in shadowed:
                del module._get_rel_pos_bias

    def custom_pruners(self) -> dict[type, Any]:
        """torch-pruning pruners for module types it should prune as one unit (its ``customized_pruners``)."""
        return {}

    def glu_mlps(self) -> list[tuple[str, Any]]:  # Any: timm modules, narrowed by name (narrow.py)
        """``(name, module)`` of gated MLPs whose ``fc1`` holds value and gate halves (timm ``GluMlp``, EVA-02's):
        torch-pruning cannot follow the chunk, so pruning narrows them itself (:func:`narrow_glu_mlp`)."""
        from timm.layers import GluMlp

        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, GluMlp) and isinstance(m.fc1, nn.Linear)]

    def attention_pools(self) -> list[tuple[str, Any]]:  # Any: timm modules, narrowed by name
        """``(name, module)`` of latent attention pools on the residual stream (SigLIP's MAP head; default: none).

        Pruning leaves their outputs (the head's input) alone and narrows their inner width to the
        embedding's afterwards (:func:`narrow_attention_pool`): timm's pool reshapes its attention
        output to its input width.
        """
        return []

    def nystrom_problem(self) -> Optional[str]:
        """Why Nyström attention does not apply to this family's attention (None: ask the attention module)."""
        return None

    def pruning_problem(self) -> Optional[str]:
        """Why structured pruning cannot run on this model, naming what would work (None: it can)."""
        return None

    def _fix_model_attributes(self) -> None:  # noqa: B027 - an optional hook: families override it, default nothing
        """Update the model-level width attributes after an edit (family-specific; default: nothing)."""

    def fix_model_attributes(self) -> None:
        """Update only the model-level widths (timm ``embed_dim``, torchvision ``hidden_dim``,
        transformers ``config``) from the weights, e.g. after replaying recorded shapes."""
        self._fix_model_attributes()

    def _output_projection(self, name: str, module: nn.Module) -> Optional[nn.Linear]:
        """The output projection where it lives outside ``module`` (default: inside)."""
        return None

    # ------------------------------------------------------------------ shared answers
    def layouts(self) -> list[AttentionLayout]:
        """The :class:`AttentionLayout` of every attention block, in order."""
        return [read_layout(n, m, self._output_projection(n, m)) for n, m in self.attention_blocks()]

    def embed_dim(self) -> int:
        """Width of the residual stream (from the weights, so it is right after pruning)."""
        patch = self.patch_embedding()
        if isinstance(patch, nn.Conv2d):
            return patch.out_channels
        if isinstance(patch, nn.Linear):
            return patch.out_features
        return self.layouts()[0].embed_dim

    def logits(self, output: Any) -> torch.Tensor:
        """The logits in ``output`` (see :func:`logits_of`); usable as torch-pruning's ``output_transform``."""
        return logits_of(output)

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Run the model on ``images`` and return its logits, whatever it returns."""
        return self.logits(self.model(images))

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A random batch of the stated input shape, on the model's device.

        Raises:
            ValueError: the model does not state its input shape (take one from the data instead).
        """
        shape = self.input_shape()
        if shape is None:
            raise ValueError(
                f"{type(self.model).__name__} does not state its input shape; take an example batch from the data."
            )
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else None
        return torch.randn(batch_size, *shape, device=device)

    def head_groups(self) -> dict[nn.Module, int]:
        """``{projection: num_heads}`` for torch-pruning's ``num_heads`` argument."""
        return {proj: layout.num_heads for layout in self.layouts() for proj in layout.head_projections}

    def unwrapped_parameters(self) -> list[tuple[nn.Parameter, int]]:
        """``[(parameter, embedding dim)]`` for torch-pruning's ``unwrapped_parameters`` argument."""
        return [(p.parameter, p.dim) for p in self.prefix_tokens().parameters]

    def embed_multiple_of(self) -> Optional[int]:
        """Embedding widths pruning must keep a multiple of (torch-pruning's ``round_to``); None: any."""
        return None

    def _block_of(self, layout: AttentionLayout) -> tuple[nn.Module, list[nn.Linear]]:
        """The transformer block around an attention and its Linears outside the attention (the MLP)."""
        modules = dict(self.model.named_modules())
        own = set(layout.module.modules()) | {layout.out_proj}
        path = layout.name
        while path:
            path = path.rpartition(".")[0]
            block = modules[path] if path else self.model
            linears = [m for m in block.modules() if isinstance(m, nn.Linear) and m not in own]
            if linears:
                return block, linears
        raise ValueError(f"No MLP found around attention block {layout.name!r}.")

    def mlp_input_layers(self) -> list[nn.Linear]:
        """Each block's MLP input Linear(s) (fc1, linear1, intermediate.dense): their outputs are prunable."""
        return [linear for layout in self.layouts() for linear in self._block_of(layout)[1][:-1]]

    def residual_layers(self) -> list[nn.Module]:
        """Layers whose outputs are the residual stream: patch embedding, attention output, MLP output.

        For ``nn.MultiheadAttention`` this is the whole module (torch-pruning prunes it as one unit).
        """
        patch = self.patch_embedding()
        layers: list[nn.Module] = [patch] if patch is not None else []
        for layout in self.layouts():
            layers.append(layout.module if layout.kind == "in_proj" else layout.out_proj)
            layers.append(self._block_of(layout)[1][-1])
        return layers

    # ------------------------------------------------------------------ after an edit
    def fix_attributes(self, num_heads: Optional[Mapping[Union[str, nn.Module], int]] = None) -> None:
        """Update the model's own bookkeeping from its weight shapes after a structural edit.

        Args:
            num_heads: heads per attention after the edit, keyed by the
                attention's qualified name or by any of its projections
                (torch-pruning's ``pruner.num_heads`` works as is). Attentions
                it does not name keep their head count, i.e. the edit changed
                ``head_dim``.

        Each attention keeps the softmax scale it had when this adapter was
        built (or last fixed): where the module would now compute another one,
        the ratio is folded into the query projection.

        Raises:
            ValueError: an attention's q/k/v width is not divisible by its head count.
        """
        num_heads = num_heads or {}
        for layout in self.layouts():
            heads = num_heads.get(layout.name)
            for key in (layout.module, *layout.head_projections):
                heads = num_heads.get(key, heads)
            heads = int(heads if heads is not None else layout.num_heads)
            attn_dim = self._attn_dim(layout)
            if attn_dim % heads:
                raise ValueError(f"{layout.name}: q/k/v width {attn_dim} is not divisible by {heads} heads.")
            self._write_attention(layout, heads, attn_dim // heads)
            trained = self._scales.get(layout.name)
            now = read_layout(layout.name, layout.module, self._output_projection(layout.name, layout.module))
            if trained is not None and not math.isclose(trained, now.effective_scale, rel_tol=1e-9):
                self._fold_query_scale(now, trained / now.effective_scale)
        for module in self.model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.normalized_shape = tuple(module.weight.shape)
        self._fix_model_attributes()
        self._scales = {layout.name: layout.effective_scale for layout in self.layouts()}

    @staticmethod
    def _attn_dim(layout: AttentionLayout) -> int:
        if layout.qkv is not None:
            return layout.qkv.out_features // 3
        if layout.in_proj_weight is not None:
            return layout.in_proj_weight.shape[0] // 3
        assert layout.query is not None
        return layout.query.out_features

    @staticmethod
    def _write_attention(layout: AttentionLayout, heads: int, head_dim: int) -> None:
        module: Any = layout.module  # a third-party attention: its head-count attributes are rewritten by name
        if layout.kind == "qkv":
            # timm's fused path ignores `scale` (it uses 1/sqrt(head_dim)): reset it, fix_attributes folds the ratio
            module.num_heads, module.head_dim, module.attn_dim = heads, head_dim, heads * head_dim
            module.scale = head_dim**-0.5
        elif layout.kind == "in_proj":
            assert isinstance(module, nn.MultiheadAttention)
            width = layout.in_proj_weight.shape[1]  # type: ignore[union-attr]
            module.embed_dim = module.kdim = module.vdim = width
            module.num_heads, module.head_dim = heads, head_dim
            if heads * head_dim != width:
                raise ValueError(
                    f"{layout.name}: nn.MultiheadAttention needs q/k/v width == embed_dim, got "
                    f"{heads * head_dim} and {width}."
                )
        else:  # transformers: `scaling`, where present, is used by eager and SDPA alike and stays
            for attr, value in (
                ("num_attention_heads", heads),
                ("num_heads", heads),
                ("attention_head_size", head_dim),
                ("head_dim", head_dim),
                ("all_head_size", heads * head_dim),
            ):
                if _int_attr(module, attr) is not None:
                    setattr(module, attr, value)
            if isinstance(module.__dict__.get("scale"), float):  # timm CaiT's ClassAttn: eager path only
                module.scale = head_dim**-0.5

    @staticmethod
    def _fold_query_scale(layout: AttentionLayout, factor: float) -> None:
        """Multiply the queries by ``factor`` (into an affine q-norm where queries are normalized)."""
        with torch.no_grad():
            q_norm = getattr(layout.module, "q_norm", None)
            norm_params = list(q_norm.parameters(recurse=False)) if isinstance(q_norm, nn.Module) else []
            if norm_params:
                for param in norm_params:
                    param.mul_(factor)
                return
            if isinstance(q_norm, nn.Module) and not isinstance(q_norm, nn.Identity):
                # a parameter-free norm would undo the fold: keep the trained scale on the eager path
                attention: Any = layout.module  # a timm attention: its eager-path attributes are set by name
                attention.scale = layout.effective_scale * factor
                attention.fused_attn = False
                return
            weight: torch.Tensor
            bias: Optional[torch.Tensor]
            if layout.query is not None:
                weight, bias, rows = layout.query.weight, layout.query.bias, layout.query.out_features
            elif layout.qkv is not None:
                weight, bias, rows = layout.qkv.weight, layout.qkv.bias, layout.attn_dim
            else:
                # neither q/k/v Linears nor a fused qkv: an nn.MultiheadAttention layout, which has in_proj_weight
                assert layout.in_proj_weight is not None
                weight, bias, rows = layout.in_proj_weight, layout.in_proj_bias, layout.attn_dim
            weight[:rows].mul_(factor)
            if bias is not None:
                bias[:rows].mul_(factor)

    def check_attention(self, name: str, module: nn.Module) -> nn.Module:
        """``module`` if the adapters can read it, else ``TypeError`` naming it and the supported families."""
        try:
            read_layout(name, module, self._output_projection(name, module))
        except TypeError as error:
            raise TypeError(
                f"Attention module {type(module).__name__} at {name!r} of a {self.family} "
                f"{type(self.model).__name__} is not supported: {error}. Supported families: {supported_families()}."
            ) from None
        return module

    # ------------------------------------------------------------------ token merging
    def token_blocks(self) -> list[tuple[str, nn.Module, str]]:
        """``(block name, block, attention attribute)`` of each transformer block (the parent of each attention)."""
        modules = dict(self.model.named_modules())
        return [
            (name.rpartition(".")[0], modules[name.rpartition(".")[0]], name.rpartition(".")[2])
            for name, _ in self.attention_blocks()
        ]

    def merge_problem(self, block: nn.Module) -> Optional[str]:
        """Why token merging cannot run ``block`` (None: it can, with :meth:`attention_step` and :meth:`mlp_step`)."""
        return f"token merging does not know the {self.family} block {type(block).__name__}"

    @staticmethod
    def attention_step(block: nn.Module, x: torch.Tensor, attend: Any) -> torch.Tensor:
        """``block``'s attention half on batch-first tokens ``x``, with ``attend(h)`` in place of its attention."""
        raise NotImplementedError

    @staticmethod
    def mlp_step(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``block``'s MLP half on batch-first tokens ``x`` (residual and norms included)."""
        raise NotImplementedError

    @staticmethod
    def tokens_batch_first(block: nn.Module) -> bool:
        """Whether ``block`` takes ``(batch, tokens, width)`` (else ``(tokens, batch, width)``)."""
        return True
