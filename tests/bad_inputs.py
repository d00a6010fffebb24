"""The table-driven bad-input suite: one :class:`Case` per bad argument, one checker for all.

Each ``tests/test_bad_inputs_<callback>.py`` holds a ``CASES`` list and one
parametrized test calling :func:`check_case`. A case says *when* the bad value
must be rejected and *which argument* the message must name:

* ``"init"``: the callback's constructor raises;
* ``"setup"``: the constructor accepts it, ``trainer.fit`` raises before the
  first training step (``trainer.global_step == 0``);
* ``"call"``: a plain function call raises (``load_compressed``...).

In every case the model's state dict (keys, shapes, values) is unchanged
afterwards. ``python tests/bad_inputs.py`` prints the table of the note:
cases per callback and stage.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning as L
import pytest
import torch
from helpers import TINY, fast_trainer

from lightning_vitcompress.digits import DigitsClassifier

Stage = Literal["init", "setup", "call"]


def tiny_model() -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    return DigitsClassifier(**TINY)


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input.

    Args:
        id: short test id (``"ratio-zero"``).
        make: ``make(tmp_path)`` builds the callback(s) (``"init"``/``"setup"``) or
            makes the call (``"call"``); may write files under ``tmp_path``.
        argument: text the error message must contain, normally ``"name="``.
        stage: when it must be rejected.
        error: the exception type expected (any ``Exception`` by default).
        model: builds the LightningModule that is fitted / checked for changes.
        trainer_kwargs: overrides for :func:`helpers.fast_trainer`.
        fit_kwargs: ``fit_kwargs(tmp_path)`` extra ``trainer.fit`` arguments (``ckpt_path``...).
        callback: the callback class the case is about (for the table).
    """

    id: str
    make: Callable[[Path], Any]
    argument: str
    stage: Stage
    callback: str
    error: Union[type[BaseException], tuple[type[BaseException], ...]] = Exception
    model: Callable[[], L.LightningModule] = tiny_model
    trainer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    fit_kwargs: Optional[Callable[[Path], dict[str, Any]]] = None


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before), f"state-dict keys changed: {set(after) ^ set(before)}"
    for key, value in before.items():
        assert type(after[key]) is type(value), f"{key} changed its type to {type(after[key]).__name__}"
        assert after[key].shape == value.shape, f"{key} changed its shape to {tuple(after[key].shape)}"
        assert torch.equal(after[key], value), f"{key} changed value"


def check_case(case: Case, tmp_path: Path, datamodule: L.LightningDataModule) -> None:
    """Assert that ``case`` is rejected at its stage, naming its argument, leaving the model as it was."""
    model = case.model()
    before = _state(model)
    if case.stage in ("init", "call"):
        with pytest.raises(case.error) as info:
            case.make(tmp_path)
    else:
        made = case.make(tmp_path)  # must not raise: this value is only known to be bad at setup
        callbacks = made if isinstance(made, list) else [made]
        trainer = fast_trainer(tmp_path, callbacks=callbacks, **case.trainer_kwargs)
        fit_kwargs = case.fit_kwargs(tmp_path) if case.fit_kwargs else {}
        with pytest.raises(case.error) as info:
            trainer.fit(model, datamodule, **fit_kwargs)
        assert trainer.global_step == 0, f"rejected only after {trainer.global_step} training steps"
    message = str(info.value)
    assert case.argument in message, f"the message does not name {case.argument!r}: {message}"
    _assert_unchanged(before, model)


def cases_table(modules: tuple[str, ...]) -> str:
    """Markdown table: cases per callback and stage (for the issue note)."""
    counts: Counter[tuple[str, str]] = Counter()
    for name in modules:
        for case in importlib.import_module(name).CASES:
            counts[(case.callback, case.stage)] += 1
    callbacks = sorted({c for c, _ in counts})
    stages = ("init", "setup", "call")
    lines = ["| callback | cases | constructor | setup | call | later | never |", "|---|---|---|---|---|---|---|"]
    for callback in callbacks + ["total"]:
        row = [counts[(callback, s)] if callback != "total" else sum(counts[(c, s)] for c in callbacks) for s in stages]
        lines.append(f"| {callback} | {sum(row)} | " + " | ".join(str(n) for n in row) + " | 0 | 0 |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    names = tuple(sorted(p.stem for p in Path(__file__).parent.glob("test_bad_inputs_*.py")))
    print(cases_table(names))
