"""DistillationTeacher: knowledge distillation from a frozen teacher, with no change to ``training_step``.

The callback adds a distillation term to the loss the user's ``training_step``
returns::

    total = (1 - alpha) * task_loss + alpha * distillation_loss

How, without touching the user's code: at ``setup`` (stage ``"fit"``) the
callback wraps the LightningModule's ``training_step`` *on the instance* (the
class is untouched; the wrapper is removed at ``teardown``). Lightning calls
``pl_module.training_step`` by attribute lookup both on a single device
(``Strategy.training_step``) and under DDP (the DDP wrapper's forward is
redirected to ``getattr(pl_module, "training_step")``), so the wrapper runs in
both cases and, under DDP, inside the DDP forward: the combined loss is the one
automatic optimization backpropagates and DDP all-reduces. During the wrapped
step, hooks on the student (the ViT the callback targets) run the teacher on
the inputs of each forward call (just before the student's forward, which is
measurably cheaper than after it) and record the student's logits; after
``training_step`` returns, the distillation term is added to the returned loss
(a tensor, or the ``"loss"`` entry of a dict).

**Several forward calls in one step** (two augmented views, a mixup pass...):
every call made with gradients enabled and the student in training mode gets
its own teacher term, and the distillation loss is their *mean*. Calls under
``torch.no_grad()`` or in eval mode are ignored. A step in which the student's
forward is never called raises an error rather than silently training without
the teacher; a ``training_step`` returning ``None`` (skip the batch) stays
``None``.

The teacher is never a submodule of the LightningModule: it is held by the
callback, so it is not in the student's ``state_dict`` or checkpoints, not
moved by ``pl_module.train()``, and not wrapped by DDP. It is frozen
(``requires_grad=False``), in ``eval()`` mode, run under ``torch.no_grad()``,
moved to the student's device at ``on_fit_start``, and cast to the student's
parameter dtype (``"bf16-true"``, ``"16-true"``); under mixed precision it runs
inside the same autocast region as the student.
"""


from __future__ import annotations

import difflib
import functools
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._checks import (
    check_bool,
    check_choice,
    check_fraction,
    check_path,
    check_positive,
)
from lightning_vitcompress._model import get_submodule, resolve_target_path
from lightning_vitcompress._structure import build_from_checkpoint, read_checkpoint
from lightning_vitcompress.functional.distill import (
    _MODES,
    _TIMM_SOURCES,
    DistillationMode,
    InputAdapter,
    TeacherSpec,
    _fixed_image_size,
    _looks_like_path,
    _num_classes,
    combine_losses,
    hard_distillation_loss,
    soft_distillation_loss,
)

__all__ = ['DistillationTeacher']


def _sample_keys(inputs: Tensor) -> list[bytes]:
    """One content hash per sample (its exact bytes, shape and dtype): the teacher-logit cache key."""
    rows = inputs.detach().to("cpu").contiguous()
    header = f"{rows.dtype}{tuple(rows.shape[1:])}".encode()
    if rows.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bits as int16
        rows = rows.view(torch.int16)
    return [hashlib.blake2b(header + row.numpy().tobytes(), digest_size=16).digest() for row in rows]


_KINDS = {"module": "an nn.Module", "checkpoint": "a checkpoint path", "timm": "a timm model name"}


def _teacher_kind(teacher: Any) -> str:
    """``"module"``, ``"checkpoint"`` (a path) or ``"timm"`` (a model name)."""
    if isinstance(teacher, nn.Module):
        return "module"
    if isinstance(teacher, os.PathLike) or _looks_like_path(teacher):
        return "checkpoint"
    return "timm"


def _check_teacher(teacher: Any, weights: Any, kwargs: Any, module_class: Any) -> None:
    """What the value of ``teacher`` and its companion arguments alone decide (files are read at setup)."""
    if not isinstance(teacher, (nn.Module, str, os.PathLike)) or (isinstance(teacher, str) and not teacher.strip()):
        raise TypeError(
            f"teacher={teacher!r}: pass an nn.Module, a timm model name ('deit_tiny_patch16_224') or the path of a "
            "Lightning checkpoint."
        )
    kind = _teacher_kind(teacher)
    if kind == "timm":
        import timm

        if not teacher.startswith(_TIMM_SOURCES) and not timm.is_model(teacher):
            close = difflib.get_close_matches(teacher, timm.list_models(), n=5, cutoff=0.6)
            hint = f" Close matches: {close}." if close else " See timm.list_models('<pattern>*')."
            raise ValueError(f"teacher={teacher!r} is neither an existing checkpoint path nor a timm model name.{hint}")
    given = {"teacher_weights": weights, "teacher_kwargs": kwargs or None, "teacher_class": module_class}
    only_for = {"teacher_weights": "timm", "teacher_kwargs": "timm", "teacher_class": "checkpoint"}
    for argument, applies_to in only_for.items():
        if given[argument] is not None and kind != applies_to:
            raise ValueError(
                f"{argument}={given[argument]!r} only applies to a teacher given as {_KINDS[applies_to]}, but "
                f"teacher={teacher if isinstance(teacher, str) else type(teacher).__name__!r} is "
                f"{_KINDS[kind]}: it would be ignored. Leave {argument} out, or build the teacher yourself."
            )
    check_path(weights, "teacher_weights")
    if kwargs is not None:
        if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
            raise TypeError(
                f"teacher_kwargs={kwargs!r}: pass a dict of timm.create_model arguments, e.g. dict(num_classes=10)."
            )
        reserved = sorted({"model_name", "pretrained"} & set(kwargs))
        if reserved:
            raise ValueError(
                f"teacher_kwargs={kwargs!r}: {reserved} are DistillationTeacher's own arguments "
                "(teacher=..., pretrained=...); pass them there."
            )
    if module_class is not None and not (
        isinstance(module_class, type) and issubclass(module_class, pl.LightningModule)
    ):
        raise TypeError(
            f"teacher_class={module_class!r}: pass the LightningModule class that saved the checkpoint "
            "(the class, not an instance), e.g. teacher_class=DigitsClassifier."
        )


class _Capture:
    """One forward call of the student in the training step, with the teacher's answer to its inputs."""

    __slots__ = ("teacher_logits", "distill_logits", "prediction_logits")

    def __init__(self, teacher_logits: Tensor, distill_logits: Tensor, prediction_logits: Tensor) -> None:
        self.teacher_logits = teacher_logits
        self.distill_logits = distill_logits  # the logits the teacher term trains
        self.prediction_logits = prediction_logits  # what the student predicts (for agreement)


# ------------------------------------------------------------------- callback
class DistillationTeacher(CompressionCallback):
    r"""Adds a distillation loss from a frozen teacher to the loss ``training_step`` returns.

    ``total = (1 - alpha) * task_loss + alpha * distillation_loss``; the user's
    LightningModule is unchanged (see the module docstring for how, and for what
    happens when the student's forward runs several times in one step).

    Args:
        teacher: an ``nn.Module`` (a LightningModule works: its ViT, or itself
            when it has none, is used); a timm model name (``"deit_base_patch16_224"``);
            or the path of a Lightning checkpoint, loaded with
            :func:`~lightning_vitcompress.load_compressed` (so pruned or otherwise
            compressed teachers load too) as ``teacher_class``.
        mode: ``"soft"``: KL divergence at ``temperature``, scaled by ``T**2``.
            ``"hard"``: cross-entropy to the teacher's argmax (DeiT's hard
            distillation). ``"deit"``: for a timm ``VisionTransformerDistilled``
            student: the class token's head is trained by the task loss, the
            distillation token's head by the teacher (``deit_target``), while
            ``training_step`` still sees ordinary (class-head) logits;
            evaluation averages the two heads, as timm does.
        alpha: weight of the distillation term, in ``[0, 1]``.
        temperature: softmax temperature of the soft term (``> 0``).
        deit_target: ``"hard"`` (DeiT's choice) or ``"soft"``: the term that
            trains the distillation head in ``mode="deit"``.
        pretrained: timm names only: load the hub weights (or ``teacher_weights``).
        teacher_weights: timm names only: a local weights file, passed as
            ``pretrained_cfg_overlay=dict(file=...)`` (implies ``pretrained``).
        teacher_kwargs: timm names only: more ``timm.create_model`` arguments
            (``num_classes``, ``img_size``...). With ``teacher_weights`` and
            ``num_classes``, the file's classifier is kept (it must have that
            many outputs): a teacher is only useful with a head trained for the
            student's classes.
        teacher_class: checkpoint paths only: the LightningModule class to build;
            default: the class of the module being trained.
        input_adapter: how student inputs become teacher inputs: an ``int`` or
            ``(height, width)`` resizes bilinearly (e.g. ``224`` for a teacher at
            224 and a student at 32), a callable maps the batch. ``None``: resize
            automatically when the teacher is a timm ViT with a fixed image size
            that differs from the student's inputs; otherwise pass them as they are.
        cache_teacher_logits: keep the teacher's logits per sample (keyed by the
            exact bytes of the sample) and reuse them; for datasets *without*
            random augmentation, where it saves the teacher forward from the
            second epoch on. A warning is raised if an epoch after the first gets
            no cache hits.
        weights_only: checkpoint paths only: ``True`` (default) reads the file with
            ``torch.load(weights_only=True)``, which cannot run code; ``False``
            reads a trusted file holding other Python objects, with a warning.
        model_attribute: attribute of the LightningModule holding the student ViT;
            ``None`` finds it.

    Example::

        teacher = DigitsClassifier.load_from_checkpoint("big.ckpt").model
        trainer = L.Trainer(callbacks=[DistillationTeacher(teacher, mode="soft", alpha=0.5, temperature=2.0)])
        trainer.fit(DigitsClassifier(embed_dim=32, depth=2), datamodule)

        # DeiT: distillation token of a distilled student, teacher at 224 from a local file
        DistillationTeacher("vit_base_patch16_224", teacher_weights="vit_b16.safetensors",
                            teacher_kwargs=dict(num_classes=10), mode="deit", alpha=0.5, input_adapter=224)

    Resuming (``trainer.fit(ckpt_path=...)``) with another ``mode`` or
    ``deit_target`` than the checkpoint's run is an error at setup naming both
    values (the loss would train other heads mid-run); another ``alpha``,
    ``temperature`` or teacher file/name is allowed with a warning, and the new
    values apply from the resumed step.

    Logs (on step and epoch) ``distill/task_loss``, ``distill/loss`` (the
    distillation term) and ``distill/agreement`` (share of samples where student
    and teacher predict the same class); the total is the loss ``training_step``
    returns.
    """

    order = 40
    LOG_PREFIX = "distill"

    def __init__(
        self,
        teacher: TeacherSpec,
        mode: DistillationMode = "soft",
        alpha: float = 0.5,
        temperature: float = 2.0,
        *,
        deit_target: Literal["hard", "soft"] = "hard",
        pretrained: bool = True,
        teacher_weights: Optional[Union[str, "os.PathLike[str]"]] = None,
        teacher_kwargs: Optional[dict[str, Any]] = None,
        teacher_class: Optional[type[pl.LightningModule]] = None,
        input_adapter: InputAdapter = None,
        cache_teacher_logits: bool = False,
        weights_only: bool = True,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        check_choice(mode, "mode", _MODES)
        check_fraction(alpha, "alpha", "0.5 as in DeiT (0: task loss only, 1: teacher only)", closed=True)
        check_positive(temperature, "temperature", "1.0 (plain softmax) or 4.0")
        check_choice(deit_target, "deit_target", ("hard", "soft"))
        if deit_target != "hard" and mode != "deit":
            raise ValueError(
                f"deit_target={deit_target!r} only applies to mode='deit' (it picks the distillation head's term), "
                f"but mode={mode!r}. Pass mode='deit', or leave deit_target out."
            )
        check_bool(pretrained, "pretrained", "timm names: load pretrained weights")
        check_bool(cache_teacher_logits, "cache_teacher_logits", "reuse the teacher's logits per sample")
        check_bool(weights_only, "weights_only", "True: safe loading, default; False: trusted files only")
        _check_teacher(teacher, teacher_weights, teacher_kwargs, teacher_class)
        if input_adapter is not None and not callable(input_adapter):
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
            input_adapter = (int(size[0]), int(size[1]))
        self.teacher_spec = teacher
        self.mode = mode
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.deit_target = deit_target
        self.pretrained = pretrained
        self.teacher_weights = teacher_weights
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.teacher_class = teacher_class
        self.input_adapter = input_adapter
        self.cache_teacher_logits = cache_teacher_logits
        self.weights_only = weights_only
        self._teacher: Optional[nn.Module] = None
        self._auto_size: Optional[tuple[int, int]] = None
        self._auto_size_checked = False
        self._cache: dict[bytes, Tensor] = {}
        self._cache_lookups = 0
        self._cache_hits = 0
        self._installed: Optional[tuple[pl.LightningModule, Callable[..., Any], Optional[Any]]] = None

    # ------------------------------------------------------------ public API
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network (built at ``setup``)."""
        if self._teacher is None:
            raise RuntimeError("The teacher is built at Trainer setup; call trainer.fit first.")
        return self._teacher

    # -------------------------------------------------------------- teacher
    def _build_teacher(self, pl_module: pl.LightningModule) -> nn.Module:
        spec = self.teacher_spec
        if isinstance(spec, nn.Module):
            return self._network_of(spec)
        spec = os.fspath(spec)
        if _looks_like_path(spec):
            return self._teacher_from_checkpoint(spec, pl_module)
        return self._teacher_from_timm(spec)

    def _network_of(self, module: nn.Module) -> nn.Module:
        """A LightningModule teacher: its ViT (as for the student), or itself when it has none."""
        if not isinstance(module, pl.LightningModule):
            return module
        try:
            return get_submodule(module, resolve_target_path(module, self.model_attribute))
        except (AttributeError, ValueError):
            return module  # e.g. a CNN teacher: its own forward gives the logits

    def _teacher_from_checkpoint(self, path: str, pl_module: pl.LightningModule) -> nn.Module:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"teacher={path!r}: no such checkpoint file. Pass an existing Lightning checkpoint path, "
                "an nn.Module, or a timm model name."
            )
        module_class = self.teacher_class or type(pl_module)
        checkpoint = read_checkpoint(path, weights_only=self.weights_only, argument="teacher")
        if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
            raise ValueError(
                f"teacher={path!r} is not a Lightning checkpoint (no 'state_dict' entry; a plain state dict or "
                "weights file?). For timm weights pass teacher=<timm name>, teacher_weights=<file>; else build the "
                "teacher, load the weights yourself and pass the nn.Module."
            )
        try:
            teacher = build_from_checkpoint(module_class, checkpoint)
        except Exception as err:
            reason = str(err) if len(str(err)) <= 300 else str(err)[:300] + "..."
            raise ValueError(
                f"teacher={path!r}: could not load it as a {module_class.__name__} ({type(err).__name__}: {reason}). "
                "Pass teacher_class=<the LightningModule class that saved it> (with save_hyperparameters()), "
                "or build the teacher yourself and pass the nn.Module."
            ) from err
        return self._network_of(teacher)

    def _teacher_from_timm(self, name: str) -> nn.Module:
        import timm

        kwargs = dict(self.teacher_kwargs)
        pretrained = self.pretrained or self.teacher_weights is not None
        if self.teacher_weights is not None:
            weights = Path(self.teacher_weights)
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
                f"teacher_kwargs={self.teacher_kwargs!r}: timm.create_model({name!r}, ...) rejected them "
                f"({err}). Pass arguments of {name!r}'s constructor (num_classes, img_size, ...)."
            ) from err
        except Exception as err:
            if not pretrained:
                raise ValueError(
                    f"teacher={name!r}: timm could not build it with teacher_kwargs={self.teacher_kwargs!r} "
                    f"({type(err).__name__}: {err})."
                ) from err
            raise RuntimeError(
                f"teacher={name!r}: timm could not load the pretrained weights ({type(err).__name__}: {err}). "
                "Offline, pass teacher_weights='<local weights file>'; pretrained=False gives random weights."
            ) from err
        hub_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
        if pretrained and self.teacher_weights is None and kwargs.get("num_classes") not in (None, hub_classes):
            rank_zero_warn(
                f"teacher={name!r}: the hub weights predict {hub_classes} classes, so timm gave the teacher a new, "
                f"untrained {kwargs['num_classes']}-class head. Fine-tune the teacher on your classes first and pass "
                "its checkpoint (or teacher_weights=<file>)."
            )
        return model

    def _prepare_teacher(self, teacher: nn.Module, pl_module: pl.LightningModule) -> nn.Module:
        student_params = {id(p) for p in pl_module.parameters()}
        if any(id(p) in student_params for p in teacher.parameters()):
            raise ValueError(
                "teacher shares parameters with the LightningModule being trained. Keep the teacher out of the "
                "module (do not assign it as an attribute): pass it only to DistillationTeacher, so that it is "
                "neither trained, saved in checkpoints nor wrapped by DDP."
            )
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    def _check_classes(self, student: nn.Module, teacher: nn.Module) -> None:
        student_classes, teacher_classes = _num_classes(student), _num_classes(teacher)
        if student_classes and teacher_classes and student_classes != teacher_classes:
            raise ValueError(
                f"teacher predicts {teacher_classes} classes but the student {student_classes}. Use a teacher "
                f"trained on the student's {student_classes} classes (e.g. a timm name with "
                f"teacher_kwargs=dict(num_classes={student_classes}) and fine-tuned weights, or its checkpoint)."
            )

    # --------------------------------------------------------------- setup
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(pl_module).__name__}.automatic_optimization is False: DistillationTeacher adds its term "
                "to the loss that training_step returns, which manual optimization never backpropagates. Use "
                "automatic optimization, or add soft_distillation_loss/hard_distillation_loss yourself."
            )
        self._check_resume(trainer)
        student = self.target(pl_module)
        if self.mode == "deit" and not (
            callable(getattr(student, "set_distilled_training", None)) and hasattr(student, "head_dist")
        ):
            raise ValueError(
                f"mode='deit' needs a student with a distillation token (timm VisionTransformerDistilled, e.g. "
                f"small_vit('deit_tiny_distilled_patch16_224')); {type(student).__name__} has none. "
                "Use mode='soft' or mode='hard' for this student."
            )
        if self._teacher is None:
            self._teacher = self._prepare_teacher(self._build_teacher(pl_module), pl_module)
        self._check_classes(student, self._teacher)
        self._install(pl_module)
        name = type(self._teacher).__name__
        rank_zero_info(
            f"DistillationTeacher: {name} teacher -> {type(student).__name__} student, mode={self.mode!r}, "
            f"alpha={self.alpha}, temperature={self.temperature}."
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the strategy has moved the student to its device (and dtype, for "-true" precisions) by now
        self._place_teacher(self.target(pl_module))

    def _place_teacher(self, student: nn.Module) -> None:
        teacher = self.teacher
        reference = next((p for p in student.parameters() if p.is_floating_point()), None)
        if reference is None:
            return
        teacher_param = next(iter(teacher.parameters()), None)
        if teacher_param is None:
            return
        if teacher_param.device != reference.device or (
            teacher_param.is_floating_point() and teacher_param.dtype != reference.dtype
        ):
            teacher.to(device=reference.device, dtype=reference.dtype)
            self._cache.clear()

    # ------------------------------------------- wrapping training_step
    def _install(self, pl_module: pl.LightningModule) -> None:
        if self._installed is not None:
            self._uninstall()
        previous = pl_module.__dict__.get("training_step")  # an instance attribute someone else set, if any
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._distilled_training_step(pl_module, original, *args, **kwargs)

        training_step._vitcompress_distillation = True  # type: ignore[attr-defined]
        pl_module.__dict__["training_step"] = training_step
        self._installed = (pl_module, training_step, previous)

    def _uninstall(self) -> None:
        if self._installed is None:
            return
        pl_module, wrapper, previous = self._installed
        self._installed = None
        if pl_module.__dict__.get("training_step") is wrapper:
            if previous is None:
                del pl_module.__dict__["training_step"]
            else:
                pl_module.__dict__["training_step"] = previous

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()  # Lightning does not call teardown after an exception

    # ------------------------------------------------------- training step
    def _distilled_training_step(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        student = self.target(pl_module)  # looked up per step: another callback may have replaced it
        captures: list[_Capture] = []
        pending: list[Tensor] = []  # teacher logits computed before the student's forward, awaiting its output
        self._place_teacher(student)
        handles = (
            student.register_forward_pre_hook(self._teacher_hook(pending), with_kwargs=True),
            student.register_forward_hook(self._capture_hook(pending, captures), with_kwargs=True),
        )
        deit = self.mode == "deit"
        was_distilled = bool(getattr(student, "distilled_training", False))
        if deit:
            student.set_distilled_training(True)
        try:
            output = original(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            if deit:
                student.set_distilled_training(was_distilled)
        if output is None:  # the user skips this batch
            return None
        task_loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(task_loss, Tensor):
            raise TypeError(
                f"DistillationTeacher: training_step returned {type(output).__name__}; it must return the loss "
                "tensor or a dict with a 'loss' tensor, to which the distillation term is added."
            )
        if not captures:
            raise RuntimeError(
                f"DistillationTeacher: the student ({type(student).__name__} at "
                f"{self.target_path or 'the LightningModule itself'!r}) was not called with gradients enabled "
                "during training_step, so there are no logits to distil. Call the model (e.g. self(x)) in "
                "training_step, or set model_attribute to the module that produces the logits."
            )
        distill_terms, agreements = [], []
        for capture in captures:
            teacher_logits = capture.teacher_logits
            if teacher_logits.shape[-1] != capture.distill_logits.shape[-1]:
                raise ValueError(
                    f"teacher gives {teacher_logits.shape[-1]} logits per sample but the student "
                    f"{capture.distill_logits.shape[-1]}: teacher and student must predict the same classes."
                )
            distill_terms.append(self._term(capture.distill_logits, teacher_logits))
            agreements.append(
                (capture.prediction_logits.detach().argmax(-1) == teacher_logits.argmax(-1)).float().mean()
            )
        distill = distill_terms[0] if len(distill_terms) == 1 else torch.stack(distill_terms).mean()
        agreement = agreements[0] if len(agreements) == 1 else torch.stack(agreements).mean()
        total = combine_losses(task_loss, distill.to(task_loss.dtype), self.alpha)
        batch_size = int(captures[0].distill_logits.shape[0]) if captures[0].distill_logits.ndim else 1
        # the total is what training_step returns (Lightning's own "loss"); logging it too would cost time only
        for name, value in (("task_loss", task_loss.detach()), ("loss", distill.detach()), ("agreement", agreement)):
            pl_module.log(f"distill/{name}", value, on_step=True, on_epoch=True, batch_size=batch_size)
        if isinstance(output, Mapping):
            output = dict(output)
            output["loss"] = total
            return output
        return total

    def _term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        kind = self.deit_target if self.mode == "deit" else self.mode
        if kind == "soft":
            return soft_distillation_loss(student_logits, teacher_logits, self.temperature)
        return hard_distillation_loss(student_logits, teacher_logits)

    @staticmethod
    def _records(module: nn.Module) -> bool:
        # forward calls without gradients (metrics, EMA targets) or in eval mode get no teacher term
        return torch.is_grad_enabled() and module.training

    def _teacher_hook(self, pending: list[Tensor]) -> Callable[..., Any]:
        """Runs the teacher on the student's inputs *before* the student's forward.

        Measured on CPU: the teacher forward before the student's forward costs
        less than after it (while the student's activations are held for
        backward), and less than the two run apart.
        """

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._records(module):
                pending.append(self._teacher_logits(args[0] if args else next(iter(kwargs.values()))))

        return pre_hook

    def _capture_hook(self, pending: list[Tensor], captures: list[_Capture]) -> Callable[..., Any]:
        deit = self.mode == "deit"

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            record = self._records(module) and bool(pending)
            if deit:
                if not (isinstance(output, (tuple, list)) and len(output) == 2):
                    return None  # eval mode: timm already averaged the heads
                cls_logits, dist_logits = output
                if not record:  # what the user would get without distilled training
                    return (cls_logits + dist_logits) / 2
                captures.append(_Capture(pending.pop(), dist_logits, ((cls_logits + dist_logits) / 2).detach()))
                return cls_logits  # training_step sees ordinary logits; the task loss trains the class head
            if not record:
                return None
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"DistillationTeacher: the student's forward returned {type(output).__name__}, not a logits "
                    "tensor. Set model_attribute to the module that returns the logits."
                )
            captures.append(_Capture(pending.pop(), output, output))
            return None

        return hook

    # ------------------------------------------------------ teacher logits
    def _adapt(self, inputs: Tensor) -> Tensor:
        adapter = self.input_adapter
        if callable(adapter):
            return adapter(inputs)
        size = adapter
        if size is None:
            if not self._auto_size_checked:
                self._auto_size_checked = True
                wanted = _fixed_image_size(self.teacher)
                if wanted is not None and inputs.ndim == 4 and tuple(inputs.shape[-2:]) != wanted:
                    self._auto_size = wanted
                    rank_zero_info(
                        f"DistillationTeacher: resizing student inputs {tuple(inputs.shape[-2:])} to the teacher's "
                        f"{wanted} (bilinear); pass input_adapter to choose otherwise."
                    )
            size = self._auto_size
        if size is None or tuple(inputs.shape[-2:]) == tuple(size):
            return inputs
        return F.interpolate(inputs, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def _teacher_forward(self, inputs: Tensor) -> Tensor:
        teacher = self.teacher
        reference = next(iter(teacher.parameters()), None)
        x = self._adapt(inputs)
        if reference is not None and reference.is_floating_point() and x.is_floating_point():
            x = x.to(reference.dtype)
        logits = teacher(x)
        if isinstance(logits, (tuple, list)):  # a distilled timm teacher in eval averages; others: first output
            logits = logits[0]
        if not isinstance(logits, Tensor):
            raise TypeError(f"The teacher returned {type(logits).__name__}; it must return a logits tensor.")
        return logits.detach()

    def _teacher_logits(self, inputs: Tensor) -> Tensor:
        if not self.cache_teacher_logits:
            return self._teacher_forward(inputs)
        keys = _sample_keys(inputs)
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        self._cache_lookups += len(keys)
        self._cache_hits += len(keys) - len(missing)
        if missing:
            fresh = self._teacher_forward(inputs[missing]).to("cpu")
            for i, row in zip(missing, fresh):
                self._cache[keys[i]] = row.clone()
        return torch.stack([self._cache[key] for key in keys]).to(inputs.device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cache_teacher_logits and trainer.current_epoch >= 1 and self._cache_lookups and not self._cache_hits:
            rank_zero_warn(
                "DistillationTeacher(cache_teacher_logits=True) found no cached teacher logits this epoch: the "
                "inputs change every epoch (random augmentation?), so the cache only costs memory. "
                "Set cache_teacher_logits=False."
            )
        self._cache_lookups = self._cache_hits = 0

    # ------------------------------------------------------ callback state
    def state_dict(self) -> dict[str, Any]:
        # the teacher itself is deliberately *not* saved: checkpoints hold the student only. These fields are
        # read back at a resume's setup (_check_resume).
        teacher = self.teacher_spec
        return {
            "mode": self.mode,
            "deit_target": self.deit_target,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "teacher": None if isinstance(teacher, nn.Module) else os.fspath(teacher),
        }

    def _check_resume(self, trainer: pl.Trainer) -> None:
        """Resuming with another loss is an error; another weight, temperature or teacher file is a warning.

        ``mode`` and ``deit_target`` decide which heads and logits the teacher trains (switching from "deit" to
        "soft" mid-run trains another head): they must match the checkpoint's run. ``alpha``, ``temperature``
        and a teacher given by name or path may change on purpose (a schedule, a better teacher): the new
        values apply from the resumed step, with a warning naming both.
        """
        path, saved = self.resumed_callback_state(trainer)
        if not saved:
            return
        mine = self.state_dict()
        for argument in ("mode", "deit_target"):
            if argument in saved and saved[argument] != mine[argument]:
                raise ValueError(
                    f"{argument}={mine[argument]!r}, but the checkpoint being resumed ({path}) was trained with "
                    f"{argument}={saved[argument]!r}. Resume with {argument}={saved[argument]!r}, or start a new fit "
                    "from its weights (trainer.fit without ckpt_path, after loading them)."
                )
        changed = [
            f"{argument}={saved[argument]!r} -> {mine[argument]!r}"
            for argument in ("alpha", "temperature", "teacher")
            if saved.get(argument) is not None and mine[argument] is not None and saved[argument] != mine[argument]
        ]
        if changed:
            rank_zero_warn(
                f"DistillationTeacher: resuming {path} with other arguments than its run used ({', '.join(changed)}); "
                "the new values apply from the resumed step."
            )

