"""Bad inputs to ``QuantizeOnFit`` and ``quantize_model`` (see tests/bad_inputs.py for the harness)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_inputs import Case, check_case, tiny_model
from helpers import fast_trainer, nan_loaders
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import QuantizeOnFit, quantize_model

Q = "QuantizeOnFit"


def init(id: str, argument: str, error: type[BaseException], **kwargs: Any) -> Case:
    return Case(id, lambda t: QuantizeOnFit(**kwargs), f"{argument}=", "init", Q, error)


def setup(id: str, argument: str, make: Callable[[Path], Any], **case_kwargs: Any) -> Case:
    return Case(id, make, argument, "setup", Q, **case_kwargs)


class _Shared:
    """The model a ``quantize_model`` call gets is the one the harness checks for changes."""

    def __init__(self) -> None:
        self.model: Any = None

    def build(self) -> Any:
        self.model = tiny_model()
        return self.model


def call(id: str, argument: str, fn: Callable[[torch.nn.Module, Path], Any], error: Any) -> Case:
    shared = _Shared()
    return Case(id, lambda t: fn(shared.model.model, t), argument, "call", "quantize_model", error, model=shared.build)


def _qat_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint saved during QAT with config='int8_dynamic' (from epoch 0)."""
    during_training = ModelCheckpoint(dirpath=tmp_path, filename="qat")  # saved before the model is quantized
    trainer = fast_trainer(
        tmp_path,
        callbacks=[QuantizeOnFit("int8_dynamic", qat_start_epoch=0), during_training],
        limit_train_batches=1,
        enable_checkpointing=True,
    )
    trainer.fit(tiny_model(), _digits())
    return tmp_path / "qat.ckpt"


def _digits() -> Any:
    from lightning_vitcompress.digits import DigitsDataModule

    return DigitsDataModule(batch_size=64)


def _file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path / "a_file" / "model.ckpt"


IMAGES = torch.randn(4, 3, 32, 32)

CASES = [
    # ------------------------------------------------------------ constructor: the value alone decides
    init("config-unknown-name", "config", ValueError, config="int3"),
    init("config-not-a-config", "config", TypeError, config=8),
    init("skip-int", "skip", TypeError, skip=5),
    init("skip-list-with-int", "skip", TypeError, skip=["head", 3]),
    init("skip-empty-string", "skip", TypeError, skip=""),
    init("skip-dict", "skip", TypeError, skip={"head": True}),
    init("qat-start-negative", "qat_start_epoch", ValueError, qat_start_epoch=-1),
    init("qat-start-bool", "qat_start_epoch", ValueError, qat_start_epoch=True),
    init("qat-start-float", "qat_start_epoch", ValueError, qat_start_epoch=1.0),
    init("compile-string", "compile", TypeError, compile="max-autotune"),
    init("compile-unknown-key", "compile", ValueError, compile={"modee": "default"}),
    init("compile-unknown-mode", "compile", ValueError, compile={"mode": "fastest"}),
    init(
        "compile-decompose-attention-not-bool",
        "compile",
        TypeError,
        config="int8_static_x86",
        compile={"decompose_attention": "no"},
    ),
    init(
        "compile-decompose-attention-not-x86",
        "compile",
        ValueError,
        config="int8_dynamic",
        compile={"decompose_attention": False},
    ),
    init("inference-precision-unknown", "inference_precision", ValueError, inference_precision="bf16"),
    init(
        "inference-precision-not-x86",
        "inference_precision",
        ValueError,
        config="int8_dynamic",
        inference_precision="bf16-mixed",
    ),
    init(
        "calibration-batches-zero", "calibration_batches", ValueError, config="int8_static_x86", calibration_batches=0
    ),
    init("calibration-batches-bool", "calibration_batches", ValueError, calibration_batches=True),
    init("on-error-unknown", "on_error", ValueError, on_error="ignore"),
    init("save-path-int", "save_path", TypeError, save_path=123),
    init("save-path-empty", "save_path", ValueError, save_path=""),
    init("save-fp32-path-list", "save_fp32_path", TypeError, save_fp32_path=["a.ckpt"]),
    Case(
        "save-paths-the-same",
        lambda t: QuantizeOnFit(save_path=t / "m.ckpt", save_fp32_path=str(t / "m.ckpt")),
        "save_fp32_path=",
        "init",
        Q,
        ValueError,
    ),
    init("model-attribute-empty", "model_attribute", ValueError, model_attribute=""),
    # ------------------------------------------------------------ setup: needs the model, Trainer or disk
    setup("config-cuda-only-on-cpu", "config=", lambda t: QuantizeOnFit("int4_weight_only"), error=ValueError),
    setup("config-float8-on-cpu", "config=", lambda t: QuantizeOnFit("float8_dynamic"), error=ValueError),
    setup(
        "qat-start-past-max-epochs", "qat_start_epoch=", lambda t: QuantizeOnFit(qat_start_epoch=1), error=ValueError
    ),
    setup(
        "static-without-training-steps",
        "config=",
        lambda t: QuantizeOnFit("int8_static_x86"),
        error=ValueError,
        trainer_kwargs=dict(limit_train_batches=0),
    ),
    # no training step: Lightning skips the train-end hooks, so nothing would be quantized or saved
    setup(
        "no-training-steps",
        "limit_train_batches=0",
        lambda t: QuantizeOnFit("int8_dynamic", save_path=t / "q.ckpt"),
        error=ValueError,
        trainer_kwargs=dict(limit_train_batches=0),
    ),
    setup(
        "no-training-epochs",
        "max_epochs=0",
        lambda t: QuantizeOnFit("int8_weight_only"),
        error=ValueError,
        trainer_kwargs=dict(max_epochs=0),
    ),
    setup(
        "static-on-nan-images",
        "calibration_batches=",
        lambda t: QuantizeOnFit("int8_static_x86"),
        error=ValueError,
        data=nan_loaders,
    ),
    setup("skip-everything", "skip=", lambda t: QuantizeOnFit(skip="*"), error=ValueError),
    setup("skip-typo", "skip=", lambda t: QuantizeOnFit(skip=["head", "blocks.*.mlp.fc3"]), error=ValueError),
    setup("save-path-is-a-directory", "save_path=", lambda t: QuantizeOnFit(save_path=t), error=IsADirectoryError),
    setup(
        "save-fp32-path-is-a-directory",
        "save_fp32_path=",
        lambda t: QuantizeOnFit(save_fp32_path=t),
        error=IsADirectoryError,
    ),
    setup("save-path-under-a-file", "save_path=", lambda t: QuantizeOnFit(save_path=_file(t)), error=ValueError),
    setup(
        "model-attribute-missing",
        "model_attribute=",
        lambda t: QuantizeOnFit(model_attribute="net"),
        error=AttributeError,
    ),
    setup(
        "resume-qat-with-another-config",
        "config=",
        lambda t: QuantizeOnFit("int8_weight_only", qat_start_epoch=0),
        error=ValueError,
        trainer_kwargs=dict(max_epochs=2),
        fit_kwargs=lambda t: dict(ckpt_path=_qat_checkpoint(t)),
    ),
    setup(
        "resume-qat-with-another-start",
        "qat_start_epoch=",
        lambda t: QuantizeOnFit("int8_dynamic", qat_start_epoch=1),
        error=ValueError,
        trainer_kwargs=dict(max_epochs=3),
        fit_kwargs=lambda t: dict(ckpt_path=_qat_checkpoint(t)),
    ),
    # ------------------------------------------------------------ quantize_model: the call raises
    call("qm-skip-int", "skip=", lambda m, t: quantize_model(m, skip=5), TypeError),
    call("qm-skip-typo", "skip=", lambda m, t: quantize_model(m, skip="haed"), ValueError),
    call("qm-config-unknown", "config=", lambda m, t: quantize_model(m, "int3"), ValueError),
    call(
        "qm-static-without-calibration",
        "calibration_inputs=",
        lambda m, t: quantize_model(m, "int8_static_x86"),
        ValueError,
    ),
    call(
        "qm-calibration-one-tensor",
        "calibration_inputs=",
        lambda m, t: quantize_model(m, "int8_static_x86", calibration_inputs=IMAGES),
        TypeError,
    ),
    call(
        "qm-example-input-wrong-shape",
        "example_input",
        lambda m, t: quantize_model(m, example_input=torch.randn(2, 3, 64, 64)),
        ValueError,
    ),
    call("qm-model-not-a-module", "model=", lambda m, t: quantize_model("vit.ckpt"), TypeError),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, digits):
    check_case(case, tmp_path, digits)


def test_an_unwritable_save_directory_is_refused_at_setup(tmp_path, digits, monkeypatch):
    """As root every directory is writable, so the permission check itself is made to say no."""
    monkeypatch.setattr("lightning_vitcompress._checks.os.access", lambda path, mode: False)
    case = setup(
        "save-path-unwritable",
        "save_path=",
        lambda t: QuantizeOnFit(save_path=t / "out" / "m.ckpt"),
        error=PermissionError,
    )
    check_case(case, tmp_path, digits)
