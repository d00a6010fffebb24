"""Structured pruning of a Vision Transformer with torch-pruning: the weight matrices really shrink.

Pure torch / torch-pruning (no Lightning): :func:`prune_vit` removes embedding
channels, attention head dimensions (or whole heads) and MLP hidden channels,
keeps each attention's trained softmax scale, and returns the shape changes as
a record that :func:`~lightning_vitcompress.load_compressed` replays on a fresh
model. :class:`~lightning_vitcompress.PruningSchedule` calls it inside ``fit``.

Example (a tiny timm ViT; ``vit_base_patch16_224`` the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.prune import prune_vit
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> _ = prune_vit(vit, 0.5, torch.randn(1, 3, 32, 32))   # half the channels of every layer
    >>> vit.embed_dim, vit.blocks[0].mlp.fc1.out_features
    (96, 384)

.. _torch-pruning: https://github.com/VainF/Torch-Pruning
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, Union

import torch
import torch_pruning as tp
from torch import nn

from lightning_vitcompress._checks import check_bool, check_choice, check_fraction, check_int, check_names
from lightning_vitcompress._model import ATTENTION_MARKER, get_submodule
from lightning_vitcompress._registry import register_reader, register_replay
from lightning_vitcompress._structure import shape_changes, shape_snapshot
from lightning_vitcompress.functional._outcome import check_outcome, output_shape
from lightning_vitcompress.functional.prune_importance import (  # gradient_kind re-exported: the callback imports it
    IMPORTANCES,
    ImportanceName,
    gradient_kind,
    make_importance,
)
from lightning_vitcompress.functional.prune_structure import (  # re-exported: callbacks and tests import them from here
    HEADS_BUFFER,
    prepare_saved,
    prunable_widths,
    read_pruned,
    replay_prune,
    widths_after,
)
from lightning_vitcompress.models import ModelAdapter, adapter_for
from lightning_vitcompress.models.base import narrow_attention_pool, narrow_glu_mlp

__all__ = ["PruneConfig", "gradient_kind", "prunable_widths", "prune_vit", "widths_after"]


# ---------------------------------------------------------------------------- config
def quantized_layer_names(model: nn.Module) -> list[str]:
    """Layers of ``model`` holding quantized weights: torchao tensor subclasses, our x86 int8 linears, or
    ``torch.ao`` quantized modules."""
    from lightning_vitcompress.functional.x86_int8 import X86Int8DynamicLinear

    names = []
    for name, module in model.named_modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        subclass = weight is not None and type(weight.data) is not torch.Tensor
        if (
            isinstance(module, X86Int8DynamicLinear)
            or subclass
            or type(module).__module__.startswith("torch.ao.nn.quantized")
        ):
            names.append(name)
    return names


@dataclass(frozen=True)
class PruneConfig:
    """What structured pruning removes, validated once: the ``quantize_(model, config)`` of pruning.

    Args:
        pruning_ratio: fraction to remove, in (0, 1): of each layer's channels (``target="channels"``),
            or of the parameters / MACs (``target="params"``/``"macs"``, translated to channels by search).
        target: what ``pruning_ratio`` measures.
        importance: ``"l2"``, ``"l1"``, ``"taylor"``, ``"hessian"``, ``"random"`` or a torch-pruning
            importance object.
        global_pruning: rank channels across all layers instead of the same fraction in each.
        round_to: keep widths multiples of this (e.g. 8), or None.
        prune_embed_dim / prune_attention / prune_heads / prune_mlp: what may be pruned;
            ``prune_heads=True`` removes whole heads instead of head dimensions.
        ignored_layers: attribute paths (inside the ViT) of layers whose outputs stay.

    Example::

        >>> import timm, torch
        >>> from lightning_vitcompress import PruningSchedule
        >>> from lightning_vitcompress.functional.prune import PruneConfig, prune_vit
        >>> config = PruneConfig(0.5, prune_heads=True)
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=4)
        >>> _ = prune_vit(vit, config, torch.randn(1, 3, 32, 32))  # now, or in a callback during fit:
        >>> vit.blocks[0].attn.num_heads, vit.blocks[0].attn.head_dim  # whole heads removed
        (2, 48)
        >>> callback = PruningSchedule(config=config, start_epoch=0)
    """

    pruning_ratio: float = 0.5
    target: Literal["channels", "params", "macs"] = "channels"
    importance: Union[ImportanceName, tp.importance.Importance] = "l2"
    global_pruning: bool = False
    round_to: Optional[int] = None
    prune_embed_dim: bool = True
    prune_attention: bool = True
    prune_heads: bool = False
    prune_mlp: bool = True
    ignored_layers: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_fraction(self.pruning_ratio, "pruning_ratio", "0.5 to remove half")
        check_choice(self.target, "target", ("channels", "params", "macs"))
        if not isinstance(self.importance, tp.importance.Importance):
            check_choice(
                self.importance, "importance", sorted(IMPORTANCES), " or a torch_pruning.importance.Importance object"
            )
        for name in ("global_pruning", "prune_embed_dim", "prune_attention", "prune_heads", "prune_mlp"):
            check_bool(getattr(self, name), name)
        if not (self.prune_embed_dim or self.prune_attention or self.prune_mlp):
            raise ValueError("prune_embed_dim, prune_attention and prune_mlp are all False: nothing would be pruned.")
        check_int(self.round_to, "round_to", minimum=1, example="8 (channel multiple)", allow_none=True)
        names = check_names(self.ignored_layers, "ignored_layers", "['blocks.0.mlp.fc1']")
        object.__setattr__(self, "pruning_ratio", float(self.pruning_ratio))
        object.__setattr__(self, "ignored_layers", tuple(names))

    @property
    def importance_name(self) -> str:
        return self.importance if isinstance(self.importance, str) else type(self.importance).__name__

    def make_importance(self) -> tp.importance.Importance:
        """A fresh torch-pruning importance (the object itself when one was given)."""
        return make_importance(self.importance)

    def to_record(self) -> dict[str, Any]:
        """Plain data (``weights_only``-safe): written into checkpoints, compared on resume."""
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "importance": self.importance_name,
            "ignored_layers": list(self.ignored_layers),
        }

    # ------------------------------------------------------- what a ratio does to widths
    def cut_widths(self, widths: dict[str, list[int]]) -> dict[str, int]:
        """The width each pruned layer group loses channels from (embedding, head dim or heads, MLP hidden)."""
        cut: dict[str, int] = {}
        for name, width in widths.items():
            if name == "embed":
                if self.prune_embed_dim:
                    cut[name] = width[0]
            elif len(width) == 2:
                if self.prune_attention:
                    cut[name] = width[0] if self.prune_heads else width[1]
            elif self.prune_mlp:
                cut[name] = width[0]
        return cut

    def removed(self, is_attention: bool, width: int, ratio: float) -> int:
        """Channels (or whole heads) torch-pruning removes from ``width`` at channel ``ratio``."""
        if self.prune_heads and is_attention:
            return math.ceil(ratio * width)
        removed = width - int(width * (1 - ratio))
        return removed - removed % self.round_to if self.round_to else removed

    def check_ratio_prunes(self, widths: dict[str, list[int]], ratio: float) -> None:
        """Refuse a channel ``ratio`` that empties a layer of ``widths`` (torch-pruning then skips it) or removes nothing."""
        cut = self.cut_widths(widths)
        if not cut:
            return
        removed = {name: self.removed(len(widths[name]) == 2, width, ratio) for name, width in cut.items()}
        emptied = [name for name, width in cut.items() if width - removed[name] < 1]
        largest = math.floor(min((width - 1) / width for width in cut.values()) * 1000) / 1000
        given = f"pruning_ratio={self.pruning_ratio!r}" + (
            f" (target={self.target!r}: channel ratio {ratio:.3f})" if self.target != "channels" else ""
        )
        if emptied:
            raise ValueError(
                f"{given} would remove every channel of {emptied[0]} ({cut[emptied[0]]}), which torch-pruning then "
                f"leaves unpruned: pass pruning_ratio <= {largest:.3f} for this model."
            )
        if all(count == 0 for count in removed.values()):
            raise ValueError(
                f"{given} removes no channel with round_to={self.round_to}: pass a larger pruning_ratio "
                f"(at least {(self.round_to or 1) / max(cut.values()):.3f}) or a smaller round_to."
            )

    def fraction_removed(self, original: dict[str, list[int]], model: nn.Module) -> float:
        """The fraction of the prunable channels ``model`` has lost since ``original`` widths."""
        current = prunable_widths(model)
        names = self.cut_widths(original)
        before = sum(math.prod(original[name]) for name in names)
        after = sum(math.prod(current[name]) for name in names if name in current)
        return 1.0 - after / max(1, before)

    def check_model(self, model: nn.Module) -> None:
        """Raise naming the option to turn off when ``model`` cannot be pruned as configured.

        What a family can prune comes from its adapter's
        :class:`~lightning_vitcompress.models.Capabilities`: ``nn.MultiheadAttention``
        (torchvision, hand-written ViTs) ties q/k/v to the embedding, so attention and
        embedding are pruned together or not at all, and never as whole heads.
        """
        quantized = quantized_layer_names(model)
        if quantized:
            raise ValueError(
                f"{type(model).__name__} is already quantized ({len(quantized)} layers, e.g. {quantized[0]!r}): "
                "structured pruning works on full-precision weights and would remove nothing from int8 ones. Prune "
                "the full-precision model and quantize after it (PruningSchedule and QuantizeOnFit in one fit do "
                "this in that order), e.g. from the fp32 checkpoint that QuantizeOnFit(save_fp32_path=...) writes."
            )
        adapter = adapter_for(model)
        capabilities, family = adapter.capabilities, adapter.family
        problem = adapter.pruning_problem()
        if problem:
            raise TypeError(f"prune_vit: {family} {type(model).__name__} cannot be pruned: {problem}")
        if self.prune_attention and self.prune_heads:
            capabilities.require("head_pruning", "prune_heads=True", family, type(model).__name__)
        only_heads = capabilities.head_pruning and not capabilities.head_dim_pruning
        if self.prune_attention and not self.prune_heads and only_heads:
            raise ValueError(
                f"prune_heads=False (head dims) is not possible on {family} models ({type(model).__name__}): "
                f"{capabilities.why_not.get('head_dim_pruning', '')} Pass prune_heads=True (whole heads), or "
                "prune_attention=False."
            )
        tied = adapter.attention_width_is_embedding()
        if tied and (self.global_pruning or self.prune_attention != self.prune_embed_dim):
            raise ValueError(
                f"The {family} attention ({type(adapter.layouts()[0].module).__name__}) reshapes its output to the "
                "embedding width, so heads and embedding are pruned together and uniformly: pass prune_attention and "
                "prune_embed_dim both True or both False, and global_pruning=False."
            )
        if not capabilities.head_dim_pruning and self.prune_attention != self.prune_embed_dim:
            on, off = (
                ("prune_attention", "prune_embed_dim")
                if self.prune_attention
                else ("prune_embed_dim", "prune_attention")
            )
            raise ValueError(
                f"{on}=True with {off}=False is not possible on {family} models: their nn.MultiheadAttention "
                f"prunes q/k/v only together with the embedding. Pass {off}=True as well, or {on}=False "
                "(prune_mlp=True alone prunes only the MLP channels)."
            )
        qk_norm = [
            layout.name
            for layout in adapter.layouts()
            if not isinstance(getattr(layout.module, "q_norm", nn.Identity()), nn.Identity)
        ]
        if qk_norm and self.prune_attention and not self.prune_heads:
            raise ValueError(
                "The attention blocks use qk_norm (normalised per head dimension), so head dimensions cannot be "
                "pruned: pass prune_heads=True (whole heads) or prune_attention=False."
            )
        for name in self.ignored_layers:
            try:
                get_submodule(model, name)
            except (AttributeError, TypeError) as err:
                modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]
                raise ValueError(
                    f"ignored_layers={list(self.ignored_layers)!r}: {name!r} is not a module of "
                    f"{type(model).__name__}; name layers inside the ViT, e.g. {modules}."
                ) from err


# ---------------------------------------------------------------------- model surgery
def _attention_output_layers(adapter: ModelAdapter) -> list[nn.Module]:
    """What torch-pruning prunes for "attention": each block's head projections, or the whole
    ``nn.MultiheadAttention`` (pruned as one unit, together with the embedding)."""
    return [
        layer
        for layout in adapter.layouts()
        for layer in (layout.head_projections if layout.kind != "in_proj" else [layout.module])
    ]


def _keep_head_counts(adapter: ModelAdapter, heads_before: dict[str, tuple[int, int]]) -> None:
    """Store the head count of every attention whose layout changed in :data:`HEADS_BUFFER`.

    From the shapes alone 4 heads of 4 dims and 2 heads of 8 look the same; a bare
    state dict needs the count. ``nn.MultiheadAttention`` never changes its count and
    :class:`~lightning_vitcompress.NystromAttention` keeps it in its extra state.
    """
    for layout in adapter.layouts():
        module = layout.module
        if layout.kind == "in_proj" or getattr(type(module), ATTENTION_MARKER, False):
            continue
        if (layout.num_heads, layout.head_dim) != heads_before.get(layout.name) or HEADS_BUFFER in dict(
            module.named_buffers(recurse=False)
        ):
            module.register_buffer(HEADS_BUFFER, torch.tensor(layout.num_heads, device=layout.out_proj.weight.device))


def _tie_embedding_to_heads(
    adapter: ModelAdapter,
    config: PruneConfig,
    residual: list[nn.Module],
    ratio_dict: dict[nn.Module, float],
    keep: Optional[dict[str, list[int]]],
) -> None:
    """Give the embedding the q/k/v width pruning leaves (``heads x head_dim`` after it), for attention whose
    q/k/v width is the embedding's (see :meth:`ModelAdapter.attention_width_is_embedding`)."""
    widths = prunable_widths(adapter.model)
    targets = set()
    for name, width in widths.items():
        if len(width) != 2:
            continue
        heads, head_dim = width
        if keep and name in keep:
            heads, head_dim = keep[name]
        elif config.prune_heads:
            heads -= config.removed(True, width[0], config.pruning_ratio)
        else:
            head_dim -= config.removed(False, width[1], config.pruning_ratio)
        targets.add(heads * head_dim)
    if len(targets) != 1:
        raise ValueError(
            f"The attention blocks would keep q/k/v widths {sorted(targets)}, but {adapter.family} "
            "attention needs one width, the embedding's: prune every block by the same ratio."
        )
    target = targets.pop()
    for layer in residual:
        ratio_dict[layer] = _ratio_to_keep(widths["embed"][0], target)


def _ratio_to_keep(current: int, keep: int) -> float:
    # torch-pruning keeps int(current * (1 - ratio)) channels: aim at keep + 0.5 to be safe from float error
    return min(max(1.0 - (keep + 0.5) / current, 0.0), 0.999) if keep < current else 0.0


def _broadcast(obj: Any) -> Any:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj


def prune_vit(
    model: nn.Module,
    config: Union[PruneConfig, float],
    example_input: torch.Tensor,
    *,
    keep: Optional[dict[str, list[int]]] = None,
    **options: Any,
) -> dict[str, Any]:
    """Prune ``model`` in place by ``config.pruning_ratio`` of its current prunable channels.

    ``config`` is a :class:`PruneConfig`, or just the ratio with the other
    options as keywords (``prune_vit(vit, 0.5, x, prune_heads=True)``);
    ``config.target`` is read as ``"channels"`` here (the callback translates
    params/MACs targets). With ``keep`` (widths as in :func:`prunable_widths`) and uniform pruning,
    each layer is pruned to exactly those widths instead (``pruning_ratio``
    then only applies to layers ``keep`` does not name).

    Returns the shape changes (``{module name: {"tensors": ..., "attrs": ...}}``)
    that :func:`~.prune_structure.replay_prune` reapplies. Under DDP the channels chosen on rank 0
    are used on every rank. On an error the model may be half pruned: work on a
    copy (``PruningSchedule`` restores the model from a snapshot instead).

    Example::

        >>> import timm, torch
        >>> from lightning_vitcompress.functional.prune import prune_vit
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> records = prune_vit(vit, 0.5, torch.randn(1, 3, 32, 32))
        >>> records["blocks.0.mlp.fc1"]["tensors"]["weight"], vit(torch.randn(2, 3, 32, 32)).shape  # new shapes
        ([384, 96], torch.Size([2, 1000]))
    """
    if not isinstance(config, PruneConfig):
        config = PruneConfig(pruning_ratio=config, **options)
    elif options:
        raise ValueError(f"prune_vit: pass the options in the PruneConfig, not also as keywords ({sorted(options)}).")
    pruning_ratio, global_pruning, prune_heads = config.pruning_ratio, config.global_pruning, config.prune_heads
    prune_embed_dim, prune_attention, prune_mlp = config.prune_embed_dim, config.prune_attention, config.prune_mlp
    imp = config.make_importance()
    adapter = adapter_for(model)  # built before the edit: it remembers each attention's softmax scale
    config.check_model(model)
    adapter.prepare_pruning()
    layouts = adapter.layouts()
    residual, mlp_inputs, attention = (
        adapter.residual_layers(),
        adapter.mlp_input_layers(),
        _attention_output_layers(adapter),
    )
    ignored: list[Union[nn.Module, nn.Parameter]] = [  # torch-pruning takes modules and parameters
        *(head for _, head in adapter.classifier_heads()),
        *(get_submodule(model, n) for n in config.ignored_layers),
        *(m for _, pool in adapter.attention_pools() for m in (pool, pool.latent)),  # narrowed after the step
        *(mlp.fc1 for _, mlp in adapter.glu_mlps()),  # torch-pruning misreads their chunk: narrowed after the step
    ]
    if not prune_embed_dim:
        ignored.extend(residual)
    if not prune_mlp:
        ignored.extend(mlp_inputs)
    if not prune_attention:
        ignored.extend(attention)
    heads_before = {layout.name: (layout.num_heads, layout.head_dim) for layout in layouts}
    shape_before = output_shape(model, example_input)

    ratio_dict: dict[nn.Module, float] = {}
    head_ratio_dict: dict[nn.Module, float] = {}
    if keep is not None and not global_pruning:
        by_key = {
            name: layout
            for layout in layouts
            if layout.kind != "in_proj"
            for name, m in model.named_modules()
            if m is layout.head_projections[0]
        }
        for name, width in prunable_widths(model).items():
            target = keep.get(name)
            if target is None:
                continue
            if name == "embed":
                for layer in residual:
                    ratio_dict[layer] = _ratio_to_keep(width[0], target[0])
            elif len(width) == 2 and name not in by_key:
                continue  # nn.MultiheadAttention: its width follows the embedding
            elif len(width) == 2 and prune_heads:
                removed = width[0] - target[0]
                for projection in by_key[name].head_projections:
                    head_ratio_dict[projection] = max(removed - 0.5, 0.0) / width[0]
            elif len(width) == 2:
                for projection in by_key[name].head_projections:
                    ratio_dict[projection] = _ratio_to_keep(width[1], target[1])
            else:
                ratio_dict[get_submodule(model, name)] = _ratio_to_keep(width[0], target[0])

    if adapter.attention_width_is_embedding() and prune_embed_dim:
        _tie_embedding_to_heads(adapter, config, residual, ratio_dict, keep)
    round_to = config.round_to
    multiple = adapter.embed_multiple_of() if prune_embed_dim else None
    if multiple:  # nn.MultiheadAttention: the embedding stays divisible by the head count
        round_to = math.lcm(round_to or 1, multiple)
    training = {module: module.training for module in model.modules()}  # tracing switches to eval
    before = shape_snapshot(model)
    # torch-pruning cannot trace the landmark branch of NystromAttention (it reads its token concat as a
    # channel concat); with landmarks >= tokens the module runs exact attention, whose graph is timm's
    landmarks: dict[Any, int] = {  # Nyström attentions, whose landmark count is set by name
        layout.module: count
        for layout in layouts
        if isinstance(count := getattr(layout.module, "num_landmarks", None), int)
    }
    for attn in landmarks:
        attn.num_landmarks = 2**31
    try:
        with adapter.tracing():  # e.g. EVA without RoPE, whose token concat torch-pruning misreads
            pruner = tp.pruner.MetaPruner(
                model,
                example_input,
                importance=imp,
                global_pruning=global_pruning,
                pruning_ratio=pruning_ratio,
                ignored_layers=ignored,
                round_to=round_to,
                num_heads=adapter.head_groups(),
                prune_num_heads=prune_heads,
                prune_head_dims=not prune_heads,
                head_pruning_ratio=pruning_ratio if prune_heads else 0.0,
                pruning_ratio_dict=ratio_dict or None,
                head_pruning_ratio_dict=head_ratio_dict or None,
                # class/distillation/register tokens and position embeddings: their last dim is the embedding
                unwrapped_parameters=adapter.unwrapped_parameters(),
                customized_pruners=adapter.custom_pruners() or None,
                output_transform=adapter.logits,
            )
    finally:
        for attn, count in landmarks.items():
            attn.num_landmarks = count
    for group in pruner.step(interactive=True):
        root_idxs = _broadcast([int(i) for i in group[0].idxs])
        group.prune(idxs=root_idxs)
    adapter.fix_attributes(pruner.num_heads)  # head counts, widths, and the trained softmax scale
    for name, pool in adapter.attention_pools():
        narrow_attention_pool(name, pool, adapter.embed_dim())
    if prune_mlp:
        for name, mlp in adapter.glu_mlps():
            target = keep.get(f"{name}.fc1") if keep else None
            hidden = mlp.fc2.in_features
            narrow_glu_mlp(mlp, target[0] // 2 if target else hidden - config.removed(False, hidden, pruning_ratio))
    _keep_head_counts(adapter, heads_before)
    for module, flag in training.items():
        module.training = flag
    check_outcome(model, example_input, shape_before, "prune_vit", features=not adapter.classifier_heads())
    return shape_changes(before, shape_snapshot(model))


# ---------------------------------------------------------------------------- registration
# how a checkpoint rebuilds a pruned model: replay its record, or read the record from a bare state dict (_registry)
register_replay("prune")(replay_prune)
register_reader("prune", read_pruned, survey=prepare_saved, order=10)
