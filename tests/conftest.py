"""Shared fixtures: the digits data and a tiny ViT classifier."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import pytest
import torch
from helpers import TINY

from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


@pytest.fixture
def tiny_classifier() -> Callable[..., DigitsClassifier]:
    """Factory: ``tiny_classifier(model_name=..., **overrides)`` with a fixed seed."""

    def make(**overrides: Any) -> DigitsClassifier:
        L.seed_everything(0, verbose=False)
        return DigitsClassifier(**{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def trained_tiny(digits: DigitsDataModule) -> dict[str, torch.Tensor]:
    """The weights of the tiny classifier trained briefly on digits (once per session): a model entering fit
    whose attention and channels matter (the budget tests of several files start from it)."""
    from helpers import fast_trainer

    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(**{**TINY, "lr": 1e-2})
    fast_trainer(None, max_epochs=3, limit_train_batches=None, limit_val_batches=0).fit(model, digits)
    return {k: v.clone() for k, v in model.state_dict().items()}
