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
* activations: uint8, asymmetric, per tensor, chosen at run time (its dynamic config).

Eager, the layer runs the reference quantize/dequantize ops (slower than fp32).
The speed comes from :func:`compile_frozen`: ``torch.compile`` with inductor
freezing, in inference mode.

Example::

    from torchao.quantization import quantize_
    from lightning_vitcompress import Int8DynamicX86Config
    from lightning_vitcompress._x86_int8 import compile_frozen

    quantize_(vit, Int8DynamicX86Config())
    compile_frozen(vit)
    with torch.inference_mode():
        logits = vit(images)
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

#: smallest scale, as in torchao's X86InductorQuantizer default config
_EPS = 2.0**-12


@functools.lru_cache(maxsize=None)
def _register_x86_lowering() -> None:
    """Define the ``quantized_decomposed`` ops and register inductor's x86 int8 lowering.

    Importing torchao's X86InductorQuantizer registers the freezing-pass
    patterns that turn the quantize/dequantize graph into oneDNN int8 GEMMs;
    without the import inductor compiles the reference ops.
    """
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - defines the quantized_decomposed ops
    import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401
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

        layer = X86Int8DynamicLinear.from_linear(nn.Linear(384, 1536))
    """

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
    def from_linear(cls, linear: nn.Linear) -> "X86Int8DynamicLinear":
        """Quantize ``linear``'s weight (symmetric per output channel, int8)."""
        weight = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.to(weight.device)
        scale = weight.abs().amax(dim=1).clamp(min=_EPS) / 127.5
        layer.weight.data = torch.ops.quantized_decomposed.quantize_per_channel.default(
            weight, scale, layer.weight_zero_point, 0, -128, 127, torch.int8
        )
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
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


def compile_frozen(model: nn.Module, **compile_kwargs: Any) -> None:
    """``model.compile(...)`` with inductor freezing on for every call, in place.

    Freezing (weights folded into the graph as constants) is what lets inductor
    lower the int8 layers to oneDNN; it applies under ``torch.no_grad`` /
    ``inference_mode``. ``torch.compile(options={"freezing": True})`` only
    half-applies it here (``onednn.qlinear_prepack is not an OpOverload``), so
    the inductor config is patched around each call instead; new input shapes
    recompile with freezing too. State-dict keys do not change.
    """
    import torch._inductor.config as inductor_config

    _register_x86_lowering()
    compiled: Callable[..., Any] = torch.compile(model._call_impl, **compile_kwargs)

    def call_with_freezing(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    model._compiled_call_impl = call_with_freezing  # what nn.Module.compile sets
