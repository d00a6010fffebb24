"""Shared fixtures: the digits data and a tiny ViT classifier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


@pytest.fixture(scope="session")
def served(tmp_path_factory, trained_tiny, digits) -> dict[str, Any]:
    """The trained tiny classifier fit once more with ExportOnFit(".pt2") and BenchmarkCallback, with the tqdm bar
    on: its folder (vit.pt2, report, MODEL_CARD.md), the live model and what the bars printed (one AOTInductor
    compile shared by the card and serving tests)."""
    import contextlib
    import io

    from helpers import fast_trainer
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_vitcompress import BenchmarkCallback, ExportOnFit

    folder = tmp_path_factory.mktemp("served")
    L.seed_everything(0, verbose=False)
    module = DigitsClassifier(**{**TINY, "lr": 1e-4})
    module.load_state_dict(trained_tiny)
    bench = BenchmarkCallback(
        batch_size=4,
        devices=("cpu",),
        rounds=1,
        min_run_time=0.02,
        latency_repeats=1,
        accuracy_batches=1,
        plot=False,
        output_dir=folder,
    )
    trainer = fast_trainer(
        folder,
        callbacks=[bench, ExportOnFit(folder / "vit.pt2"), TQDMProgressBar()],
        enable_progress_bar=True,
        limit_train_batches=2,
        limit_val_batches=1,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.fit(module, digits)
    return {"folder": folder, "model": module.model.eval(), "printed": printed.getvalue(), "digits": digits}
