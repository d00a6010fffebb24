"""What our callbacks share during one ``fit`` of one Trainer: the hooks already run, and the checkpoint it resumes.

The state lives on the Trainer instance (created at the first ``setup``,
dropped at ``teardown``), so two Trainers, or two fits of one Trainer, never
see each other's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl

from lightning_vitcompress._lightning import fit_ckpt_path
from lightning_vitcompress._structure import Record, read_checkpoint

_STATE_ATTRIBUTE = "_vitcompress_pipeline"


class PipelineState:
    """Per-trainer bookkeeping: which ordered hooks ran, what was replayed on resume."""

    def __init__(self) -> None:
        self.done: set[tuple[Any, ...]] = set()
        self.replayed: list[Record] = []
        #: the checkpoint this fit resumes from (None for a fresh fit), read once at setup
        self.resume_path: Optional[str] = None
        self.checkpoint: dict[str, Any] = {}
        #: one image of the Trainer's data (see :func:`~lightning_vitcompress._data.example_from_data`), looked up
        #: once; False: none found
        self.example: Any = None
        #: the first batch of the validation / training data (see :func:`~lightning_vitcompress._data.first_batch`)
        self.batches: dict[str, Any] = {}
        #: top-1 of each budgeted target (by path) as it entered fit, measured once at setup
        self.references: dict[str, float] = {}


def pipeline_state(trainer: pl.Trainer) -> PipelineState:
    """This trainer's :class:`PipelineState`, created on first use."""
    state = trainer.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        state = trainer.__dict__[_STATE_ATTRIBUTE] = PipelineState()
    return state


def forget_pipeline_state(trainer: pl.Trainer) -> None:
    """Drop the state at ``teardown``: a later fit/test/validate on the same trainer dispatches afresh."""
    trainer.__dict__.pop(_STATE_ATTRIBUTE, None)


def resumed_checkpoint(trainer: pl.Trainer) -> tuple[Optional[str], dict[str, Any]]:
    """The path and contents of the checkpoint this fit resumes from (``None, {}`` for a fresh fit), read at
    ``setup``, before Lightning restores it (see :func:`~lightning_vitcompress._lightning.fit_ckpt_path`)."""
    path, weights_only = fit_ckpt_path(trainer)
    if not path or not Path(path).is_file():
        return None, {}
    return path, read_checkpoint(path, weights_only=weights_only, argument="ckpt_path")
