"""How structured pruning ranks channels: the torch-pruning importance names and what each needs.

:class:`~lightning_vitcompress.functional.prune.PruneConfig` turns its ``importance``
into an object with :func:`make_importance`; :func:`gradient_kind` says whether that
object reads gradients (``"taylor"``, ``"hessian"``), which
:class:`~lightning_vitcompress.PruningSchedule` then collects during ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Optional, Union

import torch_pruning as tp

from lightning_vitcompress._checks import check_choice

__all__ = ["IMPORTANCES", "ImportanceName", "gradient_kind", "make_importance"]

ImportanceName = Literal["l1", "l2", "taylor", "hessian", "random"]

#: each importance name and how to make its torch-pruning object
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": tp.importance.GroupTaylorImportance,
    "hessian": tp.importance.GroupHessianImportance,
    "random": tp.importance.RandomImportance,
}


def make_importance(importance: Union[str, tp.importance.Importance]) -> tp.importance.Importance:
    """The torch-pruning importance object for a :class:`~lightning_vitcompress.functional.prune.PruneConfig`
    ``importance``: a name in :data:`ImportanceName`, or an importance object (returned as it is)."""
    if isinstance(importance, tp.importance.Importance):
        return importance
    check_choice(importance, "importance", sorted(IMPORTANCES), " or a torch_pruning.importance.Importance object")
    return IMPORTANCES[importance]()


def gradient_kind(importance: tp.importance.Importance) -> Optional[str]:
    """``"taylor"`` / ``"hessian"`` when ``importance`` reads ``param.grad``, else ``None``."""
    if isinstance(importance, tp.importance.GroupHessianImportance):
        return "hessian"
    if isinstance(importance, tp.importance.GroupTaylorImportance):
        return "taylor"
    return None
