"""One budget check for every ``max_accuracy_drop``: measure validation top-1, compare, return a verdict.

``PruningSchedule``, ``NystromSwap`` and ``QuantizeOnFit`` judge a compressed
model the same way: rank zero measures the model's top-1 on the fit's
validation data, every rank gets the same number, and the
:class:`~lightning_vitcompress.functional.budget.AccuracyBudget` (reference
accuracy of the model entering fit, allowed drop) says whether it is within.
:func:`judge` does that once; the callback acts on the :class:`Verdict`
(keep, roll back, swap blocks back, keep layers in full precision).

Example (a callback's hook, on a tiny ViT and scikit-learn's digits)::

    >>> import lightning as L
    >>> from lightning_vitcompress.callbacks._budget import judge
    >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
    >>> from lightning_vitcompress.functional.budget import AccuracyBudget
    >>> class Judge(L.Callback):
    ...     def on_train_end(self, trainer, pl_module):
    ...         verdict = judge(trainer, AccuracyBudget(max_drop=1.0, reference=0.9), pl_module)
    ...         if not verdict.within:
    ...             print(f"beyond the accuracy budget ({verdict.describe()})")
    ...         self.metrics = verdict.metrics()
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ...                     callbacks=[judging := Judge()])
    >>> trainer.fit(DigitsClassifier(embed_dim=32, depth=2, num_heads=4), DigitsDataModule())
    beyond the accuracy budget (...% vs 90.00% entering fit: ... pt, budget 1.00 pt)
    >>> sorted(judging.metrics)  # logged by the callback
    ['accuracy', 'accuracy_drop']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from lightning_vitcompress._base import measure_validation_accuracy
from lightning_vitcompress.functional.budget import AccuracyBudget

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["Verdict", "judge"]


@dataclass(frozen=True)
class Verdict:
    """One measurement against the budget: ``accuracy`` (None when nothing could be measured) and what it means."""

    budget: AccuracyBudget
    accuracy: float | None

    @property
    def within(self) -> bool:
        """Whether the model is within the budget (an unmeasured model is not)."""
        return self.budget.allows(self.accuracy)

    @property
    def drop(self) -> float | None:
        """Points of top-1 lost against the reference (None when not measured)."""
        return None if self.accuracy is None else self.budget.drop(self.accuracy)

    @property
    def reference(self) -> float:
        """Top-1 of the model as it entered fit."""
        return self.budget.reference

    def describe(self) -> str:
        """``"92.10% vs 94.00% entering fit: -1.90 pt, budget 1.00 pt"``."""
        return self.budget.describe(self.accuracy)

    def metrics(self) -> dict[str, float | None]:
        """``accuracy`` and ``accuracy_drop``, for :meth:`CompressionCallback.log_metrics`."""
        return {"accuracy": self.accuracy, "accuracy_drop": self.drop}


def judge(trainer: pl.Trainer, budget: AccuracyBudget, model: nn.Module) -> Verdict:
    """Measure ``model`` on the fit's validation data (rank zero measures, every rank gets the same verdict)."""
    return Verdict(budget, measure_validation_accuracy(trainer, model))
