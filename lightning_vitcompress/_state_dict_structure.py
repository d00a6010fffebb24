"""Reading a compressed model's structure from its state dict, when no records came with it.

``ModelCheckpoint(save_weights_only=True)`` checkpoints, a bare
``torch.save(model.state_dict())`` and ``.safetensors`` files hold no structure
records (see :mod:`lightning_vitcompress._structure`). The structure is still
in the tensors, and :func:`infer_records` reads it back as records that the
usual replays rebuild, in the order the callbacks act (prune, Nyström, quantize):

* **pruning**: the saved shapes (only narrower than the module built: pruning
  never widens); the attributes that follow from them (``in_features``,
  ``normalized_shape``, the ViT's ``embed_dim``...). A pruned timm
  ``Attention`` carries its head count in the buffer
  :data:`~lightning_vitcompress.functional.prune.HEADS_BUFFER`; without it (state dicts
  of older versions) the head count is read from ``q_norm``'s width or is the
  one layout the width allows (all heads kept with narrower head dims, or the
  head dim kept with fewer heads); when both fit, an error says so.
* **Nyström**: a ``NystromAttention`` has the parameter keys of the timm
  ``Attention`` it replaced, plus ``<block>._extra_state`` with its settings.
* **quantization**: torchao's quantized weights keep their tensor subclass in
  the state dict; the x86 int8 layers add ``weight_scale`` (and, static,
  ``_extra_state`` with the calibrated input range).

:func:`check_structure` compares a rebuilt module with the saved tensors and
names the first disagreements. :mod:`~lightning_vitcompress._structure` decides
when to use which (records first, inference when there are none).

Example::

    module = DigitsClassifier(**hparams)
    state_dict = torch.load("weights.pt", weights_only=True)
    replay_edits(module, infer_records(module, state_dict))
    check_structure(module, state_dict)
    module.load_state_dict(state_dict, assign=True)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress._model import (
    AmbiguousTargetError,
    get_submodule,
    is_attention_block,
    resolve_target_path,
)
from lightning_vitcompress._structure import Record, shape_changes, shape_snapshot
from lightning_vitcompress.functional.nystrom import NystromAttention, nystrom_settings
from lightning_vitcompress.functional.prune import HEADS_BUFFER
from lightning_vitcompress.functional.quantize import RECORD_KIND as QUANTIZE_KIND
from lightning_vitcompress.functional.quantize_configs import QUANTIZATION_CONFIGS
from lightning_vitcompress.models import adapter_for
from lightning_vitcompress.models.base import is_attention_pool, read_layout

__all__ = ["StructureMismatchError", "align_state_dict", "check_structure", "infer_records"]

_EXTRA_STATE = "_extra_state"
#: how many disagreeing keys an error lists
_SHOWN = 5


class StructureMismatchError(ValueError):
    """The saved tensors do not fit the module rebuilt for them (the message says where)."""


# ----------------------------------------------------------------------------- keys
def align_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``state_dict`` with keys relative to ``module``, and the prefix added (``""`` or ``"<target>."``).

    A state dict of the inner ViT (``lit.model.state_dict()``) gets the target
    path (:func:`~lightning_vitcompress._model.resolve_target_path`) put in
    front of its keys; one of the LightningModule stays as it is.

    Raises:
        StructureMismatchError: neither reading matches any key of ``module``.
    """
    expected = set(module.state_dict())
    target = _target_or_whole(module)
    as_is = sum(key in expected for key in state_dict)
    prefix = f"{target}." if target else ""
    prefixed = sum(prefix + key in expected for key in state_dict) if prefix else 0
    if not as_is and not prefixed:
        raise StructureMismatchError(
            f"The state dict does not fit {type(module).__name__}: none of its keys ({_first(state_dict)}) is a key "
            f"of the module ({_first(expected)})" + (f" or of its ViT {target!r}" if target else "") + ". It was "
            "saved from another architecture."
        )
    if prefixed > as_is:
        return {prefix + key: value for key, value in state_dict.items()}, prefix
    return dict(state_dict), ""


def _target_or_whole(module: nn.Module) -> str:
    """The ViT's path; the whole module (``""``) where several children could be it (a model and its EMA copy)."""
    try:
        return resolve_target_path(module)
    except AmbiguousTargetError:
        return ""  # loading reads the module's own keys: every candidate's structure is in them
    except (TypeError, ValueError):
        return ""  # no adapter reads its attention (only int8 applies): the module's own keys


def _first(keys: Any) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


# ----------------------------------------------------------------------------- inference
def infer_records(module: nn.Module, state_dict: Mapping[str, Any], target_path: Optional[str] = None) -> list[Record]:
    """The structure records that turn freshly built ``module`` into the model ``state_dict`` came from.

    ``state_dict`` has keys relative to ``module`` (see :func:`align_state_dict`);
    ``target_path`` is the ViT's attribute path (found when None). Returns an
    empty list when the saved model has the module's structure. Each record
    carries ``"inferred": True``.

    Raises:
        StructureMismatchError: a saved tensor is wider than the module's, or
            the head count of a pruned attention cannot be told from the shapes.

    Example::

        replay_edits(module, infer_records(module, torch.load("weights.pt", weights_only=True)))
    """
    if target_path is None:
        target_path = _target_or_whole(module)
    prefix = f"{target_path}." if target_path else ""
    model = get_submodule(module, target_path)
    saved = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    try:  # a pruned model's traceable form (e.g. EVA's q/v biases folded into qkv.bias), where the file has it
        adapter_for(model).prepare_pruning(saved)
    except (TypeError, ValueError):
        pass  # no adapter reads it: only int8 applies
    nystrom = _nystrom_blocks(model, saved)
    split = _split_attentions(model, saved)
    records: list[Record] = []
    pruned = _pruned_shapes(model, _with_multihead_keys(saved, split), nystrom, prefix)
    if pruned:
        records.append({"kind": "prune", "target": target_path, "inferred": True, "modules": pruned})
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, settings in nystrom.items():
        options = ("num_landmarks", "num_prefix_tokens", "pinv_iterations", "conv_kernel_size")
        groups.setdefault(tuple(settings[option] for option in options), []).append(name)
    for (landmarks, prefix_tokens, iterations, kernel), blocks in groups.items():
        records.append(
            {
                "kind": "nystrom",
                "target": target_path,
                "inferred": True,
                "blocks": blocks,
                "num_landmarks": landmarks,
                "num_prefix_tokens": prefix_tokens,
                "pinv_iterations": iterations,
                "conv_kernel_size": kernel,
            }
        )
    for index, (config, layers) in enumerate(_quantized_layers(model, saved, split).items()):
        records.append(
            {"kind": QUANTIZE_KIND, "target": target_path, "inferred": True, "config": config, "layers": layers,
             "skipped": {}, "split_attention": split if index == 0 else []}
        )
    return records


def _split_attentions(model: nn.Module, saved: Mapping[str, Any]) -> list[str]:
    """The ``nn.MultiheadAttention`` modules saved split for quantization (``<name>.qkv.weight``, no ``in_proj``)."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and f"{name}.qkv.weight" in saved
        and f"{name}.in_proj_weight" not in saved
    ]


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


def _nystrom_blocks(model: nn.Module, saved: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{attention block name: Nyström settings}`` for the blocks saved as ``NystromAttention``."""
    blocks: dict[str, dict[str, Any]] = {}
    for key, value in saved.items():
        name, _, leaf = key.rpartition(".")
        if leaf != _EXTRA_STATE or not name:
            continue
        try:
            block = model.get_submodule(name)
        except AttributeError:
            continue  # not in this architecture: check_structure names it
        if is_attention_block(block) and not isinstance(block, NystromAttention):
            blocks[name] = nystrom_settings(value)
    return blocks


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
        return {"embed_dim": in_proj[1], "kdim": in_proj[1], "vdim": in_proj[1], "head_dim": in_proj[0] // 3 // module.num_heads}
    query = after.get(dot + "q_proj", {}).get("tensors", {}).get("weight")
    if query and is_attention_block(module):  # transformers: separate q/k/v
        heads, head_dim = _head_layout(name, module, query[0], saved, nystrom, prefix)
        return {"num_attention_heads": heads, "num_heads": heads, "attention_head_size": head_dim,
                "head_dim": head_dim, "all_head_size": query[0]}
    kv = after.get(dot + "kv", {}).get("tensors", {}).get("weight")
    if kv and is_attention_pool(module):  # an attention pool narrowed to a pruned embedding: heads stay
        head_dim = kv[0] // 2 // module.num_heads
        return {"head_dim": head_dim, "scale": head_dim**-0.5}
    conv = after.get(dot + "patch_embed.proj", {}).get("tensors", {}).get("weight")
    if conv:  # timm VisionTransformer: its width in a few attributes (see prune_vit)
        return {attr: conv[0] for attr in ("embed_dim", "num_features", "head_hidden_size")}
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


def _quantized_layers(model: nn.Module, saved: Mapping[str, Any], split: list[str]) -> dict[str, list[str]]:
    """``{config label: linear layer names}`` of the layers saved quantized.

    A torchao tensor-subclass weight is labelled with its class; a layer saved
    from a registered config's ``module_class`` (the x86 int8 layers) with the
    first config whose module has exactly the saved keys and an int8 weight.
    The ``split`` attentions' ``qkv`` layers count as linears of the model.
    """
    modules: Optional[list[tuple[str, frozenset[str]]]] = None
    layers: dict[str, list[str]] = {}
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in [*linears, *(f"{attention}.qkv" for attention in split)]:
        weight = saved.get(f"{name}.weight")
        if not isinstance(weight, torch.Tensor):
            continue
        if type(weight) not in (torch.Tensor, nn.Parameter):  # a torchao tensor subclass
            label = type(weight).__name__
        elif weight.dtype == torch.int8:
            keys = frozenset(key[len(name) + 1 :] for key in saved if key.startswith(f"{name}.")) - {"bias"}
            modules = _swapped_in_modules() if modules is None else modules
            label = next((config for config, module_keys in modules if keys == module_keys), "")
            if not label:
                continue
        else:
            continue
        layers.setdefault(label, []).append(name)
    return layers


def _swapped_in_modules() -> list[tuple[str, frozenset[str]]]:
    """``(config name, state-dict keys of its module but "bias")`` of the registered configs that swap modules."""
    return [
        (config, frozenset(spec.module_class(1, 1, bias=False).state_dict()))
        for config, spec in QUANTIZATION_CONFIGS.items()
        if spec.module_class is not None
    ]


# ----------------------------------------------------------------------------- checking
def check_structure(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    within: str = "",
    source: str = "The structure records",
) -> None:
    """Raise when ``module``'s tensors (after a replay) differ from ``state_dict``'s in shape or keys.

    ``within`` limits the comparison to keys under a prefix (a state dict of the
    inner ViT); ``strict`` also compares the key sets. ``source`` names what
    rebuilt the structure, for the message.

    Raises:
        StructureMismatchError: naming the module, the tensor, the rebuilt and the saved shape.
    """
    rebuilt = {key: value for key, value in module.state_dict().items() if key.startswith(within)}
    mismatched = []
    for key, value in state_dict.items():
        built = rebuilt.get(key)
        if isinstance(value, torch.Tensor) and isinstance(built, torch.Tensor) and built.shape != value.shape:
            owner, _, tensor = key.rpartition(".")
            mismatched.append(f"{owner or '(root)'} ({tensor}): rebuilt {list(built.shape)}, saved {list(value.shape)}")
    if mismatched:
        raise StructureMismatchError(
            f"{source} disagree with the saved weights: " + "; ".join(mismatched[:_SHOWN])
            + (f" and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else "")
        )
    if not strict:
        return
    missing = set(rebuilt) - set(state_dict)
    unexpected = set(state_dict) - set(rebuilt)
    if missing or unexpected:
        raise StructureMismatchError(
            f"The saved weights do not fit {type(module).__name__} as rebuilt: "
            + (f"missing {_first(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_first(unexpected)}" if unexpected else "")
            + ". They were saved from another architecture, or the module was built with other constructor "
            "arguments."
        )
