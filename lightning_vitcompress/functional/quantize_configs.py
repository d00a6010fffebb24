"""The registry of quantization configs: one frozen :class:`QuantizationSpec` per name.

Everything the code needs to know about a config (how to build the torchao
config, its QAT recipe, devices, calibration, the module it swaps in, how it
compiles) is one entry; :func:`resolve_quantization` turns a name, a torchao
config object or a spec into one, once. Adding a config is one entry::

    QUANTIZATION_CONFIGS["int8_weight_only_wide"] = QuantizationSpec(
        name="int8_weight_only_wide", build=Int8WeightOnlyConfig, devices=("cpu", "cuda"),
        incompatible=lambda layer: "fewer than 64 inputs" if layer.in_features < 64 else None,
    )
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
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

from lightning_vitcompress._model import set_submodule
from lightning_vitcompress.functional._torch_internals import inductor_mode_options
from lightning_vitcompress.functional.quantize_layers import SkipSpec, is_linear, select_layers
from lightning_vitcompress.functional.x86_int8 import (
    Int8DynamicX86Config,
    Int8StaticX86Config,
    X86Int8DynamicLinear,
    X86Int8StaticLinear,
    compile_frozen,
    cpu_supports_bfloat16,
    cpu_supports_int8_dot_product,
)

__all__ = [
    "INFERENCE_PRECISIONS",
    "QUANTIZATION_CONFIGS",
    "DefaultChoice",
    "QuantizationSpec",
    "check_compile",
    "check_config",
    "default_quantization",
    "resolve_quantization",
]


#: ``QuantizeOnFit(inference_precision=...)``: the dtype the compiled model's unquantized ops run in
INFERENCE_PRECISIONS: dict[str, Optional[torch.dtype]] = {"32-true": None, "bf16-mixed": torch.bfloat16}


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
            raise TypeError(
                f"QuantizationSpec(name={self.name!r}, build={self.build!r}): pass a function "
                "returning a torchao config, e.g. torchao.quantization.Int8WeightOnlyConfig."
            )
        if self.bf16_mixed and not self.frozen_compile:
            raise ValueError(
                f"QuantizationSpec(name={self.name!r}): bf16_mixed=True needs frozen_compile=True "
                "(bf16-mixed runs inside compile_frozen)."
            )

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
        torchao.quantization.quantize_(holder, self.qat_config(), filter_fn=is_linear)
        for name, layer in zip(selected, holder):
            set_submodule(model, name, layer)
        return selected

    def prepared_copy(self, layer: nn.Module) -> nn.Module:
        """A copy of ``layer`` ready for ``quantize_``: fake quantization removed, bf16 where the kernel needs it."""
        layer = unprepared(copy.deepcopy(layer))
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
        applies to this config, compiled as ``compile`` says (whose ``decompose_attention`` only x86 configs take)."""
        if inference_precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"inference_precision={inference_precision!r}: pass one of {list(INFERENCE_PRECISIONS)}.")
        if isinstance(compile, dict) and DECOMPOSE_ATTENTION in compile and not self.frozen_compile:
            names = " or ".join(repr(n) for n, s in QUANTIZATION_CONFIGS.items() if s.frozen_compile)
            raise ValueError(
                f"compile={compile!r}: {DECOMPOSE_ATTENTION} applies to the x86 configs' bf16-mixed inference "
                f"(compile_frozen), not config={self.name!r}: use config={names}, or drop the key."
            )
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
                torchao.quantization.quantize_(holder, self.qat_config(), filter_fn=is_linear)
                holder[0](x).sum().backward()
                step = "quantize"
            holder = nn.ModuleList([self.prepared_copy(layer)])
            config = self.ptq_config((-4.0, 4.0) if self.calibrates else None)
            torchao.quantization.quantize_(holder, config, filter_fn=is_linear)
            with torch.no_grad():
                holder[0](x.to(torch.bfloat16) if self.bfloat16_weights else x)
        except Exception as err:
            what = "qat_start_epoch (torchao QAT cannot fake-quantize this config). " if step == "QAT prepare" else ""
            raise ValueError(
                f"QuantizeOnFit(config={self.name!r}): the {step} step failed on a test layer on {device}: "
                f"{type(err).__name__}: {err}. {what}"
                f"Named configs: {sorted(QUANTIZATION_CONFIGS)}."
            ) from err

    # ------------------------------------------------------------- compiling
    def compiles(self, compile: Union[bool, dict[str, Any], None]) -> bool:
        """Whether ``QuantizeOnFit(compile=...)`` compiles this config (``None``: :attr:`compiled_by_default`)."""
        return self.compiled_by_default if compile is None else compile is not False

    def compile(self, model: nn.Module, inference_precision: str = "32-true", **compile_kwargs: Any) -> None:
        """Compile the quantized ``model`` in place (state-dict keys unchanged), as this config is fastest."""
        if self.frozen_compile:
            compile_frozen(model, autocast_dtype=INFERENCE_PRECISIONS[inference_precision], **compile_kwargs)
        else:  # no autocast here, so no attention to write out ("auto" passes one compile= to every candidate)
            compile_kwargs.pop(DECOMPOSE_ATTENTION, None)
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


@dataclass(frozen=True)
class DefaultChoice:
    """What :func:`default_quantization` picked for a device, and why (said in the log and the summary)."""

    config: str
    inference_precision: str
    reason: str


def default_quantization(device: torch.device, calibrates: bool = True) -> DefaultChoice:
    """The int8 config that is fast where the model runs, read from what the hardware reports (no timing).

    * x86 CPU with int8 dot products (AVX512-VNNI, AVX-VNNI, AMX): ``"int8_static_x86"``
      (``"int8_dynamic_x86"`` when ``calibrates`` is False: no training batch to calibrate on),
      lowered by inductor to oneDNN int8 GEMMs; ``"bf16-mixed"`` where the CPU has native bf16;
    * CUDA: ``"float8_dynamic"`` on compute capability >= 8.9, else ``"int8_dynamic"``;
    * anything else (ARM, x86 without VNNI): ``"int8_dynamic"``, torchao's portable int8.

    ``QuantizeOnFit(config="auto")`` measures instead of reading. Example::

        >>> import torch
        >>> from lightning_vitcompress.functional.quantize_configs import default_quantization
        >>> default_quantization(torch.device("meta")).config
        'int8_dynamic'
    """
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability >= QUANTIZATION_CONFIGS["float8_dynamic"].min_capability:  # type: ignore[operator]
            return DefaultChoice(
                "float8_dynamic",
                "32-true",
                f"CUDA compute capability {capability[0]}.{capability[1]} has float8 tensor cores",
            )
        return DefaultChoice(
            "int8_dynamic",
            "32-true",
            f"CUDA compute capability {capability[0]}.{capability[1]}: int8 (float8 needs 8.9 or newer)",
        )
    if device.type == "cpu" and cpu_supports_int8_dot_product():
        bf16 = cpu_supports_bfloat16()
        config = "int8_static_x86" if calibrates else "int8_dynamic_x86"
        reason = "x86 CPU with int8 dot products (VNNI/AMX): oneDNN int8 GEMMs" + (
            ", activation ranges calibrated on training batches"
            if calibrates
            else " with dynamic activation ranges (no training batch to calibrate on)"
        )
        reason += ", the rest in bf16 (native on this CPU)" if bf16 else " (no native bf16 on this CPU: float32 rest)"
        return DefaultChoice(config, "bf16-mixed" if bf16 else "32-true", reason)
    return DefaultChoice(
        "int8_dynamic", "32-true", f"{device.type} device without x86 int8 dot products: torchao's portable int8"
    )


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


def _compile_arguments() -> set[str]:
    return {name for name in inspect.signature(torch.compile).parameters if name != "model"}


#: the ``compile=`` key that is not torch.compile's: the x86 configs' :func:`compile_frozen` option
DECOMPOSE_ATTENTION = "decompose_attention"


def check_compile(compile: Any) -> None:
    """``compile`` is None, a bool, or a dict of ``torch.compile`` keyword arguments it takes (and, for the x86
    configs, ``decompose_attention``: checked against the config by :meth:`QuantizationSpec.check_inference_precision`)."""
    if compile is None or isinstance(compile, bool):
        return
    if not isinstance(compile, dict):
        raise TypeError(f"compile={compile!r}: pass True/False, a dict of torch.compile arguments, or None.")
    unknown = sorted(set(compile) - _compile_arguments() - {DECOMPOSE_ATTENTION})
    if unknown:
        raise ValueError(
            f"compile={compile!r}: torch.compile takes no argument {unknown}; it takes {sorted(_compile_arguments())} "
            f"(and the x86 configs {DECOMPOSE_ATTENTION!r})."
        )
    if not isinstance(compile.get(DECOMPOSE_ATTENTION, True), bool):
        raise TypeError(f"compile={compile!r}: {DECOMPOSE_ATTENTION} must be True or False.")
    mode = compile.get("mode")
    if mode is not None:
        modes = inductor_mode_options()
        if mode not in modes:
            raise ValueError(f"compile={compile!r}: mode={mode!r} is not a torch.compile mode; use one of {modes}.")


def unprepared(layer: nn.Module) -> nn.Module:
    return layer.to_linear() if isinstance(layer, FakeQuantizedLinear) else layer
