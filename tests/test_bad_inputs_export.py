"""Bad inputs to ``ExportOnFit``, ``export_compressed`` and ``load_artifact`` (see tests/bad_inputs.py for the harness)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_inputs import Case, check_case, tiny_model
from torch import nn

from lightning_vitcompress import ExportConfig, ExportOnFit, QuantizeOnFit, export_compressed, load_artifact
from lightning_vitcompress.digits import DigitsClassifier

E = "ExportOnFit"


def init(id: str, argument: str, error: type[BaseException], **kwargs: Any) -> Case:
    kwargs.setdefault("path", "model.pt2")
    return Case(id, lambda t: ExportOnFit(**kwargs), f"{argument}=", "init", E, error)


def setup(id: str, argument: str, make: Callable[[Path], Any], **case_kwargs: Any) -> Case:
    return Case(id, make, argument, "setup", E, **case_kwargs)


class _Shared:
    """The model a plain call gets is the one the harness checks for changes."""

    def __init__(self) -> None:
        self.model: Any = None

    def build(self) -> Any:
        self.model = tiny_model()
        return self.model


def call(id: str, argument: str, fn: Callable[[nn.Module, Path], Any], error: Any) -> Case:
    shared = _Shared()
    return Case(
        id, lambda t: fn(shared.model.model, t), argument, "call", "export_compressed", error, model=shared.build
    )


class ValueBranch(nn.Module):
    """A ViT whose forward branches on a tensor's value: ``torch.export`` cannot capture it."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.img_size = 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.vit(images)
        return logits if images.mean() > 0 else -logits


def value_branch_model() -> DigitsClassifier:
    module = tiny_model()
    module.model = ValueBranch(module.model)
    module.example_input_array = torch.zeros(1, 3, 32, 32)
    return module


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path / "a_file" / "model.pt2"


IMAGES = torch.randn(2, 3, 32, 32)
#: the OpenVINO cases need the [openvino] extra (installed by the test command; tests/test_export_openvino.py says
#: why it is skipped where it is not)
HAS_OPENVINO = all(__import__("importlib.util").util.find_spec(name) is not None for name in ("openvino", "nncf"))


def float_ir_beside_quantize_on_fit(tmp_path: Path) -> list[Any]:
    return [ExportOnFit(tmp_path / "m.xml"), QuantizeOnFit("int8_dynamic")]


def int8_model_to_openvino(model: nn.Module, tmp_path: Path) -> Any:
    import copy

    from lightning_vitcompress import quantize_model

    int8 = copy.deepcopy(model)  # the harness checks that the model it hands over is left as it was
    quantize_model(int8, "int8_dynamic", example_input=IMAGES)
    return export_compressed(int8, tmp_path / "m.xml", IMAGES)


CASES = [
    init("format-unknown", "format", ValueError, format="tflite"),
    init("path-none", "path", ValueError, path=None),
    init("path-int", "path", TypeError, path=123),
    init("path-empty", "path", ValueError, path=""),
    init("inference-precision-unknown", "inference_precision", ValueError, inference_precision="fp16"),
    init("onnx-bf16-mixed", "inference_precision", ValueError, path="m.onnx", inference_precision="bf16-mixed"),
    init("dynamic-batch-string", "dynamic_batch", TypeError, dynamic_batch="yes"),
    init("device-unknown", "device", ValueError, device="tpu"),
    init("tolerance-negative", "tolerance", ValueError, tolerance=-1.0),
    init("on-error-unknown", "on_error", ValueError, on_error="ignore"),
    init("config-not-a-config", "config", TypeError, config={"format": "pt2"}),
    init("config-and-options", "config", ValueError, config=ExportConfig(), dynamic_batch=False),
    init("model-attribute-empty", "model_attribute", ValueError, model_attribute=""),
    # no training step: Lightning skips the train-end hooks, so no file would be written
    setup(
        "no-training-steps",
        "limit_train_batches=0",
        lambda t: ExportOnFit(t / "m.pt2"),
        error=ValueError,
        trainer_kwargs=dict(limit_train_batches=0),
    ),
    setup("path-is-a-directory", "path=", lambda t: ExportOnFit(t), error=IsADirectoryError),
    setup("path-under-a-file", "path=", lambda t: ExportOnFit(_under_a_file(t)), error=ValueError),
    setup(
        "data-dependent-control-flow",
        "cannot be exported with torch.export",
        lambda t: ExportOnFit(t / "m.pt2"),
        error=ValueError,
        model=value_branch_model,
    ),
    setup(
        "model-attribute-missing",
        "model_attribute=",
        lambda t: ExportOnFit(t / "m.pt2", model_attribute="net"),
        error=AttributeError,
    ),
    call("model-not-a-module", "model=", lambda m, t: export_compressed("vit.ckpt", t / "m.pt2", IMAGES), TypeError),
    call(
        "example-input-not-images",
        "example_input=",
        lambda m, t: export_compressed(m, t / "m.pt2", torch.randn(2, 32)),
        ValueError,
    ),
    call("example-input-none", "example_input=", lambda m, t: export_compressed(m, t / "m.pt2", None), ValueError),
    call("path-under-a-file", "path=", lambda m, t: export_compressed(m, _under_a_file(t), IMAGES), ValueError),
    call(
        "options-and-config",
        "config=",
        lambda m, t: export_compressed(m, t / "m.pt2", IMAGES, ExportConfig(), check=False),
        ValueError,
    ),
    call(
        "cuda-without-cuda",
        "device=",
        lambda m, t: (
            export_compressed(m, t / "m.pt2", IMAGES, device="cuda")
            if not torch.cuda.is_available()
            else pytest.skip("this machine has CUDA")
        ),
        ValueError,
    ),
    init("openvino-path-not-xml", "path", ValueError, path="m.bin", format="openvino"),
    init("quantize-with-pt2", "quantize", ValueError, path="m.pt2", quantize="int8"),
    init("quantize-unknown", "quantize", ValueError, path="m.xml", quantize="int4"),
    init(
        "calibration-batches-zero",
        "calibration_batches",
        ValueError,
        path="m.xml",
        quantize="int8",
        calibration_batches=0,
    ),
    call(
        "calibration-without-quantize",
        "calibration_data",
        lambda m, t: export_compressed(m, t / "m.xml", IMAGES, calibration_data=[IMAGES]),
        ValueError,
    ),
    call("load-unknown-suffix", "path=", lambda m, t: load_artifact(t / "model.bin"), ValueError),
    call("load-missing-file", "path=", lambda m, t: load_artifact(t / "model.pt2"), FileNotFoundError),
] + (
    [
        setup(
            "openvino-float-ir-beside-quantize",
            "quantize=None) with a QuantizeOnFit",
            float_ir_beside_quantize_on_fit,
            error=ValueError,
        ),
        call("openvino-of-a-torch-int8-model", "torch int8 layers", int8_model_to_openvino, ValueError),
    ]
    if HAS_OPENVINO
    else []
)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, digits):
    check_case(case, tmp_path, digits)
