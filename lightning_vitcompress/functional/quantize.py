"""torchao quantization of a model's linear layers, and the registry of quantization configs.

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

Example::

    summary = quantize_model(vit, "int8_dynamic", skip=["head"], example_input=images)
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

# imported with the package on purpose: torchao registers its quantized tensor classes with
# torch.serialization.add_safe_globals on import, which is what lets load_compressed /
# torch.load(weights_only=True) read a quantized checkpoint in a fresh process
import torchao.quantization
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig
from torchao.utils import TorchAOBaseTensor

from lightning_vitcompress._model import set_submodule
from lightning_vitcompress._structure import Record, register_replay
from lightning_vitcompress.functional.measure import _model_device, eval_mode, serialized_size_bytes
from lightning_vitcompress.functional.x86_int8 import (
    Int8DynamicX86Config,
    Int8StaticX86Config,
    X86Int8DynamicLinear,
    X86Int8StaticLinear,
    calibrate_input_ranges,
    compile_frozen,
)

__all__ = [
    "INFERENCE_PRECISIONS",
    "QUANTIZATION_CONFIGS",
    "ModelInputs",
    "QuantizationSpec",
    "check_compile",
    "check_config",
    "check_skip",
    "quantize_model",
    "remove_fake_quantization",
    "resolve_quantization",
    "select_layers",
    "spec_for_label",
]


RECORD_KIND = "quantize"
_MB = 1e6
#: how many examples of the captured input the post-quantization check runs
_EXAMPLE_ROWS = 8

SkipSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
#: ``(min, max)`` of each named layer's inputs seen in calibration
Ranges = dict[str, tuple[float, float]]
#: ``QuantizeOnFit(inference_precision=...)``: the dtype the compiled model's unquantized ops run in
INFERENCE_PRECISIONS: dict[str, Optional[torch.dtype]] = {"32-true": None, "bf16-mixed": torch.bfloat16}


@dataclass(frozen=True)
class ModelInputs:
    """The arguments of one forward call, ``model(*args, **kwargs)``: for models that take keywords.

    :func:`quantize_model` takes one as ``example_input`` and a list of them as
    ``calibration_inputs`` (a tensor or a tuple of positional arguments also does).
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def detached(cls, args: tuple[Any, ...], kwargs: Mapping[str, Any], rows: Optional[int] = None) -> "ModelInputs":
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


# ----------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class QuantizationSpec:
    """Everything the package needs to know about one quantization config, in one place.

    A registered name (:data:`QUANTIZATION_CONFIGS`) or a torchao config object
    is resolved into one by :func:`resolve_quantization`; quantizing, QAT, the
    setup checks, compiling and the checkpoint replay read only its fields.
    """

    name: str
    """the label written to the quantize record (and ``summary["config"]``); the registry key"""
    build: Callable[[], AOBaseConfig]
    """makes the torchao PTQ config"""
    qat: Optional[Callable[[], Any]] = None
    """makes the torchao ``QATConfig(step="prepare")`` whose fake quantization matches ``build``;
    None: ``QATConfig(base_config=build())``"""
    devices: Optional[tuple[str, ...]] = None
    """device types it runs on (``("cpu", "cuda")``); None: not checked"""
    min_capability: Optional[tuple[int, int]] = None
    """lowest CUDA compute capability (float8 needs SM 8.9)"""
    bfloat16_weights: bool = False
    """the kernel needs bf16 weights (tinygemm int4): the layer is cast to bf16 first"""
    group_size: Optional[int] = None
    """in_features must be a multiple of it, else torchao leaves the layer as it is"""
    incompatible: Optional[Callable[[nn.Linear], Optional[str]]] = None
    """why a layer cannot take this config (it is then kept in full precision), or None"""
    module_class: Optional[type[nn.Module]] = None
    """the module each quantized linear is swapped for (``module_class(in_features, out_features,
    bias=...)`` is what the replay puts in); None: torchao keeps an ``nn.Linear`` whose weight is a
    tensor subclass"""
    calibrates: bool = False
    """activation ranges are calibrated on real inputs: the PTQ config's ``input_range`` is set per layer"""
    compiled_by_default: bool = False
    """only fast compiled: ``QuantizeOnFit(compile=None)`` compiles it"""
    frozen_compile: bool = False
    """compiled with :func:`~lightning_vitcompress.functional.x86_int8.compile_frozen` (inductor
    freezing) rather than ``nn.Module.compile``"""
    bf16_mixed: bool = False
    """``inference_precision="bf16-mixed"`` applies (unquantized ops in bf16 in the frozen compile)"""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"QuantizationSpec(name={self.name!r}): pass the config's name, e.g. 'int8_dynamic'.")
        if not callable(self.build):
            raise TypeError(f"QuantizationSpec(name={self.name!r}, build={self.build!r}): pass a function "
                            "returning a torchao config, e.g. torchao.quantization.Int8WeightOnlyConfig.")
        if self.bf16_mixed and not self.frozen_compile:
            raise ValueError(f"QuantizationSpec(name={self.name!r}): bf16_mixed=True needs frozen_compile=True "
                             "(bf16-mixed runs inside compile_frozen).")

    @functools.cached_property
    def config_class(self) -> type:
        """The class of the torchao config :attr:`build` makes (objects of it resolve to this entry)."""
        return type(self.build())

    # ------------------------------------------------------------- what it makes
    def ptq_config(self, input_range: Optional[tuple[float, float]] = None) -> AOBaseConfig:
        """The torchao PTQ config; ``input_range`` fills in a calibrated layer's range."""
        config = self.build()
        return config if input_range is None else dataclasses.replace(config, input_range=input_range)

    def qat_config(self) -> Any:
        """The torchao ``QATConfig(step="prepare")`` for quantization-aware training toward this config."""
        return self.qat() if self.qat is not None else QATConfig(base_config=self.build(), step="prepare")

    def select_layers(self, model: nn.Module, skip: SkipSpec = None) -> tuple[list[str], dict[str, str]]:
        """:func:`select_layers` with this config's group size and layer check."""
        return select_layers(model, skip, self.group_size, self.incompatible)

    def prepare_qat(self, model: nn.Module, skip: SkipSpec = None) -> list[str]:
        """Swap the selected linears of ``model`` for torchao's fake-quantized ones, in place; their names.

        The fake-quantized layers share the linears' parameters, so an optimizer trains on.
        """
        selected, _ = self.select_layers(model, skip)
        holder = nn.ModuleList([model.get_submodule(name) for name in selected])
        torchao.quantization.quantize_(holder, self.qat_config(), filter_fn=_is_linear)
        for name, layer in zip(selected, holder):
            set_submodule(model, name, layer)
        return selected

    def prepared_copy(self, layer: nn.Module) -> nn.Module:
        """A copy of ``layer`` ready for ``quantize_``: fake quantization removed, bf16 where the kernel needs it."""
        layer = _unprepared(copy.deepcopy(layer))
        return layer.to(torch.bfloat16) if self.bfloat16_weights else layer

    # ------------------------------------------------------------- checks
    def check_device(self, device: torch.device) -> None:
        """Raise ``ValueError`` naming the config unless it runs on ``device`` (type and CUDA capability)."""
        if self.devices is not None and device.type not in self.devices:
            cpu_names = [n for n, s in sorted(QUANTIZATION_CONFIGS.items()) if s.devices and "cpu" in s.devices]
            raise ValueError(
                f"config={self.name!r} runs on {'/'.join(d.upper() for d in self.devices)} only, but this "
                f"Trainer runs on {device.type!r}. Use config={cpu_names[0]!r} or {cpu_names[1]!r} on CPU, "
                "or Trainer(accelerator='gpu')."
            )
        if self.min_capability is not None and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < self.min_capability:
                raise ValueError(
                    f"config={self.name!r} needs a GPU of compute capability >= "
                    f"{self.min_capability[0]}.{self.min_capability[1]} (Ada, Hopper or newer); "
                    f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}. "
                    "Use config='int8_dynamic' or 'int4_weight_only'."
                )

    def check_inference_precision(self, inference_precision: Any, compile: Any = None) -> None:
        """Raise ``ValueError`` unless ``inference_precision`` is one of :data:`INFERENCE_PRECISIONS` that
        applies to this config, compiled as ``compile`` says."""
        if inference_precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"inference_precision={inference_precision!r}: pass one of {list(INFERENCE_PRECISIONS)}.")
        if inference_precision == "32-true":
            return
        if not self.bf16_mixed:
            names = " or ".join(repr(n) for n, s in QUANTIZATION_CONFIGS.items() if s.bf16_mixed)
            raise ValueError(
                f"inference_precision={inference_precision!r} needs an x86 config (compiled with inductor "
                f"freezing), not config={self.name!r}: use config={names}, or inference_precision='32-true'."
            )
        if compile is False:
            raise ValueError(
                f"inference_precision={inference_precision!r} takes effect in the compiled model, "
                "but compile=False: pass compile=None (default) or True."
            )

    def dry_run(self, device: torch.device, qat: bool = False) -> None:
        """Quantize (and with ``qat``, QAT-prepare and train) a small linear layer on ``device``.

        Raises ``ValueError`` naming the step that failed: errors at setup, not after a fit.
        """
        step = "quantize"
        try:
            layer = nn.Linear(256, 256).to(device)
            x = torch.randn(2, 256, device=device)
            if qat:
                step = "QAT prepare"
                holder = nn.ModuleList([copy.deepcopy(layer)])
                torchao.quantization.quantize_(holder, self.qat_config(), filter_fn=_is_linear)
                holder[0](x).sum().backward()
                step = "quantize"
            holder = nn.ModuleList([self.prepared_copy(layer)])
            config = self.ptq_config((-4.0, 4.0) if self.calibrates else None)
            torchao.quantization.quantize_(holder, config, filter_fn=_is_linear)
            with torch.no_grad():
                holder[0](x.to(torch.bfloat16) if self.bfloat16_weights else x)
        except Exception as err:  # noqa: BLE001 - any failure is reported with its cause
            what = "qat_start_epoch (torchao QAT cannot fake-quantize this config). " if step == "QAT prepare" else ""
            raise ValueError(
                f"QuantizeOnFit(config={self.name!r}): the {step} step failed on a test layer on {device}: "
                f"{type(err).__name__}: {err}. {what}"
                f"Named configs: {sorted(QUANTIZATION_CONFIGS)}."
            ) from err

    # ------------------------------------------------------------- compiling
    def compiles(self, compile: Union[None, bool, dict[str, Any]]) -> bool:
        """Whether ``QuantizeOnFit(compile=...)`` compiles this config (``None``: :attr:`compiled_by_default`)."""
        return self.compiled_by_default if compile is None else compile is not False

    def compile(self, model: nn.Module, inference_precision: str = "32-true", **compile_kwargs: Any) -> None:
        """Compile the quantized ``model`` in place (state-dict keys unchanged), as this config is fastest."""
        if self.frozen_compile:
            compile_frozen(model, autocast_dtype=INFERENCE_PRECISIONS[inference_precision], **compile_kwargs)
        else:
            model.compile(**compile_kwargs)


def _float8_incompatible(layer: nn.Linear) -> Optional[str]:
    # torchao 0.18 takes a tensor-wise scaled 128x128 weight for 128x128 block scaling and the
    # matmul then asserts ("input_tensor must be 1x128 scaled"); seen on an H100
    if tuple(layer.weight.shape) == (128, 128):
        return "a 128x128 weight, which torchao's float8 tensor-wise matmul mistakes for 128x128 blocks"
    return None


def _int8_per_channel_weights() -> IntxFakeQuantizeConfig:
    return IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)


def _int8_dynamic_qat() -> QATConfig:
    # torchao's QATConfig cannot infer fake quantization from Int8DynamicActivationInt8WeightConfig,
    # and its fake quantizer has no symmetric per-token mode: per-token asymmetric int8 activations
    # (the closest it has) with symmetric per-channel int8 weights, as the PTQ config quantizes them
    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    return QATConfig(activation_config=activations, weight_config=_int8_per_channel_weights(), step="prepare")


def _int8_weight_only_qat() -> QATConfig:
    return QATConfig(weight_config=_int8_per_channel_weights(), step="prepare")


def _int4_qat() -> QATConfig:
    # QAT infers int4 fake quantization from the plain-format config only; the numerics are the same
    return QATConfig(base_config=Int4WeightOnlyConfig(group_size=128), step="prepare")


def _float8_qat() -> QATConfig:
    return QATConfig(base_config=Float8DynamicActivationFloat8WeightConfig(), step="prepare")


#: the named configs: ``QuantizeOnFit(config=name)`` / ``quantize_model(model, name)``; one entry each
QUANTIZATION_CONFIGS: dict[str, QuantizationSpec] = {
    "int8_dynamic": QuantizationSpec(
        name="int8_dynamic",
        build=Int8DynamicActivationInt8WeightConfig,
        qat=_int8_dynamic_qat,
        devices=("cpu", "cuda"),
    ),
    "int8_dynamic_x86": QuantizationSpec(
        # torchao's X86InductorQuantizer recipe, lowered by inductor to oneDNN int8 GEMMs
        name="int8_dynamic_x86",
        build=Int8DynamicX86Config,
        # torchao's fake quantizers have no per-tensor mode (it quantizes activations per tensor):
        # per-token, the closest, models slightly less rounding noise than deployment sees
        qat=_int8_dynamic_qat,
        devices=("cpu",),
        module_class=X86Int8DynamicLinear,
        compiled_by_default=True,
        frozen_compile=True,
        bf16_mixed=True,
    ),
    "int8_static_x86": QuantizationSpec(
        # the same layers with activation scales calibrated on training inputs at train end: the
        # activation quantization then fuses into the op before each linear (X86InductorQuantizer static)
        name="int8_static_x86",
        build=Int8StaticX86Config,
        qat=_int8_dynamic_qat,
        devices=("cpu",),
        module_class=X86Int8StaticLinear,
        calibrates=True,
        compiled_by_default=True,
        frozen_compile=True,
        bf16_mixed=True,
    ),
    "int8_weight_only": QuantizationSpec(
        name="int8_weight_only",
        build=Int8WeightOnlyConfig,
        qat=_int8_weight_only_qat,
        devices=("cpu", "cuda"),
    ),
    "int4_weight_only": QuantizationSpec(
        # the tile-packed format runs on core PyTorch's tinygemm kernel (the plain format needs mslk)
        name="int4_weight_only",
        build=functools.partial(Int4WeightOnlyConfig, group_size=128, int4_packing_format="tile_packed_to_4d"),
        qat=_int4_qat,
        devices=("cuda",),
        bfloat16_weights=True,
        group_size=128,
    ),
    "float8_dynamic": QuantizationSpec(
        name="float8_dynamic",
        build=Float8DynamicActivationFloat8WeightConfig,
        qat=_float8_qat,
        devices=("cuda",),
        min_capability=(8, 9),
        incompatible=_float8_incompatible,
    ),
}


# ----------------------------------------------------------------------------- resolving
def check_config(config: Any) -> None:
    """Raise naming ``config`` unless it is a registered name, a torchao config object or a spec."""
    if isinstance(config, QuantizationSpec):
        return
    if isinstance(config, str):
        if config not in QUANTIZATION_CONFIGS:
            raise ValueError(
                f"config={config!r} is not a known quantization config. Use one of {sorted(QUANTIZATION_CONFIGS)} "
                "or pass a torchao config object, e.g. torchao.quantization.Int8WeightOnlyConfig()."
            )
        if QUANTIZATION_CONFIGS[config].name != config:
            raise ValueError(
                f"QUANTIZATION_CONFIGS[{config!r}] is a QuantizationSpec named {QUANTIZATION_CONFIGS[config].name!r}: "
                "register each spec under its own name (its name is the label checkpoints are replayed by)."
            )
        return
    if not isinstance(config, AOBaseConfig):
        raise TypeError(
            f"config={config!r} ({type(config).__name__}): pass a name from {sorted(QUANTIZATION_CONFIGS)} "
            "or a torchao config object (torchao.core.config.AOBaseConfig)."
        )


def resolve_quantization(config: Any) -> QuantizationSpec:
    """The :class:`QuantizationSpec` of ``config``: a registered name, a torchao config object or a spec.

    A torchao config object of a registered class (``Int8StaticX86Config(...)``)
    gets that entry's layer class, calibration (unless it gives an
    ``input_range``) and compile behaviour, with ``group_size`` from the object;
    the entry's device list, bf16 cast, layer check and QAT recipe belong to its
    name, not the class, so the object is quantized as given. Any other torchao
    config gets a plain spec named after its class.

    Raises:
        ValueError: an unknown name. TypeError: neither a name, a torchao config nor a spec.
    """
    check_config(config)
    if isinstance(config, QuantizationSpec):
        return config
    if isinstance(config, str):
        return QUANTIZATION_CONFIGS[config]
    entry = next((s for s in QUANTIZATION_CONFIGS.values() if type(config) is s.config_class), None)
    name = type(config).__name__
    if entry is None:
        return QuantizationSpec(name=name, build=functools.partial(_given, config))
    group_size = getattr(config, "group_size", None) if entry.group_size is not None else None
    return QuantizationSpec(
        name=name,
        build=functools.partial(_given, config),
        group_size=int(group_size) if group_size is not None else None,
        module_class=entry.module_class,
        calibrates=entry.calibrates and getattr(config, "input_range", None) is None,
        compiled_by_default=entry.compiled_by_default,
        frozen_compile=entry.frozen_compile,
        bf16_mixed=entry.bf16_mixed,
    )


def _given(config: AOBaseConfig) -> AOBaseConfig:
    """``build`` of a spec resolved from a config object (a function, so the spec pickles, e.g. for ddp_spawn)."""
    return config


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


# ----------------------------------------------------------------------------- argument checks (the value alone)
def check_skip(skip: Any) -> None:
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


def check_compile(compile: Any) -> None:
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


# ----------------------------------------------------------------------------- layer selection
def _is_mha_out_proj(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _is_quantized_weight(weight: Any) -> bool:
    """True for torchao's quantized tensor subclasses (not fp32/bf16 parameters)."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return type(data) is not torch.Tensor


def _is_quantized_layer(layer: nn.Module, spec: QuantizationSpec) -> bool:
    """A layer ``quantize_`` changed: swapped for the spec's module, or given a quantized weight."""
    if spec.module_class is not None and isinstance(layer, spec.module_class):
        return True
    weight = getattr(layer, "weight", None)
    return weight is not None and _is_quantized_weight(weight)


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
@register_replay(RECORD_KIND)
def _replay_quantize(model: nn.Module, record: Record) -> None:
    """Prepare a freshly built model for a quantized state dict.

    torchao keeps each quantized layer an ``nn.Linear`` whose weight is a tensor
    subclass, so the structure is unchanged: loading with ``assign=True`` (as
    :func:`~lightning_vitcompress.load_compressed` does) restores the quantized
    weights; here the layers are checked and their weights frozen. Configs with
    a :attr:`~QuantizationSpec.module_class` (the x86 int8 layers) swap each
    linear for one: empty ones of the same shape are put in, for the state dict
    to fill (scales and calibrated input ranges included).
    """
    spec = spec_for_label(record.get("config", ""))
    module_class = spec.module_class if spec is not None else None
    for name in record.get("layers", []):
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"The checkpoint's quantize record names layer {name!r}, which this model lacks.") from err
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"The checkpoint's quantize record names {name!r}, a {type(layer).__name__}, not nn.Linear.")
        if module_class is not None:
            empty = module_class(layer.in_features, layer.out_features, bias=layer.bias is not None)
            set_submodule(model, name, empty.to(layer.weight.device))
        else:
            layer.weight.requires_grad_(False)


# ----------------------------------------------------------------------------- quantizing a model
def _unprepared(layer: nn.Module) -> nn.Module:
    return layer.to_linear() if isinstance(layer, FakeQuantizedLinear) else layer


def remove_fake_quantization(model: nn.Module) -> None:
    """Put plain ``nn.Linear`` layers (the same parameters) back for torchao's QAT fake-quantized ones, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizedLinear):
            set_submodule(model, name, module.to_linear())


def _as_inputs(inputs: Any) -> ModelInputs:
    if isinstance(inputs, ModelInputs):
        return inputs
    return ModelInputs(inputs if isinstance(inputs, tuple) else (inputs,))


def _run(model: nn.Module, inputs: Optional[ModelInputs]) -> Any:
    """``model`` on ``inputs`` (moved to its device), in eval mode; None without inputs."""
    if inputs is None:
        return None
    device = _model_device(model)
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

    Returns:
        ``{"config", "quantized": [names], "skipped": {name: why}, "size_before_bytes",
        "size_after_bytes", "output_relative_error"}``.

    Example::

        summary = quantize_model(vit, "int8_dynamic", skip=["head"], example_input=images)
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
    _check_skip_matches(model, skip)
    selected, skipped = spec.select_layers(model, skip)
    if not selected:
        raise ValueError(f"skip={skip!r} leaves no nn.Linear layer to quantize; skipped: {skipped}")
    originals = {name: model.get_submodule(name) for name in selected}
    size_before = serialized_size_bytes(model)
    with torch.no_grad():
        try:
            reference = _run(model, example)
        except Exception as err:  # noqa: BLE001 - nothing was changed yet
            raise ValueError(
                f"example_input: the model cannot run it before quantizing ({type(err).__name__}: {err}); "
                "pass an input the model takes. The model is unchanged."
            ) from err
        copies = nn.ModuleList([spec.prepared_copy(layer) for layer in originals.values()])
        if spec.calibrates:
            device = _model_device(model)
            with eval_mode(model):
                ranges = calibrate_input_ranges(
                    model,
                    selected,
                    ((_to_device(i.args, device), _to_device(dict(i.kwargs), device)) for i in calibration),
                )
            if reduce_ranges is not None:
                # every selected layer, so all processes reduce the same tensor; unseen ones stay infinite
                unseen = (float("inf"), float("-inf"))
                ranges = reduce_ranges({name: ranges.get(name, unseen) for name in selected})
                ranges = {name: r for name, r in ranges.items() if r[0] <= r[1]}
            for index, name in enumerate(selected):
                if name in ranges:  # a layer the calibration inputs never reached stays full precision
                    holder = nn.ModuleList([copies[index]])
                    torchao.quantization.quantize_(holder, spec.ptq_config(ranges[name]), filter_fn=_is_linear)
                    copies[index] = holder[0]
        else:
            torchao.quantization.quantize_(copies, spec.ptq_config(), filter_fn=_is_linear)
    quantized: list[str] = []
    for name, layer in zip(selected, copies):
        if _is_quantized_layer(layer, spec):
            quantized.append(name)
        elif spec.calibrates:
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
            output = _run(model, example)
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


def _is_linear(module: nn.Module, *args: Any) -> bool:
    return isinstance(module, nn.Linear)


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
