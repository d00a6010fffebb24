"""QuantizeOnFit: torchao quantization of the trained model when ``fit`` ends, optionally after QAT.

The model trains in full precision (or, from ``qat_start_epoch``, with
fake-quantized linears: quantization-aware training). When training ends,
after the last optimizer step and before ``on_fit_end`` (so before
``BenchmarkCallback`` measures, and before any ``trainer.test``/``predict``
that follows), the selected ``nn.Linear`` layers are quantized with torchao's
``quantize_``. Nothing happens inside ``fit`` that a resume would need to undo:
checkpoints saved during training hold the fp32 weights.

Quantizing works on copies of the layers; only when every copy quantized and a
forward pass of the model on a real input ran are they swapped in. On any
failure the fp32 model stays in place and the error says what failed.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import inspect
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch

# imported with the package on purpose: torchao registers its quantized tensor classes with
# torch.serialization.add_safe_globals on import, which is what lets load_compressed /
# torch.load(weights_only=True) read a quantized checkpoint in a fresh process
import torchao.quantization as _torchao_quantization
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._checks import check_choice, check_int, check_output_file, check_path
from lightning_vitcompress._measure import eval_mode
from lightning_vitcompress._model import set_submodule
from lightning_vitcompress._structure import (
    STRUCTURE_KEY,
    Record,
    record_edit,
    recorded_edits,
    register_replay,
)
from lightning_vitcompress._training_state import (
    check_strategy_supported,
    refresh_after_structural_change,
    resumed_callback_state,
)
from lightning_vitcompress._x86_int8 import (
    Int8DynamicX86Config,
    Int8StaticX86Config,
    X86Int8DynamicLinear,
    X86Int8StaticLinear,
    calibrate_input_ranges,
    compile_frozen,
    cpu_supports_bfloat16,
)

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
    QuantizeOnFit._check_config(config)
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


# ----------------------------------------------------------------------------- the callback
class QuantizeOnFit(CompressionCallback):
    r"""Quantize the trained model's linear layers with torchao when training ends; optional QAT.

    Example::

        from lightning_vitcompress import QuantizeOnFit, load_compressed

        trainer = Trainer(callbacks=[QuantizeOnFit("int8_dynamic", save_path="model-int8.ckpt")])
        trainer.fit(model, datamodule)
        trainer.test(model, datamodule)      # runs the quantized model
        model = load_compressed(LitModel, "model-int8.ckpt")

    Args:
        config: ``"int8_dynamic"`` (int8 per-token activations, int8 per-channel
            weights; CPU and CUDA; torchao's portable int8 path),
            ``"int8_dynamic_x86"`` (x86 CPUs: uint8 per-tensor activations, int8
            per-channel weights, compiled to oneDNN int8 GEMMs, see
            :class:`~lightning_vitcompress.Int8DynamicX86Config`),
            ``"int8_static_x86"`` (the same with activation scales calibrated on
            ``calibration_batches`` training inputs at train end: the fastest CPU path),
            ``"int8_weight_only"`` (CPU and CUDA),
            ``"int4_weight_only"`` (CUDA; groups of 128, layers cast to bf16),
            ``"float8_dynamic"`` (CUDA, compute capability >= 8.9), or any torchao
            config object (``torchao.quantization.*Config``).
        skip: layers to keep in full precision: a name or glob pattern relative
            to the model (``"head"``, ``"blocks.0.*"``), a list of them, or
            ``fn(name, module) -> bool``. ``nn.MultiheadAttention``'s
            ``out_proj`` is always kept (with a note in :attr:`summary`).
        qat_start_epoch: start quantization-aware training at this epoch (the
            linear layers are swapped for torchao's fake-quantized ones that
            share the same parameters, so the optimizer trains on); converted
            to the real quantized model when training ends. ``None``: no QAT.
        compile: ``True`` (or a dict of ``torch.compile`` keyword arguments)
            compiles the quantized model in place (``nn.Module.compile``: the
            state-dict keys do not change); the int8 kernels are fastest
            compiled. ``None`` (default): compile where the config is only fast
            compiled (``"int8_dynamic_x86"``, compiled with inductor freezing).
            The compile cost is paid once at train end, on a captured
            training input under ``inference_mode``, and logged as
            ``quant/compile_seconds`` (about 15-30 s for ViT-B/16 on 2 cores);
            inputs of another shape, device or grad mode compile again on first use.
        inference_precision: ``"32-true"`` (default) or ``"bf16-mixed"``: the
            compiled x86 model runs its unquantized ops (attention, norms, GELU,
            residual adds) in bf16 under CPU autocast and returns float32
            (PyTorch's int8-mixed-bf16 recipe; for CPUs with AVX512-BF16 or AMX,
            checked at setup). x86 configs only.
        calibration_batches: how many training batches ``"int8_static_x86"``
            calibrates on: the target model's inputs of the first
            ``calibration_batches`` training steps of the last epoch are kept
            (on their device) and run through the trained model in eval mode.
        save_path: write the quantized model here as a checkpoint that
            :func:`~lightning_vitcompress.load_compressed` loads back. Checked at
            setup (not a directory, its folder writable). Should writing it fail,
            the model is put back in full precision (a half-written file is removed)
            and the error says where the fp32 copy is.
        save_fp32_path: write the trained full-precision model here first (also
            loadable with ``load_compressed``); must differ from ``save_path``. If
            writing it fails, nothing is quantized. The checkpoints ``ModelCheckpoint``
            saved during training hold the fp32 weights too.
        on_error: ``"raise"`` (default) or ``"warn"`` when quantizing or saving
            fails; the fp32 model stays in place either way.
        model_attribute: attribute of the LightningModule holding the ViT
            (``None``: found automatically).

    Resuming (``trainer.fit(ckpt_path=...)``): until QAT has started in the
    checkpoint's run, any argument may change. Once it has, the weights were
    trained for one format, so ``config``, ``skip`` and ``qat_start_epoch``
    must match the checkpoint's (an error at setup names both values).

    After fit, :attr:`summary` holds what was done: config, quantized layers,
    skipped layers with why, size before and after, output error on a real input.
    Metrics are logged under ``quant/``.
    """

    order = 60

    def __init__(
        self,
        config: Any = "int8_dynamic",
        *,
        skip: SkipSpec = None,
        qat_start_epoch: Optional[int] = None,
        compile: Union[None, bool, dict[str, Any]] = None,
        inference_precision: Literal["32-true", "bf16-mixed"] = "32-true",
        calibration_batches: int = 8,
        save_path: Optional[Union[str, Path]] = None,
        save_fp32_path: Optional[Union[str, Path]] = None,
        on_error: Literal["raise", "warn"] = "raise",
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        self._check_config(config)
        _check_skip(skip)
        if qat_start_epoch is not None:
            check_int(qat_start_epoch, "qat_start_epoch", minimum=0, example="0 (or None for no QAT)")
        _check_compile(compile)
        check_choice(on_error, "on_error", ("raise", "warn"))
        if inference_precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"inference_precision={inference_precision!r}: pass one of {list(INFERENCE_PRECISIONS)}.")
        if inference_precision != "32-true":
            if _config_label(config) not in _X86_LAYERS:
                raise ValueError(
                    f"inference_precision={inference_precision!r} needs an x86 config (compiled with inductor "
                    f"freezing), not config={_config_label(config)!r}: use config='int8_static_x86' or "
                    "'int8_dynamic_x86', or inference_precision='32-true'."
                )
            if compile is False:
                raise ValueError(
                    f"inference_precision={inference_precision!r} takes effect in the compiled model, "
                    "but compile=False: pass compile=None (default) or True."
                )
        check_int(calibration_batches, "calibration_batches", minimum=1, example="8")
        save_path, save_fp32_path = check_path(save_path, "save_path"), check_path(save_fp32_path, "save_fp32_path")
        if save_path is not None and save_fp32_path is not None and save_path.resolve() == save_fp32_path.resolve():
            raise ValueError(
                f"save_path={str(save_path)!r} and save_fp32_path={str(save_fp32_path)!r} are the same file: the "
                "quantized model would overwrite the fp32 copy. Pass two paths, e.g. 'model-int8.ckpt' and "
                "'model-fp32.ckpt'."
            )
        self.config = config
        self.skip = skip
        self.qat_start_epoch = qat_start_epoch
        self.compile = compile
        self.inference_precision = inference_precision
        self.calibration_batches = calibration_batches
        self.save_path = save_path
        self.save_fp32_path = save_fp32_path
        self.on_error = on_error
        #: what the last quantization did (``None`` before it ran)
        self.summary: Optional[dict[str, Any]] = None
        self._qat_active = False
        self._example: Optional[Example] = None
        #: training inputs of the current epoch kept for static calibration
        self._calibration: list[Example] = []
        self._capture_handle: Optional[Any] = None

    # ------------------------------------------------------------- config
    @staticmethod
    def _check_config(config: Any) -> None:
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

    @property
    def _named(self) -> Optional[_NamedConfig]:
        return NAMED_CONFIGS.get(self.config) if isinstance(self.config, str) else None

    def _ptq_config(self) -> Any:
        return _ptq_config(self.config)

    def _qat_config(self) -> Any:
        named = self._named
        if named is not None:
            return named.qat()
        from torchao.quantization.qat import QATConfig

        return QATConfig(base_config=self.config, step="prepare")

    def _group_size(self) -> Optional[int]:
        return _group_size(self.config)

    @property
    def _compiles(self) -> bool:
        if self.compile is None:
            return self._uses_x86_layers
        return self.compile is not False

    @property
    def _uses_x86_layers(self) -> bool:
        return _config_label(self.config) in _X86_LAYERS

    @property
    def _calibrates(self) -> bool:
        return _needs_calibration(self._ptq_config())

    # ------------------------------------------------------------- setup: fail fast
    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy_supported(trainer, "QuantizeOnFit")
        if self.replayed_records(trainer, RECORD_KIND):
            raise RuntimeError(
                "QuantizeOnFit: the checkpoint being resumed was saved after the model was quantized; "
                "a quantized model cannot train on. Resume from a checkpoint saved during training "
                "(they hold the fp32 weights), or load this one for inference with load_compressed(...)."
            )
        device = trainer.strategy.root_device
        self._check_device(device)
        self._check_inference_precision()
        self._check_calibration_data(trainer)
        self._check_qat_epoch(trainer)
        for argument, path in (("save_path", self.save_path), ("save_fp32_path", self.save_fp32_path)):
            if path is not None:
                check_output_file(path, argument)
        self._check_resume(trainer)
        self._dry_run(device)
        _check_skip_matches(self.target(pl_module), self.skip)
        selected, skipped = select_layers(
            self.target(pl_module), self.skip, self._group_size(), _incompatible(self.config)
        )
        if not selected:
            raise ValueError(
                f"QuantizeOnFit(config={_config_label(self.config)!r}, skip={self.skip!r}) selects no nn.Linear "
                f"layer of the model; skipped: {skipped}. Loosen `skip`."
            )
        self.summary = None
        self._qat_active = False
        self._start_capture(self.target(pl_module))

    def _check_resume(self, trainer: "pl.Trainer") -> None:
        """Once the resumed run is in QAT, its weights were trained for one format: config, skip and
        qat_start_epoch must stay. Before QAT started, any argument may change (nothing was fake-quantized)."""
        path, saved = resumed_callback_state(trainer, self)
        if not saved or not saved.get("qat_active"):
            return
        mine = self.state_dict()
        for argument in ("config", "qat_start_epoch", "skip"):
            if argument == "skip" and (saved.get("skip_callable") or mine["skip_callable"]):
                continue  # functions cannot be compared
            if saved.get(argument) != mine[argument]:
                raise ValueError(
                    f"{argument}={mine[argument]!r}, but the checkpoint being resumed ({path}) is in "
                    f"quantization-aware training with {argument}={saved.get(argument)!r}: its weights were trained "
                    f"for that setting. Resume with {argument}={saved.get(argument)!r}, or start a new fit."
                )

    def state_dict(self) -> dict[str, Any]:
        # read back at a resume's setup (_check_resume); plain data, safe to load with weights_only=True
        skip = self.skip
        return {
            "config": _config_label(self.config),
            "qat_start_epoch": self.qat_start_epoch,
            "skip": None if skip is None or callable(skip) else ([skip] if isinstance(skip, str) else sorted(skip)),
            "skip_callable": callable(skip),
            "qat_active": self._qat_active,
        }

    def _check_device(self, device: torch.device) -> None:
        named = self._named
        if named is None:
            return
        if device.type not in named.devices:
            cpu_names = sorted(n for n, c in NAMED_CONFIGS.items() if "cpu" in c.devices)
            raise ValueError(
                f"config={self.config!r} runs on {'/'.join(d.upper() for d in named.devices)} only, but this "
                f"Trainer runs on {device.type!r}. Use config={cpu_names[0]!r} or {cpu_names[1]!r} on CPU, "
                "or Trainer(accelerator='gpu')."
            )
        if named.min_capability is not None and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < named.min_capability:
                raise ValueError(
                    f"config={self.config!r} needs a GPU of compute capability >= "
                    f"{named.min_capability[0]}.{named.min_capability[1]} (Ada, Hopper or newer); "
                    f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}. "
                    "Use config='int8_dynamic' or 'int4_weight_only'."
                )

    def _check_inference_precision(self) -> None:
        if self.inference_precision == "bf16-mixed" and not cpu_supports_bfloat16():
            raise ValueError(
                "inference_precision='bf16-mixed': this CPU has no native bf16 math (AVX512-BF16 or AMX), "
                "so bf16 would be slower than float32 here. Use inference_precision='32-true'."
            )

    def _check_calibration_data(self, trainer: "pl.Trainer") -> None:
        if self._calibrates and (trainer.max_epochs == 0 or trainer.limit_train_batches == 0):
            raise ValueError(
                f"config={_config_label(self.config)!r} calibrates on training inputs, but this Trainer runs no "
                f"training step (max_epochs={trainer.max_epochs}, limit_train_batches={trainer.limit_train_batches}). "
                "Train at least one batch, or use config='int8_dynamic_x86'."
            )

    def _check_qat_epoch(self, trainer: "pl.Trainer") -> None:
        if self.qat_start_epoch is None:
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.qat_start_epoch >= max_epochs:
            raise ValueError(
                f"qat_start_epoch={self.qat_start_epoch} is not before max_epochs={max_epochs}: QAT would never "
                f"run. Pass an epoch in 0..{max_epochs - 1}, or qat_start_epoch=None for quantization at the end only."
            )

    def _dry_run(self, device: torch.device) -> None:
        """Quantize (and QAT-prepare) a small linear layer on the training device: errors now, not after fit."""
        quantize_ = _torchao().quantize_
        label = _config_label(self.config)
        step = "quantize"
        try:
            layer = nn.Linear(256, 256).to(device)
            x = torch.randn(2, 256, device=device)
            if self.qat_start_epoch is not None:
                step = "QAT prepare"
                holder = nn.ModuleList([copy.deepcopy(layer)])
                quantize_(holder, self._qat_config(), filter_fn=_is_linear)
                holder[0](x).sum().backward()
                step = "quantize"
            holder = nn.ModuleList([_prepared_copy(layer, self.config)])
            ptq_config = self._ptq_config()
            if _needs_calibration(ptq_config):
                ptq_config = dataclasses.replace(ptq_config, input_range=(-4.0, 4.0))
            quantize_(holder, ptq_config, filter_fn=_is_linear)
            named = self._named
            with torch.no_grad():
                holder[0](x.to(torch.bfloat16) if named is not None and named.bfloat16_weights else x)
        except Exception as err:  # noqa: BLE001 - any failure is reported with its cause
            what = "qat_start_epoch (torchao QAT cannot fake-quantize this config). " if step == "QAT prepare" else ""
            raise ValueError(
                f"QuantizeOnFit(config={label!r}): the {step} step failed on a test layer on {device}: "
                f"{type(err).__name__}: {err}. {what}"
                f"Named configs: {sorted(NAMED_CONFIGS)}."
            ) from err

    # ------------------------------------------------------------- example and calibration input capture
    def _start_capture(self, model: nn.Module) -> None:
        """Keep the first training input (a few rows: the check and compile example) and, for a
        static config, the first ``calibration_batches`` training inputs of each epoch."""
        self._stop_capture()
        self._example = None
        self._calibration = []
        calibrates = self._calibrates

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._example is None:
                self._example = (_detached_rows(args), _detached_rows(kwargs))
            if not calibrates:
                self._stop_capture()
            elif module.training and len(self._calibration) < self.calibration_batches:
                self._calibration.append((_detached_rows(args, rows=None), _detached_rows(kwargs, rows=None)))

        self._capture_handle = model.register_forward_pre_hook(capture, with_kwargs=True)

    def _stop_capture(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    # ------------------------------------------------------------- QAT
    def ordered_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._calibration = []  # calibrate on the last epoch's inputs, seen by the most trained weights
        if self.qat_start_epoch is None or self._qat_active or trainer.current_epoch < self.qat_start_epoch:
            return
        model = self.target(pl_module)
        selected, _ = select_layers(model, self.skip, self._group_size(), _incompatible(self.config))
        params_before = [id(p) for p in pl_module.parameters()]
        holder = nn.ModuleList([model.get_submodule(name) for name in selected])
        _torchao().quantize_(holder, self._qat_config(), filter_fn=_is_linear)
        for name, layer in zip(selected, holder):
            set_submodule(model, name, layer)
        self._qat_active = True
        if [id(p) for p in pl_module.parameters()] != params_before:
            refresh_after_structural_change(trainer)  # torchao shares the parameters today; in case it stops
        rank_zero_info(
            f"QuantizeOnFit: quantization-aware training from epoch {trainer.current_epoch} "
            f"({len(selected)} fake-quantized linear layers, config={_config_label(self.config)!r})."
        )

    # ------------------------------------------------------------- train end: quantize
    def ordered_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stop_capture()
        model = self.target(pl_module)
        label = _config_label(self.config)
        if self.save_fp32_path is not None:
            try:
                # during QAT too: fake-quantized layers keep nn.Linear's keys and hold the fp32 weights
                self._save(trainer, pl_module, pl_module.state_dict(), self.save_fp32_path)
            except Exception as err:  # noqa: BLE001 - nothing was quantized yet
                self._fail(
                    model,
                    f"QuantizeOnFit(config={label!r}) did not quantize: writing the full-precision copy to "
                    f"save_fp32_path={str(self.save_fp32_path)!r} failed ({type(err).__name__}: {err}). The trained "
                    "full-precision model was left in place; save it (trainer.save_checkpoint) before anything else.",
                    err,
                )
                return
        # the layers as trained: quantize_model swaps in quantized copies and leaves these objects untouched
        trained = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        try:
            summary = self._quantize(model, trainer)
        except Exception as err:  # noqa: BLE001 - reported with its cause; the fp32 model is in place
            self._fail(
                model,
                f"QuantizeOnFit(config={label!r}) failed, the full-precision model was left in place: "
                f"{type(err).__name__}: {err}",
                err,
            )
            return
        record_edit(
            pl_module,
            {
                "kind": RECORD_KIND,
                "target": self.target_path or "",
                "config": label,
                "layers": list(summary["quantized"]),
                "skipped": dict(summary["skipped"]),
            },
        )
        if self.save_path is not None:
            previous = _file_stamp(self.save_path)
            try:
                self._save(trainer, pl_module, pl_module.state_dict(), self.save_path)  # before compiling: same keys
            except Exception as err:  # noqa: BLE001 - undo the quantization: the user keeps the trained model
                recorded_edits(pl_module).pop()
                for name in summary["quantized"]:
                    set_submodule(model, name, trained[name])
                if trainer.is_global_zero and _file_stamp(self.save_path) != previous:
                    self.save_path.unlink(missing_ok=True)  # a half-written file must not pass for the quantized model
                fp32 = (
                    f"the fp32 copy is at save_fp32_path={str(self.save_fp32_path)!r}"
                    if self.save_fp32_path is not None
                    else "no fp32 copy was written (pass save_fp32_path to keep one)"
                )
                self._fail(
                    model,
                    f"QuantizeOnFit(config={label!r}): writing the quantized model to save_path="
                    f"{str(self.save_path)!r} failed ({type(err).__name__}: {err}); nothing new was left there. The "
                    "model was put back in "
                    f"full precision, as trained, and {fp32}. Save it with trainer.save_checkpoint(...), or "
                    "quantize it with quantize_model(...) once the path is writable.",
                    err,
                )
                return
        if self._compiles:
            summary["compile_seconds"] = self._compile(model)
        self.summary = summary
        self._log(trainer, summary)

    def _fail(self, model: nn.Module, message: str, err: Exception) -> None:
        """The model is in full precision again; raise or warn with ``message`` as ``on_error`` says."""
        if self._qat_active:
            self._remove_fake_quantization(model)
        if self.on_error == "raise":
            raise RuntimeError(message) from err
        rank_zero_warn(message)

    def _quantize(self, model: nn.Module, trainer: "pl.Trainer") -> dict[str, Any]:
        if self._calibrates and not self._calibration:
            raise RuntimeError(
                f"config={_config_label(self.config)!r} calibrates on training inputs, but no training step ran "
                "in this fit (nothing to calibrate on)."
            )
        summary = quantize_model(
            model,
            self.config,
            skip=self.skip,
            _example=self._example,
            _calibration=self._calibration or None,
            _sync_ranges=functools.partial(_reduce_ranges, trainer),  # the same model on every rank
        )
        self._calibration = []
        summary["qat"] = self._qat_active
        summary["inference_precision"] = self.inference_precision
        if summary["skipped"]:
            rank_zero_info(
                "QuantizeOnFit kept in full precision: "
                + ", ".join(f"{name} ({why})" for name, why in summary["skipped"].items())
            )
        return summary

    def _remove_fake_quantization(self, model: nn.Module) -> None:
        """Back to plain ``nn.Linear`` layers (same parameters), e.g. when quantizing failed after QAT."""
        from torchao.quantization.qat import FakeQuantizedLinear

        for name, module in list(model.named_modules()):
            if isinstance(module, FakeQuantizedLinear):
                set_submodule(model, name, module.to_linear())
        self._qat_active = False

    def _run_example(self, model: nn.Module) -> Any:
        return _run_example(model, self._example)

    def _compile(self, model: nn.Module) -> Optional[float]:
        kwargs = self.compile if isinstance(self.compile, dict) else {}
        if self._uses_x86_layers:
            compile_frozen(model, autocast_dtype=INFERENCE_PRECISIONS[self.inference_precision], **kwargs)
        else:
            model.compile(**kwargs)
        if self._example is None:
            return None
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                self._run_example(model)
        except Exception as err:  # noqa: BLE001 - the quantized model is fine, only compiling failed
            model._compiled_call_impl = None  # undo nn.Module.compile
            rank_zero_warn(f"QuantizeOnFit(compile={self.compile!r}): compiling the quantized model failed, "
                           f"it runs eager: {type(err).__name__}: {err}")
            return None
        return time.perf_counter() - start

    # ------------------------------------------------------------- files and logs
    @staticmethod
    def _save(trainer: "pl.Trainer", pl_module: "pl.LightningModule", state_dict: dict[str, Any], path: Path) -> None:
        checkpoint: dict[str, Any] = {
            "state_dict": state_dict,
            STRUCTURE_KEY: copy.deepcopy(recorded_edits(pl_module)),
            "pytorch-lightning_version": pl.__version__,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        if pl_module.hparams:
            checkpoint[pl_module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.save_checkpoint(checkpoint, path)  # rank zero writes
        trainer.strategy.barrier("QuantizeOnFit.save")
        rank_zero_info(f"QuantizeOnFit: saved {path}")

    @staticmethod
    def _log(trainer: "pl.Trainer", summary: dict[str, Any]) -> None:
        metrics = {
            "quant/layers_quantized": float(len(summary["quantized"])),
            "quant/layers_skipped": float(len(summary["skipped"])),
            "quant/size_before_mb": summary["size_before_bytes"] / _MB,
            "quant/size_after_mb": summary["size_after_bytes"] / _MB,
            "quant/size_ratio": summary["size_after_bytes"] / summary["size_before_bytes"],
        }
        if summary["output_relative_error"] is not None:
            metrics["quant/output_relative_error"] = summary["output_relative_error"]
        if summary.get("compile_seconds") is not None:
            metrics["quant/compile_seconds"] = summary["compile_seconds"]
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {
                    "quant/config": summary["config"],
                    "quant/qat": summary["qat"],
                    "quant/inference_precision": summary["inference_precision"],
                }
            )
            logger.log_metrics(metrics, step=trainer.global_step)
        error = summary["output_relative_error"]
        rank_zero_info(
            f"QuantizeOnFit: {summary['config']} quantized {len(summary['quantized'])} linear layers"
            f"{' after QAT' if summary['qat'] else ''}, kept {len(summary['skipped'])}; "
            f"size {summary['size_before_bytes'] / _MB:.2f} MB -> {summary['size_after_bytes'] / _MB:.2f} MB"
            + (f"; relative output change {error:.4f} on a training input" if error is not None else "")
        )

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stop_capture()
        self._example = None
        self._calibration = []
        super().teardown(trainer, pl_module, stage)


# ----------------------------------------------------------------------------- small helpers
def _is_linear(module: nn.Module, *args: Any) -> bool:
    return isinstance(module, nn.Linear)


def _as_args(inputs: Any) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _file_stamp(path: Path) -> Optional[tuple[int, int]]:
    """``(mtime_ns, size)`` of the file at ``path``, ``None`` when there is none: did a write touch it?"""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _state_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _detached_rows(value: Any, rows: Optional[int] = _EXAMPLE_ROWS) -> Any:
    """A detached copy of ``value``'s tensors, cut to their first ``rows`` rows (``None``: all)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        return tensor[:rows].clone() if tensor.ndim and rows is not None else tensor.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached_rows(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _detached_rows(v, rows) for k, v in value.items()}
    return value


def _reduce_ranges(trainer: "pl.Trainer", ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The union of the calibration ranges of all ranks (each rank calibrated on its own batches)."""
    if trainer.world_size <= 1:
        return ranges
    names = sorted(ranges)
    bounds = torch.tensor([[-ranges[n][0], ranges[n][1]] for n in names], device=trainer.strategy.root_device)
    bounds = trainer.strategy.reduce(bounds, reduce_op="max")
    return {name: (-float(low), float(high)) for name, (low, high) in zip(names, bounds.tolist())}


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
