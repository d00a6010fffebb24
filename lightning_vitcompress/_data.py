"""The fit's data as our callbacks see it at ``setup``, before Lightning starts its loops.

One image to shape inputs (:func:`example_from_data`), the first batch
(:func:`first_batch`), the validation loader with ``limit_val_batches``
(:func:`validation_data`) and the top-1 every budget measures on it
(:func:`measure_validation_accuracy`). The loaders come from
:mod:`lightning_vitcompress._lightning`, wherever Lightning would find them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_vitcompress._lightning import train_dataloaders, val_dataloaders
from lightning_vitcompress._model import get_submodule, resolve_target_path, stated_input_shape
from lightning_vitcompress._pipeline import pipeline_state
from lightning_vitcompress.functional.budget import limit_batches
from lightning_vitcompress.functional.measure import eval_mode, images_of, measure_accuracy

__all__ = [
    "check_data_fits_models",
    "example_from_data",
    "first_batch",
    "in_training_step",
    "local_validation_accuracy",
    "measure_validation_accuracy",
    "validation_data",
]


def example_from_data(trainer: pl.Trainer) -> Optional[torch.Tensor]:
    """One image (batch of 1) of the data this fit trains on: validation data first, else training data.

    For models that do not state their input size. Lightning calls the
    datamodule's ``setup`` before the callbacks' ``setup``, so the loaders can
    be asked here (``fit(...)``'s loaders, the datamodule's or the module's).
    The first batch is read under a forked random state, so the training order
    is what it would be without us. Returns None where no data is reachable or
    a batch holds no image tensor.
    """
    state = pipeline_state(trainer)
    if state.example is None:
        state.example = _first_images(trainer)
        state.example = False if state.example is None else state.example[:1].detach().cpu()
    return state.example if isinstance(state.example, torch.Tensor) else None


def first_batch(trainer: pl.Trainer, validation: bool = True) -> Any:
    """The first batch of the validation data (``validation=True``) or of the training data, read once under a
    forked random state (the training order stays what it would be without us); None where none is reachable."""
    state = pipeline_state(trainer)
    key = "validation" if validation else "training"
    if key not in state.batches:
        try:
            with torch.random.fork_rng(devices=[]):
                loader = _first_loader(val_dataloaders(trainer) if validation else train_dataloaders(trainer))
                state.batches[key] = next(iter(loader)) if loader is not None else None
        except Exception:  # a failing or empty loader: no batch
            state.batches[key] = None
    return state.batches[key]


def validation_data(trainer: pl.Trainer) -> tuple[Optional[Iterable[Any]], Optional[int]]:
    """The fit's validation dataloader (the first one) and how many of its batches to use.

    Found wherever Lightning would find it (``fit(val_dataloaders=...)``, the
    datamodule, the LightningModule's ``val_dataloader``); readable from
    ``setup`` on. ``limit_val_batches`` applies (an int: that many batches, a
    float: that fraction). ``(None, None)`` when there is none or it is limited to 0.
    """
    loader = _first_loader(val_dataloaders(trainer))
    if loader is None:
        return None, None
    setting = trainer.limit_val_batches
    limit: Optional[int]
    if isinstance(setting, float):
        try:
            limit = None if setting >= 1.0 else int(len(loader) * setting)  # type: ignore[arg-type]  # TypeError below
        except TypeError:  # an iterable without len: all of it
            limit = None
    else:
        limit = setting
    if limit == 0:
        return None, None
    return loader, limit


def measure_validation_accuracy(trainer: pl.Trainer, model: nn.Module) -> Optional[float]:
    """Top-1 of ``model`` on the fit's validation data, measured on rank zero and the same on every rank.

    The one place the budgets measure (``max_accuracy_drop`` of every callback).
    """
    accuracy = local_validation_accuracy(trainer, model) if trainer.is_global_zero else None
    return trainer.strategy.broadcast(accuracy, src=0)


def local_validation_accuracy(trainer: pl.Trainer, model: nn.Module) -> Optional[float]:
    """Top-1 of ``model`` on the fit's validation data, measured in this process only (no collective call)."""
    loader, limit = validation_data(trainer)
    return None if loader is None else measure_accuracy(model, limit_batches(loader, limit))


def in_training_step(trainer: pl.Trainer) -> bool:
    """Inside a training batch (between its start and its update), not a callback's forward at an epoch start
    or a validation step: what the callbacks that keep training inputs (calibration) go by, rather than the
    module's mode (a model left in ``eval()`` trains in eval mode)."""
    # declared as a _ReadyCompletedTracker, filled with a _ProcessedTracker (which has started/processed)
    progress: Any = trainer.fit_loop.epoch_loop.batch_progress.current
    return trainer.training and progress.started > progress.processed


def check_data_fits_models(
    trainer: pl.Trainer, pl_module: pl.LightningModule, model_attributes: Iterable[Optional[str]]
) -> None:
    """Images of the Trainer's data that the compressed models (the callbacks' ``model_attributes`` of
    ``pl_module``) cannot take (another channel count or size than the one they state) are refused before any
    callback edits them, not at the first batch."""
    if getattr(pl_module, "example_input_array", None) is not None:
        return  # the module states what its model receives (training_step may convert the batch)
    example = example_from_data(trainer)
    if example is None or example.dim() != 4:
        return
    paths = {resolve_target_path(pl_module, attribute) for attribute in model_attributes}
    for path in sorted(paths):
        model = get_submodule(pl_module, path)
        stated = stated_input_shape(model)
        if stated is None or tuple(example.shape[1:]) == tuple(stated):
            continue
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            with eval_mode(model), torch.inference_mode():
                model(example.to(device))
        except Exception as err:  # reported with its cause
            raise ValueError(
                f"The Trainer's data gives images of shape {tuple(example.shape[1:])}, but "
                f"{type(model).__name__} ({path or 'the LightningModule'}) takes {tuple(stated)} (channels, height, "
                f"width) and cannot run them ({type(err).__name__}: {err}). Nothing was changed. Give the model "
                "images of its shape (e.g. repeat a grey channel 3 times in the dataset's transform), or build it "
                "for your images (timm: in_chans=, img_size=); if training_step converts the batch before the model, "
                "set example_input_array on the LightningModule to what the model receives."
            ) from err


def _first_images(trainer: pl.Trainer) -> Optional[torch.Tensor]:
    for validation in (True, False):  # validation data, then training data
        images = images_of(first_batch(trainer, validation))
        if images is not None:
            return images
    return None


def _first_loader(loaders: Any) -> Optional[Iterable[Any]]:
    """The first dataloader of what a data source gives: one loader, a list/tuple or a mapping of them."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    return loaders
