"""Reading quantized layers back from a state dict that came without structure records.

torchao's quantized weights keep their tensor subclass in the state dict; the
x86 int8 layers add ``weight_scale`` (and, static, ``_extra_state`` with the
calibrated input range); an ``nn.MultiheadAttention`` quantized through its
split form is saved with ``<name>.qkv.weight`` instead of ``in_proj_weight``.
:func:`find_split_attentions` finds the latter (the pruning reader reads their
shapes) and :func:`read_quantized` returns the records that
:mod:`~lightning_vitcompress.functional.quantize`'s replay rebuilds, one per
config. ``quantize.py`` registers both, and its replay asks :func:`spec_for_label`
which registered config a record's label names.

Example (int8 weights saved from a quantized ViT, read into a freshly built one)::

    >>> import timm, torch
    >>> from lightning_vitcompress._registry import SavedModel
    >>> from lightning_vitcompress.functional.quantize import quantize_model
    >>> from lightning_vitcompress.functional.quantize_structure import find_split_attentions, read_quantized
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    >>> _ = quantize_model(vit, "int8_dynamic_x86", skip=["head"])
    >>> torch.save(vit.state_dict(), "int8.pt")
    >>> fresh = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    >>> saved = SavedModel(fresh, torch.load("int8.pt", weights_only=True), target="")
    >>> find_split_attentions(saved)   # no nn.MultiheadAttention was split in a timm ViT
    >>> read_quantized(saved)
    [{'config': 'int8_dynamic_x86', 'layers': ['blocks.0.attn.qkv', 'blocks.0.attn.proj', 'blocks.0.mlp.fc1', 'blocks.0.mlp.fc2'], 'skipped': {}, 'split_attention': []}]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.utils import TorchAOBaseTensor

from lightning_vitcompress._registry import Record, SavedModel
from lightning_vitcompress.functional.quantize_configs import QUANTIZATION_CONFIGS, QuantizationSpec

__all__ = ["find_split_attentions", "read_quantized", "spec_for_label"]


def find_split_attentions(saved: SavedModel) -> None:
    """Store the ``nn.MultiheadAttention`` modules saved split for quantization in ``found["split_attention"]``.

    Such a module is saved with ``<name>.qkv.weight`` and no ``in_proj_weight``.
    """
    saved.found["split_attention"] = [
        name
        for name, module in saved.model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        and f"{name}.qkv.weight" in saved.state_dict
        and f"{name}.in_proj_weight" not in saved.state_dict
    ]


def read_quantized(saved: SavedModel) -> list[Record]:
    """One record body per config the saved layers were quantized with; the first one splits the attentions."""
    split = saved.found.get("split_attention", [])
    return [
        {"config": config, "layers": layers, "skipped": {}, "split_attention": split if index == 0 else []}
        for index, (config, layers) in enumerate(_quantized_layers(saved.model, saved.state_dict, split).items())
    ]


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


def spec_for_label(label: str) -> Optional[QuantizationSpec]:
    """The spec a quantize record's ``config`` label names, for the replay.

    A registry name, or the class name of a registered entry's torchao config
    (records of config objects), gives that entry. The name of another torchao
    config class or quantized tensor class (records read from a bare state
    dict) gives None: its layers stay ``nn.Linear`` with tensor-subclass weights.

    Raises:
        ValueError: a label none of these know, naming it and what is registered.
    """
    if label in QUANTIZATION_CONFIGS:
        return QUANTIZATION_CONFIGS[label]
    for spec in QUANTIZATION_CONFIGS.values():
        if spec.config_class.__name__ == label:
            return spec
    if label in _class_names(AOBaseConfig) or label in _class_names(TorchAOBaseTensor):
        return None
    raise ValueError(
        f"The checkpoint's quantize record names config={label!r}, which is neither a registered quantization "
        f"config ({sorted(QUANTIZATION_CONFIGS)}) nor a torchao config or tensor class loaded in this process, so "
        "its layers cannot be rebuilt. Register it (QUANTIZATION_CONFIGS[name] = QuantizationSpec(...)) or import "
        "the module that defines its config class before loading."
    )


def _class_names(base: type) -> set[str]:
    names, pending = set(), [base]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return names
