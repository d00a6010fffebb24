"""The table-driven bad-input suite: one :class:`Case` per bad argument, one checker for all.

Each ``tests/test_bad_inputs_<callback>.py`` holds a ``CASES`` list and one
parametrized test calling :func:`check_case`. A case says *when* the bad value
must be rejected, with *which exception type* and *which argument* the message
must name:

* ``"init"``: the callback's constructor raises;
* ``"setup"``: the constructor accepts it, ``trainer.fit`` raises before the
  first training batch starts;
* ``"call"``: a plain function call raises (``load_compressed``...).

When a case is rejected is *measured*, not taken from the case: a probe
callback records whether a training batch started and whether training
ended, so a refusal at the first batch, later in training or at the end of
fit, or no refusal at all, is seen as such (:func:`run_case`). In every case
the model's state dict (keys, shapes, values) is unchanged afterwards.
``python tests/bad_inputs.py`` runs every case and prints the table of the
note: cases per callback and the stage each was really refused at.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from helpers import TINY, fast_trainer
from lightning.pytorch.callbacks import Callback

from lightning_vitcompress.digits import DigitsClassifier

Stage = Literal["init", "setup", "call"]
#: when a bad input was really refused, in the order a fit meets them
OBSERVED = ("constructor", "call", "setup", "first batch", "later", "never")
_EXPECTED_OBSERVED = {"init": "constructor", "setup": "setup", "call": "call"}


def tiny_model() -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    return DigitsClassifier(**TINY)


ErrorType = Union[type[BaseException], tuple[type[BaseException], ...]]


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input.

    Args:
        id: short test id (``"ratio-zero"``).
        make: ``make(tmp_path)`` builds the callback(s) (``"init"``/``"setup"``) or
            makes the call (``"call"``); may write files under ``tmp_path``.
        argument: text the error message must contain, normally ``"name="``.
        stage: when it must be rejected.
        callback: the callback class the case is about (for the table).
        error: the specific exception type expected (``Exception`` itself is refused: any crash is one).
        model: builds the LightningModule that is fitted / checked for changes.
        trainer_kwargs: overrides for :func:`helpers.fast_trainer`.
        fit_kwargs: ``fit_kwargs(tmp_path)`` extra ``trainer.fit`` arguments (``ckpt_path``...).
        data: ``data(datamodule)`` gives the ``trainer.fit`` data instead of the digits datamodule
            (a datamodule, or a ``(train, val)`` pair of loaders).
    """

    id: str
    make: Callable[[Path], Any]
    argument: str
    stage: Stage
    callback: str
    error: ErrorType
    model: Callable[[], L.LightningModule] = tiny_model
    trainer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    fit_kwargs: Optional[Callable[[Path], dict[str, Any]]] = None
    data: Optional[Callable[[L.LightningDataModule], Any]] = None


@dataclasses.dataclass
class Outcome:
    """What running a case showed: when it was refused (see :data:`OBSERVED`) and with what."""

    observed: str
    error: Optional[BaseException]
    steps: int


class _Probe(Callback):
    """Records how far the fit got: a training batch started, training ended."""

    def __init__(self) -> None:
        self.batch_started = False
        self.train_ended = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch_started = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_ended = True


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before), f"state-dict keys changed: {set(after) ^ set(before)}"
    for key, value in before.items():
        assert type(after[key]) is type(value), f"{key} changed its type to {type(after[key]).__name__}"
        assert after[key].shape == value.shape, f"{key} changed its shape to {tuple(after[key].shape)}"
        plain = type(value) in (torch.Tensor, torch.nn.Parameter)
        same = torch.equal(after[key], value) if plain else torch.equal(after[key].dequantize(), value.dequantize())
        assert same, f"{key} changed value"


def run_case(case: Case, tmp_path: Path, datamodule: L.LightningDataModule) -> tuple[Outcome, L.LightningModule]:
    """Run ``case`` and measure when (if at all) it was refused; returns the outcome and the model it used."""
    model = case.model()
    if case.stage in ("init", "call"):
        try:
            made = case.make(tmp_path)
        except Exception as err:
            return Outcome("constructor" if case.stage == "init" else "call", err, 0), model
        if case.stage == "call":
            return Outcome("never", None, 0), model
    else:
        made = case.make(tmp_path)  # a setup case's constructor must accept the value (only known at setup)
    probe = _Probe()
    callbacks = [probe, *(made if isinstance(made, list) else [made])]  # first: it sees a batch start
    trainer = fast_trainer(tmp_path, callbacks=callbacks, **case.trainer_kwargs)
    fit_kwargs = case.fit_kwargs(tmp_path) if case.fit_kwargs else {}
    data = case.data(datamodule) if case.data else datamodule
    data_kwargs = (
        dict(train_dataloaders=data[0], val_dataloaders=data[1]) if isinstance(data, tuple) else dict(datamodule=data)
    )
    try:
        trainer.fit(model, **data_kwargs, **fit_kwargs)
    except Exception as err:
        if not probe.batch_started:
            observed = "setup"
        elif trainer.global_step == 0 and not probe.train_ended:
            observed = "first batch"
        else:
            observed = "later"
        return Outcome(observed, err, trainer.global_step), model
    return Outcome("never", None, trainer.global_step), model


def _check_error_type(case: Case) -> None:
    types = case.error if isinstance(case.error, tuple) else (case.error,)
    assert all(t not in (Exception, BaseException) for t in types), (
        f"{case.id}: error={case.error!r} is satisfied by any crash; name the specific exception type"
    )


def check_case(case: Case, tmp_path: Path, datamodule: L.LightningDataModule) -> None:
    """Assert that ``case`` is refused at its stage with its error type, naming its argument, leaving the model
    as it was."""
    _check_error_type(case)
    model = case.model()
    before = _state(model)
    outcome, _ = run_case(dataclasses.replace(case, model=lambda: model), tmp_path, datamodule)  # this very model
    expected = _EXPECTED_OBSERVED[case.stage]
    assert outcome.observed == expected, (
        f"{case.id}: refused at {outcome.observed!r} (after {outcome.steps} steps), expected at {expected!r}"
        + (f": {type(outcome.error).__name__}: {outcome.error}" if outcome.error else "")
    )
    assert isinstance(outcome.error, case.error), f"{case.id}: {type(outcome.error).__name__}: {outcome.error}"
    message = str(outcome.error)
    assert case.argument in message, f"the message does not name {case.argument!r}: {message}"
    _assert_unchanged(before, model)


def measured_table(modules: tuple[str, ...], tmp_root: Path, datamodule: L.LightningDataModule) -> str:
    """Markdown table: cases per callback and the stage each was really refused at, plus the unclear ones
    (another exception type than the case's, or a message that does not name its argument)."""
    counts: Counter[tuple[str, str]] = Counter()
    unclear: list[str] = []
    for name in modules:
        for case in importlib.import_module(name).CASES:
            folder = tmp_root / name / case.id
            folder.mkdir(parents=True, exist_ok=True)
            try:
                outcome, _ = run_case(case, folder, datamodule)
            except Exception as err:
                outcome = Outcome("constructor", err, 0)
            counts[(case.callback, outcome.observed)] += 1
            clear = (
                outcome.error is not None
                and isinstance(outcome.error, case.error)
                and case.argument in str(outcome.error)
            )
            if not clear:
                counts[(case.callback, "unclear")] += 1
                unclear.append(f"{name}::{case.id}: {type(outcome.error).__name__}: {outcome.error}")
    callbacks = sorted({c for c, _ in counts})
    columns = (*OBSERVED, "unclear")
    lines = ["| callback | cases | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for callback in [*callbacks, "total"]:
        row = [sum(counts[(c, s)] for c in (callbacks if callback == "total" else [callback])) for s in columns]
        lines.append(f"| {callback} | {sum(row[:-1])} | " + " | ".join(str(n) for n in row) + " |")
    return "\n".join(lines + [f"unclear: {u}" for u in unclear])


if __name__ == "__main__":
    import logging
    import tempfile
    import warnings

    from lightning_vitcompress.digits import DigitsDataModule

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    sys.path.insert(0, str(Path(__file__).parent))
    names = tuple(sorted(p.stem for p in Path(__file__).parent.glob("test_bad_inputs_*.py")))
    digits = DigitsDataModule(batch_size=64)
    digits.setup()
    with tempfile.TemporaryDirectory() as tmp:
        print(measured_table(names, Path(tmp), digits))
