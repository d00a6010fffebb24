"""The base class of every callback here: one canonical order, whatever the list order.

Lightning calls callbacks in the order of ``Trainer(callbacks=[...])``. Our
callbacks must give the same result in any order (the benchmark's baseline is
the model *before* any edit; pruning acts before the Nystrom swap at the same
epoch...). So each callback implements ``ordered_*`` hooks, and the first of
our callbacks that Lightning reaches at a hook runs that hook of *all* of them,
sorted by their class attribute ``order``; the others then skip it.

=====  ======================  =============================================
 10    BenchmarkCallback       setup: snapshots the baseline model;
                               fit end: measures the final model (every
                               edit, quantization included, is done by then)
 15    (base)                  setup, on resume: replays the checkpoint's structure
 20    PruningSchedule         setup / epoch / step: prunes
 30    NystromSwap             setup / epoch: swaps attention
 35    TokenMerging            setup / epoch: blocks merge tokens (after the
                               edits to weights and attention modules, which
                               it runs through; the teacher is never merged)
 40    DistillationTeacher     setup: checks and places the teacher
 55    ExportOnFit("*.xml")    train end: an OpenVINO IR, from the float model
                               (OpenVINO does not convert torchao's int8 layers;
                               NNCF quantizes it), before QuantizeOnFit
 60    QuantizeOnFit           train end: quantizes
 70    ExportOnFit             train end: exports the final model to a file
                               (after QuantizeOnFit saved; before the benchmark)
=====  ======================  =============================================

The base class also owns what every callback does at ``setup``: the fit-stage
gate, the strategy check of callbacks that edit the model, epochs against
``max_epochs`` (:meth:`CompressionCallback.check_fit`), the record helper
(:meth:`~CompressionCallback.record`) and one logging helper
(:meth:`~CompressionCallback.log_metrics`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_vitcompress._card import write_model_cards
from lightning_vitcompress._model import (
    check_supported_attention,
    get_submodule,
    resolve_target_path,
    stated_input_shape,
)
from lightning_vitcompress._plan import PlanRow, show_plan
from lightning_vitcompress._structure import (
    STRUCTURE_KEY,
    Record,
    add_digest,
    read_checkpoint,
    record_edit,
    recorded_edits,
    replay_checkpoint_structure,
    save_edits,
)
from lightning_vitcompress._training_state import check_strategy_supported
from lightning_vitcompress.functional.budget import AccuracyBudget, limit_batches
from lightning_vitcompress.functional.measure import eval_mode, images_of, measure_accuracy

_STATE_ATTRIBUTE = "_vitcompress_pipeline"
#: on resume, the checkpoint's structure is replayed between the baseline snapshot and the edits
REPLAY_ORDER = 15
#: hooks in which Lightning lets a callback call ``LightningModule.log`` (the ones ours log from)
_LOOP_HOOKS = frozenset({"on_train_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_train_epoch_end"})


class _PipelineState:
    """Per-trainer bookkeeping: which ordered hooks ran, what was replayed on resume."""

    def __init__(self) -> None:
        self.done: set[tuple[Any, ...]] = set()
        self.replayed: list[Record] = []
        #: the checkpoint this fit resumes from (None for a fresh fit), read once at setup
        self.resume_path: Optional[str] = None
        self.checkpoint: dict[str, Any] = {}
        #: one image of the Trainer's data (see :func:`example_from_data`), looked up once; False: none found
        self.example: Any = None
        #: the first batch of the validation / training data (see :func:`first_batch`), read once
        self.batches: dict[str, Any] = {}
        #: top-1 of each budgeted target (by path) as it entered fit, measured once at setup
        self.references: dict[str, float] = {}


def _pipeline_state(trainer: "pl.Trainer") -> _PipelineState:
    state = trainer.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        state = trainer.__dict__[_STATE_ATTRIBUTE] = _PipelineState()
    return state


def resume_checkpoint_path(trainer: "pl.Trainer") -> tuple[Optional[str], bool]:
    """The checkpoint this ``fit`` will restore, already known at ``setup``, and whether to read it safely.

    ``trainer.ckpt_path`` is only filled in after ``setup`` (Lightning restores
    the checkpoint later), but a reshaped model must be rebuilt *before* its
    weights load. Lightning 2.x resolves ``fit(ckpt_path=..., weights_only=...)``
    ("last", "best", "hpc" or a path) into the arguments of ``Trainer._run``,
    which is on the call stack during ``setup``; we read both from there. The
    second value is False only when the user passed ``weights_only=False``.
    The resume tests fail loudly should a Lightning release move them.
    """
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_run" and isinstance(frame.f_locals.get("self"), pl.Trainer):
            path = frame.f_locals.get("ckpt_path")  # includes a path set with trainer.ckpt_path = ...
            return (str(path) if path else None), frame.f_locals.get("weights_only") is not False
        frame = frame.f_back
    return (str(trainer.ckpt_path) if trainer.ckpt_path else None), True


def _resumed_checkpoint(trainer: "pl.Trainer") -> tuple[Optional[str], dict[str, Any]]:
    """The path and contents of the checkpoint this fit resumes from (``None, {}`` for a fresh fit)."""
    path, weights_only = resume_checkpoint_path(trainer)
    if not path or not Path(path).is_file():
        return None, {}
    return path, read_checkpoint(path, weights_only=weights_only, argument="ckpt_path")


def example_from_data(trainer: "pl.Trainer") -> Optional[torch.Tensor]:
    """One image (batch of 1) of the data this fit trains on: validation data first, else training data.

    For models that do not state their input size. Lightning calls the
    datamodule's ``setup`` before the callbacks' ``setup``, so the loaders can
    be asked here, from the fit loop's data sources (``_DataLoaderSource.dataloader()``,
    what Lightning itself calls: ``fit(...)``'s loaders, the datamodule's or the module's). The first batch is read under a forked random state, so the
    training order is what it would be without us. Returns None where no data
    is reachable or a batch holds no image tensor.
    """
    state = _pipeline_state(trainer)
    if state.example is None:
        state.example = _first_images(trainer)
        state.example = False if state.example is None else state.example[:1].detach().cpu()
    return state.example if isinstance(state.example, torch.Tensor) else None


def first_batch(trainer: "pl.Trainer", validation: bool = True) -> Any:
    """The first batch of the validation data (``validation=True``) or of the training data, read once under a
    forked random state (the training order stays what it would be without us); None where none is reachable."""
    state = _pipeline_state(trainer)
    key = "validation" if validation else "training"
    if key not in state.batches:
        loop = trainer.fit_loop.epoch_loop.val_loop if validation else trainer.fit_loop
        try:
            with torch.random.fork_rng(devices=[]):
                loader = _first_loader(loop._data_source)
                state.batches[key] = next(iter(loader)) if loader is not None else None
        except Exception:  # noqa: BLE001 - a failing or empty loader: no batch
            state.batches[key] = None
    return state.batches[key]


def _first_images(trainer: "pl.Trainer") -> Optional[torch.Tensor]:
    for validation in (True, False):  # validation data, then training data
        images = images_of(first_batch(trainer, validation))
        if images is not None:
            return images
    return None


def _check_data_fits_models(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
    """Images of the Trainer's data that the compressed model cannot take (another channel count or size than
    the one it states) are refused before any callback edits the model, not at the first batch."""
    if getattr(pl_module, "example_input_array", None) is not None:
        return  # the module states what its model receives (training_step may convert the batch)
    example = example_from_data(trainer)
    if example is None or example.dim() != 4:
        return
    paths = {resolve_target_path(pl_module, cb.model_attribute)
             for cb in trainer.callbacks if isinstance(cb, CompressionCallback)}
    for path in sorted(paths):
        model = get_submodule(pl_module, path)
        stated = stated_input_shape(model)
        if stated is None or tuple(example.shape[1:]) == tuple(stated):
            continue
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            with eval_mode(model), torch.inference_mode():
                model(example.to(device))
        except Exception as err:  # noqa: BLE001 - reported with its cause
            raise ValueError(
                f"The Trainer's data gives images of shape {tuple(example.shape[1:])}, but "
                f"{type(model).__name__} ({path or 'the LightningModule'}) takes {tuple(stated)} (channels, height, "
                f"width) and cannot run them ({type(err).__name__}: {err}). Nothing was changed. Give the model "
                "images of its shape (e.g. repeat a grey channel 3 times in the dataset's transform), or build it "
                "for your images (timm: in_chans=, img_size=); if training_step converts the batch before the model, "
                "set example_input_array on the LightningModule to what the model receives."
            ) from err


def _first_loader(source: Any) -> Optional[Iterable[Any]]:
    """The (first) dataloader of a Lightning data source: ``fit(...)``'s loaders, the datamodule's or the module's."""
    if source is None or source.instance is None or not source.is_defined():
        return None
    loader = source.dataloader()
    if isinstance(loader, (list, tuple)):
        return loader[0] if loader else None
    if isinstance(loader, Mapping):
        return next(iter(loader.values()), None)
    return loader


def _run_once_in_order(
    trainer: "pl.Trainer", key: tuple[Any, ...], action: Callable[["CompressionCallback"], None]
) -> bool:
    """Run ``action`` for all our callbacks in order, once per ``key``; False if already done."""
    state = _pipeline_state(trainer)
    if key in state.done:
        return False
    state.done.add(key)
    ours = [cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback)]
    for callback in sorted(ours, key=lambda cb: cb.order):  # stable: equal orders keep list order
        action(callback)
    return True


def validation_data(trainer: "pl.Trainer") -> tuple[Optional[Iterable[Any]], Optional[int]]:
    """The fit's validation dataloader (the first one) and how many of its batches to use.

    Found wherever Lightning would find it (``fit(val_dataloaders=...)``, the
    datamodule, the LightningModule's ``val_dataloader``); readable from
    ``setup`` on. ``limit_val_batches`` applies (an int: that many batches, a
    float: that fraction). ``(None, None)`` when there is none or it is limited to 0.
    """
    loader = _first_loader(trainer.fit_loop.epoch_loop.val_loop._data_source)
    if loader is None:
        return None, None
    limit = trainer.limit_val_batches
    if isinstance(limit, float):
        try:
            limit = None if limit >= 1.0 else int(len(loader) * limit)  # type: ignore[arg-type]
        except TypeError:  # an iterable without len: all of it
            limit = None
    if limit == 0:
        return None, None
    return loader, limit


def in_training_step(trainer: "pl.Trainer") -> bool:
    """Inside a training batch (between its start and its update), not a callback's forward at an epoch start
    or a validation step: what the callbacks that keep training inputs (calibration) go by, rather than the
    module's mode (a model left in ``eval()`` trains in eval mode)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return trainer.training and progress.started > progress.processed


def measure_validation_accuracy(trainer: "pl.Trainer", model: nn.Module) -> Optional[float]:
    """Top-1 of ``model`` on the fit's validation data, measured on rank zero and the same on every rank.

    The one place the budgets measure (``max_accuracy_drop`` of every callback).
    """
    accuracy = local_validation_accuracy(trainer, model) if trainer.is_global_zero else None
    return trainer.strategy.broadcast(accuracy, src=0)


def local_validation_accuracy(trainer: "pl.Trainer", model: nn.Module) -> Optional[float]:
    """Top-1 of ``model`` on the fit's validation data, measured in this process only (no collective call)."""
    loader, limit = validation_data(trainer)
    return None if loader is None else measure_accuracy(model, limit_batches(loader, limit))


def progress_line(trainer: "pl.Trainer", message: str) -> None:
    """One line of progress for the work after the last epoch, on rank zero; silent with
    ``Trainer(enable_progress_bar=False)``."""
    if trainer.progress_bar_callback is not None:
        rank_zero_info(message)


class CompressionCallback(Callback):
    """Base for the package's callbacks. Subclasses override the ``ordered_*`` hooks.

    Args:
        model_attribute: attribute of the LightningModule holding the ViT
            (``"model"``, ``"net.backbone"``...). ``None`` finds it: the module
            itself or its single child with attention blocks.
    """

    #: position at shared hooks; lower acts first (see the module docstring)
    order: ClassVar[int] = 50
    #: the ``kind`` of the structure records this callback writes (None: it writes none)
    KIND: ClassVar[Optional[str]] = None
    #: True when it changes the model's structure or layers: strategies that shard parameters are refused
    EDITS_STRUCTURE: ClassVar[bool] = False
    #: prefix of the metrics it logs (``"prune"`` logs ``prune/ratio``...)
    LOG_PREFIX: ClassVar[str] = ""
    #: points of validation top-1 the model may lose against the model as it entered fit (None: no budget)
    max_accuracy_drop: Optional[float] = None
    #: top-1 of the target as it entered fit (set at setup when there is a budget; saved for resumes)
    budget_reference: Optional[float] = None

    def __init__(self, model_attribute: Optional[str] = None) -> None:
        if model_attribute is not None and (not isinstance(model_attribute, str) or not model_attribute):
            raise ValueError(
                f"model_attribute={model_attribute!r}: pass the attribute name holding the ViT "
                "(e.g. 'model'), or None to find it automatically."
            )
        self.model_attribute = model_attribute
        self.target_path: Optional[str] = None

    # ----------------------------------------------------------------- helpers
    def target(self, pl_module: nn.Module) -> nn.Module:
        """The model this callback acts on (resolved at ``setup``)."""
        if self.target_path is None:
            self.target_path = resolve_target_path(pl_module, self.model_attribute)
        return get_submodule(pl_module, self.target_path)

    def record(self, pl_module: nn.Module, **fields: Any) -> Record:
        """Record an edit of this callback's ``KIND`` on its target (saved with checkpoints, replayed on load)."""
        assert self.KIND is not None, f"{type(self).__name__} has no record KIND"
        record = {"kind": self.KIND, "target": self.target_path or "", **fields}
        record_edit(pl_module, record)
        return record

    def log_metrics(self, trainer: "pl.Trainer", metrics: Mapping[str, Optional[float]]) -> None:
        """Log ``metrics`` as ``<LOG_PREFIX>/<name>`` (``None`` values are skipped), on rank zero.

        Inside the training loop they go through ``LightningModule.log`` (so they
        reach the progress bar, ``callback_metrics`` and ``ModelCheckpoint``);
        at hooks where Lightning forbids ``self.log`` (``on_train_end``,
        ``on_fit_end``) they go to the loggers directly, at the global step.
        """
        named = {f"{self.LOG_PREFIX}/{name}": float(value) for name, value in metrics.items() if value is not None}
        pl_module = trainer.lightning_module
        if getattr(pl_module, "_current_fx_name", None) in _LOOP_HOOKS:
            for name, value in named.items():
                pl_module.log(name, value, sync_dist=False, rank_zero_only=True)
        elif trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(named, step=trainer.global_step)

    @property
    def budget(self) -> Optional[AccuracyBudget]:
        """The accuracy budget (``max_accuracy_drop`` against the reference measured at setup), or None."""
        if self.max_accuracy_drop is None or self.budget_reference is None:
            return None
        return AccuracyBudget(float(self.max_accuracy_drop), self.budget_reference)

    def validation_accuracy(self, trainer: "pl.Trainer", model: Optional[nn.Module] = None) -> Optional[float]:
        """Top-1 of ``model`` (default: the target) on the validation data; rank zero measures, all get it."""
        if model is None:
            model = self.target(trainer.lightning_module)
        return measure_validation_accuracy(trainer, model)

    def decisions(self) -> Optional[dict[str, Any]]:
        """What this callback decided in the last fit, for the benchmark report (None: nothing to say)."""
        return None

    def fit_plan(self, trainer: "pl.Trainer") -> list[PlanRow]:
        """What this callback will do in this fit, and when: its rows of the plan printed at fit start
        (:mod:`lightning_vitcompress._plan`). Called after ``setup``, so resolved choices can be named."""
        summary = (inspect.getdoc(self) or type(self).__name__).splitlines()[0].rstrip(".")
        return [PlanRow(type(self).__name__, summary, "see its arguments", "")]

    def scheduled_epochs(self) -> dict[str, int]:
        """Arguments naming a training epoch at which this callback acts (``{"end_epoch": 4}``)."""
        return {}

    def check_fit(self, trainer: "pl.Trainer") -> None:
        """What every callback checks at fit ``setup``: the strategy (for edits), epochs within ``max_epochs``."""
        name = type(self).__name__
        if self.EDITS_STRUCTURE:
            check_strategy_supported(trainer, name)
        self._check_reaches_train_end(trainer)
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return
        for argument, epoch in self.scheduled_epochs().items():
            if epoch >= max_epochs:
                if trainer.fast_dev_run:
                    raise ValueError(
                        f"{name}({argument}={epoch}) would never act: Trainer(fast_dev_run={trainer.fast_dev_run!r}) "
                        f"sets max_epochs=1 (one epoch of {int(trainer.fast_dev_run)} batch(es)), so only epoch 0 "
                        f"runs. Pass {argument}=0 for a dev run, or turn fast_dev_run off to run the schedule."
                    )
                raise ValueError(
                    f"{name}({argument}={epoch}) would never act: Trainer(max_epochs={max_epochs}) runs epochs "
                    f"0..{max_epochs - 1}. Pass {argument} <= {max_epochs - 1}, or raise max_epochs."
                )

    def train_end_action(self) -> Optional[tuple[str, str]]:
        """``(what this callback does when training ends, what to do instead)``, or None when it does nothing
        there: a fit that never reaches train end is refused at setup rather than silently skipping it."""
        return None

    def _check_reaches_train_end(self, trainer: "pl.Trainer") -> None:
        action = self.train_end_action()
        if action is None:
            return
        what, instead = action
        settings = (("max_epochs", trainer.max_epochs), ("max_steps", trainer.max_steps),
                    ("limit_train_batches", trainer.limit_train_batches))
        zero = ", ".join(f"{name}={value}" for name, value in settings if value == 0)
        if zero:
            raise ValueError(
                f"{what} when training ends, but Trainer({zero}) runs no training step, and Lightning then skips "
                f"the train-end hooks: it would silently not happen. Train at least one batch, {instead}."
            )
        finished = self.resumed_without_training(trainer)
        if finished is not None:
            path = _pipeline_state(trainer).resume_path
            raise ValueError(
                f"{what} when training ends, but ckpt_path={path!r} leaves no training step to run ({finished}), "
                "and Lightning then skips the train-end hooks: it would silently not happen. Raise max_epochs / "
                f"max_steps to train on, {instead}."
            )

    def resumed_without_training(self, trainer: "pl.Trainer") -> Optional[str]:
        """At ``setup`` of a resumed fit: why the checkpoint leaves no training step to run (it was saved after
        the last epoch or step), else None. Lightning then skips the train-end hooks."""
        state = _pipeline_state(trainer)
        if state.resume_path is None:
            return None
        loops = state.checkpoint.get("loops") or {}
        try:
            epochs = int(loops["fit_loop"]["epoch_progress"]["current"]["processed"])
        except (KeyError, TypeError, ValueError):
            epochs = None
        steps = state.checkpoint.get("global_step")
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and epochs is not None:
            if epochs >= trainer.max_epochs:
                return f"it was saved after epoch {epochs} of Trainer(max_epochs={trainer.max_epochs})"
        if trainer.max_steps is not None and trainer.max_steps >= 0 and isinstance(steps, int):
            if steps >= trainer.max_steps:
                return f"it was saved at step {steps} of Trainer(max_steps={trainer.max_steps})"
        return None

    def resumed_callback_state(self, trainer: "pl.Trainer") -> tuple[Optional[str], Optional[dict[str, Any]]]:
        """At ``setup`` of a resumed fit: the checkpoint path and the state this callback saved in it.

        Lightning restores callback state only after the weights, later than
        ``setup``; reading it here lets a callback refuse arguments that
        disagree with the checkpoint's run before anything is loaded.
        ``(path, None)`` when it holds no state for this callback (e.g. a
        ``save_weights_only`` checkpoint); ``(None, None)`` for a fresh fit.
        """
        state = _pipeline_state(trainer)
        saved = (state.checkpoint.get("callbacks") or {}).get(self.state_key)
        return state.resume_path, saved if isinstance(saved, dict) else None

    @staticmethod
    def replayed_records(trainer: "pl.Trainer", kind: str) -> list[Record]:
        """The structural edits of ``kind`` restored from the checkpoint at this fit's setup."""
        return [r for r in _pipeline_state(trainer).replayed if r.get("kind") == kind]

    def resumed(self, trainer: "pl.Trainer") -> bool:
        """True when this fit restores a checkpoint (its weights load after ``setup``)."""
        return _pipeline_state(trainer).resume_path is not None

    # ------------------------------------------------ arguments vs checkpoint
    def resume_config(self) -> dict[str, Any]:
        """The arguments a resumed run must keep (plain data); saved in records and callback state."""
        return {}

    def check_same_config(self, saved: Optional[dict[str, Any]], source: str) -> None:
        """Raise ``ValueError`` naming each argument whose value differs from ``saved`` (from ``source``)."""
        if not saved:
            return
        mine = self.resume_config()
        differ = [f"{name}={mine[name]!r} (was {name}={saved[name]!r})" for name in mine if name in saved
                  and mine[name] != saved[name]]
        if differ:
            raise ValueError(
                f"{type(self).__name__} arguments differ from {source}: {'; '.join(differ)}. Pass the earlier "
                "values to continue that run, or start a fresh fit (no ckpt_path) from the uncompressed model to "
                "compress differently."
            )

    def saved_config(self, trainer: "pl.Trainer") -> Optional[dict[str, Any]]:
        """The arguments the resumed checkpoint holds for this callback: its last record's, else its state's."""
        checkpoint = _pipeline_state(trainer).checkpoint
        records = [r for r in checkpoint.get(STRUCTURE_KEY, []) if self.KIND and r.get("kind") == self.KIND]
        if records and "config" in records[-1]:
            return records[-1]["config"]
        _, state = self.resumed_callback_state(trainer)
        return state.get("config") if state else None

    # -------------------------------------------------- hooks for subclasses
    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """``setup`` of ``fit`` (only), in canonical order, after :meth:`check_fit` and the replay of a resumed
        checkpoint's structure."""

    def ordered_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``on_train_epoch_start``, in canonical order."""

    def ordered_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        """``on_train_batch_start``, in canonical order."""

    def ordered_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``on_train_end``, in canonical order."""

    def ordered_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``on_fit_end``, in canonical order (the model is unwrapped and on CPU)."""

    # -------------------------------------------- Lightning hooks: dispatch
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        state = _pipeline_state(trainer)
        if ("setup", stage) in state.done:
            return
        if stage == "fit":
            state.resume_path, state.checkpoint = _resumed_checkpoint(trainer)
        checkpoint = state.checkpoint
        # arguments that disagree with the checkpoint are refused before anything changes the model
        for callback in trainer.callbacks:
            if isinstance(callback, CompressionCallback) and state.resume_path is not None:
                callback.check_same_config(callback.saved_config(trainer), f"the checkpoint {state.resume_path}")
        replay_pending = stage == "fit"
        if stage == "fit" and ("setup", stage) not in state.done:
            _check_data_fits_models(trainer, pl_module)
            _prepare_budgets(trainer, pl_module, state)

        def replay() -> None:
            nonlocal replay_pending
            replay_pending = False
            if state.resume_path is None or recorded_edits(pl_module):
                return  # a fresh fit, or a module that already carries its edits (a second fit)
            state.replayed = replay_checkpoint_structure(pl_module, checkpoint)

        def act(callback: CompressionCallback) -> None:
            if stage != "fit":  # the callbacks act in fit only; test/validate/predict see the model as it is
                return
            if replay_pending and callback.order > REPLAY_ORDER:
                replay()
            callback.target_path = resolve_target_path(pl_module, callback.model_attribute)
            check_supported_attention(get_submodule(pl_module, callback.target_path))  # before anything is changed
            callback.check_fit(trainer)
            callback.ordered_setup(trainer, pl_module, stage)

        ran = _run_once_in_order(trainer, ("setup", stage), act)
        if ran and replay_pending:  # every callback acts before the replay point
            replay()

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        state = _pipeline_state(trainer)
        if ("plan",) not in state.done:  # once per fit, whichever of our callbacks Lightning reaches first
            state.done.add(("plan",))
            show_plan(trainer)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        _run_once_in_order(
            trainer,
            ("epoch_start", trainer.current_epoch),
            lambda cb: cb.ordered_train_epoch_start(trainer, pl_module),
        )

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        _run_once_in_order(
            trainer,
            ("batch_start", trainer.current_epoch, batch_idx),
            lambda cb: cb.ordered_train_batch_start(trainer, pl_module, batch, batch_idx),
        )

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        _run_once_in_order(trainer, ("train_end",), lambda cb: cb.ordered_train_end(trainer, pl_module))

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if _run_once_in_order(trainer, ("fit_end",), lambda cb: cb.ordered_fit_end(trainer, pl_module)):
            write_model_cards(trainer, pl_module)  # beside the exported file and the benchmark report

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # a later trainer.fit/test/validate on the same trainer dispatches afresh
        trainer.__dict__.pop(_STATE_ATTRIBUTE, None)

    @override
    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        save_edits(pl_module, checkpoint)
        first = next(cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback))
        if self is first and trainer.is_global_zero:  # once per file, on the rank that writes it
            add_digest(checkpoint)  # read_checkpoint refuses the file if its tensors change afterwards


def _prepare_budgets(trainer: "pl.Trainer", pl_module: "pl.LightningModule", state: _PipelineState) -> None:
    """Before any callback edits the model: each budget's reference accuracy, or an error without validation data.

    A fresh fit measures the target as it enters (once per target, on rank zero,
    broadcast); a resumed fit takes the reference its checkpoint saved, since the
    model entering it is already compressed.
    """
    budgeted = [
        cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback) and cb.max_accuracy_drop is not None
    ]
    if not budgeted:
        return
    loader, _ = validation_data(trainer)
    if loader is None:
        names = ", ".join(f"{type(cb).__name__}(max_accuracy_drop={cb.max_accuracy_drop!r})" for cb in budgeted)
        raise ValueError(
            f"{names} measures validation top-1, but this fit has no validation data (limit_val_batches="
            f"{trainer.limit_val_batches!r}). Pass val_dataloaders to fit / a datamodule with val_dataloader and "
            "limit_val_batches > 0, or max_accuracy_drop=None."
        )
    for callback in budgeted:
        path = resolve_target_path(pl_module, callback.model_attribute)
        if state.resume_path is not None:
            _, saved = callback.resumed_callback_state(trainer)
            reference = (saved or {}).get("budget_reference")
            if reference is None:
                raise ValueError(
                    f"{type(callback).__name__}(max_accuracy_drop={callback.max_accuracy_drop!r}): the checkpoint "
                    f"being resumed ({state.resume_path}) holds no reference accuracy of the model as it entered the "
                    "first fit (a save_weights_only checkpoint, or one of a run without a budget), and the model "
                    "entering this fit is not that model. Resume from a full checkpoint of the budgeted run, or pass "
                    "max_accuracy_drop=None."
                )
            callback.budget_reference = float(reference)
            continue
        if path not in state.references:
            model = get_submodule(pl_module, path)
            model.to(trainer.strategy.root_device)  # where Lightning puts it next anyway
            accuracy = measure_validation_accuracy(trainer, model)
            assert accuracy is not None
            state.references[path] = accuracy
            rank_zero_info(f"Accuracy budget: the model entering fit has validation top-1 {accuracy:.2%}.")
        callback.budget_reference = state.references[path]
