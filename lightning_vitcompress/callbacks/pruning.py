"""Structured pruning that really shrinks a Vision Transformer, inside ``fit``.

:class:`PruningSchedule` removes embedding channels, attention head dimensions
(or whole heads) and MLP hidden channels with `torch-pruning`_, so the model's
weight matrices get smaller and its forward faster (mask pruning gives neither).
It prunes once at the start of fit or step by step over a schedule, keeps the optimizer, LR scheduler
and DDP wrapper consistent after each step, and records every step in the checkpoint so that resuming
and :func:`load_compressed` rebuild the pruned shapes before the weights load.

The recipe, in the hooks: ``setup`` checks and (by default) prunes once; at each epoch or batch boundary
where a step falls due, the last step is judged against the accuracy budget (kept, or rolled back and the
schedule stops), gradients are gathered for Taylor/Hessian importance, then :meth:`PruningSchedule._prune`
makes the step; ``on_train_end`` judges the last step.

.. _torch-pruning: https://github.com/VainF/Torch-Pruning
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._checks import check_example_input, check_int, check_max_accuracy_drop
from lightning_vitcompress._options import passed_config, takes_config
from lightning_vitcompress._plan import PlanRow, budget_phrase, epochs_phrase
from lightning_vitcompress._training_state import refresh_after_structural_change
from lightning_vitcompress.callbacks._budget import judge
from lightning_vitcompress.callbacks._pruning_schedule import (
    GoodState,
    GradientMean,
    ScheduleName,
    channel_ratio_for,
    example_input_for,
    last_recorded_step,
    schedule_fractions,
    schedule_steps,
    steps_due,
    why_not_restorable,
)
from lightning_vitcompress.callbacks._pruning_step import StepResult, prune_step
from lightning_vitcompress.functional.measure import count_parameters
from lightning_vitcompress.functional.prune import PruneConfig, gradient_kind, prunable_widths

__all__ = ["PruningSchedule"]


@takes_config(PruneConfig, positional=("pruning_ratio",))
class PruningSchedule(CompressionCallback):
    r"""Structured pruning of a ViT inside ``fit``: the model really gets smaller and faster.

    Removes the least important embedding channels, attention head dimensions
    (or whole heads) and MLP hidden channels with torch-pruning; classifier
    heads keep their outputs. With the default ``start_epoch=0`` and
    ``num_steps=1`` it prunes once at ``setup`` (before the optimizer exists)
    and the rest of fit fine-tunes; otherwise it prunes ``num_steps`` times from
    ``start_epoch`` to ``end_epoch`` following ``schedule`` and fine-tunes in
    between, rebuilding optimizers, LR schedulers and the DDP wrapper each time.

    Example (a tiny ViT on scikit-learn's digits)::

        >>> import lightning as L
        >>> from lightning_vitcompress import PruningSchedule, load_compressed
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
        >>> trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[PruningSchedule(0.5, end_epoch=1, num_steps=2)])
        >>> trainer.fit(model, DigitsDataModule())
        >>> model.model.blocks[0].mlp.fc1  # was Linear(32, 128)
        Linear(in_features=16, out_features=64, bias=True)
        >>> trainer.save_checkpoint("pruned.ckpt")
        >>> load_compressed(DigitsClassifier, "pruned.ckpt").model.blocks[0].mlp.fc1.in_features  # shapes rebuilt
        16

    Args:
        start_epoch: epoch of the first pruning step.
        end_epoch: epoch of the last one (default ``start_epoch``): steps are spread
            evenly over epochs ``start_epoch..end_epoch`` (``interval="epoch"``) or over
            their training steps (``interval="step"``); ``pruning_ratio`` is reached at the last.
        num_steps: number of pruning steps (default: one per epoch from start to end,
            or 1 with ``interval="step"``).
        schedule: ``"linear"``, ``"cubic"`` or ``f(progress) -> fraction of the final
            ratio`` with ``progress = k / num_steps`` for step ``k = 1..num_steps``.
        interval: prune at ``"epoch"`` starts or at training-batch (``"step"``) boundaries.
        gradient_batches: training batches whose gradients Taylor/Hessian importance averages
            (gathered after a step falls due, then it prunes).
        seed: seed of ``importance="random"`` (all ranks draw the same channels).
        example_input: one input batch to trace the model with; needed for models without
            a timm ``patch_embed`` (e.g. ``nn.TransformerEncoder`` ones).
        max_accuracy_drop: points of validation top-1 the pruned model may lose against the
            model as it entered fit (``1.0``: one point; needs validation data). Each step is
            judged after its recovery epochs (when the next step falls due, and at the end of
            training): a step that leaves the model beyond budget is rolled back (weights,
            optimizer and LR scheduler state as they were before it) and the schedule stops at
            the last good width. ``None``: no budget.
        config: a :class:`~lightning_vitcompress.functional.PruneConfig` instead of its options
            (passing both is an error).
        model_attribute: attribute of the LightningModule holding the ViT (default: found).
    """

    order = 20
    KIND = "prune"
    EDITS_STRUCTURE = True
    LOG_PREFIX = "prune"

    def __init__(
        self,
        *args: Any,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        num_steps: Optional[int] = None,
        schedule: Union[ScheduleName, Callable[[float], float]] = "linear",
        interval: Literal["epoch", "step"] = "epoch",
        gradient_batches: int = 4,
        seed: int = 0,
        example_input: Optional[torch.Tensor] = None,
        max_accuracy_drop: Optional[float] = None,
        config: Optional[PruneConfig] = None,
        model_attribute: Optional[str] = None,
        **options: Any,
    ) -> None:
        super().__init__(model_attribute)
        #: what is pruned (validated once); ``config=`` or the same keyword arguments
        self.config = passed_config(config, args, options)
        end_epoch, num_steps = schedule_steps(start_epoch, end_epoch, num_steps, interval)
        self._fractions = schedule_fractions(schedule, num_steps)
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
        self._good: Optional[GoodState] = None
        #: a step was made since :attr:`_good` and is not judged yet
        self._unjudged = False
        #: ``(kinds, redo)``: edits of these kinds since a step do not block its rollback, which undoes them and calls
        #: ``redo(pl_module)`` (CompressionPlan's token merging)
        self.redo_after_rollback: Optional[tuple[tuple[str, ...], Callable[[pl.LightningModule], None]]] = None
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
        self._gradients = GradientMean()
        self._gathering = False
        #: metrics of the last pruning step, logged at the next batch end (setup cannot log)
        self._last_metrics: dict[str, Optional[float]] = {}

    # ------------------------------------------------------------------ hooks, in the order Lightning calls them
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the model, take the widths and the channel ratio, and prune the steps due before training."""
        model = self.target(pl_module)
        self.config.check_model(model)
        self._example_input = example_input_for(model, trainer, self.user_example_input)
        self._reset_gradients()
        # budget state of this fit (a resumed fit gets the checkpoint's back in load_state_dict)
        self.stopped, self.rollbacks, self._good, self._unjudged = False, [], None, False
        # the steps already applied: replayed from the checkpoint, or made by an earlier fit of this module
        done = last_recorded_step(pl_module, self.KIND, self.target_path)
        if done is not None:
            self.check_same_config(done.get("config"), "the pruning an earlier fit applied to this model")
            self.steps_done = int(done["step"])
            self._channel_ratio = done["channel_ratio_final"]
            self._original_widths = done["original_widths"]
            self._original_params = done["original_params"]
            return  # steps still due run at their epoch / batch boundary
        self.steps_done = 0
        self._original_widths = prunable_widths(model)
        self._original_params = count_parameters(model)
        self._channel_ratio = channel_ratio_for(model, self.config, self._example_input, self._original_widths)
        self.config.check_ratio_prunes(self._original_widths, self._channel_ratio)
        if self.resumed(trainer):
            return  # the checkpoint's unpruned weights load after setup: due steps run at the first epoch start
        # steps due before any training (epoch 0 start) are free at setup, unless they need gradients
        if not self._needs_gradients and self.start_epoch == 0:
            due = self._steps_due(None) if self.interval == "epoch" else int(self.num_steps == 1)
            if due:
                self._prune(trainer, pl_module, due)

    def ordered_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch" and not self._needs_gradients:
            self._prune_if_due(trainer, pl_module, 0)

    def ordered_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step" or self._needs_gradients:
            self._prune_if_due(trainer, pl_module, batch_idx if self.interval == "step" else 0)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Taylor/Hessian importance: add this batch's gradients (squared for Hessian) while a step waits."""
        if self._gathering:
            self._gradients.add(self.target(pl_module), square=gradient_kind(self._importance) == "hessian")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._last_metrics:  # logged here: a step at setup or an epoch start cannot log yet
            self.log_metrics(trainer, self._last_metrics)
            self._last_metrics = {}

    def ordered_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last step is judged when training ends (before quantization or the benchmark see the model)."""
        self._judge(trainer, pl_module)
        if self._last_metrics:
            self.log_metrics(trainer, self._last_metrics)
            self._last_metrics = {}

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

    # ------------------------------------------------------------------ what the pipeline asks
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

    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        c = self.config
        unit = "epochs" if self.interval == "epoch" else "steps"
        when = (
            epochs_phrase(self.start_epoch, self.end_epoch, self.num_steps)
            if self.interval == "epoch"
            else f"{self.num_steps} steps over {unit}, epochs {self.start_epoch}-{self.end_epoch}"
        )
        schedule = self.schedule if isinstance(self.schedule, str) else "custom"
        return [
            PlanRow(
                "PruningSchedule",
                f"structured pruning, {c.pruning_ratio:g} of the {c.target} removed",
                when,
                f"importance={c.importance_name}, schedule={schedule}" + budget_phrase(self),
            )
        ]

    def scheduled_epochs(self) -> dict[str, int]:
        return {"end_epoch": self.end_epoch}

    def train_end_action(self) -> Optional[tuple[str, str]]:
        if self.max_accuracy_drop is None:
            return None
        return (
            f"PruningSchedule(max_accuracy_drop={self.max_accuracy_drop!r}) judges its last pruning step "
            "against the budget",
            "or pass max_accuracy_drop=None",
        )

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

    # ------------------------------------------------------------------ helpers
    def ratio_after_step(self, step: int) -> float:
        """Channel ratio reached after pruning step ``step`` (1-based)."""
        assert self._channel_ratio is not None
        return self._fractions[step - 1] * self._channel_ratio

    def _steps_due(self, trainer: Optional[pl.Trainer], position_in_epoch: int = 0) -> int:
        """How many pruning steps should have run at this boundary (``None``: at the start of fit)."""
        return steps_due(
            trainer,
            position_in_epoch,
            start_epoch=self.start_epoch,
            end_epoch=self.end_epoch,
            num_steps=self.num_steps,
            interval=self.interval,
        )

    @property
    def _needs_gradients(self) -> bool:
        return gradient_kind(self._importance) is not None

    def _prune_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule, position_in_epoch: int) -> None:
        """At a boundary where a step falls due: judge the last step, gather gradients if needed, prune."""
        due = self._steps_due(trainer, position_in_epoch)
        if due <= self.steps_done or self.stopped:
            return
        if not self._judge(trainer, pl_module):  # the last step, after its recovery: kept or rolled back
            return
        if self._needs_gradients and self._gradients.batches < self.gradient_batches:
            self._gathering = True  # gather gradients of the next batches, then prune (checked at each batch start)
            return
        self._prune(trainer, pl_module, due)
        refresh_after_structural_change(trainer)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Prune from the ratio of step ``self.steps_done`` to that of ``step``; on failure, restore the model.

        With a budget the state before it is kept, to roll back to when :meth:`_judge` finds it beyond.
        """
        model = self.target(pl_module)
        if self.budget is not None:
            self._good = GoodState(trainer, pl_module, model, self.steps_done)
        previous = self.ratio_after_step(self.steps_done) if self.steps_done else 0.0
        reached = self.ratio_after_step(step)
        assert self._original_widths is not None and self._example_input is not None

        def record(result: StepResult) -> None:
            self.record(
                pl_module,
                step=step,
                num_steps=self.num_steps,
                channel_ratio=reached,
                channel_ratio_final=self._channel_ratio,
                fraction_removed=result.ratio,
                original_widths=self._original_widths,
                original_params=self._original_params,
                params=result.params,
                macs=result.macs,
                modules=result.changes,
                config=self.resume_config(),
            )

        result = prune_step(
            model,
            self.config,
            importance=self._importance,
            example=self._example_input,
            original_widths=self._original_widths,
            previous=previous,
            reached=reached,
            seed=self.seed,
            step=step,
            num_steps=self.num_steps,
            gradients=self._gradients if self._needs_gradients else None,
            record=record,
        )
        self.steps_done = step
        if result is None:  # nothing to remove between the two ratios
            return
        self._reset_gradients()
        self._unjudged = self.budget is not None
        self._last_metrics = {**self._last_metrics, **result.metrics(self._original_params), "step": step}

    def _judge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Judge the last step against the budget (rank zero measures, every rank decides the same).

        Within budget: True. Beyond: :meth:`_roll_back` to the state before it, the schedule stops, False.
        """
        budget = self.budget
        if budget is None or not self._unjudged:
            return True
        self._unjudged = False
        verdict = judge(trainer, budget, self.target(pl_module))
        if verdict.within:
            rank_zero_info(
                f"PruningSchedule step {self.steps_done}/{self.num_steps} is within the accuracy budget: "
                f"{verdict.describe()}."
            )
            self._last_metrics.update(verdict.metrics())
            return True
        self._roll_back(trainer, pl_module, verdict.accuracy, verdict.describe())
        return False

    def _roll_back(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, accuracy: Optional[float], described: str
    ) -> None:
        """Put the model back as it was when last judged within budget (or say why it cannot); stop the schedule."""
        model = self.target(pl_module)
        assert self._original_widths is not None and self.budget is not None
        ratio = self.config.fraction_removed(self._original_widths, model)
        again = self.stopped  # the training since a rollback left the model beyond budget once more
        self.stopped = True
        undone = {
            "step": self.steps_done,
            "ratio": ratio,
            "accuracy": accuracy,
            "reference": self.budget.reference,
            "after_rollback": again,
        }
        redone, redo = self.redo_after_rollback or ((), None)
        why = why_not_restorable(self._good, pl_module, self.KIND, redone)
        if why is not None or self._good is None:
            rank_zero_warn(
                f"PruningSchedule step {self.steps_done}/{self.num_steps} is beyond the accuracy budget "
                f"({described}) but cannot be rolled back: {why}. The schedule stops here."
            )
            undone["rolled_back"] = False
        else:
            self._good.restore(trainer, pl_module)
            if redo is not None:
                redo(pl_module)
            self.steps_done = self._good.steps_done
            undone["rolled_back"] = True
            kept = self.config.fraction_removed(self._original_widths, model)
            what = (
                "the training since the rollback left the model beyond the accuracy budget"
                if again
                else f"step {undone['step']}/{self.num_steps} ({ratio:.3f} of the prunable channels removed) is "
                "beyond the accuracy budget"
            )
            rank_zero_info(
                f"PruningSchedule: {what} ({described}): rolled back to {kept:.3f} removed (weights "
                "and optimizer state as they were when judged within budget); the schedule stops at that width."
            )
            self._last_metrics.update(ratio=kept, params=count_parameters(model))
            # training goes on at the kept width: judged again at the end, back to this state if it drifts out
            self._unjudged = True
        self.rollbacks.append(undone)
        self._last_metrics.update(rolled_back_step=undone["step"], accuracy=accuracy)

    def _reset_gradients(self) -> None:
        self._gradients = GradientMean()
        self._gathering = False
