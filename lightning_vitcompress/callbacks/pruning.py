"""Structured pruning that really shrinks a Vision Transformer, inside ``fit``.

:class:`PruningSchedule` removes embedding channels, attention head dimensions
(or whole heads) and MLP hidden channels with `torch-pruning`_, so the model's
weight matrices get smaller and its forward faster (mask pruning gives neither).
It prunes once at the start of fit or step by step over a schedule, keeps the
optimizer, LR scheduler and DDP wrapper consistent after each step, and records
every step in the checkpoint so that resuming and :func:`load_compressed` rebuild
the pruned shapes before the weights load.

.. _torch-pruning: https://github.com/VainF/Torch-Pruning
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback, example_from_data
from lightning_vitcompress._plan import PlanRow, budget_phrase, epochs_phrase
from lightning_vitcompress._checks import (
    check_choice,
    check_max_accuracy_drop,
    check_example_input,
    check_int,
    config_or_options,
    example_input_error,
)
from lightning_vitcompress._model import shape_example_input
from lightning_vitcompress._structure import ModelSnapshot, Record, recorded_edits
from lightning_vitcompress._training_state import refresh_after_structural_change
from lightning_vitcompress.functional.measure import (
    count_macs,
    count_parameters,
    eval_mode,
)
from lightning_vitcompress.functional.prune import (
    ImportanceName,
    PruneConfig,
    _gradient_kind,
    prunable_widths,
    prune_vit,
    widths_after,
)

__all__ = ["PruningSchedule"]

ScheduleName = Literal["linear", "cubic"]


def _schedule_fraction(schedule: Union[str, Callable[[float], float]], progress: float) -> float:
    """Fraction of the final pruning ratio reached at ``progress`` in (0, 1]."""
    if callable(schedule):
        return float(schedule(progress))
    if schedule == "linear":
        return progress
    return 1.0 - (1.0 - progress) ** 3  # cubic (Zhu & Gupta 2017): prune fast early, slow late


def _check_schedule(schedule: Any, num_steps: int) -> list[float]:
    """The fraction of the final ratio after each step; raises naming ``schedule`` unless it can be followed."""
    if not callable(schedule):
        check_choice(schedule, "schedule", ("linear", "cubic"), " or a callable progress -> fraction")
    fractions: list[Any] = []
    for step in range(1, num_steps + 1):
        value = schedule(step / num_steps) if callable(schedule) else _schedule_fraction(schedule, step / num_steps)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"schedule={schedule!r} returned {value!r} at progress {step}/{num_steps}: it must return the "
                "fraction of pruning_ratio reached, a number in [0, 1] (e.g. lambda progress: progress)."
            )
        fractions.append(float(value))
    if any(later < earlier for earlier, later in zip(fractions, fractions[1:])):
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


class _GoodState:
    """A training state judged within the accuracy budget: the model (tensors and modules, as
    :class:`ModelSnapshot`), the optimizers' and LR schedulers' states, the records and steps done."""

    def __init__(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", model: nn.Module, steps_done: int):
        self.target = model
        self.model = ModelSnapshot(model)
        strategy = trainer.strategy
        self.optimizers = [copy.deepcopy(opt.state_dict()) for opt in strategy.optimizers]
        self.schedulers = [copy.deepcopy(config.scheduler.state_dict()) for config in strategy.lr_scheduler_configs]
        self.records: list[Record] = list(recorded_edits(pl_module))
        self.steps_done = steps_done

    def edited_since(self, pl_module: "pl.LightningModule", kind: str) -> list[str]:
        """Kinds of the records other callbacks added since (a restore would silently undo them)."""
        known = {id(r) for r in self.records}
        return [str(r.get("kind")) for r in recorded_edits(pl_module) if id(r) not in known and r.get("kind") != kind]

    def restore(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
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


# ---------------------------------------------------------------------------- callback
class PruningSchedule(CompressionCallback):
    r"""Structured pruning of a ViT inside ``fit``: the model really gets smaller and faster.

    Removes the least important embedding channels, attention head dimensions
    (or whole heads) and MLP hidden channels with torch-pruning; classifier
    heads keep their outputs. With the default ``start_epoch=0`` and
    ``num_steps=1`` it prunes once at ``setup`` (before the optimizer exists)
    and the rest of fit fine-tunes; otherwise it prunes ``num_steps`` times from
    ``start_epoch`` to ``end_epoch`` following ``schedule`` and fine-tunes in
    between, rebuilding optimizers, LR schedulers and the DDP wrapper each time.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[PruningSchedule(0.5, end_epoch=4, num_steps=5)])
        trainer.fit(model, datamodule)
        model = load_compressed(MyModule, "last.ckpt")  # pruned shapes rebuilt, weights loaded

    Args:
        pruning_ratio: final fraction to remove, in (0, 1): of each layer's channels
            (``target="channels"``), or of the parameters / MACs (``target="params"``/``"macs"``).
        start_epoch: epoch of the first pruning step.
        end_epoch: epoch of the last one (default ``start_epoch``): steps are spread
            evenly over epochs ``start_epoch..end_epoch`` (``interval="epoch"``) or over
            their training steps (``interval="step"``).
        num_steps: number of pruning steps (default: one per epoch from start to end,
            or 1 with ``interval="step"``).
        schedule: ``"linear"``, ``"cubic"`` or ``f(progress) -> fraction of the final
            ratio`` with ``progress = k / num_steps`` for step ``k = 1..num_steps``.
        interval: prune at ``"epoch"`` starts or at training-batch (``"step"``) boundaries.
        importance: ``"l2"``, ``"l1"``, ``"taylor"``, ``"hessian"``, ``"random"`` or a
            ``torch_pruning`` importance object. Taylor/Hessian average the gradients of
            the ``gradient_batches`` training batches after a step falls due, then prune.
        global_pruning: rank channels across all layers (widths then differ per layer)
            instead of removing the same fraction in every layer.
        round_to: keep widths multiples of this (e.g. 8 for fast kernels).
        target: what ``pruning_ratio`` measures (``"channels"``, ``"params"``, ``"macs"``).
        prune_embed_dim / prune_attention / prune_heads / prune_mlp: what may be pruned;
            ``prune_heads=True`` removes whole heads instead of head dimensions.
        ignored_layers: attribute paths (inside the ViT) of layers whose outputs stay.
        gradient_batches: training batches whose gradients Taylor/Hessian importance averages.
        seed: seed of ``importance="random"`` (all ranks draw the same channels).
        example_input: one input batch to trace the model with; needed for models without
            a timm ``patch_embed`` (e.g. ``nn.TransformerEncoder`` ones).
        max_accuracy_drop: points of validation top-1 the pruned model may lose against the
            model as it entered fit (``1.0``: one point; needs validation data). Each step is
            judged after its recovery epochs (when the next step falls due, and at the end of
            training): a step that leaves the model beyond budget is rolled back (weights,
            optimizer and LR scheduler state as they were before it) and the schedule stops at
            the last good width. ``None``: no budget.
        model_attribute: attribute of the LightningModule holding the ViT (default: found).
    """

    order = 20
    KIND = "prune"
    EDITS_STRUCTURE = True
    LOG_PREFIX = "prune"

    def __init__(
        self,
        pruning_ratio: float = 0.5,
        *,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        num_steps: Optional[int] = None,
        schedule: Union[ScheduleName, Callable[[float], float]] = "linear",
        interval: Literal["epoch", "step"] = "epoch",
        importance: Union[ImportanceName, tp.importance.Importance] = "l2",
        global_pruning: bool = False,
        round_to: Optional[int] = None,
        target: Literal["channels", "params", "macs"] = "channels",
        prune_embed_dim: bool = True,
        prune_attention: bool = True,
        prune_heads: bool = False,
        prune_mlp: bool = True,
        ignored_layers: Sequence[str] = (),
        gradient_batches: int = 4,
        seed: int = 0,
        example_input: Optional[torch.Tensor] = None,
        max_accuracy_drop: Optional[float] = None,
        config: Optional[PruneConfig] = None,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        options = dict(
            pruning_ratio=pruning_ratio, target=target, importance=importance, global_pruning=global_pruning,
            round_to=round_to, prune_embed_dim=prune_embed_dim, prune_attention=prune_attention,
            prune_heads=prune_heads, prune_mlp=prune_mlp, ignored_layers=ignored_layers,
        )
        #: what is pruned (validated once); ``config=`` or the same keyword arguments
        self.config = config_or_options(config, PruneConfig, options, "PruningSchedule")
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
        self._fractions = _check_schedule(schedule, num_steps)
        check_int(gradient_batches, "gradient_batches", minimum=1, example="4")
        check_int(seed, "seed", example="0")
        check_example_input(example_input)
        check_max_accuracy_drop(max_accuracy_drop)
        self.max_accuracy_drop = max_accuracy_drop
        #: the budget stopped the schedule (a step was rolled back); saved with checkpoints
        self.stopped = False
        #: the steps the budget undid: ``{"step", "channel_ratio", "accuracy", "reference"}`` each
        self.rollbacks: list[dict[str, Any]] = []
        #: the last state judged within budget (or the model entering fit): what a rollback restores
        self._good: Optional[_GoodState] = None
        #: a step was made since :attr:`_good` and is not judged yet
        self._unjudged = False
        self._importance = self.config.make_importance()
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.num_steps = num_steps
        self.schedule = schedule
        self.interval = interval
        self.gradient_batches = gradient_batches
        self.seed = seed
        self.user_example_input = example_input
        self.steps_done = 0
        self._channel_ratio: Optional[float] = None  # pruning_ratio translated to channels
        self._example_input: Optional[torch.Tensor] = None
        self._original_widths: Optional[dict[str, list[int]]] = None
        self._original_params = 0
        self._grad_sums: dict[int, torch.Tensor] = {}
        self._grad_batches = 0
        self._gathering = False
        #: metrics of the last pruning step, logged at the next batch end (setup cannot log)
        self._last_metrics: dict[str, Optional[float]] = {}

    # ----------------------------------------------------------------- schedule
    def ratio_after_step(self, step: int) -> float:
        """Channel ratio reached after pruning step ``step`` (1-based)."""
        assert self._channel_ratio is not None
        return self._fractions[step - 1] * self._channel_ratio

    def _step_offsets(self, units: int) -> list[int]:
        return [math.floor(k * units / self.num_steps) for k in range(self.num_steps)]

    def _steps_due(self, trainer: "pl.Trainer", position_in_epoch: int = 0) -> int:
        """How many pruning steps should have run at this epoch / batch boundary."""
        if self.interval == "epoch":
            offsets = self._step_offsets(self.end_epoch - self.start_epoch + 1)
            position = trainer.current_epoch - self.start_epoch
        else:
            per_epoch = max(1, int(trainer.num_training_batches)) if math.isfinite(trainer.num_training_batches) else 1
            offsets = self._step_offsets((self.end_epoch - self.start_epoch + 1) * per_epoch)
            position = (trainer.current_epoch - self.start_epoch) * per_epoch + position_in_epoch
        return sum(1 for offset in offsets if offset <= position) if position >= 0 else 0

    def resume_config(self) -> dict[str, Any]:
        schedule = self.schedule if isinstance(self.schedule, str) else self._fractions
        return {
            **self.config.to_record(),
            "start_epoch": self.start_epoch,
            "end_epoch": self.end_epoch,
            "num_steps": self.num_steps,
            "interval": self.interval,
            "schedule": schedule,
        }

    @property
    def _needs_gradients(self) -> bool:
        return _gradient_kind(self._importance) is not None

    # ------------------------------------------------------------------- setup
    def _example(self, model: nn.Module, trainer: "pl.Trainer") -> torch.Tensor:
        if self.user_example_input is not None:
            device = next(model.parameters()).device
            example = self.user_example_input[:1].to(device)
            try:
                with torch.no_grad(), eval_mode(model):
                    model(example)
            except Exception as err:
                raise example_input_error(self.user_example_input, model, err) from err
            return example
        example = shape_example_input(model)
        if example is None:
            example = example_from_data(trainer)
        if example is not None:
            return example.to(next(model.parameters()).device)
        raise ValueError(
            f"Cannot build an example input for {type(model).__name__}: it states no input size and the Trainer "
            "has no data to take one batch from. Pass example_input=<one input batch> so that torch-pruning can "
            "trace the model."
        )

    def fit_plan(self, trainer: "pl.Trainer") -> list[PlanRow]:
        c = self.config
        unit = "epochs" if self.interval == "epoch" else "steps"
        when = (epochs_phrase(self.start_epoch, self.end_epoch, self.num_steps) if self.interval == "epoch"
                else f"{self.num_steps} steps over {unit}, epochs {self.start_epoch}-{self.end_epoch}")
        schedule = self.schedule if isinstance(self.schedule, str) else "custom"
        return [PlanRow("PruningSchedule", f"structured pruning, {c.pruning_ratio:g} of the {c.target} removed",
                        when, f"importance={c.importance_name}, schedule={schedule}" + budget_phrase(self))]

    def scheduled_epochs(self) -> dict[str, int]:
        return {"end_epoch": self.end_epoch}

    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        model = self.target(pl_module)
        self.config.check_model(model)
        self._example_input = self._example(model, trainer)
        self._reset_gradients()
        # budget state of this fit (a resumed fit gets the checkpoint's back in load_state_dict)
        self.stopped, self.rollbacks, self._good, self._unjudged = False, [], None, False
        # the steps already applied: replayed from the checkpoint, or made by an earlier fit of this module
        done = [
            r for r in recorded_edits(pl_module) if r.get("kind") == self.KIND and r.get("target") == self.target_path
        ]
        if done and "channel_ratio_final" not in done[-1]:
            raise RuntimeError(
                "PruningSchedule: the checkpoint being resumed holds a pruned model but no record of the pruning "
                "steps (its shapes were read from the weights), so the schedule cannot tell how far it got. Resume "
                "from a checkpoint saved with this package's records (a full ModelCheckpoint), or fine-tune the "
                "pruned model without PruningSchedule."
            )
        if done:
            self.check_same_config(done[-1].get("config"), "the pruning an earlier fit applied to this model")
            self.steps_done = int(done[-1]["step"])
            self._channel_ratio = done[-1]["channel_ratio_final"]
            self._original_widths = done[-1]["original_widths"]
            self._original_params = done[-1]["original_params"]
            return  # steps still due run at their epoch / batch boundary
        self.steps_done = 0
        self._original_widths = prunable_widths(model)
        self._original_params = count_parameters(model)
        self._channel_ratio = self._resolve_channel_ratio(model)
        self.config.check_ratio_prunes(self._original_widths, self._channel_ratio)
        if self.resumed(trainer):
            return  # the checkpoint's unpruned weights load after setup: due steps run at the first epoch start
        # steps due before any training (epoch 0 start) are free at setup, unless they need gradients
        if not self._needs_gradients and self.start_epoch == 0:
            due = self._steps_due_at_start() if self.interval == "epoch" else int(self.num_steps == 1)
            if due:
                self._budgeted_prune(trainer, pl_module, due)

    def _steps_due_at_start(self) -> int:
        units = self.end_epoch - self.start_epoch + 1
        return sum(1 for offset in self._step_offsets(units) if offset <= 0)

    def _resolve_channel_ratio(self, model: nn.Module) -> float:
        """Translate a params/MACs target into a channel ratio by bisection (pruning and restoring the model)."""
        if self.config.target == "channels":
            return self.config.pruning_ratio
        example = self._example_input
        measure = (lambda m: count_parameters(m)) if self.config.target == "params" else (
            lambda m: count_macs(m, example) or 0
        )
        assert self._original_widths is not None
        base = measure(model)

        def reduction(ratio: float) -> float:
            snapshot = ModelSnapshot(model)
            try:
                self._prune_model(model, ratio, importance="l2")
                return 1.0 - measure(model) / base
            finally:
                snapshot.restore()

        cut = self.config.cut_widths(self._original_widths)
        low, high = 0.0, min((width - 1) / width for width in cut.values())
        most = reduction(high)
        if most < self.config.pruning_ratio:
            raise ValueError(
                f"pruning_ratio={self.config.pruning_ratio!r} with target={self.config.target!r} is out of reach: keeping "
                f"one channel in every pruned layer removes {most:.3f} of the {self.config.target}. Pass "
                f"pruning_ratio <= {math.floor(most * 1000) / 1000:.3f}."
            )
        for _ in range(12):
            mid = (low + high) / 2
            if reduction(mid) < self.config.pruning_ratio:
                low = mid
            else:
                high = mid
        rank_zero_info(
            f"PruningSchedule: removing {self.config.pruning_ratio:.0%} of the {self.config.target} needs a channel ratio "
            f"of {high:.3f}."
        )
        return high

    # ---------------------------------------------------------------- pruning
    def _prune_model(
        self, model: nn.Module, ratio: float, importance: Any = None, keep: Optional[dict[str, list[int]]] = None
    ) -> dict[str, Any]:
        assert self._example_input is not None
        config = dataclasses.replace(
            self.config, pruning_ratio=ratio, target="channels", importance=importance or self._importance
        )
        return prune_vit(model, config, self._example_input, keep=keep)

    def _prune_to(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int) -> None:
        """Prune from the ratio of step ``self.steps_done`` to that of ``step``; on failure, restore the model."""
        model = self.target(pl_module)
        previous = self.ratio_after_step(self.steps_done) if self.steps_done else 0.0
        reached = self.ratio_after_step(step)
        # the fraction of the *current* channels to remove; a hair less guards int() flooring
        relative = max(0.0, 1.0 - (1.0 - reached) / (1.0 - previous) - 1e-6)
        if relative <= 0.0:
            self.steps_done = step
            return
        assert self._original_widths is not None and self._example_input is not None
        keep = widths_after(self._original_widths, reached, self.config.prune_heads)
        params_before = count_parameters(model)
        snapshot = ModelSnapshot(model)  # pruning works in place (the module may be the LightningModule itself)
        try:
            if _gradient_kind(self._importance) is not None:
                self._load_gradients(model)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + step)  # random importance: the same draw on every rank
                changes = self._prune_model(model, relative, keep=keep)
            params, macs = count_parameters(model), count_macs(model, self._example_input)
            ratio = self.config.fraction_removed(self._original_widths, model)
            self.record(
                pl_module,
                step=step,
                num_steps=self.num_steps,
                channel_ratio=reached,
                channel_ratio_final=self._channel_ratio,
                fraction_removed=ratio,
                original_widths=self._original_widths,
                original_params=self._original_params,
                params=params,
                macs=macs,
                modules=changes,
                config=self.resume_config(),
            )
        except Exception as err:
            snapshot.restore()
            raise RuntimeError(
                f"PruningSchedule step {step}/{self.num_steps} (to channel ratio {reached:.3f}) failed; the model was "
                f"restored to how it was before this step. Cause: {type(err).__name__}: {err}"
            ) from err
        finally:
            for param in model.parameters():
                param.grad = None
        self._reset_gradients()
        self.steps_done = step
        self._last_metrics = {
            **self._last_metrics,
            "params": params,
            "params_ratio": params / max(1, self._original_params),
            "ratio": ratio,
            "step": step,
            "macs": macs,
        }
        rank_zero_info(
            f"PruningSchedule step {step}/{self.num_steps}: {ratio:.3f} of the prunable channels removed, "
            f"params {params_before:,} -> {params:,}" + (f", MACs/image {macs:,}" if macs is not None else "")
        )

    def _maybe_prune(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", position_in_epoch: int) -> None:
        due = self._steps_due(trainer, position_in_epoch)
        if due <= self.steps_done or self.stopped:
            return
        if not self._judge(trainer, pl_module):  # the last step, after its recovery: kept or rolled back
            return
        if self._needs_gradients and self._grad_batches < self.gradient_batches:
            self._gathering = True  # gather gradients of the next batches, then prune (checked at each batch start)
            return
        self._budgeted_prune(trainer, pl_module, due)
        refresh_after_structural_change(trainer)

    # ------------------------------------------------------------------ budget
    def _budgeted_prune(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int) -> None:
        """:meth:`_prune_to`, keeping the state before it (with a budget) to roll back to."""
        if self.budget is not None:
            self._good = _GoodState(trainer, pl_module, self.target(pl_module), self.steps_done)
        records = len(recorded_edits(pl_module))
        self._prune_to(trainer, pl_module, step)
        self._unjudged = self.budget is not None and len(recorded_edits(pl_module)) > records

    def _judge(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> bool:
        """Judge the last step against the budget (rank zero measures, every rank decides the same).

        Within budget: True. Beyond: the step is rolled back to the state before it
        (weights, optimizer and scheduler state, records), the schedule stops, False.
        """
        budget = self.budget
        if budget is None or not self._unjudged:
            return True
        self._unjudged = False
        model = self.target(pl_module)
        assert self._original_widths is not None
        accuracy = self.validation_accuracy(trainer, model)
        ratio = self.config.fraction_removed(self._original_widths, model)
        if budget.allows(accuracy):
            rank_zero_info(f"PruningSchedule step {self.steps_done}/{self.num_steps} is within the accuracy budget: "
                           f"{budget.describe(accuracy)}.")
            self._last_metrics.update(accuracy=accuracy, accuracy_drop=budget.drop(accuracy))
            return True
        again = self.stopped  # the training since a rollback left the model beyond budget once more
        self.stopped = True
        undone = {"step": self.steps_done, "ratio": ratio, "accuracy": accuracy, "reference": budget.reference,
                  "after_rollback": again}
        others = self._good.edited_since(pl_module, self.KIND) if self._good is not None else []
        if self._good is None or others:
            why = "the state before it was not kept (this fit resumed after the step)" if self._good is None else (
                f"other callbacks edited the model since ({others}), which a rollback would silently undo")
            rank_zero_warn(f"PruningSchedule step {self.steps_done}/{self.num_steps} is beyond the accuracy budget "
                           f"({budget.describe(accuracy)}) but cannot be rolled back: {why}. The schedule stops here.")
            undone["rolled_back"] = False
        else:
            self._good.restore(trainer, pl_module)
            self.steps_done = self._good.steps_done
            undone["rolled_back"] = True
            kept = self.config.fraction_removed(self._original_widths, model)
            what = (
                "the training since the rollback left the model beyond the accuracy budget" if again
                else f"step {undone['step']}/{self.num_steps} ({ratio:.3f} of the prunable channels removed) is "
                "beyond the accuracy budget"
            )
            rank_zero_info(
                f"PruningSchedule: {what} ({budget.describe(accuracy)}): rolled back to {kept:.3f} removed (weights "
                "and optimizer state as they were when judged within budget); the schedule stops at that width."
            )
            self._last_metrics.update(ratio=kept, params=count_parameters(model))
            # training goes on at the kept width: judged again at the end, back to this state if it drifts out
            self._unjudged = True
        self.rollbacks.append(undone)
        self._last_metrics.update(rolled_back_step=undone["step"], accuracy=accuracy)
        return False

    def train_end_action(self) -> Optional[tuple[str, str]]:
        if self.max_accuracy_drop is None:
            return None
        return (f"PruningSchedule(max_accuracy_drop={self.max_accuracy_drop!r}) judges its last pruning step "
                "against the budget", "or pass max_accuracy_drop=None")

    def ordered_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The last step is judged when training ends (before quantization or the benchmark see the model)."""
        self._judge(trainer, pl_module)
        if self._last_metrics:
            self.log_metrics(trainer, self._last_metrics)
            self._last_metrics = {}

    def decisions(self) -> Optional[dict[str, Any]]:
        if self.max_accuracy_drop is None and not self.rollbacks:
            return None
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "reference_accuracy": self.budget_reference,
            "steps_kept": self.steps_done,
            "stopped_by_budget": self.stopped,
            "rolled_back": [dict(r) for r in self.rollbacks],
        }

    def ordered_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.interval == "epoch" and not self._needs_gradients:
            self._maybe_prune(trainer, pl_module, 0)

    def ordered_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step" or self._needs_gradients:
            self._maybe_prune(trainer, pl_module, batch_idx if self.interval == "step" else 0)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        if self._last_metrics:  # logged here: a step at setup or an epoch start cannot log yet
            self.log_metrics(trainer, self._last_metrics)
            self._last_metrics = {}

    # --------------------------------------------------------------- gradients
    def _reset_gradients(self) -> None:
        self._grad_sums = {}
        self._grad_batches = 0
        self._gathering = False

    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._gathering:
            return
        square = _gradient_kind(self._importance) == "hessian"
        with torch.no_grad():
            for param in self.target(pl_module).parameters():
                if param.grad is None:
                    continue
                grad = param.grad.detach()
                grad = grad * grad if square else grad
                total = self._grad_sums.get(id(param))
                if total is not None and total.shape == grad.shape:
                    total += grad
                else:
                    self._grad_sums[id(param)] = grad.clone()
        self._grad_batches += 1

    def _load_gradients(self, model: nn.Module) -> None:
        """Put the mean accumulated gradient of each parameter of ``model`` in its ``.grad``."""
        count = max(1, self._grad_batches)
        for param in model.parameters():
            total = self._grad_sums.get(id(param))
            param.grad = None if total is None else total / count

    # ------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        # read back at setup of a resumed fit, to refuse changed arguments also before the first pruning step;
        # the steps done and the ratio come from the structure records, which are authoritative
        return {
            "config": self.resume_config(),
            "budget_reference": self.budget_reference,
            "stopped": self.stopped,
            "rollbacks": [dict(r) for r in self.rollbacks],
            "unjudged": self._unjudged,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The budget's decisions (the replayed records are authoritative for the structure and the steps done)."""
        self.stopped = bool(state_dict.get("stopped", False))
        self.rollbacks = [dict(r) for r in state_dict.get("rollbacks", [])]
        self._unjudged = bool(state_dict.get("unjudged", False)) and self.max_accuracy_drop is not None
