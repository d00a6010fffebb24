"""Accuracy budgets: "the compressed model may lose at most N points of validation top-1".

Pure torch (no Lightning). One :class:`AccuracyBudget` holds the reference
accuracy (the model as it entered ``fit``) and the allowed drop in points;
``PruningSchedule``, ``QuantizeOnFit`` and ``NystromSwap`` take their
``max_accuracy_drop`` decisions through it, measuring with
:func:`~lightning_vitcompress.functional.measure.measure_accuracy`.

Example (a tiny timm ViT, validated on labels it gets right: 100% entering)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.budget import AccuracyBudget
    >>> from lightning_vitcompress.functional.measure import measure_accuracy
    >>> from lightning_vitcompress.functional.prune import prune_vit
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    >>> images = torch.randn(64, 3, 32, 32)
    >>> val_batches = [(images, vit(images).argmax(-1))]
    >>> budget = AccuracyBudget(max_drop=1.0, reference=measure_accuracy(vit, val_batches))
    >>> _ = prune_vit(vit, 0.5, images[:1])   # ...compress...
    >>> accuracy = measure_accuracy(vit, val_batches)
    >>> budget.reference, budget.allows(accuracy) == (accuracy >= 0.99)
    (1.0, True)
    >>> budget.describe(0.921)   # what a callback reports for a model beyond its budget
    '92.10% vs 100.00% entering fit: -7.90 pt, budget 1.00 pt'
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["AccuracyBudget", "limit_batches"]

#: accuracies are fractions; a drop equal to the budget up to float rounding is within it
_TOLERANCE_POINTS = 1e-6


@dataclass(frozen=True)
class AccuracyBudget:
    """At most ``max_drop`` points of top-1 below ``reference`` (a fraction in [0, 1]).

    Example::

        >>> from lightning_vitcompress.functional.budget import AccuracyBudget
        >>> AccuracyBudget(1.0, 0.94).allows(0.932), AccuracyBudget(1.0, 0.94).allows(0.92)   # -0.8 pt, -2 pt
        (True, False)
    """

    max_drop: float
    """allowed drop in percentage points of top-1 (1.0 = one point)"""
    reference: float
    """top-1 of the model as it entered fit, a fraction"""

    def drop(self, accuracy: float) -> float:
        """Points lost against the reference (negative: better than the reference)."""
        return (self.reference - accuracy) * 100.0

    def allows(self, accuracy: Optional[float]) -> bool:
        """Whether ``accuracy`` is within the budget (``None``, nothing measured, is not)."""
        return accuracy is not None and self.drop(accuracy) <= self.max_drop + _TOLERANCE_POINTS

    def describe(self, accuracy: Optional[float]) -> str:
        """``"92.10% vs 94.00% entering fit: -1.90 pt, budget 1.00 pt"``."""
        if accuracy is None:
            return f"not measured (entering fit {self.reference:.2%}, budget {self.max_drop:.2f} pt)"
        return (
            f"{accuracy:.2%} vs {self.reference:.2%} entering fit: {-self.drop(accuracy):+.2f} pt, "
            f"budget {self.max_drop:.2f} pt"
        )


def limit_batches(batches: Iterable[Any], limit: Optional[int]) -> Iterator[Any]:
    """The first ``limit`` batches of ``batches`` (all of them for ``None``)."""
    return iter(batches) if limit is None else itertools.islice(batches, limit)
