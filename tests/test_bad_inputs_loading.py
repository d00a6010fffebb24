"""Bad inputs to ``load_compressed`` (see tests/bad_inputs.py for the harness)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bad_inputs import Case, check_case, tiny_model

from lightning_vitcompress import load_compressed
from lightning_vitcompress._structure import UnsafeCheckpointError
from lightning_vitcompress.digits import DigitsClassifier


def _saved(tmp_path: Path, **extra) -> Path:
    model = tiny_model()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), **extra}, path)
    return path


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(data)
    return path


CASES = [
    Case(
        "missing-file",
        lambda t: load_compressed(DigitsClassifier, t / "none.ckpt"),
        "checkpoint_path=",
        "call",
        "load_compressed",
        FileNotFoundError,
    ),
    Case(
        "directory",
        lambda t: load_compressed(DigitsClassifier, t),
        "checkpoint_path=",
        "call",
        "load_compressed",
        FileNotFoundError,
    ),
    Case(
        "empty-file",
        lambda t: load_compressed(DigitsClassifier, _write(t, b"")),
        "checkpoint_path=",
        "call",
        "load_compressed",
        ValueError,
    ),
    Case(
        "text-file",
        lambda t: load_compressed(DigitsClassifier, _write(t, b"hello" * 50)),
        "checkpoint_path=",
        "call",
        "load_compressed",
        ValueError,
    ),
    Case(
        "unsafe-object",
        lambda t: load_compressed(DigitsClassifier, _saved(t, extra=Path("x"))),
        "checkpoint_path=",
        "call",
        "load_compressed",
        UnsafeCheckpointError,
    ),
    Case(
        "class-instance",
        lambda t: load_compressed(tiny_model(), _saved(t)),
        "module_class=",
        "call",
        "load_compressed",
        TypeError,
    ),
    Case(
        "class-not-a-module",
        lambda t: load_compressed(dict, _saved(t)),
        "module_class=",
        "call",
        "load_compressed",
        TypeError,
    ),
    Case(
        "path-int",
        lambda t: load_compressed(DigitsClassifier, 3),
        "checkpoint_path=",
        "call",
        "load_compressed",
        TypeError,
    ),
    Case(
        "weights-only-string",
        lambda t: load_compressed(DigitsClassifier, _saved(t), weights_only="no"),
        "weights_only=",
        "call",
        "load_compressed",
        TypeError,
    ),
    Case(
        "strict-string",
        lambda t: load_compressed(DigitsClassifier, _saved(t), strict="yes"),
        "strict=",
        "call",
        "load_compressed",
        TypeError,
    ),
    Case(
        "unknown-record-kind",
        lambda t: load_compressed(DigitsClassifier, _saved(t, vitcompress_structure=[{"kind": "nope", "target": ""}])),
        "nope",
        "call",
        "load_compressed",
        KeyError,
    ),
    Case(
        "bad-init-kwarg",
        lambda t: load_compressed(DigitsClassifier, _saved(t), embed_size=32),
        "embed_size",
        "call",
        "load_compressed",
        TypeError,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, digits):
    check_case(case, tmp_path, digits)
