"""Structured pruning that really shrinks a Vision Transformer, inside ``fit``.

:class:`PruningSchedule` removes embedding channels, attention head dimensions
(or whole heads) and MLP hidden channels with `torch-pruning`_, so the model's
weight matrices get smaller and its forward faster (mask pruning gives neither).
It prunes once at the start of fit or step by step over a schedule, keeps the
optimizer, LR scheduler and DDP wrapper consistent after each step, and records
every step in the checkpoint so that resuming and :func:`load_compressed` rebuild
the pruned shapes before the weights load.

.. _torch-pruning: https://github.com/VainF/Torch-Pruning
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._checks import (
    check_bool,
    check_choice,
    check_example_input,
    check_fraction,
    check_int,
    check_names,
)
from lightning_vitcompress._measure import count_macs, count_parameters, eval_mode
from lightning_vitcompress._model import find_attention_blocks, get_submodule, shape_example_input
from lightning_vitcompress._structure import Record, record_edit, recorded_edits, register_replay
from lightning_vitcompress._training_state import check_strategy_supported, refresh_after_structural_change

__all__ = ["PruningSchedule", "prune_vit"]

ImportanceName = Literal["l1", "l2", "taylor", "hessian", "random"]
ScheduleName = Literal["linear", "cubic"]

#: integer/float attributes that describe a module's shapes; replayed from the record
_SHAPE_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "normalized_shape",
    "num_features",
    "embedding_dim",
    "embed_dim",
    "head_hidden_size",
    "num_heads",
    "head_dim",
    "attn_dim",
    "scale",
    "kdim",
    "vdim",
)


# ---------------------------------------------------------------------------- importance
_IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": tp.importance.GroupTaylorImportance,
    "hessian": tp.importance.GroupHessianImportance,
    "random": tp.importance.RandomImportance,
}


def _make_importance(importance: Union[str, tp.importance.Importance]) -> tp.importance.Importance:
    if isinstance(importance, tp.importance.Importance):
        return importance
    check_choice(importance, "importance", sorted(_IMPORTANCES), " or a torch_pruning.importance.Importance object")
    return _IMPORTANCES[importance]()


def _gradient_kind(importance: tp.importance.Importance) -> Optional[str]:
    """``"taylor"`` / ``"hessian"`` when ``importance`` reads ``param.grad``, else ``None``."""
    if isinstance(importance, tp.importance.GroupHessianImportance):
        return "hessian"
    if isinstance(importance, tp.importance.GroupTaylorImportance):
        return "taylor"
    return None


def _schedule_fraction(schedule: Union[str, Callable[[float], float]], progress: float) -> float:
    """Fraction of the final pruning ratio reached at ``progress`` in (0, 1]."""
    if callable(schedule):
        return float(schedule(progress))
    if schedule == "linear":
        return progress
    return 1.0 - (1.0 - progress) ** 3  # cubic (Zhu & Gupta 2017): prune fast early, slow late


def _check_schedule(schedule: Any, num_steps: int) -> list[float]:
    """The fraction of the final ratio after each step; raises naming ``schedule`` unless it can be followed."""
    if not callable(schedule):
        check_choice(schedule, "schedule", ("linear", "cubic"), " or a callable progress -> fraction")
    fractions: list[Any] = []
    for step in range(1, num_steps + 1):
        value = schedule(step / num_steps) if callable(schedule) else _schedule_fraction(schedule, step / num_steps)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"schedule={schedule!r} returned {value!r} at progress {step}/{num_steps}: it must return the "
                "fraction of pruning_ratio reached, a number in [0, 1] (e.g. lambda progress: progress)."
            )
        fractions.append(float(value))
    if any(later < earlier for earlier, later in zip(fractions, fractions[1:])):
        raise ValueError(
            f"schedule={schedule!r} gives fractions {fractions} at steps 1..{num_steps}: pruned channels cannot come "
            "back, so the fractions must not decrease."
        )
    if fractions[-1] == 0.0:
        raise ValueError(
            f"schedule={schedule!r} gives fractions {fractions}: it never prunes. Return 1.0 at progress 1.0 to "
            "reach pruning_ratio."
        )
    return fractions


# ---------------------------------------------------------------------- model surgery
def _classifier_heads(model: nn.Module) -> list[nn.Module]:
    heads: list[nn.Module] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        found = get_classifier()
        heads.extend(found if isinstance(found, (tuple, list)) else [found])
    for name in ("head", "head_dist", "fc", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and module not in heads:
            heads.append(module)
    return [h for h in heads if isinstance(h, nn.Module) and any(True for _ in h.parameters())]


def _residual_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs are the residual stream (pruning them narrows the embedding)."""
    layers: list[nn.Module] = []
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and isinstance(getattr(patch_embed, "proj", None), nn.Module):
        layers.append(patch_embed.proj)
    for _, attn in find_attention_blocks(model):
        if isinstance(getattr(attn, "proj", None), nn.Linear):
            layers.append(attn.proj)
        if isinstance(attn, nn.MultiheadAttention):
            layers.append(attn)
    for module in model.modules():
        fc2 = getattr(module, "fc2", None)
        if isinstance(fc2, nn.Linear):
            layers.append(fc2)
        if isinstance(module, nn.TransformerEncoderLayer):
            layers.append(module.linear2)
    return layers


def _mlp_input_layers(model: nn.Module) -> list[nn.Module]:
    layers = []
    for module in model.modules():
        if isinstance(getattr(module, "fc1", None), nn.Linear):
            layers.append(module.fc1)
        if isinstance(module, nn.TransformerEncoderLayer):
            layers.append(module.linear1)
    return layers


def _timm_style_attention(model: nn.Module) -> list[nn.Module]:
    """Attention blocks with a fused ``qkv`` Linear (timm ``Attention``, our ``NystromAttention``)."""
    return [m for _, m in find_attention_blocks(model) if isinstance(getattr(m, "qkv", None), nn.Linear)]


def _shape_snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    snapshot: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        tensors = {n: list(t.shape) for n, t in module.named_parameters(recurse=False)}
        tensors.update({n: list(t.shape) for n, t in module.named_buffers(recurse=False) if t is not None})
        attrs = {}
        for attr in _SHAPE_ATTRIBUTES:
            value = module.__dict__.get(attr)
            if isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
                continue
            attrs[attr] = list(value) if isinstance(value, (tuple, list)) else value
        snapshot[name] = {"tensors": tensors, "attrs": attrs}
    return snapshot


def _shape_changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name, now in after.items():
        old = before.get(name, {"tensors": {}, "attrs": {}})
        tensors = {n: s for n, s in now["tensors"].items() if old["tensors"].get(n) != s}
        attrs = {a: v for a, v in now["attrs"].items() if old["attrs"].get(a) != v}
        if tensors or attrs:
            changes[name] = {"tensors": tensors, "attrs": attrs}
    return changes


@register_replay("prune")
def _replay_prune(model: nn.Module, record: Record) -> None:
    """Give ``model`` the shapes a pruning step left; the state dict fills in the weights."""
    for name, change in record["modules"].items():
        module = get_submodule(model, name)
        for tensor_name, shape in change["tensors"].items():
            if tensor_name in module._parameters:
                old = module._parameters[tensor_name]
                assert old is not None
                module._parameters[tensor_name] = nn.Parameter(
                    old.new_zeros(shape), requires_grad=old.requires_grad
                )
            elif tensor_name in module._buffers:
                old_buffer = module._buffers[tensor_name]
                assert old_buffer is not None
                module._buffers[tensor_name] = old_buffer.new_zeros(shape)
            else:
                raise KeyError(f"Pruning record names {name}.{tensor_name}, which {type(module).__name__} lacks.")
        for attr, value in change["attrs"].items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)


def _fix_attention(model: nn.Module, num_heads: dict[nn.Module, int], scales: dict[nn.Module, float]) -> None:
    """After torch-pruning: update head bookkeeping and keep each block's softmax scale.

    timm's fused path calls ``scaled_dot_product_attention`` without ``scale=``,
    i.e. with ``1/sqrt(head_dim)`` of the *current* head_dim. We fold the ratio
    ``old_scale * sqrt(new_head_dim)`` into the query projection (rows of
    ``qkv``, or the affine ``q_norm``) and set ``scale`` to the new default, so
    the fused and the eager paths both compute exactly the trained attention.
    """
    for attn in _timm_style_attention(model):
        attn_dim = attn.qkv.out_features // 3
        heads = num_heads.get(attn.qkv, attn.num_heads)
        head_dim = attn_dim // heads
        old_scale = scales[attn]
        new_scale = head_dim**-0.5
        factor = old_scale / new_scale
        attn.num_heads, attn.head_dim, attn.attn_dim, attn.scale = heads, head_dim, attn_dim, new_scale
        if math.isclose(factor, 1.0, rel_tol=1e-12):
            continue
        with torch.no_grad():
            q_norm = getattr(attn, "q_norm", None)
            if isinstance(q_norm, nn.Module) and not isinstance(q_norm, nn.Identity):
                for param in q_norm.parameters(recurse=False):
                    param.mul_(factor)
            else:
                attn.qkv.weight[:attn_dim].mul_(factor)
                if attn.qkv.bias is not None:
                    attn.qkv.bias[:attn_dim].mul_(factor)


def prunable_widths(model: nn.Module) -> dict[str, list[int]]:
    """The widths pruning acts on: ``{"embed": [E], "<qkv name>": [heads, head_dim], "<fc1 name>": [hidden]}``."""
    widths: dict[str, list[int]] = {}
    conv = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(conv, nn.Conv2d):
        widths["embed"] = [conv.out_channels]
    names = {module: name for name, module in model.named_modules()}
    for attn in _timm_style_attention(model):
        widths[names[attn.qkv]] = [int(attn.num_heads), attn.qkv.out_features // 3 // int(attn.num_heads)]
    for fc1 in _mlp_input_layers(model):
        widths[names[fc1]] = [fc1.out_features]
    return widths


def widths_after(original: dict[str, list[int]], ratio: float, prune_heads: bool) -> dict[str, list[int]]:
    """The widths a one-shot uniform prune of ``original`` by ``ratio`` leaves (torch-pruning's rounding)."""
    keep: dict[str, list[int]] = {}
    for name, width in original.items():
        if len(width) == 2:  # attention: [heads, head_dim]
            heads, head_dim = width
            if prune_heads:
                keep[name] = [heads - math.ceil(ratio * heads), head_dim]
            else:
                keep[name] = [heads, int(head_dim * (1 - ratio))]
        else:
            keep[name] = [int(width[0] * (1 - ratio))]
    return keep


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


class _Snapshot:
    """What pruning may change in ``model``: each module's attributes, its tensors' objects, values and grads.

    ``restore()`` puts all of it back in place, so a failed or trial prune leaves
    the very same objects (the optimizer keeps pointing at the right tensors).
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (module, {key: copy.copy(value) if isinstance(value, dict) else value
                      for key, value in vars(module).items()})
            for module in model.modules()
        ]
        tensors = [*model.parameters(), *model.buffers()]
        self.tensors = [(tensor, tensor.data.clone(), tensor.grad) for tensor in tensors]

    def restore(self) -> None:
        for module, attributes in self.modules:
            vars(module).clear()
            vars(module).update(attributes)
        for tensor, data, grad in self.tensors:
            tensor.data = data
            tensor.grad = grad


def prune_vit(
    model: nn.Module,
    pruning_ratio: float,
    example_input: torch.Tensor,
    *,
    importance: Union[str, tp.importance.Importance] = "l2",
    global_pruning: bool = False,
    round_to: Optional[int] = None,
    prune_embed_dim: bool = True,
    prune_attention: bool = True,
    prune_heads: bool = False,
    prune_mlp: bool = True,
    ignored_layers: Sequence[nn.Module] = (),
    keep: Optional[dict[str, list[int]]] = None,
) -> dict[str, Any]:
    """Prune ``model`` in place by ``pruning_ratio`` of its current prunable channels.

    With ``keep`` (widths as in :func:`prunable_widths`) and uniform pruning,
    each layer is pruned to exactly those widths instead (``pruning_ratio``
    then only applies to layers ``keep`` does not name).

    Returns the shape changes (``{module name: {"tensors": ..., "attrs": ...}}``)
    that :func:`_replay_prune` reapplies. Under DDP the channels chosen on rank 0
    are used on every rank. On an error the model may be half pruned: work on a
    copy (``PruningSchedule`` restores the model from a snapshot instead).

    Example::

        vit = timm.create_model("vit_base_patch16_224")
        prune_vit(vit, 0.5, torch.randn(1, 3, 224, 224))
    """
    imp = _make_importance(importance)
    attentions = _timm_style_attention(model)
    ignored: list[nn.Module] = [*_classifier_heads(model), *ignored_layers]
    if not prune_embed_dim:
        ignored.extend(_residual_layers(model))
    if not prune_mlp:
        ignored.extend(_mlp_input_layers(model))
    if not prune_attention:
        ignored.extend(attn.qkv for attn in attentions)
    num_heads = {attn.qkv: attn.num_heads for attn in attentions}
    scales = {attn: float(attn.scale) for attn in attentions}
    if not prune_embed_dim:  # nn.MultiheadAttention's outputs are the residual stream
        ignored.extend(m for _, m in find_attention_blocks(model) if isinstance(m, nn.MultiheadAttention))

    ratio_dict: dict[nn.Module, float] = {}
    head_ratio_dict: dict[nn.Module, float] = {}
    if keep is not None and not global_pruning:
        current = prunable_widths(model)
        modules = dict(model.named_modules())
        for name, width in current.items():
            target = keep.get(name)
            if target is None:
                continue
            if name == "embed":
                for layer in _residual_layers(model):
                    ratio_dict[layer] = _ratio_to_keep(width[0], target[0])
            elif len(width) == 2 and prune_heads:
                removed = width[0] - target[0]
                head_ratio_dict[modules[name]] = max(removed - 0.5, 0.0) / width[0]
            elif len(width) == 2:
                ratio_dict[modules[name]] = _ratio_to_keep(width[1], target[1])
            else:
                ratio_dict[modules[name]] = _ratio_to_keep(width[0], target[0])

    training = {module: module.training for module in model.modules()}  # tracing switches to eval
    before = _shape_snapshot(model)
    # torch-pruning cannot trace the landmark branch of NystromAttention (it reads its token concat as a
    # channel concat); with landmarks >= tokens the module runs exact attention, whose graph is timm's
    landmarks = {a: a.num_landmarks for a in attentions if isinstance(getattr(a, "num_landmarks", None), int)}
    for attn in landmarks:
        attn.num_landmarks = 2**31
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            importance=imp,
            global_pruning=global_pruning,
            pruning_ratio=pruning_ratio,
            ignored_layers=ignored,
            round_to=round_to,
            num_heads=num_heads,
            prune_num_heads=prune_heads,
            prune_head_dims=not prune_heads,
            head_pruning_ratio=pruning_ratio if prune_heads else 0.0,
            pruning_ratio_dict=ratio_dict or None,
            head_pruning_ratio_dict=head_ratio_dict or None,
            # class/distillation/register tokens and position embeddings: their last dim is the embedding
            unwrapped_parameters=[(p, p.dim() - 1) for p in model.parameters(recurse=False) if p.dim() >= 2],
        )
    finally:
        for attn, count in landmarks.items():
            attn.num_landmarks = count
    for group in pruner.step(interactive=True):
        root_idxs = _broadcast([int(i) for i in group[0].idxs])
        group.prune(idxs=root_idxs)
    _fix_attention(model, pruner.num_heads, scales)
    for module, flag in training.items():
        module.training = flag
    width = getattr(model, "patch_embed", None)
    proj = getattr(width, "proj", None)
    if isinstance(proj, nn.Conv2d):  # timm ViT keeps its width in a few attributes
        for attr in ("embed_dim", "num_features", "head_hidden_size"):
            if isinstance(model.__dict__.get(attr), int):
                setattr(model, attr, proj.out_channels)
    return _shape_changes(before, _shape_snapshot(model))


# ---------------------------------------------------------------------------- callback
class PruningSchedule(CompressionCallback):
    r"""Structured pruning of a ViT inside ``fit``: the model really gets smaller and faster.

    Removes the least important embedding channels, attention head dimensions
    (or whole heads) and MLP hidden channels with torch-pruning; classifier
    heads keep their outputs. With the default ``start_epoch=0`` and
    ``num_steps=1`` it prunes once at ``setup`` (before the optimizer exists)
    and the rest of fit fine-tunes; otherwise it prunes ``num_steps`` times from
    ``start_epoch`` to ``end_epoch`` following ``schedule`` and fine-tunes in
    between, rebuilding optimizers, LR schedulers and the DDP wrapper each time.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[PruningSchedule(0.5, end_epoch=4, num_steps=5)])
        trainer.fit(model, datamodule)
        model = load_compressed(MyModule, "last.ckpt")  # pruned shapes rebuilt, weights loaded

    Args:
        pruning_ratio: final fraction to remove, in (0, 1): of each layer's channels
            (``target="channels"``), or of the parameters / MACs (``target="params"``/``"macs"``).
        start_epoch: epoch of the first pruning step.
        end_epoch: epoch of the last one (default ``start_epoch``): steps are spread
            evenly over epochs ``start_epoch..end_epoch`` (``interval="epoch"``) or over
            their training steps (``interval="step"``).
        num_steps: number of pruning steps (default: one per epoch from start to end,
            or 1 with ``interval="step"``).
        schedule: ``"linear"``, ``"cubic"`` or ``f(progress) -> fraction of the final
            ratio`` with ``progress = k / num_steps`` for step ``k = 1..num_steps``.
        interval: prune at ``"epoch"`` starts or at training-batch (``"step"``) boundaries.
        importance: ``"l2"``, ``"l1"``, ``"taylor"``, ``"hessian"``, ``"random"`` or a
            ``torch_pruning`` importance object. Taylor/Hessian average the gradients of
            the ``gradient_batches`` training batches after a step falls due, then prune.
        global_pruning: rank channels across all layers (widths then differ per layer)
            instead of removing the same fraction in every layer.
        round_to: keep widths multiples of this (e.g. 8 for fast kernels).
        target: what ``pruning_ratio`` measures (``"channels"``, ``"params"``, ``"macs"``).
        prune_embed_dim / prune_attention / prune_heads / prune_mlp: what may be pruned;
            ``prune_heads=True`` removes whole heads instead of head dimensions.
        ignored_layers: attribute paths (inside the ViT) of layers whose outputs stay.
        gradient_batches: training batches whose gradients Taylor/Hessian importance averages.
        seed: seed of ``importance="random"`` (all ranks draw the same channels).
        example_input: one input batch to trace the model with; needed for models without
            a timm ``patch_embed`` (e.g. ``nn.TransformerEncoder`` ones).
        model_attribute: attribute of the LightningModule holding the ViT (default: found).
    """

    order = 20
    KIND = "prune"

    def __init__(
        self,
        pruning_ratio: float = 0.5,
        *,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        num_steps: Optional[int] = None,
        schedule: Union[ScheduleName, Callable[[float], float]] = "linear",
        interval: Literal["epoch", "step"] = "epoch",
        importance: Union[ImportanceName, tp.importance.Importance] = "l2",
        global_pruning: bool = False,
        round_to: Optional[int] = None,
        target: Literal["channels", "params", "macs"] = "channels",
        prune_embed_dim: bool = True,
        prune_attention: bool = True,
        prune_heads: bool = False,
        prune_mlp: bool = True,
        ignored_layers: Sequence[str] = (),
        gradient_batches: int = 4,
        seed: int = 0,
        example_input: Optional[torch.Tensor] = None,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        check_fraction(pruning_ratio, "pruning_ratio", "0.5 to remove half")
        check_int(start_epoch, "start_epoch", example="0 (prune at setup)")
        end_epoch = start_epoch if end_epoch is None else end_epoch
        check_int(end_epoch, "end_epoch", minimum=start_epoch, example=f"{start_epoch} (start_epoch={start_epoch})")
        check_choice(interval, "interval", ("epoch", "step"))
        if num_steps is None:
            num_steps = end_epoch - start_epoch + 1 if interval == "epoch" else 1
        check_int(num_steps, "num_steps", minimum=1, example="3 pruning steps")
        if interval == "epoch" and num_steps > end_epoch - start_epoch + 1:
            raise ValueError(
                f"num_steps={num_steps} does not fit into epochs {start_epoch}..{end_epoch} at one step per epoch; "
                f"use num_steps <= {end_epoch - start_epoch + 1}, a later end_epoch, or interval='step'."
            )
        self._fractions = _check_schedule(schedule, num_steps)
        check_choice(target, "target", ("channels", "params", "macs"))
        for name, flag in [("global_pruning", global_pruning), ("prune_embed_dim", prune_embed_dim),
                           ("prune_attention", prune_attention), ("prune_heads", prune_heads),
                           ("prune_mlp", prune_mlp)]:
            check_bool(flag, name)
        if not (prune_embed_dim or prune_attention or prune_mlp):
            raise ValueError("prune_embed_dim, prune_attention and prune_mlp are all False: nothing would be pruned.")
        check_int(round_to, "round_to", minimum=1, example="8 (channel multiple)", allow_none=True)
        self.ignored_layers = check_names(ignored_layers, "ignored_layers", "['blocks.0.mlp.fc1']")
        check_int(gradient_batches, "gradient_batches", minimum=1, example="4")
        check_int(seed, "seed", example="0")
        check_example_input(example_input)
        self.importance = _make_importance(importance)  # validates the name early
        self.importance_name = importance if isinstance(importance, str) else type(importance).__name__
        self.pruning_ratio = float(pruning_ratio)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.num_steps = num_steps
        self.schedule = schedule
        self.interval = interval
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.target_metric = target
        self.prune_embed_dim = prune_embed_dim
        self.prune_attention = prune_attention
        self.prune_heads = prune_heads
        self.prune_mlp = prune_mlp
        self.gradient_batches = gradient_batches
        self.seed = seed
        self.user_example_input = example_input
        self.steps_done = 0
        self._channel_ratio: Optional[float] = None  # pruning_ratio translated to channels
        self._example_input: Optional[torch.Tensor] = None
        self._original_widths: Optional[dict[str, list[int]]] = None
        self._original_params = 0
        self._grad_sums: dict[int, torch.Tensor] = {}
        self._grad_batches = 0
        self._gathering = False

    # ----------------------------------------------------------------- schedule
    def ratio_after_step(self, step: int) -> float:
        """Channel ratio reached after pruning step ``step`` (1-based)."""
        assert self._channel_ratio is not None
        return self._fractions[step - 1] * self._channel_ratio

    def _step_offsets(self, units: int) -> list[int]:
        return [math.floor(k * units / self.num_steps) for k in range(self.num_steps)]

    def _steps_due(self, trainer: "pl.Trainer", position_in_epoch: int = 0) -> int:
        """How many pruning steps should have run at this epoch / batch boundary."""
        if self.interval == "epoch":
            offsets = self._step_offsets(self.end_epoch - self.start_epoch + 1)
            position = trainer.current_epoch - self.start_epoch
        else:
            per_epoch = max(1, int(trainer.num_training_batches)) if math.isfinite(trainer.num_training_batches) else 1
            offsets = self._step_offsets((self.end_epoch - self.start_epoch + 1) * per_epoch)
            position = (trainer.current_epoch - self.start_epoch) * per_epoch + position_in_epoch
        return sum(1 for offset in offsets if offset <= position) if position >= 0 else 0

    def resume_config(self) -> dict[str, Any]:
        schedule = self.schedule if isinstance(self.schedule, str) else self._fractions
        return {
            "pruning_ratio": self.pruning_ratio,
            "target": self.target_metric,
            "importance": self.importance_name,
            "prune_heads": self.prune_heads,
            "prune_embed_dim": self.prune_embed_dim,
            "prune_attention": self.prune_attention,
            "prune_mlp": self.prune_mlp,
            "global_pruning": self.global_pruning,
            "round_to": self.round_to,
            "ignored_layers": list(self.ignored_layers),
            "start_epoch": self.start_epoch,
            "end_epoch": self.end_epoch,
            "num_steps": self.num_steps,
            "interval": self.interval,
            "schedule": schedule,
        }

    @property
    def _needs_gradients(self) -> bool:
        return _gradient_kind(self.importance) is not None

    # ------------------------------------------------------------------- setup
    def _example(self, model: nn.Module) -> torch.Tensor:
        if self.user_example_input is not None:
            device = next(model.parameters()).device
            example = self.user_example_input[:1].to(device)
            try:
                with torch.no_grad(), eval_mode(model):
                    model(example)
            except Exception as err:
                raise ValueError(
                    f"example_input=<tensor of shape {tuple(self.user_example_input.shape)}> does not run through "
                    f"{type(model).__name__}: pass one input batch the model takes. It said: "
                    f"{type(err).__name__}: {err}"
                ) from err
            return example
        example = shape_example_input(model)
        if example is not None:
            return example
        raise ValueError(
            f"Cannot build an example input for {type(model).__name__} (no timm patch_embed): pass "
            "example_input=<one input batch> so that torch-pruning can trace the model."
        )

    def _check_prunable(self, model: nn.Module) -> None:
        mha = [name for name, m in find_attention_blocks(model) if isinstance(m, nn.MultiheadAttention)]
        if mha and (self.prune_attention or self.prune_embed_dim):
            raise ValueError(
                f"{mha[0]} is an nn.MultiheadAttention, whose head width is tied to embed_dim: torch-pruning "
                "cannot narrow its heads without the residual stream. Pass prune_attention=False and "
                "prune_embed_dim=False to prune only the MLP channels of this model."
            )
        qk_norm = [
            a for a in _timm_style_attention(model) if not isinstance(getattr(a, "q_norm", nn.Identity()), nn.Identity)
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
                    f"ignored_layers={self.ignored_layers!r}: {name!r} is not a module of {type(model).__name__}; "
                    f"name layers inside the ViT, e.g. {modules}."
                ) from err
        prunable = []
        if self.prune_mlp:
            prunable += _mlp_input_layers(model)
        if self.prune_attention:
            prunable += _timm_style_attention(model)
        if self.prune_embed_dim:
            prunable += _residual_layers(model)
        if not prunable:
            raise ValueError(
                f"Nothing prunable in {type(model).__name__} with prune_embed_dim={self.prune_embed_dim}, "
                f"prune_attention={self.prune_attention}, prune_mlp={self.prune_mlp}: PruningSchedule prunes timm "
                "ViT/DeiT blocks (attn.qkv/proj, mlp.fc1/fc2) and nn.TransformerEncoderLayer MLPs."
            )

    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy_supported(trainer, type(self).__name__)
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.end_epoch >= max_epochs:
            raise ValueError(
                f"end_epoch={self.end_epoch} is past the last epoch of this fit (max_epochs={max_epochs} runs epochs "
                f"0..{max_epochs - 1}): pass end_epoch <= {max_epochs - 1} or raise max_epochs."
            )
        model = self.target(pl_module)
        self._check_prunable(model)
        self._example_input = self._example(model)
        self._reset_gradients()
        # the steps already applied: replayed from the checkpoint, or made by an earlier fit of this module
        done = [
            r for r in recorded_edits(pl_module) if r.get("kind") == self.KIND and r.get("target") == self.target_path
        ]
        if done:
            self.check_same_config(done[-1].get("config"), "the pruning an earlier fit applied to this model")
            self.steps_done = int(done[-1]["step"])
            self._channel_ratio = done[-1]["channel_ratio_final"]
            self._original_widths = done[-1]["original_widths"]
            self._original_params = done[-1]["original_params"]
            return  # steps still due run at their epoch / batch boundary
        self.steps_done = 0
        self._original_widths = prunable_widths(model)
        self._original_params = count_parameters(model)
        self._channel_ratio = self._resolve_channel_ratio(model)
        self._check_ratio_prunes(self._channel_ratio)
        if self.resumed(trainer):
            return  # the checkpoint's unpruned weights load after setup: due steps run at the first epoch start
        # steps due before any training (epoch 0 start) are free at setup, unless they need gradients
        if not self._needs_gradients and self.start_epoch == 0:
            due = self._steps_due_at_start() if self.interval == "epoch" else int(self.num_steps == 1)
            if due:
                self._prune_to(trainer, pl_module, due)

    def _steps_due_at_start(self) -> int:
        units = self.end_epoch - self.start_epoch + 1
        return sum(1 for offset in self._step_offsets(units) if offset <= 0)

    # ----------------------------------------------------------- ratio checks
    def _cut_widths(self, widths: dict[str, list[int]]) -> dict[str, int]:
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

    def _removed(self, name: str, width: int, ratio: float) -> int:
        """Channels (or whole heads) torch-pruning removes from ``width`` at channel ``ratio``."""
        assert self._original_widths is not None
        if self.prune_heads and len(self._original_widths[name]) == 2:
            return math.ceil(ratio * width)
        removed = width - int(width * (1 - ratio))
        return removed - removed % self.round_to if self.round_to else removed

    def _check_ratio_prunes(self, ratio: float) -> None:
        """Refuse a ratio that empties a layer (torch-pruning then skips it) or removes nothing."""
        assert self._original_widths is not None
        cut = self._cut_widths(self._original_widths)
        if not cut:
            return
        emptied = [name for name, width in cut.items() if width - self._removed(name, width, ratio) < 1]
        largest = math.floor(min((width - 1) / width for width in cut.values()) * 1000) / 1000
        given = f"pruning_ratio={self.pruning_ratio!r}" + (
            f" (target={self.target_metric!r}: channel ratio {ratio:.3f})" if self.target_metric != "channels" else ""
        )
        if emptied:
            raise ValueError(
                f"{given} would remove every channel of {emptied[0]} ({cut[emptied[0]]}), which torch-pruning then "
                f"leaves unpruned: pass pruning_ratio <= {largest:.3f} for this model."
            )
        if all(self._removed(name, width, ratio) == 0 for name, width in cut.items()):
            raise ValueError(
                f"{given} removes no channel with round_to={self.round_to}: pass a larger pruning_ratio "
                f"(at least {self.round_to / max(cut.values()):.3f}) or a smaller round_to."
            )

    def _fraction_removed(self, model: nn.Module) -> float:
        """The fraction of the prunable channels the model has lost so far (what it really is, not the target)."""
        assert self._original_widths is not None
        current = prunable_widths(model)
        names = self._cut_widths(self._original_widths)
        before = sum(math.prod(self._original_widths[name]) for name in names)
        after = sum(math.prod(current[name]) for name in names if name in current)
        return 1.0 - after / max(1, before)

    def _resolve_channel_ratio(self, model: nn.Module) -> float:
        """Translate a params/MACs target into a channel ratio by bisection (pruning and restoring the model)."""
        if self.target_metric == "channels":
            return self.pruning_ratio
        example = self._example_input
        measure = (lambda m: count_parameters(m)) if self.target_metric == "params" else (
            lambda m: count_macs(m, example) or 0
        )
        assert self._original_widths is not None
        base = measure(model)

        def reduction(ratio: float) -> float:
            snapshot = _Snapshot(model)
            try:
                self._prune_model(model, ratio, importance="l2")
                return 1.0 - measure(model) / base
            finally:
                snapshot.restore()

        cut = self._cut_widths(self._original_widths)
        low, high = 0.0, min((width - 1) / width for width in cut.values())
        most = reduction(high)
        if most < self.pruning_ratio:
            raise ValueError(
                f"pruning_ratio={self.pruning_ratio!r} with target={self.target_metric!r} is out of reach: keeping "
                f"one channel in every pruned layer removes {most:.3f} of the {self.target_metric}. Pass "
                f"pruning_ratio <= {math.floor(most * 1000) / 1000:.3f}."
            )
        for _ in range(12):
            mid = (low + high) / 2
            if reduction(mid) < self.pruning_ratio:
                low = mid
            else:
                high = mid
        rank_zero_info(
            f"PruningSchedule: removing {self.pruning_ratio:.0%} of the {self.target_metric} needs a channel ratio "
            f"of {high:.3f}."
        )
        return high

    # ---------------------------------------------------------------- pruning
    def _prune_model(
        self, model: nn.Module, ratio: float, importance: Any = None, keep: Optional[dict[str, list[int]]] = None
    ) -> dict[str, Any]:
        assert self._example_input is not None
        return prune_vit(
            model,
            ratio,
            self._example_input,
            importance=self.importance if importance is None else importance,
            global_pruning=self.global_pruning,
            round_to=self.round_to,
            prune_embed_dim=self.prune_embed_dim,
            prune_attention=self.prune_attention,
            prune_heads=self.prune_heads,
            prune_mlp=self.prune_mlp,
            ignored_layers=[get_submodule(model, name) for name in self.ignored_layers],
            keep=keep,
        )

    def _prune_to(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int) -> None:
        """Prune from the ratio of step ``self.steps_done`` to that of ``step``; on failure, restore the model."""
        model = self.target(pl_module)
        previous = self.ratio_after_step(self.steps_done) if self.steps_done else 0.0
        reached = self.ratio_after_step(step)
        # the fraction of the *current* channels to remove; a hair less guards int() flooring
        relative = max(0.0, 1.0 - (1.0 - reached) / (1.0 - previous) - 1e-6)
        if relative <= 0.0:
            self.steps_done = step
            return
        assert self._original_widths is not None and self._example_input is not None
        keep = widths_after(self._original_widths, reached, self.prune_heads)
        params_before = count_parameters(model)
        snapshot = _Snapshot(model)  # pruning works in place (the module may be the LightningModule itself)
        try:
            if _gradient_kind(self.importance) is not None:
                self._load_gradients(model)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + step)  # random importance: the same draw on every rank
                changes = self._prune_model(model, relative, keep=keep)
            params, macs = count_parameters(model), count_macs(model, self._example_input)
            ratio = self._fraction_removed(model)
            record_edit(
                pl_module,
                {
                    "kind": self.KIND,
                    "target": self.target_path or "",
                    "step": step,
                    "num_steps": self.num_steps,
                    "channel_ratio": reached,
                    "channel_ratio_final": self._channel_ratio,
                    "fraction_removed": ratio,
                    "original_widths": self._original_widths,
                    "original_params": self._original_params,
                    "params": params,
                    "macs": macs,
                    "modules": changes,
                    "config": self.resume_config(),
                },
            )
        except Exception as err:
            snapshot.restore()
            raise RuntimeError(
                f"PruningSchedule step {step}/{self.num_steps} (to channel ratio {reached:.3f}) failed; the model was "
                f"restored to how it was before this step. Cause: {type(err).__name__}: {err}"
            ) from err
        finally:
            for param in model.parameters():
                param.grad = None
        self._reset_gradients()
        self.steps_done = step
        self._last_metrics = {
            "prune/params": float(params),
            "prune/params_ratio": params / max(1, self._original_params),
            "prune/ratio": ratio,
            "prune/step": float(step),
        }
        if macs is not None:
            self._last_metrics["prune/macs"] = float(macs)
        rank_zero_info(
            f"PruningSchedule step {step}/{self.num_steps}: {ratio:.3f} of the prunable channels removed, "
            f"params {params_before:,} -> {params:,}" + (f", MACs/image {macs:,}" if macs is not None else "")
        )

    def _maybe_prune(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", position_in_epoch: int) -> None:
        due = self._steps_due(trainer, position_in_epoch)
        if due <= self.steps_done:
            return
        if self._needs_gradients and self._grad_batches < self.gradient_batches:
            self._gathering = True  # gather gradients of the next batches, then prune (checked at each batch start)
            return
        self._prune_to(trainer, pl_module, due)
        refresh_after_structural_change(trainer)

    def ordered_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.interval == "epoch" and not self._needs_gradients:
            self._maybe_prune(trainer, pl_module, 0)

    def ordered_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step" or self._needs_gradients:
            self._maybe_prune(trainer, pl_module, batch_idx if self.interval == "step" else 0)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        metrics = getattr(self, "_last_metrics", None)
        if metrics:
            for name, value in metrics.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
            self._last_metrics = {}

    # --------------------------------------------------------------- gradients
    def _reset_gradients(self) -> None:
        self._grad_sums = {}
        self._grad_batches = 0
        self._gathering = False

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._gathering:
            return
        square = _gradient_kind(self.importance) == "hessian"
        with torch.no_grad():
            for param in self.target(pl_module).parameters():
                if param.grad is None:
                    continue
                grad = param.grad.detach()
                grad = grad * grad if square else grad
                total = self._grad_sums.get(id(param))
                if total is not None and total.shape == grad.shape:
                    total += grad
                else:
                    self._grad_sums[id(param)] = grad.clone()
        self._grad_batches += 1

    def _load_gradients(self, model: nn.Module) -> None:
        """Put the mean accumulated gradient of each parameter of ``model`` in its ``.grad``."""
        count = max(1, self._grad_batches)
        for param in model.parameters():
            total = self._grad_sums.get(id(param))
            param.grad = None if total is None else total / count

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        # "config" lets a resumed fit refuse changed arguments also before the first pruning step
        return {"steps_done": self.steps_done, "channel_ratio": self._channel_ratio, "config": self.resume_config()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the replayed records are authoritative for the structure and the steps done."""
