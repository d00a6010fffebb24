"""What an export artifact computes and how it is captured: ``torch.export`` of the model, and its ONNX conversion.

The artifact computes :class:`_Deployable`: images to float32 logits, in the
configured precision. :func:`_export_program` captures it with ``torch.export``
(a model it cannot capture is a ``ValueError`` saying why) and :func:`_write_onnx`
converts the captured program. :func:`~lightning_vitcompress.functional.export.export_compressed`
decides what to write and checks it; the ``.pt2`` writer (AOTInductor) is there,
the OpenVINO one in :mod:`~lightning_vitcompress.functional.openvino`.

Example (a tiny timm ViT; one image is repeated to two rows, so the batch stays dynamic)::

    >>> import timm, torch
    >>> from pathlib import Path
    >>> from lightning_vitcompress.functional.export import ExportConfig
    >>> from lightning_vitcompress.functional.export_capture import (
    ...     _Deployable, _example_batch, _export_program, _write_onnx)
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    >>> images = torch.randn(1, 3, 32, 32)
    >>> program = _export_program(_Deployable(vit, None), _example_batch(images), dynamic_batch=True)
    >>> program.module()(torch.randn(5, 3, 32, 32)).shape
    torch.Size([5, 10])
    >>> _write_onnx(_Deployable(vit, None), program, _example_batch(images), Path("vit.onnx"), ExportConfig(), False)
    >>> Path("vit.onnx").stat().st_size > 0
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from lightning_vitcompress.functional.x86_int8 import X86Int8DynamicLinear, run_in_precision
from lightning_vitcompress.models.base import logits_of

if TYPE_CHECKING:  # export.py imports this module: its config is only a type here
    from lightning_vitcompress.functional.export import ExportConfig

__all__: list[str] = []  # private helpers of export.py


class _Deployable(nn.Module):
    """What the artifact computes: images -> logits (float32), in the configured precision."""

    def __init__(self, model: nn.Module, autocast_dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return run_in_precision(lambda x: logits_of(self.model(x)), self.autocast_dtype, images)


def _has_x86_int8(model: nn.Module) -> bool:
    return any(isinstance(module, X86Int8DynamicLinear) for module in model.modules())


def _example_batch(example_input: torch.Tensor) -> torch.Tensor:
    """At least two rows: ``torch.export`` specializes a dynamic dimension it sees as 1."""
    example_input = example_input.detach()
    return example_input if example_input.shape[0] >= 2 else example_input.repeat(2, *[1] * (example_input.dim() - 1))


def _export_program(module: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` on ``example``; a model it cannot capture is a ``ValueError`` saying why."""
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    try:
        with torch.no_grad():
            return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:
        text = _short(err, 1500)
        data_dependent = any(
            marker in text for marker in ("data-dependent", "data dependent", "GuardOnDataDependent", "Could not guard")
        )
        hint = (
            "It branches on tensor values (data-dependent control flow), which a graph cannot hold: compute the "
            "branch from shapes, or use torch.cond"
            if data_dependent
            else "Make the forward traceable by torch.export (no Python side effects that depend on values)"
        )
        raise ValueError(
            f"{type(module.model).__name__} cannot be exported with torch.export (dynamic_batch={dynamic_batch}). "
            f"{hint}. The model itself is unchanged. It said: {text}"
        ) from err


def _write_onnx(
    module: nn.Module,
    program: torch.export.ExportedProgram,
    example: torch.Tensor,
    path: Path,
    config: ExportConfig,
    int8: bool,
) -> None:
    kwargs: dict[str, Any] = {"dynamo": True, "verbose": False, "input_names": ["images"], "output_names": ["logits"]}
    if config.opset_version is not None:
        kwargs["opset_version"] = config.opset_version
    try:
        with torch.no_grad():
            onnx_program = torch.onnx.export(program, (example,), **kwargs)
        assert onnx_program is not None  # dynamo=True returns the ONNXProgram (None is the legacy exporter's)
        onnx_program.save(str(path))
    except Exception as err:
        what = "its int8 layers" if int8 or _has_quantized_weights(module) else "the model"
        raise ValueError(
            f"format='onnx': the ONNX exporter cannot convert {what} ({_short(err, 300).splitlines()[0]}). "
            "Use format='pt2' (AOTInductor, loads with torch alone), which runs every model this library makes."
        ) from err


def _short(err: BaseException, limit: int) -> str:
    """``Type: message`` without terminal colour codes, cut at ``limit`` characters."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(err).__name__}: {err}").strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def _has_quantized_weights(model: nn.Module) -> bool:
    return any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters())
