"""OpenVINO IR as a deployment target: convert the model, optionally quantize it with NNCF, write ``.xml``/``.bin``.

OpenVINO is what many teams deploy to on CPUs; on the x86 CPUs here its
NNCF int8 model runs a ViT-B/16 faster than any torch path (see
``benchmarks/bench_deploy.py``). :func:`write_openvino` is the OpenVINO half of
:func:`~lightning_vitcompress.functional.export_compressed` (``format="openvino"``):

* ``ov.convert_model`` traces the float model (pruned, token-merged, Nystrom,
  distilled: whatever it is) with a dynamic batch dimension;
* ``quantize="int8"``: NNCF post-training quantization with its transformer
  preset (``ModelType.TRANSFORMER``: SmoothQuant, the attention matmuls
  quantized too), calibrated on the batches given (a fit's own training inputs
  in :class:`~lightning_vitcompress.ExportOnFit`);
* the inference precision it was checked in is written into the IR
  (``rt_info`` ``runtime_options/INFERENCE_PRECISION_HINT``: ``"bf16"`` for
  ``"bf16-mixed"``, ``"f32"`` for ``"32-true"``). OpenVINO 2026.4's CPU plugin
  does not apply that hint by itself (it runs bf16 wherever the CPU has native
  bf16), so a loader passes it to ``compile_model``, as :class:`OpenVINORunner` does.

A server loads it with OpenVINO alone::

    import openvino as ov
    core = ov.Core()
    ir = core.read_model("vit.xml")
    hint = ir.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
    model = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    logits = model(images_numpy)[0]

OpenVINO converts torch's float ops, not torchao's int8 tensor subclasses: the
model given here must be in float (``ExportOnFit`` exports it before
``QuantizeOnFit`` acts and lets NNCF quantize it).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "INSTALL_OPENVINO",
    "OPENVINO_PRECISION_HINTS",
    "OpenVINORunner",
    "check_openvino_installed",
    "convert_to_openvino",
    "converter_message",
    "openvino_files",
    "write_openvino",
]

INSTALL_OPENVINO = "pip install 'lightning-vitcompress[openvino]' (openvino, nncf)"

#: ``inference_precision`` -> the OpenVINO ``INFERENCE_PRECISION_HINT`` written into the IR
OPENVINO_PRECISION_HINTS: dict[str, str] = {"32-true": "f32", "bf16-mixed": "bf16"}

_RUNTIME_HINT = ["runtime_options", "INFERENCE_PRECISION_HINT"]


def check_openvino_installed(quantize: Optional[str]) -> None:
    """Raise ``ImportError`` naming the extra when ``openvino`` (and, for int8, ``nncf``) cannot be imported."""
    needed = ["openvino"] + (["nncf"] if quantize is not None else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"format='openvino'{' with quantize=' + repr(quantize) if quantize else ''} needs {missing}: "
            f"{INSTALL_OPENVINO}. Or use format='pt2' (torch only) or 'onnx'."
        )


def convert_to_openvino(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> Any:
    """``ov.convert_model`` of ``module`` traced on ``example`` (batch dimension dynamic unless told); a model it
    cannot convert is a ``ValueError`` naming what it refused and what works. ExportOnFit's setup check is a dry
    run of this (nothing written)."""
    import openvino as ov

    input_shape = [-1 if dynamic_batch else example.shape[0], *example.shape[1:]]
    try:
        with torch.no_grad():
            return ov.convert_model(module, example_input=example, input=[input_shape])
    except Exception as err:
        raise ValueError(
            f"format='openvino': ov.convert_model cannot convert {type(getattr(module, 'model', module)).__name__} "
            f"({converter_message(err)}). Use format='pt2' (AOTInductor), which runs every model this library "
            "makes. The model is unchanged."
        ) from err


def openvino_files(path: Path) -> tuple[Path, Path]:
    """The IR's two files: the ``.xml`` graph and its ``.bin`` weights beside it."""
    return path, path.with_suffix(".bin")


def write_openvino(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    precision: str,
    quantize: Optional[str] = None,
    calibration_data: Optional[Iterable[torch.Tensor]] = None,
    dynamic_batch: bool = True,
) -> None:
    """Convert ``module`` (images -> logits, float) to an OpenVINO IR at ``path`` (``.xml`` + ``.bin``).

    ``quantize="int8"`` runs NNCF's post-training quantization (transformer
    preset) on ``calibration_data`` (image batches; default: ``example``).
    Raises ``ValueError`` saying what the converter or NNCF refused.
    """
    import openvino as ov

    ov_model = convert_to_openvino(module, example, dynamic_batch)
    if quantize is not None:
        ov_model = _nncf_int8(ov_model, list(calibration_data) if calibration_data is not None else [example])
    ov_model.set_rt_info(OPENVINO_PRECISION_HINTS[precision], _RUNTIME_HINT)
    ov.save_model(ov_model, str(path), compress_to_fp16=False)


def _nncf_int8(ov_model: Any, batches: list[torch.Tensor]) -> Any:
    import nncf

    if not batches:
        raise ValueError("quantize='int8': no calibration batches; pass calibration_data (image batches).")
    dataset = nncf.Dataset([batch.detach().float().cpu().numpy() for batch in batches])
    try:
        return nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches))
    except Exception as err:
        raise ValueError(
            f"quantize='int8': NNCF post-training quantization failed ({converter_message(err)}). Export in float "
            "(quantize=None), or use QuantizeOnFit with format='pt2'."
        ) from err


def converter_message(err: BaseException) -> str:
    """The line of an OpenVINO/NNCF error that says what failed (the converter's first line is a C++ location)."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip()]
    useful = next((line for line in lines if "No conversion rule" in line or "Conversion is failed" in line), None)
    text = useful or (lines[0] if lines else "")
    return f"{type(err).__name__}: {text}"[:300]


class OpenVINORunner:
    """An IR compiled for this CPU: ``runner(images) -> logits`` (numpy in, numpy out).

    Threads follow torch's (``torch.get_num_threads()``), so a benchmark compares
    it with the other rows on equal terms; latency mode, one stream. The
    precision is the one written in the IR (:func:`write_openvino`), else OpenVINO's default.
    """

    def __init__(self, path: os.PathLike) -> None:
        import openvino as ov

        core = ov.Core()
        ir = core.read_model(str(path))
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if ir.has_rt_info(_RUNTIME_HINT):
            config["INFERENCE_PRECISION_HINT"] = ir.get_rt_info(_RUNTIME_HINT).astype(str)
        self.compiled = core.compile_model(ir, "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        #: the precision OpenVINO runs the float ops in: ``"bf16"`` or ``"f32"``
        self.precision_hint: str = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self._request = self.compiled.create_infer_request()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self._request.infer([images.detach().float().cpu().numpy()])
        return torch.from_numpy(outputs[self.compiled.output(0)].copy())
