"""Bad inputs to ``DistillationTeacher`` (see tests/bad_inputs.py for the harness)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from bad_inputs import Case, check_case, tiny_model
from helpers import TINY, fast_trainer
from torch import nn

from lightning_vitcompress import DistillationTeacher, DistillConfig
from lightning_vitcompress._structure import UnsafeCheckpointError
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule, small_vit

D = "DistillationTeacher"


def teacher(**overrides: Any) -> nn.Module:
    torch.manual_seed(1)
    return small_vit(**{**TINY, **overrides})


_A_TEACHER = object()


def init(id: str, argument: str, error: Any, teacher_spec: Any = _A_TEACHER, **kwargs: Any) -> Case:
    def make(tmp_path: Path) -> DistillationTeacher:
        return DistillationTeacher(teacher() if teacher_spec is _A_TEACHER else teacher_spec, **kwargs)

    return Case(id, make, f"{argument}=", "init", D, error)


def setup(id: str, argument: str, make: Callable[[Path], Any], **case_kwargs: Any) -> Case:
    return Case(id, make, argument, "setup", D, **case_kwargs)


class OtherNet(L.LightningModule):
    """Another architecture, with other constructor arguments than the student's class."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.Linear(hidden, 10))


def _other_architecture(tmp_path: Path) -> str:
    model = OtherNet()
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return str(path)


def _plain_state_dict(tmp_path: Path) -> str:
    path = tmp_path / "weights.pth"
    torch.save(teacher().state_dict(), path)
    return str(path)


def _unsafe(tmp_path: Path) -> str:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": tiny_model().state_dict(), "extra": Path("x")}, path)
    return str(path)


def _soft_run_checkpoint(tmp_path: Path) -> Path:
    def student() -> DigitsClassifier:
        L.seed_everything(0, verbose=False)
        return DigitsClassifier(model_name="deit_tiny_distilled_patch16_224", **TINY)

    trainer = fast_trainer(tmp_path, callbacks=[DistillationTeacher(teacher(), mode="deit")], limit_train_batches=1)
    trainer.fit(student(), DigitsDataModule(batch_size=64))
    trainer.save_checkpoint(tmp_path / "deit.ckpt")
    return tmp_path / "deit.ckpt"


def _distilled_student() -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    return DigitsClassifier(model_name="deit_tiny_distilled_patch16_224", **TINY)


class _Shared:
    """The student the harness checks is the one the case hands to the callback as its teacher."""

    def __init__(self) -> None:
        self.model: Any = None

    def build(self) -> L.LightningModule:
        self.model = tiny_model()
        return self.model


_SHARED_STUDENT = _Shared()


def _meta_teacher() -> nn.Module:
    with torch.device("meta"):
        return teacher()


CASES = [
    # ------------------------------------------------------------ constructor: the value alone decides
    init("teacher-none", "teacher", TypeError, teacher_spec=None),
    init("teacher-empty-name", "teacher", TypeError, teacher_spec=""),
    init("teacher-unknown-timm-name", "teacher", ValueError, teacher_spec="vit_tiny_patch16_24"),
    init("mode-capitalised", "mode", ValueError, mode="Soft"),
    init("mode-list", "mode", ValueError, mode=["soft"]),
    init("alpha-above-one", "alpha", ValueError, alpha=1.5),
    init("alpha-bool", "alpha", ValueError, alpha=True),
    init("alpha-string", "alpha", ValueError, alpha="0.5"),
    init("temperature-zero", "temperature", ValueError, temperature=0),
    init("temperature-infinite", "temperature", ValueError, temperature=float("inf")),
    init("temperature-bool", "temperature", ValueError, temperature=True),
    init("deit-target-unknown", "deit_target", ValueError, mode="deit", deit_target="kl"),
    init("deit-target-without-deit", "deit_target", ValueError, mode="soft", deit_target="soft"),
    init("pretrained-string", "pretrained", TypeError, pretrained="no"),
    init("cache-string", "cache_teacher_logits", TypeError, cache_teacher_logits="yes"),
    init("weights-only-int", "weights_only", TypeError, weights_only=1),
    init("teacher-precision-unknown", "teacher_precision", ValueError, teacher_precision="int8"),
    init("teacher-precision-dtype", "teacher_precision", ValueError, teacher_precision=torch.bfloat16),
    Case(
        "teacher-weights-for-a-module",
        lambda t: DistillationTeacher(teacher(), teacher_weights=t / "w.pth"),
        "teacher_weights",
        "init",
        D,
        ValueError,
    ),
    init("teacher-kwargs-for-a-module", "teacher_kwargs", ValueError, teacher_kwargs=dict(num_classes=10)),
    init(
        "teacher-kwargs-a-string",
        "teacher_kwargs",
        TypeError,
        teacher_spec="vit_tiny_patch16_224",
        teacher_kwargs="num_classes=10",
    ),
    init(
        "teacher-kwargs-pretrained",
        "teacher_kwargs",
        ValueError,
        teacher_spec="vit_tiny_patch16_224",
        teacher_kwargs=dict(pretrained=False),
    ),
    init("teacher-weights-int", "teacher_weights", TypeError, teacher_spec="vit_tiny_patch16_224", teacher_weights=5),
    init(
        "teacher-class-for-a-timm-name",
        "teacher_class",
        ValueError,
        teacher_spec="vit_tiny_patch16_224",
        teacher_class=DigitsClassifier,
    ),
    init(
        "teacher-class-an-instance",
        "teacher_class",
        TypeError,
        teacher_spec="teacher.ckpt",
        teacher_class=DigitsClassifier(**TINY),
    ),
    init("input-adapter-zero", "input_adapter", ValueError, input_adapter=0),
    init("input-adapter-one-number-tuple", "input_adapter", ValueError, input_adapter=(224,)),
    init("input-adapter-string", "input_adapter", ValueError, input_adapter="224"),
    init("input-adapter-bool", "input_adapter", ValueError, input_adapter=True),
    init("model-attribute-empty", "model_attribute", ValueError, model_attribute=""),
    init("config-a-dict", "config", TypeError, config=dict(mode="hard")),
    init("config-and-a-loss-keyword", "config", ValueError, config=DistillConfig(mode="hard"), alpha=0.7),
    # ------------------------------------------------------------ setup: needs the student, the files or the Trainer
    setup(
        "teacher-other-class-count", "teacher", lambda t: DistillationTeacher(teacher(num_classes=7)), error=ValueError
    ),
    setup(
        "teacher-sequential-other-class-count",
        "teacher",
        lambda t: DistillationTeacher(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))),
        error=ValueError,
    ),
    setup(
        "teacher-path-missing",
        "teacher=",
        lambda t: DistillationTeacher(str(t / "missing.ckpt")),
        error=FileNotFoundError,
    ),
    setup(
        "teacher-checkpoint-of-another-architecture",
        "teacher=",
        lambda t: DistillationTeacher(_other_architecture(t)),
        error=ValueError,
    ),
    setup(
        "teacher-plain-state-dict-file",
        "teacher=",
        lambda t: DistillationTeacher(_plain_state_dict(t)),
        error=ValueError,
    ),
    setup(
        "teacher-unsafe-checkpoint", "teacher=", lambda t: DistillationTeacher(_unsafe(t)), error=UnsafeCheckpointError
    ),
    setup(
        "teacher-kwargs-unknown-key",
        "teacher_kwargs=",
        lambda t: DistillationTeacher("vit_tiny_patch16_224", pretrained=False, teacher_kwargs=dict(num_clases=10)),
        error=ValueError,
    ),
    setup(
        "teacher-weights-missing",
        "teacher_weights=",
        lambda t: DistillationTeacher("vit_tiny_patch16_224", teacher_weights=t / "missing.pth"),
        error=FileNotFoundError,
    ),
    setup(
        "teacher-is-the-student",
        "teacher",
        lambda t: DistillationTeacher(_SHARED_STUDENT.model.model),
        error=ValueError,
        model=_SHARED_STUDENT.build,
    ),
    setup(
        "mode-deit-without-distillation-token",
        "mode=",
        lambda t: DistillationTeacher(teacher(), mode="deit"),
        error=ValueError,
    ),
    setup(
        "model-attribute-missing",
        "model_attribute=",
        lambda t: DistillationTeacher(teacher(), model_attribute="net"),
        error=AttributeError,
    ),
    # the teacher does not take the student's batches (3x32x32): refused at setup, not at the first batch
    setup(
        "teacher-one-channel", "input_adapter=", lambda t: DistillationTeacher(teacher(in_chans=1)), error=ValueError
    ),
    setup(
        "teacher-other-input-size",
        "input_adapter=",
        lambda t: DistillationTeacher(nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 10))),
        error=ValueError,
    ),
    setup("teacher-on-meta-device", "teacher=", lambda t: DistillationTeacher(_meta_teacher()), error=ValueError),
    setup(
        "resume-with-another-mode",
        "mode=",
        lambda t: DistillationTeacher(teacher(), mode="soft"),
        error=ValueError,
        model=_distilled_student,
        trainer_kwargs=dict(max_epochs=2),
        fit_kwargs=lambda t: dict(ckpt_path=_soft_run_checkpoint(t)),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, digits):
    check_case(case, tmp_path, digits)
