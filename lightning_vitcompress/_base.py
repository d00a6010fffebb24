"""The base class of every callback here: one canonical order, whatever the list order.

Lightning calls callbacks in the order of ``Trainer(callbacks=[...])``. Our
callbacks must give the same result in any order (the benchmark's baseline is
the model *before* any edit; pruning acts before the Nystrom swap at the same
epoch...). So each callback implements ``ordered_*`` hooks, and the first of
our callbacks that Lightning reaches at a hook runs that hook of *all* of them,
sorted by their class attribute ``order``; the others then skip it.

=====  ======================  =============================================
order  callback                acts
=====  ======================  =============================================
 10    BenchmarkCallback       setup: snapshots the baseline model
 15    (base)                  setup, on resume: replays the checkpoint's structure
 20    PruningSchedule         setup / epoch / step: prunes
 30    NystromSwap             setup / epoch: swaps attention
 40    DistillationTeacher     setup: checks and places the teacher
 60    QuantizeOnFit           train end: quantizes
 90    BenchmarkCallback       fit end: measures the final model
=====  ======================  =============================================
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_vitcompress._model import get_submodule, resolve_target_path
from lightning_vitcompress._structure import Record, replay_from_checkpoint, save_edits

_STATE_ATTRIBUTE = "_vitcompress_pipeline"
#: on resume, the checkpoint's structure is replayed between the baseline snapshot and the edits
REPLAY_ORDER = 15


class _PipelineState:
    """Per-trainer bookkeeping: which ordered hooks ran, what was replayed on resume."""

    def __init__(self) -> None:
        self.done: set[tuple[Any, ...]] = set()
        self.replayed: list[Record] = []


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


def _replay_resumed_structure(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[Record]:
    path, weights_only = resume_checkpoint_path(trainer)
    return replay_from_checkpoint(pl_module, path, weights_only=weights_only)


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


class CompressionCallback(Callback):
    """Base for the package's callbacks. Subclasses override the ``ordered_*`` hooks.

    Args:
        model_attribute: attribute of the LightningModule holding the ViT
            (``"model"``, ``"net.backbone"``...). ``None`` finds it: the module
            itself or its single child with attention blocks.
    """

    #: position at shared hooks; lower acts first (see the module docstring)
    order: ClassVar[int] = 50

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

    @staticmethod
    def replayed_records(trainer: "pl.Trainer", kind: str) -> list[Record]:
        """The structural edits of ``kind`` restored from the checkpoint at this fit's setup."""
        return [r for r in _pipeline_state(trainer).replayed if r.get("kind") == kind]

    # -------------------------------------------------- hooks for subclasses
    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """``setup``, in canonical order, after a resumed checkpoint's structure was replayed."""

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
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        state = _pipeline_state(trainer)
        replay_pending = stage == "fit"

        def act(callback: CompressionCallback) -> None:
            nonlocal replay_pending
            if replay_pending and callback.order > REPLAY_ORDER:
                state.replayed = _replay_resumed_structure(trainer, pl_module)
                replay_pending = False
            callback.target_path = resolve_target_path(pl_module, callback.model_attribute)
            callback.ordered_setup(trainer, pl_module, stage)

        ran = _run_once_in_order(trainer, ("setup", stage), act)
        if ran and replay_pending:  # every callback acts before the replay point
            state.replayed = _replay_resumed_structure(trainer, pl_module)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        _run_once_in_order(
            trainer,
            ("epoch_start", trainer.current_epoch),
            lambda cb: cb.ordered_train_epoch_start(trainer, pl_module),
        )

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        _run_once_in_order(
            trainer,
            ("batch_start", trainer.current_epoch, batch_idx),
            lambda cb: cb.ordered_train_batch_start(trainer, pl_module, batch, batch_idx),
        )

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        _run_once_in_order(trainer, ("train_end",), lambda cb: cb.ordered_train_end(trainer, pl_module))

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        _run_once_in_order(trainer, ("fit_end",), lambda cb: cb.ordered_fit_end(trainer, pl_module))

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # a later trainer.fit/test/validate on the same trainer dispatches afresh
        trainer.__dict__.pop(_STATE_ATTRIBUTE, None)

    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        save_edits(pl_module, checkpoint)
