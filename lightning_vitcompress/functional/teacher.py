"""Loading the distillation teacher: an ``nn.Module``, a checkpoint path or a timm model name, checked before training.

:func:`check_teacher` tells what a teacher argument is and refuses a bad one
at construction (a missing file, an unknown timm name with the closest ones);
:func:`load_teacher` builds it: a checkpoint through
:func:`~lightning_vitcompress.load_compressed` (a compressed teacher keeps its
structure), a timm name with ``pretrained_cfg_overlay`` for local weights.
:mod:`~lightning_vitcompress.functional.distill` re-exports both.

Example (a tiny timm ViT's weights saved to a local file, as a fine-tuned teacher's would be)::

    >>> import timm, torch
    >>> from safetensors.torch import save_file
    >>> from lightning_vitcompress.functional.teacher import load_teacher
    >>> tiny = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    >>> trained = timm.create_model("vit_tiny_patch16_224", **tiny)
    >>> save_file(trained.state_dict(), "vit_tiny.safetensors")
    >>> teacher = load_teacher("vit_tiny_patch16_224", teacher_weights="vit_tiny.safetensors", teacher_kwargs=tiny)
    >>> torch.equal(teacher.head.weight, trained.head.weight)   # the file's weights, its 10-class head kept
    True
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from lightning_vitcompress._checks import check_path
from lightning_vitcompress._model import get_submodule, resolve_target_path
from lightning_vitcompress._structure import build_from_checkpoint, read_checkpoint

__all__ = ["TeacherSpec", "check_teacher", "freeze_teacher", "load_teacher", "teacher_kind"]

TeacherSpec = Union[nn.Module, str, "os.PathLike[str]"]

_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


# --------------------------------------------------------------- teacher loading
_KINDS = {"module": "an nn.Module", "checkpoint": "a checkpoint path", "timm": "a timm model name"}


def _is_lightning_module_class(cls: Any) -> bool:
    """A ``LightningModule`` subclass, told without importing Lightning (this layer must load without it).

    ``CHECKPOINT_HYPER_PARAMS_KEY`` is a class attribute of ``LightningModule``
    that a plain ``nn.Module`` does not have.
    """
    return isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY")


def teacher_kind(teacher: TeacherSpec) -> str:
    """``"module"``, ``"checkpoint"`` (a path) or ``"timm"`` (a model name)."""
    if isinstance(teacher, nn.Module):
        return "module"
    if isinstance(teacher, os.PathLike) or _looks_like_path(teacher):
        return "checkpoint"
    return "timm"


def check_teacher(
    teacher: Any, *, teacher_weights: Any = None, teacher_kwargs: Any = None, teacher_class: Any = None
) -> None:
    """Check what the values of ``teacher`` and its companion arguments alone decide (files are read later).

    Raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for an
    unknown timm name (with close matches) or a companion argument that does
    not apply to this kind of teacher; each message names the argument.
    """
    if not isinstance(teacher, (nn.Module, str, os.PathLike)) or (isinstance(teacher, str) and not teacher.strip()):
        raise TypeError(
            f"teacher={teacher!r}: pass an nn.Module, a timm model name ('deit_tiny_patch16_224') or the path of a "
            "Lightning checkpoint."
        )
    kind = teacher_kind(teacher)
    if kind == "timm":
        import timm

        assert isinstance(teacher, str)  # teacher_kind: neither a module nor a path, so a model name
        if not teacher.startswith(_TIMM_SOURCES) and not timm.is_model(teacher):
            close = difflib.get_close_matches(teacher, timm.list_models(), n=5, cutoff=0.6)
            hint = f" Close matches: {close}." if close else " See timm.list_models('<pattern>*')."
            raise ValueError(f"teacher={teacher!r} is neither an existing checkpoint path nor a timm model name.{hint}")
    given = {
        "teacher_weights": teacher_weights,
        "teacher_kwargs": teacher_kwargs or None,
        "teacher_class": teacher_class,
    }
    only_for = {"teacher_weights": "timm", "teacher_kwargs": "timm", "teacher_class": "checkpoint"}
    for argument, applies_to in only_for.items():
        if given[argument] is not None and kind != applies_to:
            raise ValueError(
                f"{argument}={given[argument]!r} only applies to a teacher given as {_KINDS[applies_to]}, but "
                f"teacher={teacher if isinstance(teacher, str) else type(teacher).__name__!r} is "
                f"{_KINDS[kind]}: it would be ignored. Leave {argument} out, or build the teacher yourself."
            )
    check_path(teacher_weights, "teacher_weights")
    if teacher_kwargs is not None:
        if not isinstance(teacher_kwargs, Mapping) or not all(isinstance(key, str) for key in teacher_kwargs):
            raise TypeError(
                f"teacher_kwargs={teacher_kwargs!r}: pass a dict of timm.create_model arguments, "
                "e.g. dict(num_classes=10)."
            )
        reserved = sorted({"model_name", "pretrained"} & set(teacher_kwargs))
        if reserved:
            raise ValueError(
                f"teacher_kwargs={teacher_kwargs!r}: {reserved} have arguments of their own "
                "(teacher=..., pretrained=...); pass them there."
            )
    if teacher_class is not None and not _is_lightning_module_class(teacher_class):
        raise TypeError(
            f"teacher_class={teacher_class!r}: pass the LightningModule class that saved the checkpoint "
            "(the class, not an instance), e.g. teacher_class=DigitsClassifier."
        )


def load_teacher(
    teacher: TeacherSpec,
    *,
    pretrained: bool = True,
    teacher_weights: Optional[Union[str, os.PathLike[str]]] = None,
    teacher_kwargs: Optional[Mapping[str, Any]] = None,
    teacher_class: Optional[type[nn.Module]] = None,
    weights_only: bool = True,
    model_attribute: Optional[str] = None,
    warn: Callable[[str], Any] = warnings.warn,
) -> nn.Module:
    """The teacher network ``teacher`` names, as it is (not frozen, not moved; the caller decides).

    Args:
        teacher: an ``nn.Module`` (a LightningModule gives its ViT, found as for
            the student, or itself when it has none); a timm model name
            (``"deit_base_patch16_224"``, ``"hf-hub:..."``); or the path of a
            Lightning checkpoint, rebuilt as ``teacher_class`` with
            :func:`~lightning_vitcompress.load_compressed`'s machinery (so
            pruned or otherwise compressed teachers load too).
        pretrained: timm names only: load the hub weights (or ``teacher_weights``).
        teacher_weights: timm names only: a local weights file, passed as
            ``pretrained_cfg_overlay=dict(file=...)`` (implies ``pretrained``).
            With ``num_classes`` in ``teacher_kwargs`` the file's classifier is
            kept (it must have that many outputs).
        teacher_kwargs: timm names only: more ``timm.create_model`` arguments.
        teacher_class: checkpoint paths only (and required for them): the
            LightningModule class that saved the checkpoint.
        weights_only: checkpoint paths only: ``True`` reads the file with
            ``torch.load(weights_only=True)``, which cannot run code; ``False``
            reads a trusted file holding other Python objects, with a warning.
        model_attribute: attribute of a LightningModule teacher holding its ViT.
        warn: reports a teacher that is probably not what you meant (a hub
            head replaced by an untrained one); under DDP pass a rank-zero
            warning function.

    Raises:
        TypeError, ValueError: as :func:`check_teacher`, or a file that is no
            Lightning checkpoint / cannot be built as ``teacher_class``.
        FileNotFoundError: a missing checkpoint or ``teacher_weights`` file.
        RuntimeError: timm could not fetch pretrained weights (offline).

    Example::

        >>> import lightning as L
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> from lightning_vitcompress.functional.teacher import load_teacher
        >>> big = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(big, DigitsDataModule())
        >>> trainer.save_checkpoint("runs/big.ckpt")
        >>> teacher = load_teacher("runs/big.ckpt", teacher_class=DigitsClassifier)
        >>> type(teacher).__name__, teacher.embed_dim   # the ViT inside the LightningModule
        ('VisionTransformer', 32)
    """
    check_teacher(teacher, teacher_weights=teacher_weights, teacher_kwargs=teacher_kwargs, teacher_class=teacher_class)
    if isinstance(teacher, nn.Module):
        return _network_of(teacher, model_attribute)
    spec = os.fspath(teacher)
    if teacher_kind(spec) == "checkpoint":
        return _teacher_from_checkpoint(spec, teacher_class, weights_only, model_attribute)
    return _teacher_from_timm(spec, pretrained, teacher_weights, dict(teacher_kwargs or {}), warn)


def freeze_teacher(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """``teacher`` in eval mode with no gradients; raises if it shares parameters with ``student`` (it would train)."""
    student_params = {id(p) for p in student.parameters()}
    if any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError(
            "teacher shares parameters with the LightningModule being trained. Keep the teacher out of the "
            "module (do not assign it as an attribute): pass it only to DistillationTeacher, so that it is "
            "neither trained, saved in checkpoints nor wrapped by DDP."
        )
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _network_of(module: nn.Module, model_attribute: Optional[str]) -> nn.Module:
    """A LightningModule teacher: its ViT (as for the student), or itself when it has none."""
    if not _is_lightning_module_class(type(module)):
        return module
    try:
        return get_submodule(module, resolve_target_path(module, model_attribute))
    except (AttributeError, TypeError, ValueError):
        return module  # e.g. a CNN or Swin teacher: its own forward gives the logits


def _teacher_from_checkpoint(
    path: str, module_class: Optional[type[nn.Module]], weights_only: bool, model_attribute: Optional[str]
) -> nn.Module:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"teacher={path!r}: no such checkpoint file. Pass an existing Lightning checkpoint path, "
            "an nn.Module, or a timm model name."
        )
    if module_class is None:
        raise ValueError(
            f"teacher={path!r} is a checkpoint path: pass teacher_class=<the LightningModule class that saved it>."
        )
    checkpoint = read_checkpoint(path, weights_only=weights_only, argument="teacher")
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(
            f"teacher={path!r} is not a Lightning checkpoint (no 'state_dict' entry; a plain state dict or "
            "weights file?). For timm weights pass teacher=<timm name>, teacher_weights=<file>; else build the "
            "teacher, load the weights yourself and pass the nn.Module."
        )
    try:
        built = build_from_checkpoint(module_class, checkpoint)
    except Exception as err:
        reason = str(err) if len(str(err)) <= 300 else str(err)[:300] + "..."
        raise ValueError(
            f"teacher={path!r}: could not load it as a {module_class.__name__} ({type(err).__name__}: {reason}). "
            "Pass teacher_class=<the LightningModule class that saved it> (with save_hyperparameters()), "
            "or build the teacher yourself and pass the nn.Module."
        ) from err
    return _network_of(built, model_attribute)


def _teacher_from_timm(
    name: str,
    pretrained: bool,
    teacher_weights: Optional[Union[str, os.PathLike[str]]],
    given: dict[str, Any],
    warn: Callable[[str], Any],
) -> nn.Module:
    import timm

    kwargs = dict(given)
    pretrained = pretrained or teacher_weights is not None
    if teacher_weights is not None:
        weights = Path(teacher_weights)
        if not weights.is_file():
            raise FileNotFoundError(f"teacher_weights={str(weights)!r}: no such file.")
        overlay = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(weights)}
        if "num_classes" in kwargs:
            # the file holds a teacher trained for these classes: keep its head (timm would drop and
            # re-initialise a head whose class count differs from the hub config's)
            overlay.setdefault("num_classes", kwargs["num_classes"])
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:  # an argument the model's constructor does not take
        raise ValueError(
            f"teacher_kwargs={given!r}: timm.create_model({name!r}, ...) rejected them "
            f"({err}). Pass arguments of {name!r}'s constructor (num_classes, img_size, ...)."
        ) from err
    except Exception as err:
        if not pretrained:
            raise ValueError(
                f"teacher={name!r}: timm could not build it with teacher_kwargs={given!r} "
                f"({type(err).__name__}: {err})."
            ) from err
        raise RuntimeError(
            f"teacher={name!r}: timm could not load the pretrained weights ({type(err).__name__}: {err}). "
            "Offline, pass teacher_weights='<local weights file>'; pretrained=False gives random weights."
        ) from err
    hub_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if pretrained and teacher_weights is None and kwargs.get("num_classes") not in (None, hub_classes):
        warn(
            f"teacher={name!r}: the hub weights predict {hub_classes} classes, so timm gave the teacher a new, "
            f"untrained {kwargs['num_classes']}-class head. Fine-tune the teacher on your classes first and pass "
            "its checkpoint (or teacher_weights=<file>)."
        )
    return model


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
