"""The plan at fit start: one table of what each compression callback will do to the model, and when.

Like Lightning's ``ModelSummary``, it is printed on rank zero when ``fit``
starts (after ``setup``, so the resolved choices are in it: the quantization
config the hardware picked and why, the export precision); it prints where the
model summary prints (``Trainer(enable_model_summary=False)`` silences both).
It always goes to the Trainer's loggers: one ``plan/<Callback>`` hyperparameter
per callback, and the table as text where the logger takes text (TensorBoard).

Example::

    >>> import lightning as L
    >>> from lightning_vitcompress import PruningSchedule, TokenMerging
    >>> trainer = L.Trainer(max_epochs=3, callbacks=[PruningSchedule(0.5, end_epoch=2), TokenMerging(r=4)])
    >>> print(format_plan(plan_rows(trainer)))  # the Markdown table printed at fit start
    | callback | does | when | settings |
    |---|---|---|---|
    | PruningSchedule | structured pruning, 0.5 of the channels removed | 3 steps, epochs 0-2 | importance=l2, schedule=linear |
    | TokenMerging | token merging (ToMe), r=4 per block (constant) | setup (before the optimizer exists) | blocks=all, no weights change |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_vitcompress._lightning import callbacks_of

if TYPE_CHECKING:
    from lightning_vitcompress._base import CompressionCallback

__all__ = ["PlanRow", "budget_phrase", "epochs_phrase", "format_plan", "plan_rows", "show_plan"]


class PlanRow(NamedTuple):
    """One line of the plan: which callback, what it does, when, and the settings that decide it."""

    callback: str
    what: str
    when: str
    details: str


@runtime_checkable
class PlannedCallback(Protocol):
    """What the plan reads of a callback: its place in the order and its rows (every ``CompressionCallback``).

    A protocol, not ``isinstance(cb, CompressionCallback)``: ``_base`` imports this module, so this one
    does not import ``_base`` (no import cycle).
    """

    order: int

    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]: ...


def epochs_phrase(start: int, end: int, steps: int = 1) -> str:
    """``"setup"``, ``"start of epoch 3"`` or ``"4 steps, epochs 0-3"``: when an epoch-scheduled edit happens."""
    if steps <= 1 and start == end:
        return "setup (before the optimizer exists)" if start == 0 else f"start of epoch {start}"
    return f"{steps} steps, epochs {start}-{end}"


def budget_phrase(callback: CompressionCallback) -> str:
    """``"; max_accuracy_drop=1 pt (entry top-1 94.00%)"`` for a callback with a budget, else ``""``."""
    if callback.max_accuracy_drop is None:
        return ""
    entry = f" (entry top-1 {callback.budget_reference:.2%})" if callback.budget_reference is not None else ""
    return f"; max_accuracy_drop={callback.max_accuracy_drop:g} pt{entry}, undone beyond it"


def plan_rows(trainer: pl.Trainer) -> list[PlanRow]:
    """The plan of every compression callback in ``trainer``, in the order they act."""
    ours: list[PlannedCallback] = [cb for cb in callbacks_of(trainer) if isinstance(cb, PlannedCallback)]
    return [row for cb in sorted(ours, key=lambda cb: cb.order) for row in cb.fit_plan(trainer)]


def format_plan(rows: list[PlanRow]) -> str:
    """The plan as a Markdown table (what is printed, logged and put in the model card)."""
    lines = ["| callback | does | when | settings |", "|---|---|---|---|"]
    lines += [f"| {r.callback} | {r.what} | {r.when} | {r.details} |" for r in rows]
    return "\n".join(lines)


def show_plan(trainer: pl.Trainer) -> None:
    """Print the plan on rank zero (where the model summary prints) and log it to the Trainer's loggers."""
    rows = plan_rows(trainer)
    if not rows or not trainer.is_global_zero:
        return
    table = format_plan(rows)
    if any(isinstance(cb, ModelSummary) for cb in callbacks_of(trainer)):
        rank_zero_info(f"\nCompression plan (lightning-vitcompress):\n{table}\n")
    for logger in trainer.loggers:
        try:
            logger.log_hyperparams({f"plan/{r.callback}": f"{r.what}; {r.when}; {r.details}" for r in rows})
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("vitcompress/plan", table, global_step=trainer.global_step)
        except Exception as err:  # the plan is information; it never stops the fit
            rank_zero_warn(
                f"The compression plan could not be logged to {type(logger).__name__} "
                f"({type(err).__name__}: {err}); the fit goes on."
            )
