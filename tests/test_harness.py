"""The bad-input harness measures when a case was refused (its table's columns are not taken on trust)."""

from __future__ import annotations

import pytest
from bad_inputs import Case, check_case, run_case
from lightning.pytorch.callbacks import Callback


class RaiseAt(Callback):
    """Raises ValueError('x=1 ...') in the named hook (None: never)."""

    def __init__(self, hook: str | None) -> None:
        self.hook = hook

    def _maybe(self, hook: str) -> None:
        if hook == self.hook:
            raise ValueError(f"x=1 refused in {hook}")

    def setup(self, trainer, pl_module, stage):
        self._maybe("setup")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe("on_train_batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= 2:
            self._maybe("on_train_batch_end")

    def on_train_end(self, trainer, pl_module):
        self._maybe("on_train_end")


@pytest.mark.parametrize(
    "hook, observed",
    [
        ("setup", "setup"),
        ("on_train_batch_start", "first batch"),
        ("on_train_batch_end", "later"),
        ("on_train_end", "later"),
        (None, "never"),
    ],
)
def test_the_stage_is_measured(hook, observed, tmp_path, digits):
    case = Case(
        "probe",
        lambda t: RaiseAt(hook),
        "x=1",
        "setup",
        "RaiseAt",
        ValueError,
        trainer_kwargs=dict(limit_train_batches=3, limit_val_batches=0),
    )
    outcome, _ = run_case(case, tmp_path, digits)
    assert outcome.observed == observed
    assert (outcome.error is None) == (hook is None)
    if hook == "setup":
        check_case(case, tmp_path, digits)
    elif hook == "on_train_batch_start":
        with pytest.raises(AssertionError, match="expected at 'setup'"):
            check_case(case, tmp_path, digits)


def test_any_exception_is_not_a_specific_type(tmp_path, digits):
    case = Case("probe", lambda t: RaiseAt("setup"), "x=1", "setup", "RaiseAt", Exception)
    with pytest.raises(AssertionError, match="specific exception type"):
        check_case(case, tmp_path, digits)
