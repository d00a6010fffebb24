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
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback, example_from_data
from lightning_vitcompress._plan import PlanRow
from lightning_vitcompress._model import shape_example_input
from lightning_vitcompress.models.base import logits_of
from lightning_vitcompress._checks import check_bool
from lightning_vitcompress._options import takes_config
from lightning_vitcompress.functional.distill import (
    DistillConfig,
    InputAdapter,
    TeacherPrecision,
    TeacherSpec,
    _fixed_image_size,
    check_input_adapter,
    check_same_classes,
    check_teacher,
    check_teacher_precision,
    combine_losses,
    load_teacher,
    resolve_teacher_precision,
    sample_keys,
    teacher_forward,
    teacher_kind,
)

__all__ = ['DistillationTeacher']


class _Capture:
    """One forward call of the student in the training step, with the teacher's answer to its inputs."""

    __slots__ = ("teacher_logits", "distill_logits", "prediction_logits")

    def __init__(self, teacher_logits: Tensor, distill_logits: Tensor, prediction_logits: Tensor) -> None:
        self.teacher_logits = teacher_logits
        self.distill_logits = distill_logits  # the logits the teacher term trains
        self.prediction_logits = prediction_logits  # what the student predicts (for agreement)


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

    Example::

        teacher = DigitsClassifier.load_from_checkpoint("big.ckpt").model
        trainer = L.Trainer(callbacks=[DistillationTeacher(teacher, mode="soft", alpha=0.5, temperature=2.0)])
        trainer.fit(DigitsClassifier(embed_dim=32, depth=2), datamodule)

        # DeiT: distillation token of a distilled student, teacher at 224 from a local file
        DistillationTeacher("vit_base_patch16_224", teacher_weights="vit_b16.safetensors",
                            teacher_kwargs=dict(num_classes=10), config=DistillConfig(mode="deit"), input_adapter=224)

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
        *,
        config: DistillConfig,
        pretrained: bool = True,
        teacher_weights: Optional[Union[str, "os.PathLike[str]"]] = None,
        teacher_kwargs: Optional[dict[str, Any]] = None,
        teacher_class: Optional[type[pl.LightningModule]] = None,
        input_adapter: InputAdapter = None,
        teacher_precision: Optional[TeacherPrecision] = None,
        cache_teacher_logits: bool = False,
        weights_only: bool = True,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        self.config = config
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

    # --------------------------------------------------------------- setup
    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        c = self.config
        teacher = self.teacher_spec if isinstance(self.teacher_spec, str) else type(self.teacher_spec).__name__
        return [PlanRow("DistillationTeacher", f"adds a {c.mode} distillation term from {teacher}",
                        "every training step", f"alpha={c.alpha:g}, temperature={c.temperature:g}, teacher in {self.teacher_precision}")]

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
            self._teacher = self._prepare_teacher(self._build_teacher(pl_module), pl_module)
        check_same_classes(student, self._teacher)
        self._check_teacher_runs(trainer, student)
        self._install(pl_module)
        name = type(self._teacher).__name__
        rank_zero_info(
            f"DistillationTeacher: {name} teacher -> {type(student).__name__} student, mode={self.config.mode!r}, "
            f"alpha={self.config.alpha}, temperature={self.config.temperature}, "
            f"teacher_precision={self.teacher_precision!r}."
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
        except Exception as err:  # noqa: BLE001 - reported with its cause
            raise ValueError(
                f"teacher={type(teacher).__name__} cannot run the student's input of shape {tuple(example.shape)} "
                f"(from {source}): {type(err).__name__}: {err}. Pass input_adapter= (an image size to resize to, or "
                "a function mapping the student's batch to the teacher's input, e.g. repeating a grey channel), "
                "or a teacher built for the student's images (channels and size)."
            ) from err

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the strategy has moved the student to its device (and dtype, for "-true" precisions) by now
        self._place_teacher(self.target(pl_module))

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

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()
        super().teardown(trainer, pl_module, stage)

    @override
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
        deit = self.config.mode == "deit"
        was_distilled = bool(getattr(student, "distilled_training", False))
        if deit and callable(getattr(student, "set_distilled_training", None)):  # timm; transformers always is
            student.set_distilled_training(True)
        try:
            output = original(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            if deit and callable(getattr(student, "set_distilled_training", None)):
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
            distill_terms.append(self.config.loss(capture.distill_logits, teacher_logits))
            agreements.append(
                (capture.prediction_logits.detach().argmax(-1) == teacher_logits.argmax(-1)).float().mean()
            )
        distill = distill_terms[0] if len(distill_terms) == 1 else torch.stack(distill_terms).mean()
        agreement = agreements[0] if len(agreements) == 1 else torch.stack(agreements).mean()
        total = combine_losses(task_loss, distill.to(task_loss.dtype), self.config.alpha)
        batch_size = int(captures[0].distill_logits.shape[0]) if captures[0].distill_logits.ndim else 1
        # the total is what training_step returns (Lightning's own "loss"); logging it too would cost time only
        for name, value in (("task_loss", task_loss.detach()), ("loss", distill.detach()), ("agreement", agreement)):
            pl_module.log(f"distill/{name}", value, on_step=True, on_epoch=True, batch_size=batch_size)
        if isinstance(output, Mapping):
            output = dict(output)
            output["loss"] = total
            return output
        return total

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
        deit = self.config.mode == "deit"

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            record = self._records(module) and bool(pending)
            if deit:
                heads = _class_and_distillation_logits(output)
                if heads is None:
                    return None  # eval mode: timm already averaged the heads
                cls_logits, dist_logits = heads
                if not record:  # what the user would get without distilled training
                    return _with_logits(output, (cls_logits + dist_logits) / 2)
                captures.append(_Capture(pending.pop(), dist_logits, ((cls_logits + dist_logits) / 2).detach()))
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
            captures.append(_Capture(pending.pop(), logits, logits))
            return None

        return hook

    # ------------------------------------------------------ teacher logits
    def _adapter(self, inputs: Tensor) -> InputAdapter:
        """``input_adapter``; when None, the teacher's fixed image size if the first batch differs from it."""
        if self.input_adapter is not None:
            return self.input_adapter
        if not self._auto_size_checked:
            self._auto_size_checked = True
            wanted = _fixed_image_size(self.teacher)
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

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cache_teacher_logits and trainer.current_epoch >= 1 and self._cache_lookups and not self._cache_hits:
            rank_zero_warn(
                "DistillationTeacher(cache_teacher_logits=True) found no cached teacher logits this epoch: the "
                "inputs change every epoch (random augmentation?), so the cache only costs memory. "
                "Set cache_teacher_logits=False."
            )
        self._cache_lookups = self._cache_hits = 0

    # ------------------------------------------------------ callback state
    @override
    def state_dict(self) -> dict[str, Any]:
        # the teacher itself is deliberately *not* saved: checkpoints hold the student only. These fields are
        # read back at a resume's setup (_check_resume).
        teacher = None if isinstance(self.teacher_spec, nn.Module) else os.fspath(self.teacher_spec)
        return {**dataclasses.asdict(self.config), "teacher": teacher, "teacher_precision": self.teacher_precision}

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

