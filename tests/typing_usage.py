"""Calls a typed user writes (the README's), checked by mypy (pyproject's ``[tool.mypy] files``); never run.

The callbacks' constructors take their config's fields through :func:`~lightning_vitcompress._options.takes_config`,
so static checkers read the source ``__init__`` (``*args``, the callback's own keywords, ``config=None``,
``**options``): these calls must type-check. Not a test module: pytest collects only ``test_*.py``.
"""

from __future__ import annotations

from lightning_vitcompress.callbacks import (
    DistillationTeacher,
    ExportOnFit,
    NystromSwap,
    PruningSchedule,
    QuantizeOnFit,
    TokenMerging,
)
from lightning_vitcompress.functional import PruneConfig


def readme_calls() -> list[object]:
    return [
        PruningSchedule(),
        PruningSchedule(0.5, end_epoch=4, num_steps=5),
        PruningSchedule(0.5, prune_heads=True),
        PruningSchedule(config=PruneConfig(0.5)),
        DistillationTeacher("vit_small_patch16_224", mode="soft", alpha=0.5),
        NystromSwap(num_landmarks=32),
        NystromSwap(32, 1),
        TokenMerging(r=8),
        ExportOnFit("model.pt2"),
        ExportOnFit("model.onnx", "onnx", calibration_batches=4),
        QuantizeOnFit(),
    ]
