"""Progress bars for the work after the last epoch, in the style of the Trainer's own bar.

Training shows Lightning's progress bar; what follows it (the "auto" config
search, calibration batches, compiling, exporting, the benchmark's timing) is
one bar per stage here: a tqdm bar shaped like :class:`~lightning.pytorch.callbacks.TQDMProgressBar`'s,
or a task in the Trainer's own rich display when it uses
:class:`~lightning.pytorch.callbacks.RichProgressBar`. Rank zero only; silent
with ``Trainer(enable_progress_bar=False)``. A bar never fails a fit: a bar
that cannot draw warns once and goes quiet.

Example (``trainer=None`` gives a silent bar; a Trainer's own bar style draws it)::

    >>> with stage_bar(None, "QuantizeOnFit: calibrating", total=8, unit="batch") as bar:
    ...     for batch in range(8):
    ...         bar.step()
    >>> bar.count
    8
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_warn

from lightning_vitcompress._lightning import rich_display

__all__ = ["StageBar", "stage_bar"]


class StageBar:
    """One stage's bar: :meth:`step` after each unit of work (a config tried, a batch, a stage).

    A disabled bar (``enabled=False``) does nothing; a bar whose drawing fails
    warns once and turns itself off, so the work it reports on carries on.
    """

    def __init__(
        self, trainer: Optional[pl.Trainer], description: str, total: Optional[int], unit: str = "step"
    ) -> None:
        self.description = description
        self.total = total
        #: how many units were reported (counted even when nothing is drawn)
        self.count = 0
        self._tqdm: Any = None
        self._rich: Any = None
        self._task: Any = None
        self._own_rich = False
        callback: Any = trainer.progress_bar_callback if trainer is not None else None
        self.enabled = bool(
            trainer is not None and callback is not None and callback.is_enabled and trainer.is_global_zero
        )
        if self.enabled:
            self._guard(lambda: self._open(callback, unit))

    def _open(self, callback: Any, unit: str) -> None:
        if isinstance(callback, RichProgressBar):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            progress, console = rich_display(callback)
            if progress is None:
                # the Trainer's display is closed: our own, on its console
                progress = Progress(
                    TextColumn("[progress.description]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[note]}"),
                    console=console,
                )
                progress.start()
                self._own_rich = True
            self._rich = progress
            self._task = progress.add_task(self.description, total=self.total, note="")
            return
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        bar_format = callback.BAR_FORMAT if isinstance(callback, TQDMProgressBar) else TQDMProgressBar.BAR_FORMAT
        self._tqdm = Tqdm(
            desc=self.description,
            total=self.total,
            unit=unit,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=bar_format if self.total else None,
        )

    def step(self, message: Optional[str] = None, advance: int = 1) -> None:
        """Report ``advance`` units done; ``message`` says what is under way now."""
        self.count += advance
        if not self.enabled:
            return

        def draw() -> None:
            if self._tqdm is not None:
                if message is not None:
                    self._tqdm.set_postfix_str(message, refresh=False)
                self._tqdm.update(advance)
            elif self._rich is not None:
                fields = {"note": message} if message is not None and "note" in self._fields() else {}
                self._rich.update(self._task, advance=advance, **fields)
                if message is not None and not fields:
                    self._rich.update(self._task, description=f"{self.description}: {message}")

        self._guard(draw)

    def _fields(self) -> dict[str, Any]:
        task = next((t for t in self._rich.tasks if t.id == self._task), None)
        return task.fields if task is not None else {}

    def close(self) -> None:
        """Finish the bar (left on screen, as the Trainer leaves its own)."""
        if not self.enabled:
            return

        def finish() -> None:
            if self._tqdm is not None:
                self._tqdm.close()
            elif self._rich is not None:
                if self.total is None:
                    self._rich.update(self._task, total=self.count, completed=self.count)
                self._rich.refresh()
                if self._own_rich:
                    self._rich.stop()

        self._guard(finish)
        self.enabled = False

    def _guard(self, action: Any) -> None:
        try:
            action()
        except Exception as err:
            self.enabled = False
            rank_zero_warn(
                f"The progress bar for {self.description!r} could not be drawn and is off "
                f"({type(err).__name__}: {err}); the work goes on."
            )


@contextmanager
def stage_bar(
    trainer: Optional[pl.Trainer], description: str, total: Optional[int] = None, unit: str = "step"
) -> Iterator[StageBar]:
    """A :class:`StageBar` for the ``with`` block, closed at its end (also when the work fails); ``trainer=None``
    gives a silent one."""
    bar = StageBar(trainer, description, total, unit)
    try:
        yield bar
    finally:
        bar.close()
