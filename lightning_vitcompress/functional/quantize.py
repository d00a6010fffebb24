"""torchao quantization of a model's linear layers, and the registry of named configs.

Pure torch / torchao (no Lightning): :func:`quantize_model` quantizes copies of
the selected ``nn.Linear`` layers and swaps them in only when all of them
quantized and the model still runs; :data:`NAMED_CONFIGS` says what each named
config needs (devices, calibration, weight dtype, replay).
:class:`~lightning_vitcompress.QuantizeOnFit` calls it when training ends.

Example::

    summary = quantize_model(vit, "int8_dynamic", skip=["head"], example_input=images)
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

# imported with the package on purpose: torchao registers its quantized tensor classes with
# torch.serialization.add_safe_globals on import, which is what lets load_compressed /
# torch.load(weights_only=True) read a quantized checkpoint in a fresh process
import torchao.quantization as _torchao_quantization
from torch import nn

from lightning_vitcompress._model import set_submodule
from lightning_vitcompress._structure import (
    Record,
    register_replay,
)
from lightning_vitcompress.functional.measure import eval_mode
from lightning_vitcompress.functional.x86_int8 import (
    Int8DynamicX86Config,
    Int8StaticX86Config,
    X86Int8DynamicLinear,
    X86Int8StaticLinear,
    calibrate_input_ranges,
)

__all__ = ['check_config', 'quantize_model', 'select_layers', 'INFERENCE_PRECISIONS', 'NAMED_CONFIGS']


RECORD_KIND = "quantize"
_MB = 1e6
#: how many examples of the captured input the post-quantization check runs
_EXAMPLE_ROWS = 8

SkipSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
#: a forward call's positional and keyword arguments
Example = tuple[tuple[Any, ...], dict[str, Any]]
#: ``QuantizeOnFit(inference_precision=...)``: the dtype the compiled model's unquantized ops run in
INFERENCE_PRECISIONS: dict[str, Optional[torch.dtype]] = {"32-true": None, "bf16-mixed": torch.bfloat16}


def _torchao() -> Any:
    return _torchao_quantization


# ----------------------------------------------------------------------------- named configs
@dataclass(frozen=True)
class _NamedConfig:
    build: Callable[[], Any]
    """the torchao PTQ config"""
    qat: Callable[[], Any]
    """the torchao ``QATConfig(step="prepare")`` whose fake quantization matches ``build``"""
    devices: tuple[str, ...]
    min_capability: Optional[tuple[int, int]] = None
    """lowest CUDA compute capability (float8 needs SM 8.9)"""
    bfloat16_weights: bool = False
    """the kernel needs bf16 weights (tinygemm int4): the layer is cast to bf16 first"""
    group_size: Optional[int] = None
    """in_features must be a multiple of it, else torchao leaves the layer as it is"""
    incompatible: Optional[Callable[[nn.Linear], Optional[str]]] = None
    """why a layer cannot take this config (it is then kept in full precision), or None"""
    compiled_by_default: bool = False
    """only fast compiled: ``QuantizeOnFit(compile=None)`` compiles it"""


def _float8_incompatible(layer: nn.Linear) -> Optional[str]:
    # torchao 0.18 takes a tensor-wise scaled 128x128 weight for 128x128 block scaling and the
    # matmul then asserts ("input_tensor must be 1x128 scaled"); seen on an H100
    if tuple(layer.weight.shape) == (128, 128):
        return "a 128x128 weight, which torchao's float8 tensor-wise matmul mistakes for 128x128 blocks"
    return None


def _int8_per_channel_weights() -> Any:
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)


def _int8_dynamic_qat() -> Any:
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    # torchao's QATConfig cannot infer fake quantization from Int8DynamicActivationInt8WeightConfig,
    # and its fake quantizer has no symmetric per-token mode: per-token asymmetric int8 activations
    # (the closest it has) with symmetric per-channel int8 weights, as the PTQ config quantizes them
    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    return QATConfig(activation_config=activations, weight_config=_int8_per_channel_weights(), step="prepare")


def _int8_weight_only_qat() -> Any:
    from torchao.quantization.qat import QATConfig

    return QATConfig(weight_config=_int8_per_channel_weights(), step="prepare")


def _int4_qat() -> Any:
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.qat import QATConfig

    # QAT infers int4 fake quantization from the plain-format config only; the numerics are the same
    return QATConfig(base_config=Int4WeightOnlyConfig(group_size=128), step="prepare")


def _float8_qat() -> Any:
    from torchao.quantization.qat import QATConfig

    return QATConfig(base_config=_torchao().Float8DynamicActivationFloat8WeightConfig(), step="prepare")


NAMED_CONFIGS: dict[str, _NamedConfig] = {
    "int8_dynamic": _NamedConfig(
        build=lambda: _torchao().Int8DynamicActivationInt8WeightConfig(),
        qat=_int8_dynamic_qat,
        devices=("cpu", "cuda"),
    ),
    "int8_dynamic_x86": _NamedConfig(
        # torchao's X86InductorQuantizer recipe, lowered by inductor to oneDNN int8 GEMMs
        build=Int8DynamicX86Config,
        # torchao's fake quantizers have no per-tensor mode (it quantizes activations per tensor):
        # per-token, the closest, models slightly less rounding noise than deployment sees
        qat=_int8_dynamic_qat,
        devices=("cpu",),
        compiled_by_default=True,
    ),
    "int8_static_x86": _NamedConfig(
        # the same layers with activation scales calibrated on training inputs at train end: the
        # activation quantization then fuses into the op before each linear (X86InductorQuantizer static)
        build=Int8StaticX86Config,
        qat=_int8_dynamic_qat,
        devices=("cpu",),
        compiled_by_default=True,
    ),
    "int8_weight_only": _NamedConfig(
        build=lambda: _torchao().Int8WeightOnlyConfig(),
        qat=_int8_weight_only_qat,
        devices=("cpu", "cuda"),
    ),
    "int4_weight_only": _NamedConfig(
        # the tile-packed format runs on core PyTorch's tinygemm kernel (the plain format needs mslk)
        build=lambda: _torchao().Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
        qat=_int4_qat,
        devices=("cuda",),
        bfloat16_weights=True,
        group_size=128,
    ),
    "float8_dynamic": _NamedConfig(
        build=lambda: _torchao().Float8DynamicActivationFloat8WeightConfig(),
        qat=_float8_qat,
        devices=("cuda",),
        min_capability=(8, 9),
        incompatible=_float8_incompatible,
    ),
}


def _config_label(config: Any) -> str:
    return config if isinstance(config, str) else type(config).__name__


# ----------------------------------------------------------------------------- layer selection
def _is_mha_out_proj(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _is_quantized_weight(weight: Any) -> bool:
    """True for torchao's quantized tensor subclasses (not fp32/bf16 parameters)."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return type(data) is not torch.Tensor


def _is_quantized_layer(layer: nn.Module) -> bool:
    """A layer ``quantize_`` changed: a quantized weight, or swapped for an int8 module."""
    if isinstance(layer, X86Int8DynamicLinear):  # and X86Int8StaticLinear
        return True
    weight = getattr(layer, "weight", None)
    return weight is not None and _is_quantized_weight(weight)


def _check_skip(skip: Any) -> None:
    """``skip`` is None, a callable, a non-empty pattern, or a list of them (a str is one pattern, not letters)."""
    patterns = [skip] if isinstance(skip, str) else skip
    if skip is None or callable(skip):
        return
    if (
        isinstance(skip, (bytes, Mapping))
        or not isinstance(patterns, (Sequence, set, frozenset))
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise TypeError(
            f"skip={skip!r}: pass a layer name or glob pattern ('head'), a list of them (['head', 'blocks.0.*']), "
            "or a function (name, module) -> bool."
        )


def _compile_arguments() -> set[str]:
    return {name for name in inspect.signature(torch.compile).parameters if name != "model"}


def _check_compile(compile: Any) -> None:
    """``compile`` is None, a bool, or a dict of ``torch.compile`` keyword arguments it takes."""
    if compile is None or isinstance(compile, bool):
        return
    if not isinstance(compile, dict):
        raise TypeError(f"compile={compile!r}: pass True/False, a dict of torch.compile arguments, or None.")
    unknown = sorted(set(compile) - _compile_arguments())
    if unknown:
        raise ValueError(
            f"compile={compile!r}: torch.compile takes no argument {unknown}; it takes {sorted(_compile_arguments())}."
        )
    mode = compile.get("mode")
    if mode is not None:
        import torch._inductor

        modes = list(torch._inductor.list_mode_options())
        if mode not in modes:
            raise ValueError(f"compile={compile!r}: mode={mode!r} is not a torch.compile mode; use one of {modes}.")


def _check_skip_matches(model: nn.Module, skip: SkipSpec) -> None:
    """Each ``skip`` pattern names at least one ``nn.Linear`` of ``model``: a typo must not quantize a layer."""
    if skip is None or callable(skip):
        return
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for pattern in [skip] if isinstance(skip, str) else skip:
        if not any(name == pattern or fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = names if len(names) <= 8 else names[:8] + ["..."]
            raise ValueError(
                f"skip={skip!r}: {pattern!r} matches no nn.Linear layer of {type(model).__name__}; its linear "
                f"layers are {shown}. Use their names or glob patterns ('blocks.*.mlp.fc2')."
            )


def _skip_matcher(skip: SkipSpec) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name, module: any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    skip: SkipSpec = None,
    group_size: Optional[int] = None,
    incompatible: Optional[Callable[[nn.Linear], Optional[str]]] = None,
) -> tuple[list[str], dict[str, str]]:
    """Names of the ``nn.Linear`` layers of ``model`` to quantize, and the skipped ones with why.

    ``nn.MultiheadAttention``'s ``out_proj`` is always skipped: MHA runs it through
    ``F.multi_head_attention_forward`` with the raw weight tensor, which torchao's
    quantized tensors do not support (torchao's own default filter skips it silently).
    """
    matches_skip = _skip_matcher(skip)
    selected: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _is_mha_out_proj(module):
            skipped[name] = "nn.MultiheadAttention out_proj (MHA uses its weight tensor directly; kept fp32)"
        elif matches_skip(name, module):
            skipped[name] = "skip"
        elif _is_quantized_weight(module.weight):
            skipped[name] = "already quantized"
        elif group_size is not None and module.in_features % group_size:
            skipped[name] = f"in_features={module.in_features} is not a multiple of group_size={group_size}"
        elif incompatible is not None and incompatible(module):
            skipped[name] = str(incompatible(module))
        else:
            selected.append(name)
    return selected, skipped


# ----------------------------------------------------------------------------- replay
#: record labels of the configs that swap each linear for an x86 int8 module, and that module
_X86_LAYERS: dict[str, type[X86Int8DynamicLinear]] = {
    "int8_dynamic_x86": X86Int8DynamicLinear,
    Int8DynamicX86Config.__name__: X86Int8DynamicLinear,
    "int8_static_x86": X86Int8StaticLinear,
    Int8StaticX86Config.__name__: X86Int8StaticLinear,
}


@register_replay(RECORD_KIND)
def _replay_quantize(model: nn.Module, record: Record) -> None:
    """Prepare a freshly built model for a quantized state dict.

    torchao keeps each quantized layer an ``nn.Linear`` whose weight is a tensor
    subclass, so the structure is unchanged: loading with ``assign=True`` (as
    :func:`~lightning_vitcompress.load_compressed` does) restores the quantized
    weights; here the layers are checked and their weights frozen. The x86
    configs swap each linear for an :class:`X86Int8DynamicLinear` (or
    :class:`X86Int8StaticLinear`): empty ones of the same shape are put in, for
    the state dict to fill (scales and calibrated input ranges included).
    """
    x86_layer = _X86_LAYERS.get(record.get("config", ""))
    for name in record.get("layers", []):
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"The checkpoint's quantize record names layer {name!r}, which this model lacks.") from err
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"The checkpoint's quantize record names {name!r}, a {type(layer).__name__}, not nn.Linear.")
        if x86_layer is not None:
            empty = x86_layer(layer.in_features, layer.out_features, bias=layer.bias is not None)
            set_submodule(model, name, empty.to(layer.weight.device))
        else:
            layer.weight.requires_grad_(False)


# ----------------------------------------------------------------------------- quantizing a model
def _ptq_config(config: Any) -> Any:
    return NAMED_CONFIGS[config].build() if isinstance(config, str) else config


def _needs_calibration(ptq_config: Any) -> bool:
    """A static config without an input range: ranges are calibrated per layer."""
    return isinstance(ptq_config, Int8StaticX86Config) and ptq_config.input_range is None


def _group_size(config: Any) -> Optional[int]:
    if isinstance(config, str):
        return NAMED_CONFIGS[config].group_size
    int4_config = getattr(_torchao(), "Int4WeightOnlyConfig", None)
    if int4_config is not None and isinstance(config, int4_config):
        return int(config.group_size)
    return None


def _incompatible(config: Any) -> Optional[Callable[[nn.Linear], Optional[str]]]:
    return NAMED_CONFIGS[config].incompatible if isinstance(config, str) else None


def _prepared_copy(layer: nn.Module, config: Any) -> nn.Module:
    """A copy of ``layer`` ready for ``quantize_``: fake quantization removed, bf16 where the kernel needs it."""
    from torchao.quantization.qat import FakeQuantizedLinear

    layer = copy.deepcopy(layer)
    if isinstance(layer, FakeQuantizedLinear):
        layer = layer.to_linear()
    if isinstance(config, str) and NAMED_CONFIGS[config].bfloat16_weights:
        layer = layer.to(torch.bfloat16)
    return layer


def _unprepared(layer: nn.Module) -> nn.Module:
    from torchao.quantization.qat import FakeQuantizedLinear

    return layer.to_linear() if isinstance(layer, FakeQuantizedLinear) else layer


def _run_example(model: nn.Module, example: Optional[Example]) -> Any:
    if example is None:
        return None
    args, kwargs = example
    device = _first_device(model)
    with eval_mode(model):
        return model(*_to_device(args, device), **_to_device(kwargs, device))


def quantize_model(
    model: nn.Module,
    config: Any = "int8_dynamic",
    *,
    skip: SkipSpec = None,
    example_input: Any = None,
    calibration_inputs: Optional[Sequence[Any]] = None,
    _example: Optional[Example] = None,
    _calibration: Optional[Sequence[Example]] = None,
    _sync_ranges: Optional[Callable[[dict[str, tuple[float, float]]], dict[str, tuple[float, float]]]] = None,
) -> dict[str, Any]:
    """Quantize ``model``'s linear layers in place with torchao; what :class:`QuantizeOnFit` does at train end.

    Each selected layer is copied and quantized; only when all copies are
    quantized (and, given ``example_input``, a forward pass ran) are they swapped
    in. On failure ``model`` is left as it was and the error propagates.

    Args:
        model: the model (e.g. a timm ViT); quantized in place.
        config, skip: as for :class:`QuantizeOnFit`.
        example_input: a tensor (or tuple of positional args) to check the quantized
            model runs and to measure its relative output change.
        calibration_inputs: inputs (tensors or tuples of positional args) the
            model runs on, in eval mode, to calibrate static activation
            quantization (``"int8_static_x86"``); a few batches of real data.

    Returns:
        ``{"config", "quantized": [names], "skipped": {name: why}, "size_before_bytes",
        "size_after_bytes", "output_relative_error"}``.

    Example::

        summary = quantize_model(vit, "int8_dynamic", skip=["head"], example_input=images)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__}: pass the nn.Module to quantize (e.g. a timm ViT).")
    check_config(config)
    _check_skip(skip)
    if calibration_inputs is not None and (
        isinstance(calibration_inputs, torch.Tensor) or not isinstance(calibration_inputs, Sequence)
    ):
        raise TypeError(
            f"calibration_inputs={type(calibration_inputs).__name__}: pass a list of batches "
            "([images, ...]), not one batch (a tensor would be read as one image per element)."
        )
    if _example is None and example_input is not None:
        _example = (_as_args(example_input), {})
    if _calibration is None and calibration_inputs is not None:
        _calibration = [(_as_args(inputs), {}) for inputs in calibration_inputs]
    ptq_config = _ptq_config(config)
    calibrates = _needs_calibration(ptq_config)
    if calibrates and not _calibration:
        raise ValueError(
            f"config={_config_label(config)!r} quantizes activations with scales calibrated on real inputs: "
            "pass calibration_inputs=[batch, ...] (a few batches of the model's inputs), "
            "or use config='int8_dynamic_x86', which needs none."
        )
    _check_skip_matches(model, skip)
    selected, skipped = select_layers(model, skip, _group_size(config), _incompatible(config))
    if not selected:
        raise ValueError(f"skip={skip!r} leaves no nn.Linear layer to quantize; skipped: {skipped}")
    originals = {name: model.get_submodule(name) for name in selected}
    size_before = _state_size(model)
    with torch.no_grad():
        try:
            reference = _run_example(model, _example)
        except Exception as err:  # noqa: BLE001 - nothing was changed yet
            raise ValueError(
                f"example_input: the model cannot run it before quantizing ({type(err).__name__}: {err}); "
                "pass an input the model takes. The model is unchanged."
            ) from err
        copies = nn.ModuleList([_prepared_copy(layer, config) for layer in originals.values()])
        if calibrates:
            assert _calibration is not None
            with eval_mode(model):
                device = _first_device(model)
                ranges = calibrate_input_ranges(
                    model, selected, ((_to_device(a, device), _to_device(k, device)) for a, k in _calibration)
                )
            if _sync_ranges is not None:
                # every selected layer, so all ranks reduce the same tensor; unseen ones stay infinite
                unseen = (float("inf"), float("-inf"))
                ranges = _sync_ranges({name: ranges.get(name, unseen) for name in selected})
                ranges = {name: r for name, r in ranges.items() if r[0] <= r[1]}
            for index, name in enumerate(selected):
                if name in ranges:  # a layer the calibration inputs never reached stays full precision
                    layer_config = dataclasses.replace(ptq_config, input_range=ranges[name])
                    holder = nn.ModuleList([copies[index]])
                    _torchao().quantize_(holder, layer_config, filter_fn=_is_linear)
                    copies[index] = holder[0]
        else:
            _torchao().quantize_(copies, ptq_config, filter_fn=_is_linear)
    quantized: list[str] = []
    for name, layer in zip(selected, copies):
        if _is_quantized_layer(layer):
            quantized.append(name)
        elif calibrates:
            skipped[name] = "not run by the calibration inputs, so no input range (kept full precision)"
        else:  # torchao returns some layers unchanged (e.g. int4 with an incompatible shape)
            skipped[name] = "left unquantized by torchao (incompatible shape for this config)"
    if not quantized:
        raise RuntimeError(f"torchao quantized none of the {len(selected)} selected layers; skipped: {skipped}")
    for name, layer in zip(selected, copies):
        # quantized copies in; layers torchao left alone lose any QAT fake quantization
        set_submodule(model, name, layer if name in quantized else _unprepared(originals[name]))
    try:
        with torch.no_grad():
            output = _run_example(model, _example)
    except Exception:
        for name, layer in originals.items():  # put the full-precision layers back
            set_submodule(model, name, layer)
        raise
    return {
        "config": _config_label(config),
        "quantized": quantized,
        "skipped": skipped,
        "size_before_bytes": size_before,
        "size_after_bytes": _state_size(model),
        "output_relative_error": _relative_error(output, reference),
    }


def check_config(config: Any) -> None:
    """Raise naming ``config`` unless it is a registered name or a torchao config object."""
    if isinstance(config, str):
        if config not in NAMED_CONFIGS:
            raise ValueError(
                f"config={config!r} is not a known quantization config. Use one of {sorted(NAMED_CONFIGS)} "
                "or pass a torchao config object, e.g. torchao.quantization.Int8WeightOnlyConfig()."
            )
        return
    from torchao.core.config import AOBaseConfig

    if not isinstance(config, AOBaseConfig):
        raise TypeError(
            f"config={config!r} ({type(config).__name__}): pass a name from {sorted(NAMED_CONFIGS)} "
            "or a torchao config object (torchao.core.config.AOBaseConfig)."
        )




def _is_linear(module: nn.Module, *args: Any) -> bool:
    return isinstance(module, nn.Linear)



def _as_args(inputs: Any) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)



def _state_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes



def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value



def _first_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")



def _relative_error(output: Any, reference: Any) -> Optional[float]:
    if not isinstance(output, torch.Tensor) or not isinstance(reference, torch.Tensor):
        return None
    output, reference = output.float(), reference.float()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))

