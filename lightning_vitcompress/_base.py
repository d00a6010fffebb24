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
(:meth:`~CompressionCallback.log_metrics`). What the fit shares lives beside
it: the per-trainer state and the resumed checkpoint in
:mod:`~lightning_vitcompress._pipeline`, the fit's data in
:mod:`~lightning_vitcompress._data`, and every access to Lightning's private
API in :mod:`~lightning_vitcompress._lightning`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_vitcompress._card import write_model_cards
from lightning_vitcompress._data import (
    check_data_fits_models,
    example_from_data,
    first_batch,
    in_training_step,
    local_validation_accuracy,
    measure_validation_accuracy,
    validation_data,
)
from lightning_vitcompress._lightning import callbacks_of, current_hook_name, fast_dev_run_of
from lightning_vitcompress._model import check_supported_attention, get_submodule, resolve_target_path
from lightning_vitcompress._pipeline import PipelineState, forget_pipeline_state, pipeline_state, resumed_checkpoint
from lightning_vitcompress._plan import PlanRow, show_plan
from lightning_vitcompress._structure import (
    STRUCTURE_KEY,
    Record,
    add_digest,
    record_edit,
    recorded_edits,
    replay_checkpoint_structure,
    save_edits,
)
from lightning_vitcompress._training_state import check_strategy_supported
from lightning_vitcompress.functional.budget import AccuracyBudget

__all__ = [
    "REPLAY_ORDER",
    "CompressionCallback",
    # the fit's data, from lightning_vitcompress._data, where the callbacks have imported them from
    "example_from_data",
    "first_batch",
    "in_training_step",
    "local_validation_accuracy",
    "measure_validation_accuracy",
    "progress_line",
    "validation_data",
]

#: on resume, the checkpoint's structure is replayed between the baseline snapshot and the edits
REPLAY_ORDER = 15
#: hooks in which Lightning lets a callback call ``LightningModule.log`` (the ones ours log from)
_LOOP_HOOKS = frozenset({"on_train_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_train_epoch_end"})


def progress_line(trainer: pl.Trainer, message: str) -> None:
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

    def log_metrics(self, trainer: pl.Trainer, metrics: Mapping[str, Optional[float]]) -> None:
        """Log ``metrics`` as ``<LOG_PREFIX>/<name>`` (``None`` values are skipped), on rank zero.

        Inside the training loop they go through ``LightningModule.log`` (so they
        reach the progress bar, ``callback_metrics`` and ``ModelCheckpoint``);
        at hooks where Lightning forbids ``self.log`` (``on_train_end``,
        ``on_fit_end``) they go to the loggers directly, at the global step.
        """
        named = {f"{self.LOG_PREFIX}/{name}": float(value) for name, value in metrics.items() if value is not None}
        pl_module = trainer.lightning_module
        if current_hook_name(pl_module) in _LOOP_HOOKS:
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

    def validation_accuracy(self, trainer: pl.Trainer, model: Optional[nn.Module] = None) -> Optional[float]:
        """Top-1 of ``model`` (default: the target) on the validation data; rank zero measures, all get it."""
        if model is None:
            model = self.target(trainer.lightning_module)
        return measure_validation_accuracy(trainer, model)

    def decisions(self) -> Optional[dict[str, Any]]:
        """What this callback decided in the last fit, for the benchmark report (None: nothing to say)."""
        return None

    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        """What this callback will do in this fit, and when: its rows of the plan printed at fit start
        (:mod:`lightning_vitcompress._plan`). Called after ``setup``, so resolved choices can be named."""
        summary = (inspect.getdoc(self) or type(self).__name__).splitlines()[0].rstrip(".")
        return [PlanRow(type(self).__name__, summary, "see its arguments", "")]

    def scheduled_epochs(self) -> dict[str, int]:
        """Arguments naming a training epoch at which this callback acts (``{"end_epoch": 4}``)."""
        return {}

    def check_fit(self, trainer: pl.Trainer) -> None:
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
                fast_dev_run = fast_dev_run_of(trainer)
                if fast_dev_run:
                    raise ValueError(
                        f"{name}({argument}={epoch}) would never act: Trainer(fast_dev_run={fast_dev_run!r}) "
                        f"sets max_epochs=1 (one epoch of {int(fast_dev_run)} batch(es)), so only epoch 0 "
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

    def _check_reaches_train_end(self, trainer: pl.Trainer) -> None:
        action = self.train_end_action()
        if action is None:
            return
        what, instead = action
        settings = (
            ("max_epochs", trainer.max_epochs),
            ("max_steps", trainer.max_steps),
            ("limit_train_batches", trainer.limit_train_batches),
        )
        zero = ", ".join(f"{name}={value}" for name, value in settings if value == 0)
        if zero:
            raise ValueError(
                f"{what} when training ends, but Trainer({zero}) runs no training step, and Lightning then skips "
                f"the train-end hooks: it would silently not happen. Train at least one batch, {instead}."
            )
        finished = self.resumed_without_training(trainer)
        if finished is not None:
            path = pipeline_state(trainer).resume_path
            raise ValueError(
                f"{what} when training ends, but ckpt_path={path!r} leaves no training step to run ({finished}), "
                "and Lightning then skips the train-end hooks: it would silently not happen. Raise max_epochs / "
                f"max_steps to train on, {instead}."
            )

    def resumed_without_training(self, trainer: pl.Trainer) -> Optional[str]:
        """At ``setup`` of a resumed fit: why the checkpoint leaves no training step to run (it was saved after
        the last epoch or step), else None. Lightning then skips the train-end hooks."""
        state = pipeline_state(trainer)
        if state.resume_path is None:
            return None
        loops = state.checkpoint.get("loops") or {}
        try:
            epochs = int(loops["fit_loop"]["epoch_progress"]["current"]["processed"])
        except (KeyError, TypeError, ValueError):
            epochs = None
        steps = state.checkpoint.get("global_step")
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        if max_epochs is not None and max_epochs >= 0 and epochs is not None and epochs >= max_epochs:
            return f"it was saved after epoch {epochs} of Trainer(max_epochs={max_epochs})"
        if max_steps is not None and max_steps >= 0 and isinstance(steps, int) and steps >= max_steps:
            return f"it was saved at step {steps} of Trainer(max_steps={max_steps})"
        return None

    def resumed_callback_state(self, trainer: pl.Trainer) -> tuple[Optional[str], Optional[dict[str, Any]]]:
        """At ``setup`` of a resumed fit: the checkpoint path and the state this callback saved in it.

        Lightning restores callback state only after the weights, later than
        ``setup``; reading it here lets a callback refuse arguments that
        disagree with the checkpoint's run before anything is loaded.
        ``(path, None)`` when it holds no state for this callback (e.g. a
        ``save_weights_only`` checkpoint); ``(None, None)`` for a fresh fit.
        """
        state = pipeline_state(trainer)
        saved = (state.checkpoint.get("callbacks") or {}).get(self.state_key)
        return state.resume_path, saved if isinstance(saved, dict) else None

    @staticmethod
    def replayed_records(trainer: pl.Trainer, kind: str) -> list[Record]:
        """The structural edits of ``kind`` restored from the checkpoint at this fit's setup."""
        return [r for r in pipeline_state(trainer).replayed if r.get("kind") == kind]

    def resumed(self, trainer: pl.Trainer) -> bool:
        """True when this fit restores a checkpoint (its weights load after ``setup``)."""
        return pipeline_state(trainer).resume_path is not None

    # ------------------------------------------------ arguments vs checkpoint
    def resume_config(self) -> dict[str, Any]:
        """The arguments a resumed run must keep (plain data); saved in records and callback state."""
        return {}

    def check_same_config(self, saved: Optional[dict[str, Any]], source: str) -> None:
        """Raise ``ValueError`` naming each argument whose value differs from ``saved`` (from ``source``)."""
        if not saved:
            return
        mine = self.resume_config()
        differ = [
            f"{name}={mine[name]!r} (was {name}={saved[name]!r})"
            for name in mine
            if name in saved and mine[name] != saved[name]
        ]
        if differ:
            raise ValueError(
                f"{type(self).__name__} arguments differ from {source}: {'; '.join(differ)}. Pass the earlier "
                "values to continue that run, or start a fresh fit (no ckpt_path) from the uncompressed model to "
                "compress differently."
            )

    def saved_config(self, trainer: pl.Trainer) -> Optional[dict[str, Any]]:
        """The arguments the resumed checkpoint holds for this callback: its last record's, else its state's."""
        checkpoint = pipeline_state(trainer).checkpoint
        records = [r for r in checkpoint.get(STRUCTURE_KEY, []) if self.KIND and r.get("kind") == self.KIND]
        if records and "config" in records[-1]:
            return records[-1]["config"]
        _, state = self.resumed_callback_state(trainer)
        return state.get("config") if state else None

    # -------------------------------------------------- hooks for subclasses
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """``setup`` of ``fit`` (only), in canonical order, after :meth:`check_fit` and the replay of a resumed
        checkpoint's structure."""

    def ordered_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_train_epoch_start``, in canonical order."""

    def ordered_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """``on_train_batch_start``, in canonical order."""

    def ordered_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_train_end``, in canonical order."""

    def ordered_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_fit_end``, in canonical order (the model is unwrapped and on CPU)."""

    # -------------------------------------------- Lightning hooks: dispatch
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        state = pipeline_state(trainer)
        if ("setup", stage) in state.done:
            return
        if stage == "fit":
            state.resume_path, state.checkpoint = resumed_checkpoint(trainer)
        checkpoint = state.checkpoint
        # arguments that disagree with the checkpoint are refused before anything changes the model
        for callback in callbacks_of(trainer):
            if isinstance(callback, CompressionCallback) and state.resume_path is not None:
                callback.check_same_config(callback.saved_config(trainer), f"the checkpoint {state.resume_path}")
        replay_pending = stage == "fit"
        if stage == "fit" and ("setup", stage) not in state.done:
            check_data_fits_models(trainer, pl_module, [cb.model_attribute for cb in _ours(trainer)])
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
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = pipeline_state(trainer)
        if ("plan",) not in state.done:  # once per fit, whichever of our callbacks Lightning reaches first
            state.done.add(("plan",))
            show_plan(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _run_once_in_order(
            trainer,
            ("epoch_start", trainer.current_epoch),
            lambda cb: cb.ordered_train_epoch_start(trainer, pl_module),
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _run_once_in_order(
            trainer,
            ("batch_start", trainer.current_epoch, batch_idx),
            lambda cb: cb.ordered_train_batch_start(trainer, pl_module, batch, batch_idx),
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _run_once_in_order(trainer, ("train_end",), lambda cb: cb.ordered_train_end(trainer, pl_module))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _run_once_in_order(trainer, ("fit_end",), lambda cb: cb.ordered_fit_end(trainer, pl_module)):
            write_model_cards(trainer, pl_module)  # beside the exported file and the benchmark report

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a later trainer.fit/test/validate on the same trainer dispatches afresh
        forget_pipeline_state(trainer)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_edits(pl_module, checkpoint)
        first = next(cb for cb in callbacks_of(trainer) if isinstance(cb, CompressionCallback))
        if self is first and trainer.is_global_zero:  # once per file, on the rank that writes it
            add_digest(checkpoint)  # read_checkpoint refuses the file if its tensors change afterwards


def _prepare_budgets(trainer: pl.Trainer, pl_module: pl.LightningModule, state: PipelineState) -> None:
    """Before any callback edits the model: each budget's reference accuracy, or an error without validation data.

    A fresh fit measures the target as it enters (once per target, on rank zero,
    broadcast); a resumed fit takes the reference its checkpoint saved, since the
    model entering it is already compressed.
    """
    budgeted = [
        cb for cb in callbacks_of(trainer) if isinstance(cb, CompressionCallback) and cb.max_accuracy_drop is not None
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


def _ours(trainer: pl.Trainer) -> list[CompressionCallback]:
    return [cb for cb in callbacks_of(trainer) if isinstance(cb, CompressionCallback)]


def _run_once_in_order(
    trainer: pl.Trainer, key: tuple[Any, ...], action: Callable[[CompressionCallback], None]
) -> bool:
    """Run ``action`` for all our callbacks in order, once per ``key``; False if already done."""
    state = pipeline_state(trainer)
    if key in state.done:
        return False
    state.done.add(key)
    for callback in sorted(_ours(trainer), key=lambda cb: cb.order):  # stable: equal orders keep list order
        action(callback)
    return True
