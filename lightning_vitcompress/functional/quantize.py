"""torchao quantization of a model's linear layers: :func:`quantize_model` and the replay of its record.

Pure torch / torchao (no Lightning). Everything the code needs to know about a
config is one frozen :class:`QuantizationSpec`; :data:`QUANTIZATION_CONFIGS`
holds one per name, and :func:`resolve_quantization` turns a name, a torchao
config object or a spec into one, once. :func:`quantize_model` quantizes copies
of the selected ``nn.Linear`` layers and swaps them in only when all of them
quantized and the model still runs.
:class:`~lightning_vitcompress.QuantizeOnFit` calls it when training ends.

Adding a config is one registry entry::

    QUANTIZATION_CONFIGS["int8_weight_only_wide"] = QuantizationSpec(
        name="int8_weight_only_wide", build=Int8WeightOnlyConfig, devices=("cpu", "cuda"),
        incompatible=lambda layer: "fewer than 64 inputs" if layer.in_features < 64 else None,
    )

Example (a tiny timm ViT; any model with linear layers the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.quantize import quantize_model
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    >>> images = torch.randn(2, 3, 32, 32)
    >>> summary = quantize_model(vit, "int8_dynamic", skip=["head"], example_input=images)
    >>> len(summary["quantized"]), summary["skipped"], summary["size_after_bytes"] < summary["size_before_bytes"] / 2
    (8, {'head': 'skip'}, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# imported with the package on purpose: torchao registers its quantized tensor classes with
# torch.serialization.add_safe_globals on import, which is what lets load_compressed /
# torch.load(weights_only=True) read a quantized checkpoint in a fresh process
import torchao.quantization
from torch import nn
from torchao.quantization.qat import FakeQuantizedLinear

from lightning_vitcompress._model import set_submodule
from lightning_vitcompress._registry import register_reader
from lightning_vitcompress._structure import Record, register_replay
from lightning_vitcompress.functional.measure import eval_mode, model_device, serialized_size_bytes
from lightning_vitcompress.functional.multihead_attention import (
    restore_multihead_attention,
    split_multihead_attention,
    split_named,
)
from lightning_vitcompress.functional.quantize_configs import resolve_quantization, unprepared
from lightning_vitcompress.functional.quantize_layers import (
    SkipSpec,
    check_skip,
    check_skip_matches,
    is_linear,
    is_quantized_layer,
)
from lightning_vitcompress.functional.quantize_structure import find_split_attentions, read_quantized, spec_for_label
from lightning_vitcompress.functional.x86_int8 import (
    calibrate_input_ranges,
)

__all__ = ["ModelInputs", "quantize_model", "remove_fake_quantization", "split_attention_to_quantize"]


RECORD_KIND = "quantize"


MB = 1e6


#: how many examples of the captured input the post-quantization check runs
EXAMPLE_ROWS = 8


#: ``(min, max)`` of each named layer's inputs seen in calibration
Ranges = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class ModelInputs:
    """The arguments of one forward call, ``model(*args, **kwargs)``: for models that take keywords.

    :func:`quantize_model` takes one as ``example_input`` and a list of them as
    ``calibration_inputs`` (a tensor or a tuple of positional arguments also does).
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def detached(cls, args: tuple[Any, ...], kwargs: Mapping[str, Any], rows: Optional[int] = None) -> ModelInputs:
        """A detached copy of a forward call's tensors, cut to their first ``rows`` rows (``None``: all)."""
        return cls(_detached_rows(args, rows), _detached_rows(dict(kwargs), rows))


def _detached_rows(value: Any, rows: Optional[int]) -> Any:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        return tensor[:rows].clone() if tensor.ndim and rows is not None else tensor.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached_rows(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _detached_rows(v, rows) for k, v in value.items()}
    return value


@register_replay(RECORD_KIND)
def _replay_quantize(model: nn.Module, record: Record) -> None:
    """Prepare a freshly built model for a quantized state dict.

    torchao keeps each quantized layer an ``nn.Linear`` whose weight is a tensor
    subclass, so the structure is unchanged: loading with ``assign=True`` (as
    :func:`~lightning_vitcompress.load_compressed` does) restores the quantized
    weights; here the layers are checked and their weights frozen. Configs with
    a :attr:`~QuantizationSpec.module_class` (the x86 int8 layers) swap each
    linear for one: empty ones of the same shape are put in, for the state dict
    to fill (scales and calibrated input ranges included). The
    ``nn.MultiheadAttention`` modules the record lists under ``split_attention``
    get their linear projections first (see :func:`split_multihead_attention`).
    """
    spec = spec_for_label(record.get("config", ""))
    module_class = spec.module_class if spec is not None else None
    split_named(model, record.get("split_attention", []))
    for name in record.get("layers", []):
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"The checkpoint's quantize record names layer {name!r}, which this model lacks.") from err
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"The checkpoint's quantize record names {name!r}, a {type(layer).__name__}, not nn.Linear."
            )
        if module_class is not None:
            empty = module_class(layer.in_features, layer.out_features, bias=layer.bias is not None)
            set_submodule(model, name, empty.to(layer.weight.device))
        else:
            layer.weight.requires_grad_(False)
    keep_encoder_layers_unfused(model)


# a state dict without records: its quantized layers, after pruning's and Nystrom's records (see _registry)
register_reader(RECORD_KIND, read_quantized, survey=find_split_attentions, order=30)


def keep_encoder_layers_unfused(model: nn.Module) -> None:
    """Turn off ``nn.TransformerEncoderLayer``'s fused inference path where its MLP is no float ``nn.Linear``.

    In inference that path hands ``linear1.weight``/``linear2.weight`` straight to
    one fused kernel, which reads an x86 int8 layer's int8 weight as if it were
    float (torchao's tensor subclasses already keep it off). The flag it checks
    only selects that path; the layer's own modules compute the same function.
    Likewise an ``nn.TransformerEncoder`` whose layers' attention is no longer an
    ``nn.MultiheadAttention`` does not pack padded inputs into nested tensors.
    timm's EVA and BEiT attention with q/v biases call ``F.linear`` with ``qkv.weight``
    unless ``qkv_bias_separate`` is set, which calls ``qkv`` and adds the same biases.
    """
    for module in model.modules():
        if getattr(module, "qkv_bias_separate", None) is False and getattr(module, "q_bias", None) is not None:
            attention: Any = module  # a timm EVA/BEiT attention: the flag is set by name
            attention.qkv_bias_separate = True  # the same function, with qkv called as a module
        if isinstance(module, nn.TransformerEncoder) and any(
            not isinstance(layer.self_attn, nn.MultiheadAttention) for layer in module.layers
        ):
            module.use_nested_tensor = False
        if isinstance(module, nn.TransformerEncoderLayer) and any(
            type(layer) is not nn.Linear or not layer.weight.is_floating_point()
            for layer in (module.linear1, module.linear2)
        ):
            module.activation_relu_or_gelu = 0


def remove_fake_quantization(model: nn.Module) -> None:
    """Put plain ``nn.Linear`` layers (the same parameters) back for torchao's QAT fake-quantized ones, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizedLinear):
            set_submodule(model, name, module.to_linear())


def _as_inputs(inputs: Any) -> ModelInputs:
    if isinstance(inputs, ModelInputs):
        return inputs
    return ModelInputs(inputs if isinstance(inputs, tuple) else (inputs,))


def run_model(model: nn.Module, inputs: Optional[ModelInputs]) -> Any:
    """``model`` on ``inputs`` (moved to its device), in eval mode; None without inputs."""
    if inputs is None:
        return None
    device = model_device(model)
    with eval_mode(model):
        return model(*_to_device(inputs.args, device), **_to_device(dict(inputs.kwargs), device))


def quantize_model(
    model: nn.Module,
    config: Any = "int8_dynamic",
    *,
    skip: SkipSpec = None,
    example_input: Any = None,
    calibration_inputs: Optional[Sequence[Any]] = None,
    reduce_ranges: Optional[Callable[[Ranges], Ranges]] = None,
    progress: Optional[Callable[[], None]] = None,
) -> dict[str, Any]:
    """Quantize ``model``'s linear layers in place with torchao; what :class:`QuantizeOnFit` does at train end.

    Each selected layer is copied and quantized; only when all copies are
    quantized (and, given ``example_input``, a forward pass ran) are they swapped
    in. On failure ``model`` is left as it was and the error propagates.

    Args:
        model: the model (e.g. a timm ViT); quantized in place.
        config: a name from :data:`QUANTIZATION_CONFIGS`, a torchao config object,
            or a :class:`QuantizationSpec` (see :func:`resolve_quantization`).
        skip: as for :class:`QuantizeOnFit`.
        example_input: a tensor, a tuple of positional args or a :class:`ModelInputs`,
            to check the quantized model runs and to measure its relative output change.
        calibration_inputs: a list of inputs (each as ``example_input``) the
            model runs on, in eval mode, to calibrate static activation
            quantization (``"int8_static_x86"``); a few batches of real data.
        reduce_ranges: for calibration spread over processes (DDP): gets every
            selected layer's input ``{name: (min, max)}`` seen here (``(inf, -inf)``
            for a layer no input reached) and returns the union over all processes,
            the same on each. ``None``: this process's ranges are used as they are.
        progress: called after each calibration batch (a progress bar's step).

    Self-attention ``nn.MultiheadAttention`` modules (torchvision, hand-written
    ViTs) are first swapped for :class:`~lightning_vitcompress.functional.multihead_attention.MultiheadSelfAttention`,
    the same function with ``qkv`` and ``out_proj`` ``nn.Linear`` layers, so that
    their projections quantize too (``nn.MultiheadAttention`` uses the raw weight tensors).

    Returns:
        ``{"config", "quantized": [names], "skipped": {name: why}, "size_before_bytes",
        "size_after_bytes", "output_relative_error", "split_attention": [names of the swapped attentions]}``.

    Example::

        >>> import timm, torch
        >>> from lightning_vitcompress.functional.quantize import quantize_model
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
        >>> images = torch.randn(2, 3, 32, 32)
        >>> summary = quantize_model(vit.eval(), "int8_dynamic", skip=["head"], example_input=images)
        >>> summary["config"], summary["quantized"][:2], summary["output_relative_error"] < 0.1
        ('int8_dynamic', ['blocks.0.attn.qkv', 'blocks.0.attn.proj'], True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__}: pass the nn.Module to quantize (e.g. a timm ViT).")
    spec = resolve_quantization(config)
    check_skip(skip)
    if calibration_inputs is not None and (
        isinstance(calibration_inputs, torch.Tensor) or not isinstance(calibration_inputs, Sequence)
    ):
        raise TypeError(
            f"calibration_inputs={type(calibration_inputs).__name__}: pass a list of batches "
            "([images, ...]), not one batch (a tensor would be read as one image per element)."
        )
    example = _as_inputs(example_input) if example_input is not None else None
    calibration = [_as_inputs(inputs) for inputs in calibration_inputs or ()]
    if spec.calibrates and not calibration:
        raise ValueError(
            f"config={spec.name!r} quantizes activations with scales calibrated on real inputs: "
            "pass calibration_inputs=[batch, ...] (a few batches of the model's inputs), "
            "or use config='int8_dynamic_x86', which needs none."
        )
    split = split_attention_to_quantize(model)
    try:
        summary = _quantize_split_model(model, spec, skip, example, calibration, reduce_ranges, progress)
    except BaseException:
        restore_multihead_attention(model, split)
        raise
    summary["split_attention"] = list(split)
    return summary


def split_attention_to_quantize(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Give each self-attention ``nn.MultiheadAttention`` linear projections that quantize (``skip`` still applies).

    Returns the swapped-out modules by name (see :func:`restore_multihead_attention`).
    """
    return dict(split_multihead_attention(model))  # a copy typed as the callers hold it (dict is invariant)


def _quantize_split_model(
    model: nn.Module,
    spec: Any,
    skip: SkipSpec,
    example: Optional[ModelInputs],
    calibration: list[ModelInputs],
    reduce_ranges: Optional[Callable[[Ranges], Ranges]],
    progress: Optional[Callable[[], None]] = None,
) -> dict[str, Any]:
    check_skip_matches(model, skip)
    selected, skipped = spec.select_layers(model, skip)
    if not selected:
        raise ValueError(f"skip={skip!r} leaves no nn.Linear layer to quantize; skipped: {skipped}")
    originals = {name: model.get_submodule(name) for name in selected}
    size_before = serialized_size_bytes(model)
    with torch.no_grad():
        try:
            reference = run_model(model, example)
        except Exception as err:
            raise ValueError(
                f"example_input: the model cannot run it before quantizing ({type(err).__name__}: {err}); "
                "pass an input the model takes. The model is unchanged."
            ) from err
        copies = nn.ModuleList([spec.prepared_copy(layer) for layer in originals.values()])
        if spec.calibrates:
            device = model_device(model)
            with eval_mode(model):
                ranges = calibrate_input_ranges(
                    model,
                    selected,
                    ((_to_device(i.args, device), _to_device(dict(i.kwargs), device)) for i in calibration),
                    progress,
                )
            if reduce_ranges is not None:
                # every selected layer, so all processes reduce the same tensor; unseen ones stay infinite
                unseen = (float("inf"), float("-inf"))
                ranges = reduce_ranges({name: ranges.get(name, unseen) for name in selected})
                ranges = {name: r for name, r in ranges.items() if r[0] <= r[1]}
            for index, name in enumerate(selected):
                if name in ranges:  # a layer the calibration inputs never reached stays full precision
                    holder = nn.ModuleList([copies[index]])
                    torchao.quantization.quantize_(holder, spec.ptq_config(ranges[name]), filter_fn=is_linear)
                    copies[index] = holder[0]
        else:
            torchao.quantization.quantize_(copies, spec.ptq_config(), filter_fn=is_linear)
    quantized: list[str] = []
    for name, layer in zip(selected, copies):
        if is_quantized_layer(layer, spec):
            quantized.append(name)
        elif spec.calibrates:
            skipped[name] = "not run by the calibration inputs, so no input range (kept full precision)"
        else:  # torchao returns some layers unchanged (e.g. int4 with an incompatible shape)
            skipped[name] = "left unquantized by torchao (incompatible shape for this config)"
    if not quantized:
        raise RuntimeError(f"torchao quantized none of the {len(selected)} selected layers; skipped: {skipped}")
    for name, layer in zip(selected, copies):
        # quantized copies in; layers torchao left alone lose any QAT fake quantization
        set_submodule(model, name, layer if name in quantized else unprepared(originals[name]))
    keep_encoder_layers_unfused(model)
    try:
        with torch.no_grad():
            output = run_model(model, example)
    except Exception:
        for name, layer in originals.items():  # put the full-precision layers back
            set_submodule(model, name, layer)
        raise
    return {
        "config": spec.name,
        "quantized": quantized,
        "skipped": skipped,
        "size_before_bytes": size_before,
        "size_after_bytes": serialized_size_bytes(model),
        "output_relative_error": _relative_error(output, reference),
    }


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _relative_error(output: Any, reference: Any) -> Optional[float]:
    if not isinstance(output, torch.Tensor) or not isinstance(reference, torch.Tensor):
        return None
    output, reference = output.float(), reference.float()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))
