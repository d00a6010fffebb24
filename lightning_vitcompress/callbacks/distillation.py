"""DistillationTeacher: knowledge distillation from a frozen teacher, with no change to ``training_step``.

The callback adds a distillation term to the loss the user's ``training_step``
returns::

    total = (1 - alpha) * task_loss + alpha * distillation_loss

How, without touching the user's code: at ``setup`` (stage ``"fit"``) the
callback wraps the LightningModule's ``training_step`` *on the instance*
(:func:`~lightning_vitcompress._lightning.wrap_training_step`: Lightning has no
public hook that changes the returned loss; the class is untouched, and the
wrapper is removed at ``teardown``). Lightning looks the step up by attribute on
one device and inside the DDP forward, so the combined loss is the one automatic
optimization backpropagates and DDP all-reduces. During the wrapped step, hooks
on the student (the ViT the callback targets) run the teacher on the inputs of
each forward call (just before the student's forward, measurably cheaper than
after it) and record the student's logits
(:mod:`~lightning_vitcompress.callbacks._distillation_step`); after
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
parameter dtype (``"bf16-true"``, ``"16-true"``) unless ``teacher_precision="fp32"``.
Its forward runs in inference mode under autocast at ``teacher_precision``
(default: bf16 where the device has native bf16, fp32 elsewhere), whatever
precision the student trains in: on an AMD EPYC with AVX512-BF16 a bf16 teacher
forward took 0.55-0.65x the time of an fp32 one at ViT-Tiny width (192) and
gained nothing on 32-wide toys.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._checks import check_bool
from lightning_vitcompress._data import example_from_data
from lightning_vitcompress._lightning import wrap_training_step
from lightning_vitcompress._model import shape_example_input
from lightning_vitcompress._options import passed_config, takes_config
from lightning_vitcompress._plan import PlanRow
from lightning_vitcompress.callbacks._distillation_step import StudentCapture, distillation_terms, with_loss
from lightning_vitcompress.functional.distill import (
    DistillConfig,
    InputAdapter,
    TeacherPrecision,
    TeacherSpec,
    check_input_adapter,
    check_same_classes,
    check_teacher,
    check_teacher_precision,
    combine_losses,
    fixed_image_size,
    freeze_teacher,
    load_teacher,
    resolve_teacher_precision,
    sample_keys,
    teacher_forward,
    teacher_kind,
)

__all__ = ["DistillationTeacher"]


# ------------------------------------------------------------------- callback
@takes_config(DistillConfig, positional=("teacher", "mode", "alpha", "temperature"))
class DistillationTeacher(CompressionCallback):
    r"""Adds a distillation loss from a frozen teacher to the loss ``training_step`` returns.

    ``total = (1 - alpha) * task_loss + alpha * distillation_loss``; the user's
    LightningModule is unchanged (see the module docstring for how, and for what
    happens when the student's forward runs several times in one step).

    Args:
        teacher, pretrained, teacher_weights, teacher_kwargs, weights_only: the
            teacher and where it comes from, as in
            :func:`~lightning_vitcompress.functional.load_teacher`: an ``nn.Module``
            (a LightningModule gives its ViT, or itself when it has none); a timm
            model name, with the hub weights (``pretrained``) or a local
            ``teacher_weights`` file, and more ``timm.create_model`` arguments in
            ``teacher_kwargs`` (``num_classes``, ``img_size``...); or the path of
            a Lightning checkpoint (compressed teachers load too), read with
            ``torch.load(weights_only=True)`` unless you pass ``weights_only=False``
            for a trusted file.
        config: the same settings as one ``DistillConfig`` (then leave the four
            keywords out; passing both is an error).
        teacher_class: checkpoint paths only: the LightningModule class to build;
            default: the class of the module being trained.
        input_adapter: how student inputs become teacher inputs: an ``int`` or
            ``(height, width)`` resizes bilinearly (e.g. ``224`` for a teacher at
            224 and a student at 32), a callable maps the batch. ``None``: resize
            automatically when the teacher is a timm ViT with a fixed image size
            that differs from the student's inputs; otherwise pass them as they are.
        teacher_precision: ``"bf16"``, ``"fp16"`` or ``"fp32"``: the teacher's forward runs in
            inference mode under autocast at this precision (its weights stay as
            they are; ``"fp32"`` turns the student's autocast off for the teacher).
            ``None`` (default): ``"bf16"`` where the device runs bf16 natively (a
            CPU with AVX512-BF16 or AMX, an Ampere or newer GPU), else ``"fp32"``;
            resolved at setup, then :attr:`teacher_precision` tells which.
            ``benchmarks/bench_distillation.py`` measures its cost per step and
            the student accuracy with either teacher.
        cache_teacher_logits: keep the teacher's logits per sample (keyed by the
            exact bytes of the sample) and reuse them; for datasets *without*
            random augmentation, where it saves the teacher forward from the
            second epoch on. A warning is raised if an epoch after the first gets
            no cache hits.
        model_attribute: attribute of the LightningModule holding the student ViT;
            ``None`` finds it.

    Example (a tiny student on scikit-learn's digits; the teacher would be trained, e.g. from a checkpoint)::

        >>> import lightning as L
        >>> from lightning_vitcompress import DistillationTeacher
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> teacher = DigitsClassifier(embed_dim=64, depth=2, num_heads=4).model
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[DistillationTeacher(teacher, mode="soft", alpha=0.5, temperature=2.0)])
        >>> trainer.fit(DigitsClassifier(embed_dim=32, depth=2, num_heads=4), DigitsDataModule())
        >>> sorted(name for name in trainer.callback_metrics if name.startswith("distill/") and name.endswith("_epoch"))
        ['distill/agreement_epoch', 'distill/loss_epoch', 'distill/task_loss_epoch']
        >>> # DeiT: distillation token of a distilled student, teacher at 224 from a local file (not in CI)
        >>> from lightning_vitcompress.functional import DistillConfig
        >>> DistillationTeacher("vit_base_patch16_224", teacher_weights="vit_b16.safetensors",  # doctest: +SKIP
        ...                     teacher_kwargs=dict(num_classes=10), config=DistillConfig(mode="deit"), input_adapter=224)

    Resuming (``trainer.fit(ckpt_path=...)``) with another ``mode`` or
    ``deit_target`` than the checkpoint's run is an error at setup naming both
    values (the loss would train other heads mid-run); another ``alpha``,
    ``temperature``, teacher file/name or ``teacher_precision`` is allowed with a
    warning, and the new values apply from the resumed step.

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
        *args: Any,
        config: Optional[DistillConfig] = None,
        pretrained: bool = True,
        teacher_weights: Optional[Union[str, os.PathLike[str]]] = None,
        teacher_kwargs: Optional[dict[str, Any]] = None,
        teacher_class: Optional[type[pl.LightningModule]] = None,
        input_adapter: InputAdapter = None,
        teacher_precision: Optional[TeacherPrecision] = None,
        cache_teacher_logits: bool = False,
        weights_only: bool = True,
        model_attribute: Optional[str] = None,
        **options: Any,
    ) -> None:
        super().__init__(model_attribute)
        self.config = passed_config(config, args, options)
        check_bool(pretrained, "pretrained", "timm names: load pretrained weights")
        check_bool(cache_teacher_logits, "cache_teacher_logits", "reuse the teacher's logits per sample")
        check_bool(weights_only, "weights_only", "True: safe loading, default; False: trusted files only")
        check_teacher(
            teacher, teacher_weights=teacher_weights, teacher_kwargs=teacher_kwargs, teacher_class=teacher_class
        )
        self.input_adapter = check_input_adapter(input_adapter)
        self.requested_teacher_precision = check_teacher_precision(teacher_precision)
        #: the precision the teacher runs in: ``teacher_precision``, or the per-device default once resolved at setup
        self.teacher_precision: Optional[TeacherPrecision] = teacher_precision
        self.teacher_spec = teacher
        self.pretrained = pretrained
        self.teacher_weights = teacher_weights
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.teacher_class = teacher_class
        self.cache_teacher_logits = cache_teacher_logits
        self.weights_only = weights_only
        self._teacher: Optional[nn.Module] = None
        self._auto_size: Optional[tuple[int, int]] = None
        self._auto_size_checked = False
        self._cache: dict[bytes, Tensor] = {}
        self._cache_lookups = 0
        self._cache_hits = 0
        self._unwrap_training_step: Optional[Callable[[], None]] = None

    # --------------------------------------------------------------- public API
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network (built at ``setup``)."""
        if self._teacher is None:
            raise RuntimeError("The teacher is built at Trainer setup; call trainer.fit first.")
        return self._teacher

    # ----------------------------------- Lightning hooks, in the order they run
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(pl_module).__name__}.automatic_optimization is False: DistillationTeacher adds its term "
                "to the loss that training_step returns, which manual optimization never backpropagates. Use "
                "automatic optimization, or add soft_distillation_loss/hard_distillation_loss yourself."
            )
        self.teacher_precision = resolve_teacher_precision(
            self.requested_teacher_precision, trainer.strategy.root_device
        )
        self._check_resume(trainer)
        student = self.target(pl_module)
        self.config.check_student(student)
        if self._teacher is None:
            self._teacher = freeze_teacher(self._build_teacher(pl_module), pl_module)
        check_same_classes(student, self._teacher)
        self._check_teacher_runs(trainer, student)
        self._install(pl_module)
        name = type(self._teacher).__name__
        rank_zero_info(
            f"DistillationTeacher: {name} teacher -> {type(student).__name__} student, mode={self.config.mode!r}, "
            f"alpha={self.config.alpha}, temperature={self.config.temperature}, "
            f"teacher_precision={self.teacher_precision!r}."
        )

    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        c = self.config
        teacher = self.teacher_spec if isinstance(self.teacher_spec, str) else type(self.teacher_spec).__name__
        details = f"alpha={c.alpha:g}, temperature={c.temperature:g}, teacher in {self.teacher_precision}"
        return [
            PlanRow(
                "DistillationTeacher",
                f"adds a {c.mode} distillation term from {teacher}",
                "every training step",
                details,
            )
        ]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the strategy has moved the student to its device (and dtype, for "-true" precisions) by now
        self._place_teacher(self.target(pl_module))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cache_teacher_logits and trainer.current_epoch >= 1 and self._cache_lookups and not self._cache_hits:
            rank_zero_warn(
                "DistillationTeacher(cache_teacher_logits=True) found no cached teacher logits this epoch: the "
                "inputs change every epoch (random augmentation?), so the cache only costs memory. "
                "Set cache_teacher_logits=False."
            )
        self._cache_lookups = self._cache_hits = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        # the teacher itself is deliberately *not* saved: checkpoints hold the student only. These fields are
        # read back at a resume's setup (_check_resume).
        teacher = None if isinstance(self.teacher_spec, nn.Module) else os.fspath(self.teacher_spec)
        return {**dataclasses.asdict(self.config), "teacher": teacher, "teacher_precision": self.teacher_precision}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()  # Lightning does not call teardown after an exception

    # ------------------------------------------------------- setup: the teacher
    def _build_teacher(self, pl_module: pl.LightningModule) -> nn.Module:
        """:func:`~lightning_vitcompress.functional.load_teacher`; a checkpoint defaults to the student's class."""
        checkpoint = teacher_kind(self.teacher_spec) == "checkpoint"
        return load_teacher(
            self.teacher_spec,
            pretrained=self.pretrained,
            teacher_weights=self.teacher_weights,
            teacher_kwargs=self.teacher_kwargs,
            teacher_class=self.teacher_class or (type(pl_module) if checkpoint else None),
            weights_only=self.weights_only,
            model_attribute=self.model_attribute,
            warn=rank_zero_warn,
        )

    def _check_teacher_runs(self, trainer: pl.Trainer, student: nn.Module) -> None:
        """The teacher holds weights and runs one of the student's inputs now, not at the first batch."""
        teacher = self.teacher
        tensors = [*teacher.parameters(), *teacher.buffers()]
        if any(t.is_meta for t in tensors):
            raise ValueError(
                f"teacher={type(teacher).__name__}: its weights are on the meta device (built without data, e.g. "
                "under torch.device('meta') or init_empty_weights), so it has no logits to teach. Load its weights "
                "first (model.to_empty(device='cpu') then load_state_dict), or pass a checkpoint path or timm name."
            )
        example = example_from_data(trainer)
        source = "the Trainer's data"
        if example is None:
            example, source = shape_example_input(student), f"{type(student).__name__}'s stated input size"
        if example is None:
            return  # no input known before the first batch
        device = next((t.device for t in tensors), torch.device("cpu"))
        try:
            teacher_forward(teacher, example.to(device), self._adapter(example), precision=self.teacher_precision)
        except Exception as err:  # reported with its cause
            raise ValueError(
                f"teacher={type(teacher).__name__} cannot run the student's input of shape {tuple(example.shape)} "
                f"(from {source}): {type(err).__name__}: {err}. Pass input_adapter= (an image size to resize to, or "
                "a function mapping the student's batch to the teacher's input, e.g. repeating a grey channel), "
                "or a teacher built for the student's images (channels and size)."
            ) from err

    def _check_resume(self, trainer: pl.Trainer) -> None:
        """Resuming with another loss is an error; another weight, temperature or teacher file is a warning.

        ``mode`` and ``deit_target`` decide which heads and logits the teacher trains (switching from "deit" to
        "soft" mid-run trains another head): they must match the checkpoint's run. ``alpha``, ``temperature``
        a teacher given by name or path and ``teacher_precision`` may change on purpose (a schedule, a better
        teacher, another device): the new values apply from the resumed step, with a warning naming both.
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
            for argument in ("alpha", "temperature", "teacher", "teacher_precision")
            if saved.get(argument) is not None and mine[argument] is not None and saved[argument] != mine[argument]
        ]
        if changed:
            rank_zero_warn(
                f"DistillationTeacher: resuming {path} with other arguments than its run used ({', '.join(changed)}); "
                "the new values apply from the resumed step."
            )

    def _place_teacher(self, student: nn.Module) -> None:
        teacher = self.teacher
        reference = next((p for p in student.parameters() if p.is_floating_point()), None)
        teacher_param = next(iter(teacher.parameters()), None)
        if reference is None or teacher_param is None:
            return
        # an fp32 teacher keeps fp32 weights next to a "-true" low-precision student
        dtype = torch.float32 if self.teacher_precision == "fp32" else reference.dtype
        if teacher_param.device != reference.device or (
            teacher_param.is_floating_point() and teacher_param.dtype != dtype
        ):
            teacher.to(device=reference.device, dtype=dtype)
            self._cache.clear()

    # ---------------------------------------------- the distilled training step
    def _install(self, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        step = functools.partial(self._distilled_training_step, pl_module)
        self._unwrap_training_step = wrap_training_step(pl_module, step)

    def _uninstall(self) -> None:
        unwrap, self._unwrap_training_step = self._unwrap_training_step, None
        if unwrap is not None:
            unwrap()

    def _distilled_training_step(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        student = self.target(pl_module)  # looked up per step: another callback may have replaced it
        self._place_teacher(student)
        with StudentCapture(self._teacher_logits, deit=self.config.mode == "deit").attached(student) as step:
            output = original(*args, **kwargs)
        if output is None:  # the user skips this batch
            return None
        task_loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(task_loss, Tensor):
            raise TypeError(
                f"DistillationTeacher: training_step returned {type(output).__name__}; it must return the loss "
                "tensor or a dict with a 'loss' tensor, to which the distillation term is added."
            )
        if not step.captures:
            raise RuntimeError(
                f"DistillationTeacher: the student ({type(student).__name__} at "
                f"{self.target_path or 'the LightningModule itself'!r}) was not called with gradients enabled "
                "during training_step, so there are no logits to distil. Call the model (e.g. self(x)) in "
                "training_step, or set model_attribute to the module that produces the logits."
            )
        distill, agreement = distillation_terms(step.captures, self.config.loss)
        total = combine_losses(task_loss, distill.to(task_loss.dtype), self.config.alpha)
        first = step.captures[0].distill_logits
        batch_size = int(first.shape[0]) if first.ndim else 1
        # the total is what training_step returns (Lightning's own "loss"); logging it too would cost time only
        for name, value in (("task_loss", task_loss.detach()), ("loss", distill.detach()), ("agreement", agreement)):
            pl_module.log(f"distill/{name}", value, on_step=True, on_epoch=True, batch_size=batch_size)
        return with_loss(output, total)

    # ----------------------------------------------------------- teacher logits
    def _adapter(self, inputs: Tensor) -> InputAdapter:
        """``input_adapter``; when None, the teacher's fixed image size if the first batch differs from it."""
        if self.input_adapter is not None:
            return self.input_adapter
        if not self._auto_size_checked:
            self._auto_size_checked = True
            wanted = fixed_image_size(self.teacher)
            if wanted is not None and inputs.ndim == 4 and tuple(inputs.shape[-2:]) != wanted:
                self._auto_size = wanted
                rank_zero_info(
                    f"DistillationTeacher: resizing student inputs {tuple(inputs.shape[-2:])} to the teacher's "
                    f"{wanted} (bilinear); pass input_adapter to choose otherwise."
                )
        return self._auto_size

    def _teacher_forward(self, inputs: Tensor) -> Tensor:
        return teacher_forward(self.teacher, inputs, self._adapter(inputs), precision=self.teacher_precision)

    def _teacher_logits(self, inputs: Tensor) -> Tensor:
        if not self.cache_teacher_logits:
            return self._teacher_forward(inputs)
        keys = sample_keys(inputs)
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        self._cache_lookups += len(keys)
        self._cache_hits += len(keys) - len(missing)
        if missing:
            fresh = self._teacher_forward(inputs[missing]).to("cpu")
            for i, row in zip(missing, fresh):
                self._cache[keys[i]] = row.clone()
        return torch.stack([self._cache[key] for key in keys]).to(inputs.device)
