"""The one seam to Lightning's private API.

Every read of a Lightning attribute that starts with ``_``, and every use of
Lightning behaviour that is not documented (wrapping ``training_step`` on the
instance, rebuilding the DDP wrapper mid-fit), is a small named function here.
The rest of the package calls these functions and touches only public API, so
a Lightning release that moves one of them breaks one function, and
``tests/test_lightning_seam.py`` says which.

Each function names what it relies on and the Lightning versions its source was
checked on (2.4.0, 2.5.0, 2.6.0 and the main branch of July 2026); the tests run
against the installed Lightning.

It also holds the typed accessors for public ``Trainer`` attributes that
Lightning assigns in its connectors rather than declares on the class
(:func:`callbacks_of`, :func:`datamodule_of`, :func:`fast_dev_run_of`), so
type checkers see their types in one place.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback, RichProgressBar

__all__ = [
    "callbacks_of",
    "current_hook_name",
    "datamodule_of",
    "fast_dev_run_of",
    "fit_ckpt_path",
    "rewrap_and_setup_optimizers",
    "rich_display",
    "train_dataloaders",
    "val_dataloaders",
    "wrap_training_step",
]

#: marks a ``training_step`` installed by :func:`wrap_training_step`
WRAPPED_MARKER = "_vitcompress_distillation"


def callbacks_of(trainer: pl.Trainer) -> list[Callback]:
    """``trainer.callbacks``, typed.

    A public attribute, but ``Trainer`` does not declare it: its callback connector assigns it in
    ``Trainer.__init__``, so type checkers do not know it. Reading it here gives it its type once.
    """
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # assigned by the connector, not declared
    return callbacks


def datamodule_of(trainer: pl.Trainer) -> Optional[pl.LightningDataModule]:
    """``trainer.datamodule`` (``None`` when the fit got dataloaders), typed.

    Public, but assigned by ``Trainer``'s data connector rather than declared on the class (see :func:`callbacks_of`).
    """
    datamodule: Optional[pl.LightningDataModule] = trainer.datamodule  # type: ignore[attr-defined]  # as callbacks_of
    return datamodule


def fast_dev_run_of(trainer: pl.Trainer) -> int | bool:
    """``Trainer(fast_dev_run=...)``'s value (``False``, ``True`` or a batch count), typed.

    Public, but assigned by ``Trainer``'s debugging connector rather than declared (see :func:`callbacks_of`).
    """
    fast_dev_run: int | bool = trainer.fast_dev_run  # type: ignore[attr-defined]  # as callbacks_of
    return fast_dev_run


def fit_ckpt_path(trainer: pl.Trainer) -> tuple[Optional[str], bool]:
    """The checkpoint this ``fit`` restores, known already at ``setup``, and whether to load it with ``weights_only``.

    Reads the ``ckpt_path`` and ``weights_only`` arguments of ``Trainer._run`` from
    the call stack (Lightning 2.4-2.6; ``weights_only`` from 2.6). The public
    ``trainer.ckpt_path`` is only set when the checkpoint is restored, after
    ``setup``, but a reshaped model must be rebuilt *before* its weights load.
    ``_run`` receives the resolved path ("last", "best", "hpc" or a path, also
    one set with ``trainer.ckpt_path = ...``). The second value is False only
    when the user passed ``weights_only=False``. Outside ``_run`` (no fit under
    way) it falls back on ``trainer.ckpt_path``.
    """
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_run" and isinstance(frame.f_locals.get("self"), pl.Trainer):
            path = frame.f_locals.get("ckpt_path")
            return (str(path) if path else None), frame.f_locals.get("weights_only") is not False
        frame = frame.f_back
    return (str(trainer.ckpt_path) if trainer.ckpt_path else None), True


def train_dataloaders(trainer: pl.Trainer) -> Any:
    """The training loader(s) ``fit`` will use, from ``setup`` on: ``fit(train_dataloaders=...)``, the datamodule's
    or the module's ``train_dataloader()``; None where none is defined.

    Reads ``trainer.fit_loop._data_source`` (a ``_DataLoaderSource``; Lightning 2.4-2.6). The public
    ``trainer.train_dataloader`` is only set when the fit loop starts, after ``setup``.
    """
    return _dataloaders(trainer.fit_loop._data_source)


def val_dataloaders(trainer: pl.Trainer) -> Any:
    """The validation loader(s) ``fit`` will use, from ``setup`` on: ``fit(val_dataloaders=...)``, the datamodule's
    or the module's ``val_dataloader()``; None where none is defined.

    Reads ``trainer.fit_loop.epoch_loop.val_loop._data_source`` (Lightning 2.4-2.6). The public
    ``trainer.val_dataloaders`` is only set when the first validation runs, after ``setup``.
    """
    return _dataloaders(trainer.fit_loop.epoch_loop.val_loop._data_source)


def _dataloaders(source: Any) -> Any:
    # what Lightning itself calls: ``_DataLoaderSource.dataloader()`` when ``instance`` is set and ``is_defined()``
    if source is None or source.instance is None or not source.is_defined():
        return None
    return source.dataloader()


def current_hook_name(pl_module: pl.LightningModule) -> Optional[str]:
    """The name of the hook Lightning is running (``"on_train_batch_end"``...), None outside hooks.

    Reads ``LightningModule._current_fx_name``, which Lightning sets around every hook call and
    checks in ``LightningModule.log`` (Lightning 2.4-2.6).
    """
    return getattr(pl_module, "_current_fx_name", None)


def wrap_training_step(pl_module: pl.LightningModule, step: Callable[..., Any]) -> Callable[[], None]:
    """Make Lightning call ``step(original_training_step, *args, **kwargs)`` as ``pl_module``'s training step;
    returns the function that undoes it (a no-op once something else replaced the step).

    Sets ``training_step`` on the instance (the class is untouched). Lightning has no public hook that may change
    the loss ``training_step`` returns; it calls the step by attribute lookup, on one device
    (``Strategy.training_step``) and under DDP (``_ForwardRedirection`` runs ``getattr(pl_module, "training_step")``
    inside the DDP forward): Lightning 2.4-2.6.
    """
    previous = pl_module.__dict__.get("training_step")  # an instance attribute someone else set, if any
    original = pl_module.training_step

    @functools.wraps(original)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        return step(original, *args, **kwargs)

    setattr(training_step, WRAPPED_MARKER, True)
    pl_module.__dict__["training_step"] = training_step

    def undo() -> None:
        if pl_module.__dict__.get("training_step") is training_step:
            if previous is None:
                del pl_module.__dict__["training_step"]
            else:
                pl_module.__dict__["training_step"] = previous

    return undo


def rich_display(callback: RichProgressBar) -> tuple[Any, Any]:
    """``(progress, console)`` of a ``RichProgressBar``: its live ``rich.progress.Progress`` (None once stopped or
    before it starts) and its ``rich`` console (None before it starts).

    Reads ``RichProgressBar._progress_stopped`` and ``._console`` (Lightning 2.4-2.6); ``progress`` is public.
    """
    stopped = getattr(callback, "_progress_stopped", True)
    return (None if stopped else callback.progress), getattr(callback, "_console", None)


def rewrap_and_setup_optimizers(trainer: pl.Trainer) -> None:
    """After parameters were replaced mid-fit: wrap the LightningModule in DDP again (DDP strategies) and rebuild
    the optimizers and LR schedulers from ``configure_optimizers``.

    Public methods (``DDPStrategy.configure_ddp``, ``Strategy.setup_optimizers``), but Lightning calls them once, at
    setup; calling them again mid-fit is not a documented use (Lightning 2.4-2.6).
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        # unwrap, then let the strategy wrap the edited module exactly as it did at setup
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
