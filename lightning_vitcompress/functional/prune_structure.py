"""A pruned model's structure: its widths, the record that rebuilds it, and reading it back from a state dict.

:func:`~lightning_vitcompress.functional.prune_vit` narrows a ViT and records
the shapes it left (:func:`shape_changes`); :func:`replay_prune` gives a freshly
built model those shapes again. Where a file holds no records, :func:`read_pruned`
reads them from the saved tensors: the saved shapes (pruning only narrows), and
the attributes that follow from them (``in_features``, ``normalized_shape``, the
ViT's ``embed_dim``, each attention's head layout). :mod:`~lightning_vitcompress.functional.prune`
registers both with :mod:`lightning_vitcompress._registry`.

Example (a two-block ``vit_tiny_patch16_224``)::

    >>> import timm
    >>> from lightning_vitcompress.functional.prune_structure import prunable_widths, widths_after
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> prunable_widths(vit)
    {'embed': [192], 'blocks.0.attn.qkv': [3, 64], 'blocks.1.attn.qkv': [3, 64], 'blocks.0.mlp.fc1': [768], 'blocks.1.mlp.fc1': [768]}
    >>> widths_after(prunable_widths(vit), 0.5, prune_heads=False)["blocks.0.attn.qkv"]   # 3 heads of 32 dims
    [3, 32]
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress._model import get_submodule, is_attention_block
from lightning_vitcompress._registry import Record, SavedModel
from lightning_vitcompress._state_dict_structure import StructureMismatchError
from lightning_vitcompress._structure import shape_changes, shape_snapshot
from lightning_vitcompress.models import ModelAdapter, adapter_for
from lightning_vitcompress.models.base import is_attention_pool, read_layout

__all__ = ["HEADS_BUFFER", "prepare_saved", "prunable_widths", "read_pruned", "replay_prune", "widths_after"]

#: a pruned timm ``Attention`` keeps its head count in this buffer (a scalar int64): from the shapes
#: alone 4 heads of 4 dims and 2 heads of 8 look the same, so a bare state dict needs it
#: (:class:`~lightning_vitcompress.NystromAttention` keeps it in its extra state instead)
HEADS_BUFFER = "vitcompress_num_heads"


# ---------------------------------------------------------------------------- widths
def prunable_widths(model: nn.Module) -> dict[str, list[int]]:
    """The widths pruning acts on: ``{"embed": [E], "<attention>": [heads, head_dim], "<MLP input>": [hidden]}``.

    Attention widths are keyed by the name of the layer torch-pruning groups heads
    by (timm ``qkv``, transformers ``q_proj``), or of the ``nn.MultiheadAttention``.
    """
    adapter = adapter_for(model)
    names = {module: name for name, module in model.named_modules()}
    widths: dict[str, list[int]] = {"embed": [adapter.embed_dim()]}
    for layout in adapter.layouts():
        key = layout.module if layout.kind == "in_proj" else layout.head_projections[0]
        widths[names[key]] = [layout.num_heads, layout.head_dim]
    for linear in adapter.mlp_input_layers():
        widths[names[linear]] = [linear.out_features]
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


# ---------------------------------------------------------------------------- replay
def replay_prune(model: nn.Module, record: Record) -> None:
    """Give ``model`` the shapes a pruning step left; the state dict fills in the weights."""
    adapter = _adapter_or_none(model)  # before the edit: it remembers the widths to update
    if adapter is not None:
        adapter.prepare_pruning()
    for name, change in record["modules"].items():
        module = get_submodule(model, name)
        parameters = dict(module.named_parameters(recurse=False, remove_duplicate=False))
        buffers = dict(module.named_buffers(recurse=False, remove_duplicate=False))
        for tensor_name, shape in change["tensors"].items():
            if tensor_name in parameters:  # nn.Module's setattr replaces a registered parameter / buffer in place
                old = parameters[tensor_name]
                setattr(module, tensor_name, nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad))
            elif tensor_name in buffers:
                setattr(module, tensor_name, buffers[tensor_name].new_zeros(shape))
            elif tensor_name == HEADS_BUFFER:
                module.register_buffer(HEADS_BUFFER, torch.zeros(shape, dtype=torch.int64))
            else:
                raise KeyError(f"Pruning record names {name}.{tensor_name}, which {type(module).__name__} lacks.")
        for attr, value in change["attrs"].items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    if adapter is not None:  # model-level widths (torchvision hidden_dim, transformers config)
        adapter.fix_model_attributes()


def _adapter_or_none(model: nn.Module) -> Optional[ModelAdapter]:
    try:
        return adapter_for(model)
    except (TypeError, ValueError):  # a record of a model no adapter reads: the record's attributes are all
        return None


# ---------------------------------------------------------------------------- reading a state dict
def prepare_saved(saved: SavedModel) -> None:
    """Put a pruned model's tensors in their traceable form (e.g. EVA's q/v biases folded into ``qkv.bias``)."""
    with contextlib.suppress(TypeError, ValueError):  # no adapter reads it: only int8 applies
        adapter_for(saved.model).prepare_pruning(saved.state_dict)


def read_pruned(saved: SavedModel) -> list[Record]:
    """The prune record (its ``"modules"``) that gives ``saved.model`` the saved shapes; none when they match.

    Uses what the other readers found: the blocks saved as Nyström attention
    (their head layout) and the ``nn.MultiheadAttention`` saved split into ``qkv``.

    Raises:
        StructureMismatchError: a saved tensor is wider than the module's, or
            the head count of a pruned attention cannot be told from the shapes.
    """
    nystrom = saved.found.get("nystrom", {})
    tensors = _with_multihead_keys(saved.state_dict, saved.found.get("split_attention", []))
    pruned = _pruned_shapes(saved.model, tensors, nystrom, saved.prefix)
    return [{"modules": pruned}] if pruned else []


def _with_multihead_keys(saved: Mapping[str, Any], split: list[str]) -> Mapping[str, Any]:
    """``saved`` with the split attentions' ``qkv`` keys under ``nn.MultiheadAttention``'s names, for their shapes."""
    if not split:
        return saved
    renamed = dict(saved)
    for name in split:
        for old, new in (("qkv.weight", "in_proj_weight"), ("qkv.bias", "in_proj_bias")):
            if f"{name}.{old}" in renamed:
                renamed[f"{name}.{new}"] = renamed.pop(f"{name}.{old}")
    return renamed


def _pruned_shapes(
    model: nn.Module, saved: Mapping[str, Any], nystrom: Mapping[str, dict[str, Any]], prefix: str
) -> dict[str, Any]:
    """The ``"modules"`` of a prune record: saved shapes and the attributes that follow from them."""
    before = shape_snapshot(model)
    after = copy.deepcopy(before)
    modules = dict(model.named_modules())
    for name, entry in after.items():
        dot = f"{name}." if name else ""
        for tensor_name, shape in entry["tensors"].items():
            value = saved.get(dot + tensor_name)
            if not isinstance(value, torch.Tensor) or list(value.shape) == shape:
                continue  # absent or renamed (check_structure reports it), or unchanged
            saved_shape = list(value.shape)
            if len(saved_shape) != len(shape) or any(s > b for s, b in zip(saved_shape, shape)):
                owner = prefix + name if name else prefix[:-1] or "(root)"
                raise StructureMismatchError(
                    f"{prefix}{dot}{tensor_name}: saved with shape {saved_shape}, but the {type(modules[name]).__name__} "
                    f"at {owner} is built with {shape}; pruning only narrows tensors, so the weights come from another "
                    "architecture or other constructor arguments."
                )
            entry["tensors"][tensor_name] = saved_shape
        if isinstance(saved.get(dot + HEADS_BUFFER), torch.Tensor):
            entry["tensors"][HEADS_BUFFER] = list(saved[dot + HEADS_BUFFER].shape)
    for name, module in modules.items():
        attrs = _attributes(name, module, after, saved, nystrom, prefix)
        after[name]["attrs"].update({a: v for a, v in attrs.items() if a in after[name]["attrs"]})
    return shape_changes(before, after)


def _attributes(
    name: str,
    module: nn.Module,
    after: Mapping[str, dict[str, Any]],
    saved: Mapping[str, Any],
    nystrom: Mapping[str, dict[str, Any]],
    prefix: str,
) -> dict[str, Any]:
    """The shape attributes of ``module`` (see ``_structure.SHAPE_ATTRIBUTES``) that its saved tensors imply."""
    dot = f"{name}." if name else ""
    tensors = after[name]["tensors"]
    weight = tensors.get("weight")
    if isinstance(module, nn.Linear) and weight:
        return {"out_features": weight[0], "in_features": weight[1]}
    if isinstance(module, nn.LayerNorm) and weight:
        return {"normalized_shape": list(weight)}
    if isinstance(module, nn.Conv2d) and weight:
        return {"out_channels": weight[0], "in_channels": weight[1] * module.groups}
    qkv = after.get(dot + "qkv", {}).get("tensors", {}).get("weight")
    if qkv and isinstance(getattr(module, "num_heads", None), int):  # timm Attention
        heads, head_dim = _head_layout(name, module, qkv[0] // 3, saved, nystrom, prefix)
        scale = nystrom[name]["scale"] if name in nystrom else head_dim**-0.5
        return {"num_heads": heads, "head_dim": head_dim, "attn_dim": qkv[0] // 3, "scale": scale}
    in_proj = tensors.get("in_proj_weight")
    if isinstance(module, nn.MultiheadAttention) and in_proj:  # pruned only along with the embedding
        return {
            "embed_dim": in_proj[1],
            "kdim": in_proj[1],
            "vdim": in_proj[1],
            "head_dim": in_proj[0] // 3 // module.num_heads,
        }
    query = after.get(dot + "q_proj", {}).get("tensors", {}).get("weight")
    if query and is_attention_block(module):  # transformers: separate q/k/v
        heads, head_dim = _head_layout(name, module, query[0], saved, nystrom, prefix)
        return {
            "num_attention_heads": heads,
            "num_heads": heads,
            "attention_head_size": head_dim,
            "head_dim": head_dim,
            "all_head_size": query[0],
        }
    kv = after.get(dot + "kv", {}).get("tensors", {}).get("weight")
    if kv and is_attention_pool(module):  # an attention pool narrowed to a pruned embedding: heads stay
        head_dim = kv[0] // 2 // module.num_heads
        return {"head_dim": head_dim, "scale": head_dim**-0.5}
    conv = after.get(dot + "patch_embed.proj", {}).get("tensors", {}).get("weight")
    if conv:  # timm VisionTransformer: its width in a few attributes (see prune_vit)
        return dict.fromkeys(("embed_dim", "num_features", "head_hidden_size"), conv[0])
    return {}


def _head_layout(
    name: str,
    attn: nn.Module,
    attn_dim: int,
    saved: Mapping[str, Any],
    nystrom: Mapping[str, dict[str, Any]],
    prefix: str,
) -> tuple[int, int]:
    """``(num_heads, head_dim)`` of a saved attention block ``attn_dim`` wide.

    Evidence first (Nyström settings, the head-count buffer a pruned block
    carries, ``q_norm``'s width = head_dim); then the one layout torch-pruning
    can have left: all heads with narrower head dims (``prune_heads=False``)
    or whole heads removed (``prune_heads=True``), whichever divides ``attn_dim``.
    """
    dot = f"{name}." if name else ""
    if name in nystrom:
        return nystrom[name]["num_heads"], nystrom[name]["head_dim"]
    heads_buffer = saved.get(dot + HEADS_BUFFER)
    if isinstance(heads_buffer, torch.Tensor):
        heads = int(heads_buffer)
        return heads, attn_dim // heads
    layout = read_layout(name, attn)
    heads, head_dim = layout.num_heads, layout.head_dim
    if attn_dim == layout.attn_dim:
        return heads, head_dim
    q_norm = saved.get(dot + "q_norm.weight")
    if isinstance(q_norm, torch.Tensor):
        return attn_dim // q_norm.shape[0], q_norm.shape[0]
    layouts = set()
    if attn_dim % heads == 0:
        layouts.add((heads, attn_dim // heads))
    if attn_dim % head_dim == 0:
        layouts.add((attn_dim // head_dim, head_dim))
    if len(layouts) == 1:
        return layouts.pop()
    found = " or ".join(f"{h} heads of {d}" for h, d in sorted(layouts)) or "no whole number of heads"
    raise StructureMismatchError(
        f"{prefix}{name}: the saved attention is {attn_dim} wide (built: {heads} heads of {head_dim}), which fits "
        f"{found}, and the file does not say which (no {HEADS_BUFFER!r} buffer: it was saved by an older version). "
        "Load a checkpoint that holds the structure records (a full ModelCheckpoint, or QuantizeOnFit(save_path=...))."
    )
