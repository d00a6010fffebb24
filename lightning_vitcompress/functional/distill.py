"""Distillation losses and teacher helpers: pure torch, no Lightning.

:class:`~lightning_vitcompress.DistillationTeacher` adds these terms to the
user's loss; they are usable on their own in any training loop.

Example::

    loss = combine_losses(F.cross_entropy(student(x), y), soft_distillation_loss(student(x), teacher(x), 4.0), 0.5)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['combine_losses', 'hard_distillation_loss', 'soft_distillation_loss']


DistillationMode = Literal["soft", "hard", "deit"]
TeacherSpec = Union[nn.Module, str, "os.PathLike[str]"]
InputAdapter = Union[None, int, tuple[int, int], Callable[[Tensor], Tensor]]

_MODES = ("soft", "hard", "deit")
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


# ---------------------------------------------------------------- loss functions
def soft_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton's soft distillation: ``KL(softmax(t / T) || softmax(s / T)) * T**2``, batch mean.

    Computed in float32. Logits of any shape ``(..., classes)``; every leading
    position counts as one sample.

    Example::

        loss = soft_distillation_loss(student(x), teacher(x), temperature=4.0)
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0, e.g. 1.0 or 4.0.")
    student = student_logits.float().flatten(0, -2) / temperature
    teacher = teacher_logits.float().flatten(0, -2) / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def hard_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT's hard distillation: cross-entropy to the teacher's argmax, batch mean (float32)."""
    student = student_logits.float().flatten(0, -2)
    return F.cross_entropy(student, teacher_logits.flatten(0, -2).argmax(dim=-1))


def combine_losses(task_loss: Tensor, distillation_loss: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) * task_loss + alpha * distillation_loss``."""
    return (1.0 - alpha) * task_loss + alpha * distillation_loss


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mode: Literal["soft", "hard"] = "soft",
    temperature: float = 1.0,
) -> Tensor:
    """The distillation term of ``mode`` (``"soft"`` or ``"hard"``)."""
    if mode == "soft":
        return soft_distillation_loss(student_logits, teacher_logits, temperature)
    if mode == "hard":
        return hard_distillation_loss(student_logits, teacher_logits)
    raise ValueError(f"mode={mode!r}: use 'soft' or 'hard'.")


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


_TIMM_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:")


def _looks_like_path(spec: str) -> bool:
    """A checkpoint path rather than a timm name (``hf-hub:``/``local-dir:`` names are timm's)."""
    if spec.startswith(_TIMM_SOURCES):
        return False
    return (
        os.sep in spec
        or (os.altsep is not None and os.altsep in spec)
        or spec.lower().endswith(_CHECKPOINT_SUFFIXES)
        or Path(spec).exists()
    )


def _fixed_image_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """The input size a timm ViT-like teacher insists on; ``None`` when it takes any size."""
    if getattr(model, "dynamic_img_size", False):
        return None
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))



