"""Dynamic int8 linears that inductor lowers to oneDNN's int8 GEMM on x86 CPUs.

torchao's ``Int8DynamicActivationInt8WeightConfig`` is the portable int8 path,
but on x86 CPUs its tensor subclass runs ``_int_mm`` between unfused
quantize/scale element-wise ops, eager and compiled (about 1-2x fp32 on
ViT-B/16 here). torchao's PT2E ``X86InductorQuantizer`` reaches oneDNN instead:
its quantize/dequantize graph is pattern-matched by inductor's freezing passes
into ``onednn.qlinear_pointwise`` (VNNI/AMX int8, activation quantization, GELU
and residual adds fused). :class:`Int8DynamicX86Config` gives the same recipe to
torchao's ``quantize_`` layer by layer, so the model keeps its structure
(module names, ``skip`` by name, checkpoint replay):

* weights: int8, symmetric, per output channel (X86InductorQuantizer's weight observer);
* activations: uint8, asymmetric, per tensor, chosen at run time (its dynamic
  config, :class:`X86Int8DynamicLinear`) or calibrated once on real inputs (its
  static config, :class:`X86Int8StaticLinear`, :func:`calibrate_input_ranges`).

Eager, the layer runs the reference quantize/dequantize ops (slower than fp32).
The speed comes from :func:`compile_frozen`: ``torch.compile`` with inductor
freezing, in inference mode; ``autocast_dtype=torch.bfloat16`` also runs what
is not quantized (attention, norms, GELU) in bf16, PyTorch's "int8-mixed-bf16"
recipe for CPUs with AVX512-BF16/AMX.

Example (any model with linear layers; a ViT the same way)::

    >>> import torch
    >>> from torchao.quantization import quantize_
    >>> from lightning_vitcompress import Int8DynamicX86Config
    >>> from lightning_vitcompress.functional.x86_int8 import compile_frozen
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).eval()
    >>> quantize_(mlp, Int8DynamicX86Config())
    >>> type(mlp[0]).__name__
    'X86Int8DynamicLinear'
    >>> compile_frozen(mlp)  # or compile_frozen(mlp, autocast_dtype=torch.bfloat16)
    >>> with torch.inference_mode():
    ...     logits = mlp(torch.randn(4, 64))
    >>> logits.shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from lightning_vitcompress.functional._torch_internals import (
    cpu_has_amx_or_vnni,
    eager_call,
    inductor_config,
    mkldnn_bf16_supported,
    register_quantized_decomposed_ops,
    set_compiled_call,
    tree_map,
)
from lightning_vitcompress.functional.sdpa import DecomposedAttention

#: smallest scale, as in torchao's X86InductorQuantizer default config
_EPS = 2.0**-12


@functools.cache
def _register_x86_lowering() -> None:
    """Define the ``quantized_decomposed`` ops and register inductor's x86 int8 lowering.

    Importing torchao's X86InductorQuantizer registers the freezing-pass
    patterns that turn the quantize/dequantize graph into oneDNN int8 GEMMs;
    without the import inductor compiles the reference ops.
    """
    register_quantized_decomposed_ops()
    import torchao.quantization.pt2e.inductor_passes.x86
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    # inductor's oneDNN lowering copies the zero points with torch.tensor(tensor) and warns about
    # its own code on every compile; nothing a user can act on
    warnings.filterwarnings(
        "ignore", message="To copy construct from a tensor", module=r"torch\._inductor\.mkldnn_lowerings"
    )


class X86Int8DynamicLinear(nn.Module):
    """An ``nn.Linear`` with int8 per-channel weights and dynamically quantized uint8 activations.

    ``weight`` is an int8 ``nn.Parameter`` (frozen) of the linear's shape,
    ``weight_scale`` its per-channel scales; ``bias`` stays in full precision.

    Example::

        >>> import torch
        >>> linear = torch.nn.Linear(384, 1536)
        >>> layer = X86Int8DynamicLinear.from_linear(linear)
        >>> layer.weight.dtype, layer.weight_scale.shape
        (torch.int8, torch.Size([1536]))
        >>> x = torch.randn(2, 384)
        >>> bool((layer(x) - linear(x)).abs().max() < 0.05)  # int8 weights and activations, close to fp32
        True
    """

    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    bias: Optional[nn.Parameter]

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        _register_x86_lowering()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features))
        # symmetric weights: the zero points are all 0, rebuilt here rather than saved
        self.register_buffer("weight_zero_point", torch.zeros(out_features, dtype=torch.int64), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> X86Int8DynamicLinear:
        """Quantize ``linear``'s weight (symmetric per output channel, int8)."""
        weight = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.to(weight.device)
        scale = weight.abs().amax(dim=1).clamp(min=_EPS) / 127.5
        layer.weight.data = torch.ops.quantized_decomposed.quantize_per_channel.default(
            weight, scale, layer.weight_zero_point, 0, -128, 127, torch.int8
        )
        layer.weight_scale.copy_(scale)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        scale, zero_point = ops.choose_qparams.tensor(x, 0, 255, _EPS, torch.uint8)
        x_q = ops.quantize_per_tensor.tensor(x, scale, zero_point, 0, 255, torch.uint8)
        x_dq = ops.dequantize_per_tensor.tensor(x_q, scale, zero_point, 0, 255, torch.uint8)
        weight = ops.dequantize_per_channel.default(
            self.weight, self.weight_scale, self.weight_zero_point, 0, -128, 127, torch.int8
        )
        return F.linear(x_dq, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@dataclass
class Int8DynamicX86Config(AOBaseConfig):
    """torchao config: dynamic int8 linears for x86 CPUs (:class:`X86Int8DynamicLinear`).

    Use it through :class:`~lightning_vitcompress.QuantizeOnFit` as
    ``config="int8_dynamic_x86"`` (which compiles the result), or directly with
    ``torchao.quantization.quantize_`` followed by :func:`compile_frozen`.
    """


@register_quantize_module_handler(Int8DynamicX86Config)
def _quantize_linear(module: nn.Module, config: Int8DynamicX86Config) -> nn.Module:
    if not isinstance(module, nn.Linear):
        return module
    return X86Int8DynamicLinear.from_linear(module)


class X86Int8StaticLinear(X86Int8DynamicLinear):
    """An :class:`X86Int8DynamicLinear` whose activation quantization was calibrated once.

    ``input_scale`` and ``input_zero_point`` (uint8, per tensor) are plain Python
    numbers, so the compiled graph holds them as constants and inductor fuses the
    activation quantization into the previous op; they travel in the state dict
    as the module's extra state (weights_only-safe).

    Example::

        >>> import torch
        >>> layer = X86Int8StaticLinear.from_linear(torch.nn.Linear(384, 1536), input_range=(-3.2, 4.1))
        >>> layer(torch.randn(2, 384)).shape
        torch.Size([2, 1536])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.input_scale = 1.0
        self.input_zero_point = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_range: Optional[tuple[float, float]] = None) -> X86Int8StaticLinear:
        """Quantize ``linear``'s weight; ``input_range`` (min, max) is what its inputs were seen to span."""
        if input_range is None:
            raise ValueError(
                "input_range=None: a static int8 layer needs the (min, max) of its calibration inputs; "
                "see calibrate_input_ranges()."
            )
        layer: X86Int8StaticLinear = super().from_linear(linear)  # type: ignore[assignment]
        layer.set_input_range(*input_range)
        return layer

    def set_input_range(self, low: float, high: float) -> None:
        """uint8 affine quantization covering ``[low, high]`` (and 0), as PyTorch's MinMaxObserver."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        scale = max((high - low) / 255.0, _EPS)
        self.input_scale = scale
        self.input_zero_point = int(min(max(round(-low / scale), 0), 255))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        scale, zero_point = self.input_scale, self.input_zero_point
        x_q = ops.quantize_per_tensor.default(x, scale, zero_point, 0, 255, torch.uint8)
        x_dq = ops.dequantize_per_tensor.default(x_q, scale, zero_point, 0, 255, torch.uint8)
        weight = ops.dequantize_per_channel.default(
            self.weight, self.weight_scale, self.weight_zero_point, 0, -128, 127, torch.int8
        )
        return F.linear(x_dq, weight, self.bias)

    def get_extra_state(self) -> dict[str, Any]:
        return {"input_scale": self.input_scale, "input_zero_point": self.input_zero_point}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.input_scale = float(state["input_scale"])
        self.input_zero_point = int(state["input_zero_point"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_scale={self.input_scale:.4g}, input_zero_point={self.input_zero_point}"


@dataclass
class Int8StaticX86Config(AOBaseConfig):
    """torchao config: one :class:`X86Int8StaticLinear` whose inputs span ``input_range``.

    The range differs per layer, so :func:`~lightning_vitcompress.quantize_model`
    (``config="int8_static_x86"``) calibrates the model first and applies one
    config per layer.
    """

    input_range: Optional[tuple[float, float]] = None


@register_quantize_module_handler(Int8StaticX86Config)
def _quantize_linear_static(module: nn.Module, config: Int8StaticX86Config) -> nn.Module:
    if not isinstance(module, nn.Linear):
        return module
    return X86Int8StaticLinear.from_linear(module, config.input_range)


def calibrate_input_ranges(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
    progress: Optional[Callable[[], None]] = None,
) -> dict[str, tuple[float, float]]:
    """Run ``model`` (as it is, e.g. in eval mode) on ``batches`` and return each named layer's input (min, max).

    ``batches`` holds ``(args, kwargs)`` for the model's forward. Layers that
    saw no input are left out of the result. ``progress`` is called after each batch.

    Example::

        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
        >>> images = torch.randn(4, 3, 32, 32)
        >>> ranges = calibrate_input_ranges(vit, ["blocks.0.attn.qkv"], [((images,), {})])
        >>> low, high = ranges["blocks.0.attn.qkv"]
        >>> low < 0 < high
        True
    """
    ranges: dict[str, tuple[float, float]] = {}

    def observe(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            low, high = torch.aminmax(args[0].detach().float())
            seen_low, seen_high = ranges.get(name, (float("inf"), float("-inf")))
            ranges[name] = (min(seen_low, low.item()), max(seen_high, high.item()))

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(observe(name)) for name in layer_names]
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                model(*args, **kwargs)
                if progress is not None:
                    progress()
    finally:
        for handle in handles:
            handle.remove()
    return ranges


#: the inductor settings every frozen CPU lowering uses (``compile_frozen`` and the AOTInductor export):
#: weights folded in as constants, which is what turns the int8 layers into oneDNN GEMMs
FROZEN_INDUCTOR_OPTIONS: dict[str, Any] = {"freezing": True}


def run_in_precision(
    call: Callable[..., Any],
    autocast_dtype: Optional[torch.dtype],
    *args: Any,
    decompose_attention: bool = True,
    **kwargs: Any,
) -> Any:
    """``call(*args, **kwargs)``, under CPU autocast to ``autocast_dtype`` with floating outputs cast back to float32
    ("int8-mixed-bf16"); ``None`` runs it as it is. Shared by :func:`compile_frozen` and the exported artifact.

    Under autocast, attention runs as matmul -> softmax -> matmul (:class:`~lightning_vitcompress.functional.sdpa.
    DecomposedAttention`): in bf16 that is faster on CPUs than the fused flash kernel at ViT sequence lengths
    (``benchmarks/bench_attention.py``); ``decompose_attention=False`` keeps the fused kernel.
    """
    if autocast_dtype is None:
        return call(*args, **kwargs)
    rewrite = DecomposedAttention() if decompose_attention else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=autocast_dtype), rewrite:
        output = call(*args, **kwargs)
    return tree_map(_to_float32, output)


def compile_frozen(
    model: nn.Module,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
    decompose_attention: bool = True,
    **compile_kwargs: Any,
) -> None:
    """``model.compile(...)`` with inductor freezing on for every call, in place.

    Freezing (weights folded into the graph as constants) is what lets inductor
    lower the int8 layers to oneDNN; it applies under ``torch.no_grad`` /
    ``inference_mode``. ``torch.compile(options={"freezing": True})`` only
    half-applies it here (``onednn.qlinear_prepack is not an OpOverload``), so
    the inductor config is patched around each call instead; new input shapes
    recompile with freezing too. State-dict keys do not change.

    ``autocast_dtype=torch.bfloat16`` runs each call under CPU autocast
    ("int8-mixed-bf16": the int8 GEMMs stay int8, the rest runs in bf16, attention
    as bf16 matmuls, see :func:`run_in_precision`; ``decompose_attention=False`` keeps the fused attention
    kernel) and casts floating outputs back to float32. ``QuantizeOnFit(compile={...})`` passes both here.
    """
    _register_x86_lowering()
    compiled: Callable[..., Any] = torch.compile(eager_call(model), **compile_kwargs)

    def call_with_freezing(*args: Any, **kwargs: Any) -> Any:
        with inductor_config().patch(FROZEN_INDUCTOR_OPTIONS):
            return run_in_precision(compiled, autocast_dtype, *args, decompose_attention=decompose_attention, **kwargs)

    set_compiled_call(model, call_with_freezing)  # what nn.Module.compile sets


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU has native bf16 math (AVX512-BF16 or AMX), which makes "bf16-mixed" inference fast."""
    return bool(torch.backends.mkldnn.is_available() and mkldnn_bf16_supported())


def cpu_supports_int8_dot_product() -> bool:
    """Whether this is an x86 CPU with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), where
    oneDNN's int8 GEMMs beat float32; elsewhere the x86 int8 lowering has nothing fast to lower to."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False
    return cpu_has_amx_or_vnni()
