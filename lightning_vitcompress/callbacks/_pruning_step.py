"""One pruning step of :class:`~lightning_vitcompress.PruningSchedule` on the model, apart from the hooks.

From the channel ratio reached so far to the next one: the gradients gathered
for Taylor/Hessian importance go into ``.grad``, torch-pruning cuts the model
to the target widths with a seeded draw, the result is measured and recorded,
and a failure anywhere puts the model back as it was before the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_vitcompress._structure import ModelSnapshot
from lightning_vitcompress.callbacks._pruning_schedule import GradientMean
from lightning_vitcompress.functional.measure import count_macs, count_parameters
from lightning_vitcompress.functional.prune import PruneConfig, prune_vit, widths_after

__all__ = ["StepResult", "prune_step"]


@dataclasses.dataclass
class StepResult:
    """What one pruning step changed and measured."""

    #: the modules torch-pruning changed, as :func:`~lightning_vitcompress.functional.prune_vit` reports them
    changes: Any
    params: int
    macs: Optional[int]
    #: fraction of the prunable channels removed so far (against the original widths)
    ratio: float

    def metrics(self, original_params: int) -> dict[str, Optional[float]]:
        """What the callback logs about the step."""
        params_ratio = self.params / max(1, original_params)
        return {"params": self.params, "params_ratio": params_ratio, "ratio": self.ratio, "macs": self.macs}


def prune_step(
    model: nn.Module,
    config: PruneConfig,
    *,
    importance: Any,
    example: torch.Tensor,
    original_widths: dict[str, list[int]],
    previous: float,
    reached: float,
    seed: int,
    step: int,
    num_steps: int,
    gradients: Optional[GradientMean],
    record: Callable[[StepResult], None],
) -> Optional[StepResult]:
    """Prune ``model`` in place from channel ratio ``previous`` to the widths of ``reached`` (``None``: nothing to
    remove between the two).

    ``gradients`` (Taylor/Hessian importance) are loaded first; ``record`` is called with the result while a failure
    can still undo the step. On failure the model is restored and a ``RuntimeError`` names the step; either way the
    parameters' ``.grad`` are cleared.
    """
    # the fraction of the *current* channels to remove; a hair less guards int() flooring
    relative = max(0.0, 1.0 - (1.0 - reached) / (1.0 - previous) - 1e-6)
    if relative <= 0.0:
        return None
    keep = widths_after(original_widths, reached, config.prune_heads)
    params_before = count_parameters(model)
    snapshot = ModelSnapshot(model)  # pruning works in place (the module may be the LightningModule itself)
    try:
        if gradients is not None:
            gradients.load(model)
        step_config = dataclasses.replace(config, pruning_ratio=relative, target="channels", importance=importance)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + step)  # random importance: the same draw on every rank
            changes = prune_vit(model, step_config, example, keep=keep)
        params, macs = count_parameters(model), count_macs(model, example)
        result = StepResult(changes, params, macs, config.fraction_removed(original_widths, model))
        record(result)
    except Exception as err:
        snapshot.restore()
        raise RuntimeError(
            f"PruningSchedule step {step}/{num_steps} (to channel ratio {reached:.3f}) failed; the model was "
            f"restored to how it was before this step. Cause: {type(err).__name__}: {err}"
        ) from err
    finally:
        for param in model.parameters():
            param.grad = None
    rank_zero_info(
        f"PruningSchedule step {step}/{num_steps}: {result.ratio:.3f} of the prunable channels removed, "
        f"params {params_before:,} -> {params:,}" + (f", MACs/image {macs:,}" if macs is not None else "")
    )
    return result
