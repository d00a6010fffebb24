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
