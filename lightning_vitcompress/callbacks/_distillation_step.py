"""What ``DistillationTeacher`` does inside one training step: hooks on the student, and the term they add.

:class:`StudentCapture` hooks the student for the step: before each forward
call that trains (gradients on, train mode) the teacher runs on its inputs,
after it the student's logits are kept. :func:`distillation_terms` turns the
captures into the distillation loss (their mean) and the agreement with the
teacher; :func:`with_loss` puts the total back where ``training_step`` returned
its loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_vitcompress.models.base import logits_of

__all__ = ["Capture", "StudentCapture", "distillation_terms", "with_loss"]


class Capture:
    """One forward call of the student in the training step, with the teacher's answer to its inputs."""

    __slots__ = ("distill_logits", "prediction_logits", "teacher_logits")

    def __init__(self, teacher_logits: Tensor, distill_logits: Tensor, prediction_logits: Tensor) -> None:
        self.teacher_logits = teacher_logits
        self.distill_logits = distill_logits  # the logits the teacher term trains
        self.prediction_logits = prediction_logits  # what the student predicts (for agreement)


class StudentCapture:
    """Hooks on the student for one training step; :attr:`captures` holds one :class:`Capture` per forward call
    that trains. ``teacher_logits`` maps the student's inputs to the teacher's logits; ``deit``: the student is a
    DeiT in distilled training (its distillation head is trained, the task loss sees the class head)."""

    def __init__(self, teacher_logits: Callable[[Tensor], Tensor], deit: bool) -> None:
        self.teacher_logits = teacher_logits
        self.deit = deit
        self.captures: list[Capture] = []
        self._pending: list[Tensor] = []  # teacher logits computed before the student's forward, awaiting its output

    @contextmanager
    def attached(self, student: nn.Module) -> Iterator[StudentCapture]:
        """The hooks on ``student`` for the ``with`` block (and distilled training, for a timm DeiT)."""
        handles = (
            student.register_forward_pre_hook(self._teacher_hook, with_kwargs=True),
            student.register_forward_hook(self._capture_hook, with_kwargs=True),
        )
        set_distilled: Any = (
            getattr(student, "set_distilled_training", None) if self.deit else None
        )  # timm; transformers is
        toggles = callable(set_distilled)
        was_distilled = bool(getattr(student, "distilled_training", False))
        if toggles:
            set_distilled(True)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if toggles:
                set_distilled(was_distilled)

    @staticmethod
    def _records(module: nn.Module) -> bool:
        # forward calls without gradients (metrics, EMA targets) or in eval mode get no teacher term
        return torch.is_grad_enabled() and module.training

    def _teacher_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Runs the teacher on the student's inputs *before* the student's forward.

        Measured on CPU: the teacher forward before the student's forward costs
        less than after it (while the student's activations are held for
        backward), and less than the two run apart.
        """
        if self._records(module):
            self._pending.append(self.teacher_logits(args[0] if args else next(iter(kwargs.values()))))

    def _capture_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        record = self._records(module) and bool(self._pending)
        if self.deit:
            heads = _class_and_distillation_logits(output)
            if heads is None:
                return None  # eval mode: timm already averaged the heads
            cls_logits, dist_logits = heads
            if not record:  # what the user would get without distilled training
                return _with_logits(output, (cls_logits + dist_logits) / 2)
            self.captures.append(Capture(self._pending.pop(), dist_logits, ((cls_logits + dist_logits) / 2).detach()))
            return _with_logits(output, cls_logits)  # the task loss trains the class head
        if not record:
            return None
        try:
            logits = logits_of(output)  # a tensor, a tuple's first element, or transformers' .logits
        except TypeError:
            raise TypeError(
                f"DistillationTeacher: the student's forward returned {type(output).__name__}, not logits. "
                "Set model_attribute to the module that returns the logits."
            ) from None
        self.captures.append(Capture(self._pending.pop(), logits, logits))
        return None


def distillation_terms(captures: list[Capture], loss: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(distillation loss, agreement)``: the mean over the captures of ``loss(student, teacher)`` and of the
    share of samples where student and teacher predict the same class."""
    distill_terms, agreements = [], []
    for capture in captures:
        teacher_logits = capture.teacher_logits
        if teacher_logits.shape[-1] != capture.distill_logits.shape[-1]:
            raise ValueError(
                f"teacher gives {teacher_logits.shape[-1]} logits per sample but the student "
                f"{capture.distill_logits.shape[-1]}: teacher and student must predict the same classes."
            )
        distill_terms.append(loss(capture.distill_logits, teacher_logits))
        agreements.append((capture.prediction_logits.detach().argmax(-1) == teacher_logits.argmax(-1)).float().mean())
    distill = distill_terms[0] if len(distill_terms) == 1 else torch.stack(distill_terms).mean()
    agreement = agreements[0] if len(agreements) == 1 else torch.stack(agreements).mean()
    return distill, agreement


def with_loss(output: Any, total: Tensor) -> Any:
    """What ``training_step`` returned (a loss tensor, or a dict with ``"loss"``), with ``total`` as its loss."""
    if isinstance(output, Mapping):
        output = dict(output)
        output["loss"] = total
        return output
    return total


def _class_and_distillation_logits(output: Any) -> Optional[tuple[Tensor, Tensor]]:
    """The class-token and distillation-token logits of a DeiT student in distilled training, else None.

    timm's ``VisionTransformerDistilled`` returns them as a pair; transformers'
    ``DeiTForImageClassificationWithTeacher`` as ``cls_logits``/``distillation_logits``.
    """
    if isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(o, Tensor) for o in output):
        return output[0], output[1]
    cls_logits, dist_logits = getattr(output, "cls_logits", None), getattr(output, "distillation_logits", None)
    if isinstance(cls_logits, Tensor) and isinstance(dist_logits, Tensor):
        return cls_logits, dist_logits
    return None


def _with_logits(output: Any, logits: Tensor) -> Any:
    """``output`` with its logits replaced: the tensor itself, or an output object whose ``.logits`` is ``logits``."""
    if isinstance(output, (Tensor, tuple, list)):
        return logits
    output.logits = logits  # transformers' ModelOutput keeps attribute and key in step
    return output
