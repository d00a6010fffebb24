"""Distillation: the loss settings (:class:`DistillConfig`), the loss terms, the teacher in a step. Pure torch, no Lightning.

:class:`~lightning_vitcompress.DistillationTeacher` adds these terms to the
user's loss at every training step; they are usable on their own in any
training loop. Loading the teacher is :mod:`~lightning_vitcompress.functional.teacher`.

Example (tiny timm ViTs: a 64-pixel teacher from a local weights file, a 32-pixel student)::

    >>> import timm, torch, torch.nn.functional as F
    >>> from safetensors.torch import save_file
    >>> from lightning_vitcompress.functional.distill import (
    ...     DistillConfig, combine_losses, load_teacher, teacher_forward)
    >>> tiny = dict(num_classes=10, patch_size=8, depth=2)
    >>> save_file(timm.create_model("vit_tiny_patch16_224", img_size=64, **tiny).state_dict(), "teacher.safetensors")
    >>> config = DistillConfig(mode="soft", alpha=0.5, temperature=4.0)
    >>> teacher = load_teacher("vit_tiny_patch16_224", teacher_weights="teacher.safetensors",
    ...                        teacher_kwargs=dict(img_size=64, **tiny)).eval().requires_grad_(False)
    >>> student = timm.create_model("vit_tiny_patch16_224", img_size=32, **tiny)
    >>> x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    >>> logits = student(x)
    >>> term = config.loss(logits, teacher_forward(teacher, x, input_adapter=64))  # no_grad, resized to 64
    >>> loss = combine_losses(F.cross_entropy(logits, y), term, config.alpha)
    >>> loss.shape, loss.requires_grad, any(p.grad is not None for p in teacher.parameters())
    (torch.Size([]), True, False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vitcompress._checks import check_choice, check_fraction, check_positive
from lightning_vitcompress.functional.teacher import (  # re-exported: teacher loading lives there
    TeacherSpec,
    check_teacher,
    freeze_teacher,
    load_teacher,
    teacher_kind,
)
from lightning_vitcompress.models.base import logits_of

__all__ = [
    "DistillConfig",
    "TeacherSpec",
    "autocast_runs_natively",
    "check_input_adapter",
    "check_same_classes",
    "check_teacher",
    "check_teacher_precision",
    "combine_losses",
    "freeze_teacher",
    "hard_distillation_loss",
    "load_teacher",
    "resolve_teacher_precision",
    "sample_keys",
    "soft_distillation_loss",
    "teacher_forward",
    "teacher_kind",
]


DistillationMode = Literal["soft", "hard", "deit"]
TeacherPrecision = Literal["bf16", "fp16", "fp32"]
InputAdapter = Union[None, int, tuple[int, int], Callable[[Tensor], Tensor]]

_MODES = ("soft", "hard", "deit")
_TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- loss functions
def soft_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton's soft distillation: ``KL(softmax(t / T) || softmax(s / T)) * T**2``, batch mean.

    Computed in float32. Logits of any shape ``(..., classes)``; every leading
    position counts as one sample.

    Example::

        >>> import torch
        >>> from lightning_vitcompress.functional.distill import soft_distillation_loss
        >>> teacher_logits = torch.randn(8, 10)
        >>> float(soft_distillation_loss(teacher_logits, teacher_logits, temperature=4.0))  # same logits: nothing
        0.0
        >>> float(soft_distillation_loss(torch.zeros(8, 10), teacher_logits, temperature=4.0)) > 0
        True
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0, e.g. 1.0 or 4.0.")
    student = student_logits.float().flatten(0, -2) / temperature
    teacher = teacher_logits.float().flatten(0, -2) / temperature
    kl = F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean", log_target=True
    )
    return kl * temperature**2


def hard_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT's hard distillation: cross-entropy to the teacher's argmax, batch mean (float32)."""
    student = student_logits.float().flatten(0, -2)
    return F.cross_entropy(student, teacher_logits.flatten(0, -2).argmax(dim=-1))


def combine_losses(task_loss: Tensor, distillation_loss: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) * task_loss + alpha * distillation_loss``."""
    return (1.0 - alpha) * task_loss + alpha * distillation_loss


# ----------------------------------------------------------------------- config
@dataclass(frozen=True)
class DistillConfig:
    """The distillation loss settings, checked once, here: ``total = (1 - alpha) * task_loss + alpha * term``.

    Args:
        mode: ``"soft"``: KL divergence at ``temperature``, scaled by ``T**2``.
            ``"hard"``: cross-entropy to the teacher's argmax (DeiT's hard
            distillation). ``"deit"``: for a timm ``VisionTransformerDistilled``
            student: the distillation token's head learns from the teacher
            (with ``deit_target``), the class token's head from the task loss
            (``DistillationTeacher``: ``training_step`` still sees ordinary
            class-head logits; evaluation averages the two heads, as timm does).
        alpha: weight of the distillation term, in ``[0, 1]``.
        temperature: softmax temperature of the soft term (``> 0``).
        deit_target: ``"hard"`` (DeiT's choice) or ``"soft"``: the term that
            trains the distillation head in ``mode="deit"``.

    Example::

        >>> import torch
        >>> from lightning_vitcompress.functional.distill import DistillConfig
        >>> config = DistillConfig(mode="deit", deit_target="soft", temperature=3.0)
        >>> student_logits, teacher_logits = torch.randn(8, 10), torch.randn(8, 10)
        >>> term = config.loss(student_logits, teacher_logits)  # the distillation head's soft term
        >>> term.shape, config.alpha
        (torch.Size([]), 0.5)
    """

    mode: DistillationMode = "soft"
    alpha: float = 0.5
    temperature: float = 2.0
    deit_target: Literal["hard", "soft"] = "hard"

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", _MODES)
        check_fraction(self.alpha, "alpha", "0.5 as in DeiT (0: task loss only, 1: teacher only)", closed=True)
        check_positive(self.temperature, "temperature", "1.0 (plain softmax) or 4.0")
        check_choice(self.deit_target, "deit_target", ("hard", "soft"))
        if self.deit_target != "hard" and self.mode != "deit":
            raise ValueError(
                f"deit_target={self.deit_target!r} only applies to mode='deit' (it picks the distillation head's "
                f"term), but mode={self.mode!r}. Pass mode='deit', or leave deit_target out."
            )
        object.__setattr__(self, "alpha", float(self.alpha))  # frozen: set once, as a float
        object.__setattr__(self, "temperature", float(self.temperature))

    def loss(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The distillation term (not yet weighted by ``alpha``) for these student and teacher logits."""
        kind = self.deit_target if self.mode == "deit" else self.mode
        if kind == "soft":
            return soft_distillation_loss(student_logits, teacher_logits, self.temperature)
        return hard_distillation_loss(student_logits, teacher_logits)

    def check_student(self, student: nn.Module) -> None:
        """``mode="deit"`` needs a student with a distillation token; raise ``ValueError`` naming ``mode`` if not."""
        timm_distilled = callable(getattr(student, "set_distilled_training", None)) and hasattr(student, "head_dist")
        transformers_distilled = hasattr(student, "cls_classifier") and hasattr(student, "distillation_classifier")
        if self.mode == "deit" and not (timm_distilled or transformers_distilled):
            raise ValueError(
                f"mode='deit' needs a student with a distillation token (timm VisionTransformerDistilled, e.g. "
                f"small_vit('deit_tiny_distilled_patch16_224'), or transformers "
                f"DeiTForImageClassificationWithTeacher); {type(student).__name__} has none. "
                "Use mode='soft' or mode='hard' for this student."
            )


# ----------------------------------------------------------- the teacher in a step
def check_input_adapter(input_adapter: Any) -> InputAdapter:
    """``None``, a callable, or an image size as ``(height, width)`` (an ``int`` means a square); else ``ValueError``."""
    if input_adapter is None or callable(input_adapter):
        return input_adapter
    size = (input_adapter, input_adapter) if isinstance(input_adapter, int) else input_adapter
    if not (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(
            f"input_adapter={input_adapter!r}: pass an image size (224 or (224, 224)), "
            "a callable mapping the student's batch to the teacher's, or None."
        )
    return (int(size[0]), int(size[1]))


def check_teacher_precision(teacher_precision: Any) -> Optional[TeacherPrecision]:
    """``None`` (resolved per device by :func:`resolve_teacher_precision`), ``"bf16"``, ``"fp16"`` or ``"fp32"``."""
    if teacher_precision is not None:
        check_choice(
            teacher_precision,
            "teacher_precision",
            tuple(_TEACHER_DTYPES),
            ", or None (bf16 where the device runs it natively, else fp32)",
        )
    return teacher_precision


def autocast_runs_natively(device: Union[str, torch.device], precision: str) -> bool:
    """Whether ``device`` runs autocast in ``precision`` with native math (not just emulated, hence slow).

    CPU: bf16 with AVX512-BF16 or AMX (oneDNN), fp16 with AVX512-FP16 or AMX-FP16;
    CUDA: bf16 from Ampere on, fp16 everywhere; other devices: no.
    """
    device = torch.device(device)
    if precision == "fp32":
        return True
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return torch.cuda.is_bf16_supported() if precision == "bf16" else True
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        probe = "_is_mkldnn_bf16_supported" if precision == "bf16" else "_is_mkldnn_fp16_supported"
        try:
            return bool(getattr(torch.ops.mkldnn, probe)())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_teacher_precision(teacher_precision: Optional[str], device: Union[str, torch.device]) -> TeacherPrecision:
    """The precision the teacher runs in on ``device``: ``teacher_precision``, or for ``None`` bf16 where
    the device has native bf16 (:func:`autocast_runs_natively`) and fp32 elsewhere.

    A reduced precision the device cannot autocast to at all (fp16/bf16 on a
    device type without autocast, bf16 on a pre-Ampere GPU) is a ``ValueError``
    naming ``teacher_precision``.
    """
    check_teacher_precision(teacher_precision)
    device = torch.device(device)
    if teacher_precision is None:
        return "bf16" if autocast_runs_natively(device, "bf16") else "fp32"
    if teacher_precision != "fp32":
        available = torch.amp.is_autocast_available(device.type)
        if not available or (device.type == "cuda" and not autocast_runs_natively(device, teacher_precision)):
            raise ValueError(
                f"teacher_precision={teacher_precision!r}: the {device} device cannot autocast to "
                f"{teacher_precision}. Pass teacher_precision='fp32', or None to pick per device."
            )
    return teacher_precision  # type: ignore[return-value]


def teacher_forward(
    teacher: nn.Module, inputs: Tensor, input_adapter: InputAdapter = None, precision: Optional[str] = None
) -> Tensor:
    """The teacher's logits for a student batch, in inference mode (no autograd records at all).

    ``input_adapter`` (see :func:`check_input_adapter`) maps the batch (a
    callable) or resizes it bilinearly (an image size); floating inputs are cast
    to the teacher's parameter dtype. ``precision``: ``"bf16"``/``"fp16"`` run
    the forward under autocast on the inputs' device (the teacher's weights stay
    as they are) and return float32 logits; ``"fp32"`` runs it with autocast
    off, even inside the student's mixed-precision region; ``None`` leaves the
    surrounding autocast state alone. A teacher returning a tuple (a distilled
    timm model in training mode) gives its first output; an output object
    (transformers) its ``.logits``.
    """
    with torch.inference_mode():
        x = inputs
        if callable(input_adapter):
            x = input_adapter(x)
        elif input_adapter is not None:
            size = (input_adapter, input_adapter) if isinstance(input_adapter, int) else input_adapter
            if tuple(x.shape[-2:]) != tuple(size):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        reference = next(iter(teacher.parameters()), None)
        if reference is not None and reference.is_floating_point() and x.is_floating_point():
            x = x.to(reference.dtype)
        if precision is None:
            output = teacher(x)
        else:
            check_teacher_precision(precision)  # raises for a name _TEACHER_DTYPES lacks
            dtype = _TEACHER_DTYPES[precision]
            with torch.autocast(x.device.type, dtype=dtype, enabled=precision != "fp32"):
                output = teacher(x)
        try:  # a tensor; a tuple (first output: a distilled timm teacher in eval averages); `.logits` (transformers)
            logits = logits_of(output)
        except TypeError:
            raise TypeError(
                f"The teacher returned {type(output).__name__}; it must return logits: a tensor, a tuple whose "
                "first element is one, or an object with .logits."
            ) from None
    # outside inference mode: a normal tensor the loss may save for backward
    return logits.float() if precision in ("bf16", "fp16") else logits.clone()


def sample_keys(inputs: Tensor) -> list[bytes]:
    """One content hash per sample (its exact bytes, shape and dtype): a teacher-logit cache key."""
    rows = inputs.detach().to("cpu").contiguous()
    header = f"{rows.dtype}{tuple(rows.shape[1:])}".encode()
    if rows.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bits as int16
        rows = rows.view(torch.int16)
    return [hashlib.blake2b(header + row.numpy().tobytes(), digest_size=16).digest() for row in rows]


def check_same_classes(student: nn.Module, teacher: nn.Module) -> None:
    """Raise ``ValueError`` when both models state their class count and the counts differ."""
    student_classes, teacher_classes = _num_classes(student), _num_classes(teacher)
    if student_classes and teacher_classes and student_classes != teacher_classes:
        raise ValueError(
            f"teacher predicts {teacher_classes} classes but the student {student_classes}. Use a teacher "
            f"trained on the student's {student_classes} classes (e.g. a timm name with "
            f"teacher_kwargs=dict(num_classes={student_classes}) and fine-tuned weights, or its checkpoint)."
        )


# -------------------------------------------------------------------- helpers
def _num_classes(model: nn.Module) -> Optional[int]:
    """Output classes where the model states them (timm's ``num_classes``, ``get_classifier()``, or the last
    layer of an ``nn.Sequential`` being an ``nn.Linear``); else ``None``."""
    value = getattr(model, "num_classes", None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if head is None and isinstance(model, nn.Sequential) and len(model):
        head = model[-1]
    return head.out_features if isinstance(head, nn.Linear) else None


def fixed_image_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """The input size a timm ViT-like teacher insists on; ``None`` when it takes any size."""
    if getattr(model, "dynamic_img_size", False):
        return None
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
