"""What :class:`~lightning_vitcompress.PruningSchedule` needs that is not about Lightning's hooks.

The schedule (how much of the final ratio each step reaches, which steps are
due at an epoch or batch boundary), the translation of a params/MACs target
into a channel ratio, the state a budget rollback restores, the gradients
Taylor/Hessian importance averages, and the example input traced.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_vitcompress._base import example_from_data
from lightning_vitcompress._checks import check_choice, check_int, example_input_error
from lightning_vitcompress._model import shape_example_input
from lightning_vitcompress._structure import ModelSnapshot, Record, edits_of, recorded_edits
from lightning_vitcompress._training_state import refresh_after_structural_change
from lightning_vitcompress.functional.measure import count_macs, count_parameters, eval_mode
from lightning_vitcompress.functional.prune import PruneConfig, prune_vit

__all__ = [
    "GoodState",
    "GradientMean",
    "ScheduleName",
    "channel_ratio_for",
    "example_input_for",
    "last_recorded_step",
    "schedule_fractions",
    "schedule_steps",
    "steps_due",
]

ScheduleName = Literal["linear", "cubic"]


def schedule_steps(
    start_epoch: int, end_epoch: Optional[int], num_steps: Optional[int], interval: str
) -> tuple[int, int]:
    """``(end_epoch, num_steps)`` with their defaults filled in; raises naming the argument unless they fit together."""
    check_int(start_epoch, "start_epoch", example="0 (prune at setup)")
    end_epoch = start_epoch if end_epoch is None else end_epoch
    check_int(end_epoch, "end_epoch", minimum=start_epoch, example=f"{start_epoch} (start_epoch={start_epoch})")
    check_choice(interval, "interval", ("epoch", "step"))
    if num_steps is None:
        num_steps = end_epoch - start_epoch + 1 if interval == "epoch" else 1
    check_int(num_steps, "num_steps", minimum=1, example="3 pruning steps")
    if interval == "epoch" and num_steps > end_epoch - start_epoch + 1:
        raise ValueError(
            f"num_steps={num_steps} does not fit into epochs {start_epoch}..{end_epoch} at one step per epoch; "
            f"use num_steps <= {end_epoch - start_epoch + 1}, a later end_epoch, or interval='step'."
        )
    return end_epoch, num_steps


def last_recorded_step(pl_module: pl.LightningModule, kind: str, target_path: Optional[str]) -> Optional[Record]:
    """The record of the last pruning step already applied to ``pl_module``'s model (replayed from a checkpoint,
    or made by an earlier fit), or None; raises when the model was pruned but its steps were not recorded."""
    done = edits_of(pl_module, kind, target_path)
    if done and "channel_ratio_final" not in done[-1]:
        raise RuntimeError(
            "PruningSchedule: the checkpoint being resumed holds a pruned model but no record of the pruning "
            "steps (its shapes were read from the weights), so the schedule cannot tell how far it got. Resume "
            "from a checkpoint saved with this package's records (a full ModelCheckpoint), or fine-tune the "
            "pruned model without PruningSchedule."
        )
    return done[-1] if done else None


def schedule_fractions(schedule: Union[str, Callable[[float], float]], num_steps: int) -> list[float]:
    """The fraction of the final ratio after each step; raises naming ``schedule`` unless it can be followed."""
    if not callable(schedule):
        check_choice(schedule, "schedule", ("linear", "cubic"), " or a callable progress -> fraction")
    fractions: list[Any] = []
    for step in range(1, num_steps + 1):
        value = _fraction(schedule, step / num_steps)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"schedule={schedule!r} returned {value!r} at progress {step}/{num_steps}: it must return the "
                "fraction of pruning_ratio reached, a number in [0, 1] (e.g. lambda progress: progress)."
            )
        fractions.append(float(value))
    if any(later < earlier for earlier, later in itertools.pairwise(fractions)):
        raise ValueError(
            f"schedule={schedule!r} gives fractions {fractions} at steps 1..{num_steps}: pruned channels cannot come "
            "back, so the fractions must not decrease."
        )
    if fractions[-1] == 0.0:
        raise ValueError(
            f"schedule={schedule!r} gives fractions {fractions}: it never prunes. Return 1.0 at progress 1.0 to "
            "reach pruning_ratio."
        )
    return fractions


def _fraction(schedule: Union[str, Callable[[float], float]], progress: float) -> Any:
    """Fraction of the final pruning ratio reached at ``progress`` in (0, 1]."""
    if callable(schedule):
        return schedule(progress)
    if schedule == "linear":
        return progress
    return 1.0 - (1.0 - progress) ** 3  # cubic (Zhu & Gupta 2017): prune fast early, slow late


def _offsets(num_steps: int, units: int) -> list[int]:
    return [math.floor(k * units / num_steps) for k in range(num_steps)]


def steps_due(
    trainer: Optional[pl.Trainer],
    position_in_epoch: int,
    *,
    start_epoch: int,
    end_epoch: int,
    num_steps: int,
    interval: str,
) -> int:
    """How many pruning steps should have run at this epoch / batch boundary (``trainer=None``: at fit start)."""
    epochs = end_epoch - start_epoch + 1
    if trainer is None:
        return sum(1 for offset in _offsets(num_steps, epochs) if offset <= 0)
    if interval == "epoch":
        offsets = _offsets(num_steps, epochs)
        position = trainer.current_epoch - start_epoch
    else:
        per_epoch = max(1, int(trainer.num_training_batches)) if math.isfinite(trainer.num_training_batches) else 1
        offsets = _offsets(num_steps, epochs * per_epoch)
        position = (trainer.current_epoch - start_epoch) * per_epoch + position_in_epoch
    return sum(1 for offset in offsets if offset <= position) if position >= 0 else 0


def channel_ratio_for(
    model: nn.Module, config: PruneConfig, example: torch.Tensor, widths: dict[str, list[int]]
) -> float:
    """``config.pruning_ratio`` as a channel ratio: itself, or for a params/MACs target found by bisection
    (pruning and restoring ``model``)."""
    if config.target == "channels":
        return config.pruning_ratio
    measure = count_parameters if config.target == "params" else (lambda m: count_macs(m, example) or 0)
    base = measure(model)

    def reduction(ratio: float) -> float:
        snapshot = ModelSnapshot(model)
        try:
            prune_vit(
                model, dataclasses.replace(config, pruning_ratio=ratio, target="channels", importance="l2"), example
            )
            return 1.0 - measure(model) / base
        finally:
            snapshot.restore()

    cut = config.cut_widths(widths)
    low, high = 0.0, min((width - 1) / width for width in cut.values())
    most = reduction(high)
    if most < config.pruning_ratio:
        raise ValueError(
            f"pruning_ratio={config.pruning_ratio!r} with target={config.target!r} is out of reach: keeping "
            f"one channel in every pruned layer removes {most:.3f} of the {config.target}. Pass "
            f"pruning_ratio <= {math.floor(most * 1000) / 1000:.3f}."
        )
    for _ in range(12):
        mid = (low + high) / 2
        if reduction(mid) < config.pruning_ratio:
            low = mid
        else:
            high = mid
    rank_zero_info(
        f"PruningSchedule: removing {config.pruning_ratio:.0%} of the {config.target} needs a channel ratio "
        f"of {high:.3f}."
    )
    return high


class GoodState:
    """A training state judged within the accuracy budget: the model (tensors and modules, as
    :class:`ModelSnapshot`), the optimizers' and LR schedulers' states, the records and steps done."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module, steps_done: int):
        self.target = model
        self.model = ModelSnapshot(model)
        strategy = trainer.strategy
        self.optimizers = [copy.deepcopy(opt.state_dict()) for opt in strategy.optimizers]
        self.schedulers = [copy.deepcopy(config.scheduler.state_dict()) for config in strategy.lr_scheduler_configs]
        self.records: list[Record] = list(recorded_edits(pl_module))
        self.steps_done = steps_done

    def edited_since(self, pl_module: pl.LightningModule, kind: str) -> list[str]:
        """Kinds of the records other callbacks added since (a restore would silently undo them)."""
        known = {id(r) for r in self.records}
        return [str(r.get("kind")) for r in recorded_edits(pl_module) if id(r) not in known and r.get("kind") != kind]

    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put it all back; it can be restored again later (training after this must not change it)."""
        self.model.restore()
        recorded_edits(pl_module)[:] = self.records
        refresh_after_structural_change(trainer)  # optimizers around the restored parameters
        strategy = trainer.strategy
        if len(strategy.optimizers) == len(self.optimizers):
            for optimizer, state in zip(strategy.optimizers, self.optimizers):
                optimizer.load_state_dict(copy.deepcopy(state))
        for config, state in zip(strategy.lr_scheduler_configs, self.schedulers):
            config.scheduler.load_state_dict(state)


def why_not_restorable(
    good: Optional[GoodState], pl_module: pl.LightningModule, kind: str, redone: Sequence[str] = ()
) -> Optional[str]:
    """Why a rollback to ``good`` cannot happen (``None``: it can): nothing was kept, or others edited since
    (other than the ``redone`` kinds, which their owner makes again after the rollback)."""
    if good is None:
        return "the state before it was not kept (this fit resumed after the step)"
    others = [other for other in good.edited_since(pl_module, kind) if other not in redone]
    if others:
        return f"other callbacks edited the model since ({others}), which a rollback would silently undo"
    return None


class GradientMean:
    """The gradients (squared for Hessian importance) of the batches seen while a step waits, summed per parameter."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.batches = 0

    def add(self, model: nn.Module, *, square: bool) -> None:
        """Add the gradients of ``model``'s parameters after one backward."""
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is None:
                    continue
                grad = param.grad.detach()
                grad = grad * grad if square else grad
                total = self.sums.get(id(param))
                if total is not None and total.shape == grad.shape:
                    total += grad
                else:
                    self.sums[id(param)] = grad.clone()
        self.batches += 1

    def load(self, model: nn.Module) -> None:
        """Put the mean accumulated gradient of each parameter of ``model`` in its ``.grad``."""
        count = max(1, self.batches)
        for param in model.parameters():
            total = self.sums.get(id(param))
            param.grad = None if total is None else total / count


def example_input_for(model: nn.Module, trainer: pl.Trainer, user_example: Optional[torch.Tensor]) -> torch.Tensor:
    """One input row for torch-pruning to trace ``model`` with: the user's (checked to run), the model's stated
    input size, or the first batch of the Trainer's data."""
    if user_example is not None:
        device = next(model.parameters()).device
        example = user_example[:1].to(device)
        try:
            with torch.no_grad(), eval_mode(model):
                model(example)
        except Exception as err:
            raise example_input_error(user_example, model, err) from err
        return example
    found = shape_example_input(model)
    if found is None:
        found = example_from_data(trainer)
    if found is not None:
        return found.to(next(model.parameters()).device)
    raise ValueError(
        f"Cannot build an example input for {type(model).__name__}: it states no input size and the Trainer "
        "has no data to take one batch from. Pass example_input=<one input batch> so that torch-pruning can "
        "trace the model."
    )
