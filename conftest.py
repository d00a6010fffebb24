"""Docstring examples run as doctests (``--doctest-modules`` over the package, see pyproject.toml).

Each example is self-contained (its own imports, a tiny model) so a reader can copy it; this file only gives
every example a fresh working directory, a fixed seed and quiet output.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_sandbox(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not isinstance(request.node, DoctestItem):
        return
    monkeypatch.chdir(tmp_path)  # examples write checkpoints, exports and logs where they run
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    warnings.simplefilter("ignore")
