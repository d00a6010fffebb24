"""Export the compressed model as a file a server loads without this library (nor Lightning, timm, torchao).

A compressed model lives in a Python process that imports Lightning, timm,
torchao and us; the fastest CPU paths exist only as a ``torch.compile`` of that
live model, paid again (15-20 s for ViT-B/16) in every process. What a team
deploys is a file: :func:`export_compressed` writes

* ``format="pt2"``: ``torch.export`` of the model, compiled ahead of time by
  AOTInductor into a ``.pt2`` package for the model's device, with the same
  lowering the in-process compiled paths use (inductor freezing, the x86 int8
  layers as oneDNN GEMMs, ``inference_precision="bf16-mixed"`` as CPU autocast).
  Load it with ``torch._inductor.aoti_load_package(path)``; torch alone runs it.
* ``format="onnx"``: the dynamo ONNX exporter; run it with onnxruntime. For the
  float structures (pruned, Nystrom, distilled); int8 where onnxruntime runs the
  exported quantize/dequantize graph, else an error naming ``"pt2"``.
* ``format="openvino"``: an OpenVINO IR (``.xml`` + ``.bin``) of the float model,
  ``quantize="int8"`` by NNCF (see :mod:`~lightning_vitcompress.functional.openvino`);
  OpenVINO alone runs it. The fastest CPU runtime on the machines measured here.

The artifact maps a batch of images to the logits tensor (output objects and
DeiT's tuples are read as :func:`~lightning_vitcompress.models.logits_of` reads
them), with a dynamic batch size and the image size of the example input. It is
written next to its final path and moved there only once it loaded back and its
outputs matched the live model's within :data:`TOLERANCES`. What the artifact
computes, its capture and the ONNX conversion are in
:mod:`~lightning_vitcompress.functional.export_capture`.

Example (a tiny timm ViT; a pruned or quantized one the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.export import export_compressed
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    >>> images = torch.randn(8, 3, 32, 32)
    >>> summary = export_compressed(vit, "vit.pt2", images[:2])   # checked against the live model
    >>> runner = torch._inductor.aoti_load_package("vit.pt2")   # in the server: torch only
    >>> summary["format"], runner(images).shape   # any batch size
    ('pt2', torch.Size([8, 10]))
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_vitcompress._checks import check_bool, check_choice, check_output_file, check_path
from lightning_vitcompress.functional._torch_internals import (
    FORWARD_HOOK_DICTS,
    aoti_compile_and_package,
    compiled_call,
    set_compiled_call,
)
from lightning_vitcompress.functional.artifact import (
    ARTIFACT_FORMATS,
    ArtifactMismatchError,
    LoadedArtifact,
    artifact_files,
    load_artifact,
    verify_artifact,
)
from lightning_vitcompress.functional.export_capture import (
    _Deployable,
    _example_batch,
    _export_program,
    _has_quantized_weights,
    _has_x86_int8,
    _write_onnx,
)
from lightning_vitcompress.functional.measure import eval_mode
from lightning_vitcompress.functional.openvino import check_openvino_installed, convert_to_openvino, write_openvino
from lightning_vitcompress.functional.quantize_configs import INFERENCE_PRECISIONS
from lightning_vitcompress.functional.x86_int8 import (
    FROZEN_INDUCTOR_OPTIONS,
    _register_x86_lowering,
    cpu_supports_bfloat16,
)

__all__ = [
    "ARTIFACT_FORMATS",
    "NNCF_INT8_TOLERANCE",
    "TOLERANCES",
    "ArtifactMismatchError",
    "ExportConfig",
    "LoadedArtifact",
    "check_exportable",
    "export_compressed",
    "load_artifact",
]


#: how far the loaded artifact's logits may be from the live model's on the same real batch, as
#: ``max |artifact - live| / max |live|``, per (precision, int8 layers present). The reference is the live model
#: run eagerly in the same precision; compiled kernels differ in summation order (float32), in rounding to bf16
#: at other points (bf16-mixed), and int8 layers re-quantize activations whose values may move by one step
TOLERANCES: dict[tuple[str, bool], float] = {
    ("32-true", False): 1e-3,
    ("32-true", True): 3e-2,
    ("bf16-mixed", False): 5e-2,
    ("bf16-mixed", True): 8e-2,
}
#: the same for an OpenVINO IR that NNCF quantized to int8: its activations are quantized at more places (the
#: attention matmuls too, per tensor) than torch's int8 layers, so its logits move more; ExportOnFit also reports
#: the IR's top-1 agreement with the live model on validation data, the check that matters for a classifier
NNCF_INT8_TOLERANCE = 0.25

_INSTALL_ONNX = "pip install 'lightning-vitcompress[export]' (onnx, onnxscript, onnxruntime)"


@dataclass(frozen=True)
class ExportConfig:
    """What to export, validated once.

    Args:
        format: ``"pt2"`` (AOTInductor package, torch alone loads it), ``"onnx"`` (onnxruntime) or
            ``"openvino"`` (an OpenVINO IR, ``.xml`` + ``.bin``; OpenVINO alone loads it).
        inference_precision: ``"32-true"`` or ``"bf16-mixed"`` (the unquantized ops run in bf16, outputs
            float32: CPU autocast in a ``"pt2"``, QuantizeOnFit's int8-mixed-bf16; the bf16 precision hint in an
            OpenVINO IR; on a CPU with AVX512-BF16 or AMX). None: ``"32-true"`` (``ExportOnFit``: the
            ``QuantizeOnFit``'s in the Trainer); for ``"openvino"``, ``"bf16-mixed"`` where the CPU has native bf16.
        quantize: ``"openvino"`` only: ``"int8"`` quantizes the IR with NNCF (transformer preset) on the
            calibration batches given to :func:`export_compressed`; None: float.
        dynamic_batch: any batch size (``torch.export.Dim``); False fixes the example's. The image size is fixed.
        device: where the artifact runs, ``"cpu"`` or ``"cuda"``; None: the model's device.
        check: load the file back and compare its outputs with the live model's (see :data:`TOLERANCES`).
        tolerance: override :data:`TOLERANCES` (relative to the largest live logit).
        opset_version: ONNX opset (None: the exporter's default).

    Example::

        >>> from lightning_vitcompress.functional.export import ExportConfig, export_stages
        >>> config = ExportConfig(format="onnx")   # export_compressed(vit, "vit.onnx", images, config)
        >>> config.precision, export_stages(config)
        ('32-true', ['trace (torch.export)', 'write ONNX', 'load back and check'])
    """

    format: Literal["pt2", "onnx", "openvino"] = "pt2"
    inference_precision: Optional[Literal["32-true", "bf16-mixed"]] = None
    quantize: Optional[Literal["int8"]] = None
    dynamic_batch: bool = True
    device: Optional[str] = None
    check: bool = True
    tolerance: Optional[float] = None
    opset_version: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice(self.format, "format", tuple(ARTIFACT_FORMATS), " ('pt2': AOTInductor, torch alone loads it)")
        if self.inference_precision is not None:
            check_choice(self.inference_precision, "inference_precision", tuple(INFERENCE_PRECISIONS))
        check_bool(self.dynamic_batch, "dynamic_batch", "export any batch size")
        check_bool(self.check, "check", "load the file back and compare its outputs")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device={self.device!r}: pass 'cpu', 'cuda' or None (the model's device).") from err
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"device={self.device!r}: pass 'cpu', 'cuda' or None (the model's device).")
        if self.tolerance is not None and (not isinstance(self.tolerance, (int, float)) or not self.tolerance > 0):
            raise ValueError(f"tolerance={self.tolerance!r}: pass a positive number (e.g. 1e-3), or None.")
        if self.opset_version is not None and (not isinstance(self.opset_version, int) or self.opset_version < 7):
            raise ValueError(f"opset_version={self.opset_version!r}: pass an ONNX opset number (e.g. 18), or None.")
        if self.quantize is not None:
            check_choice(self.quantize, "quantize", ("int8",), " (NNCF int8), or None")
            if self.format != "openvino":
                raise ValueError(
                    f"quantize={self.quantize!r} with format={self.format!r}: NNCF quantizes OpenVINO IRs only. Use "
                    "format='openvino', or quantize the model itself (QuantizeOnFit / quantize_model) for "
                    f"{self.format!r}."
                )
        if self.format == "onnx" and self.precision != "32-true":
            raise ValueError(
                f"inference_precision={self.inference_precision!r} with format='onnx': onnxruntime has no CPU "
                "autocast (bf16-mixed). Use format='pt2' for bf16-mixed, or inference_precision='32-true'."
            )

    @property
    def precision(self) -> str:
        """``inference_precision``; when None, ``"32-true"`` (``"openvino"``: bf16 where the CPU has it natively)."""
        if self.inference_precision is not None:
            return self.inference_precision
        return "bf16-mixed" if self.format == "openvino" and cpu_supports_bfloat16() else "32-true"

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The CPU autocast dtype the traced model runs in (None for OpenVINO, which applies its own hint)."""
        return None if self.format == "openvino" else INFERENCE_PRECISIONS[self.precision]

    def check_environment(self) -> None:
        """What can be known before exporting: the ONNX packages, bf16 math on this CPU, CUDA when asked for."""
        if self.format == "onnx":
            missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
            if missing:
                raise ImportError(f"format='onnx' needs {missing}: {_INSTALL_ONNX}. Or use format='pt2' (torch only).")
        if self.format == "openvino":
            check_openvino_installed(self.quantize)
            if self.device is not None and torch.device(self.device).type != "cpu":
                raise ValueError(
                    f"device={self.device!r} with format='openvino': the IR is written for OpenVINO's "
                    "CPU plugin. Pass device='cpu' or None, or use format='pt2' for CUDA."
                )
        if self.precision == "bf16-mixed" and not cpu_supports_bfloat16():
            raise ValueError(
                "inference_precision='bf16-mixed': this CPU has no native bf16 math (AVX512-BF16 or AMX), so the "
                "artifact would be slower than float32. Use inference_precision='32-true'."
            )
        if self.device is not None and torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r}: this machine has no CUDA device. Pass device='cpu' or None.")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@contextlib.contextmanager
def _uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with an in-place ``nn.Module.compile`` (QuantizeOnFit's) set aside: export traces the eager model."""
    compiled = compiled_call(model)
    set_compiled_call(model, None)
    try:
        yield model
    finally:
        set_compiled_call(model, compiled)


@contextlib.contextmanager
def _hooks_set_aside(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its modules' forward hooks set aside: a trial trace must not reach hooks that keep inputs
    (QuantizeOnFit's capture of the first training batch would keep the trace's tensors)."""
    saved = [
        (module, name, getattr(module, name))
        for module in model.modules()
        for name in FORWARD_HOOK_DICTS
        if getattr(module, name, None)
    ]
    for module, name, hooks in saved:
        setattr(module, name, type(hooks)())
    try:
        yield model
    finally:
        for module, name, hooks in saved:
            setattr(module, name, hooks)


def check_exportable(model: nn.Module, example_input: torch.Tensor, config: Optional[ExportConfig] = None) -> None:
    """Raise ``ValueError`` now if ``torch.export`` cannot capture ``model`` (e.g. data-dependent control flow).

    Cheap next to the AOT compile: :class:`~lightning_vitcompress.ExportOnFit` runs it at ``setup``.
    """
    config = config or ExportConfig()
    with _uncompiled(model), eval_mode(model), _hooks_set_aside(model):
        if config.format == "openvino":  # its converter is the check: a dry conversion, nothing written
            _check_float(model)
            convert_to_openvino(_Deployable(model, None), _example_batch(example_input), config.dynamic_batch)
            return
        _export_program(_Deployable(model, None), _example_batch(example_input), config.dynamic_batch)


def _check_float(model: nn.Module) -> None:
    """OpenVINO converts float models: int8 layers (QuantizeOnFit / quantize_model) are refused, saying what works."""
    if _has_x86_int8(model) or _has_quantized_weights(model):
        raise ValueError(
            f"format='openvino': {type(model).__name__} holds torch int8 layers (QuantizeOnFit / quantize_model), "
            "which OpenVINO does not convert. Export the float model with quantize='int8' (NNCF quantizes it for "
            "OpenVINO; ExportOnFit does this before QuantizeOnFit acts), or use format='pt2' for the torch int8 model."
        )


def export_compressed(
    model: nn.Module,
    path: Union[str, os.PathLike],
    example_input: torch.Tensor,
    config: Optional[ExportConfig] = None,
    *,
    calibration_data: Optional[Iterable[torch.Tensor]] = None,
    progress: Optional[Callable[[str], None]] = None,
    **options: Any,
) -> dict[str, Any]:
    """Export ``model`` (pruned, Nystrom-swapped, quantized...) to ``path`` and check the file.

    The model is not changed (an in-place ``compile`` is set aside while tracing,
    its training flags restored). The file is written beside ``path`` first, then
    loaded back and run on ``example_input`` (a real batch); only when its logits
    match the live model's (same precision, eager) within the tolerance does it
    replace ``path``.

    Args:
        model: the model; ``model(images)`` returns logits, a tuple or an object with ``.logits``.
        path: the file to write (``.pt2``, ``.onnx`` or ``.xml``; ``format`` follows the suffix unless given).
        example_input: a real batch of images; its image size is the artifact's.
        config: an :class:`ExportConfig`, or pass its fields as keyword ``options``.
        calibration_data: image batches NNCF calibrates on (``format="openvino", quantize="int8"``); None:
            ``example_input``. Real training or validation images, a few hundred in all.
        progress: called with each stage of :func:`export_stages` as it finishes (a progress bar's step).

    Returns:
        ``{"path", "format", "device", "inference_precision", "dynamic_batch", "size_bytes",
        "export_seconds", "load_seconds", "first_call_seconds", "relative_error", "tolerance"}``.

    Raises:
        ValueError: a bad argument, or a model ``torch.export`` cannot capture (data-dependent
            control flow); also int8 layers onnxruntime cannot run (use ``format="pt2"``).
        ArtifactMismatchError: the loaded file's outputs differ beyond the tolerance (no file left at ``path``).

    Example::

        >>> import timm, torch
        >>> from lightning_vitcompress.functional.export import export_compressed
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
        >>> images, train_batches = torch.randn(8, 3, 32, 32), [torch.randn(8, 3, 32, 32)]
        >>> # export_compressed(vit, "vit.pt2", images[:8]) as in the module's example; the format follows the suffix:
        >>> export_compressed(vit, "vit.onnx", images[:8])["format"]
        'onnx'
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):   # NNCF prints its calibration progress bars
        ...     summary = export_compressed(vit, "vit.xml", images[:8], quantize="int8", calibration_data=train_batches)
        >>> summary["format"], summary["quantize"], summary["relative_error"] <= summary["tolerance"]
        ('openvino', 'int8', True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__}: pass the nn.Module to export (e.g. a timm ViT).")
    target = check_path(path, "path")
    assert target is not None  # path is required (not Optional); check_path returns None only for None
    if config is None:
        if "format" not in options:
            options["format"] = next(
                (name for name, suffix in ARTIFACT_FORMATS.items() if target.suffix == suffix), "pt2"
            )
        config = ExportConfig(**options)
    elif options:
        raise ValueError(f"export_compressed(config=..., {', '.join(options)}=...): pass the options in config only.")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4 or example_input.shape[0] == 0:
        shown = (
            f"<tensor of shape {tuple(example_input.shape)}>"
            if isinstance(example_input, torch.Tensor)
            else f"<{type(example_input).__name__}>"
        )
        raise ValueError(
            f"example_input={shown}: pass a real batch of images (batch, channels, height, width), e.g. the first "
            "validation batch; its image size is the exported file's."
        )
    check_output_file(target, "path")
    config.check_environment()
    if config.format == "openvino" and target.suffix != ".xml":
        raise ValueError(
            f"path={str(target)!r} with format='openvino': an OpenVINO IR is an .xml file (its weights go "
            f"to the .bin beside it). Pass e.g. {str(target.with_suffix('.xml'))!r}."
        )
    if calibration_data is not None and config.quantize is None:
        raise ValueError(
            "calibration_data is for format='openvino', quantize='int8' (NNCF); this export quantizes "
            "nothing. Drop calibration_data, or pass quantize='int8'."
        )

    device = torch.device(config.device) if config.device is not None else _model_device(model)
    if device.type != "cpu" and config.precision == "bf16-mixed":
        raise ValueError(
            f"inference_precision='bf16-mixed' is the x86 CPU recipe (CPU autocast), but the export is for "
            f"{str(device)!r}. Export for device='cpu', or with inference_precision='32-true'."
        )
    here = _model_device(model)
    same = here.type == device.type and (here.index or 0) == (device.index or 0)
    source = model if same else _moved_copy(model, device)
    example = _example_batch(example_input).to(device)
    if _has_x86_int8(source):
        _register_x86_lowering()
    int8 = _has_x86_int8(source) or _has_quantized_weights(source)  # x86 layers, or torchao's tensor subclasses
    if config.format == "openvino":
        _check_float(source)
    tolerance = (
        config.tolerance
        if config.tolerance is not None
        else (NNCF_INT8_TOLERANCE if config.quantize == "int8" else TOLERANCES[(config.precision, int8)])
    )

    say = progress or (lambda stage: None)
    stages = iter(export_stages(config))
    start = time.perf_counter()
    with _uncompiled(source), eval_mode(source):
        deployable = _Deployable(source, config.autocast_dtype)
        with torch.inference_mode():
            reference = deployable(example).float()
        # OpenVINO's converter traces the module itself; the other formats start from torch.export's program
        program = None if config.format == "openvino" else _export_program(deployable, example, config.dynamic_batch)
        if program is not None:
            say(next(stages))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial{ARTIFACT_FORMATS[config.format]}")
        try:
            if config.format == "pt2":
                assert program is not None
                _write_pt2(program, partial)
            elif config.format == "onnx":
                assert program is not None
                _write_onnx(deployable, program, example, partial, config, int8)
            else:
                calibration = [example] if calibration_data is None else [b.to(device) for b in calibration_data]
                write_openvino(
                    deployable,
                    example,
                    partial,
                    precision=config.precision,
                    quantize=config.quantize,
                    calibration_data=calibration,
                    dynamic_batch=config.dynamic_batch,
                )
        except BaseException:
            _remove(partial, config.format)
            raise
    say(next(stages))
    export_seconds = time.perf_counter() - start

    summary: dict[str, Any] = {
        "path": str(target),
        "format": config.format,
        "device": str(device),
        "inference_precision": config.precision,
        "dynamic_batch": config.dynamic_batch,
        "size_bytes": sum(f.stat().st_size for f in artifact_files(partial, config.format)),
        "export_seconds": export_seconds,
        "load_seconds": None,
        "first_call_seconds": None,
        "relative_error": None,
        "tolerance": tolerance,
        "quantize": config.quantize,
    }
    if config.check:
        try:
            summary.update(verify_artifact(partial, config.format, example, reference, tolerance, device))
        except BaseException:
            _remove(partial, config.format)
            raise
        say(next(stages))
    for written, final in zip(artifact_files(partial, config.format), artifact_files(target, config.format)):
        os.replace(written, final)
    return summary


def export_stages(config: ExportConfig) -> list[str]:
    """The stages :func:`export_compressed` reports to ``progress``, in order, for ``config``."""
    write = {
        "pt2": "compile (AOTInductor)",
        "onnx": "write ONNX",
        "openvino": "convert to OpenVINO" + (" + NNCF int8" if config.quantize else ""),
    }[config.format]
    return (
        ([] if config.format == "openvino" else ["trace (torch.export)"])
        + [write]
        + (["load back and check"] if config.check else [])
    )


def _remove(path: Path, format: str) -> None:
    for file in artifact_files(path, format):
        file.unlink(missing_ok=True)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _moved_copy(model: nn.Module, device: torch.device) -> nn.Module:
    try:
        return copy.deepcopy(model).to(device)
    except Exception as err:
        raise ValueError(
            f"device={str(device)!r}: the model cannot move there ({type(err).__name__}: {err}). Export on the "
            "device the model was quantized for (device=None)."
        ) from err


def _write_pt2(program: torch.export.ExportedProgram, path: Path) -> None:
    # freezing applies only with gradients off, as in compile_frozen's inference-mode calls
    with torch.no_grad():
        aoti_compile_and_package(program, package_path=str(path), inductor_configs=dict(FROZEN_INDUCTOR_OPTIONS))
