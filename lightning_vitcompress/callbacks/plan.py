"""CompressionPlan: ask for a speedup and an accuracy budget; fit finds the recipe, applies it and backs off.

The speed model is :mod:`lightning_vitcompress.functional.plan_speed`, the candidates and the choice
:mod:`lightning_vitcompress.functional.plan`; setup checks in ``_plan_setup.py``, the report in ``_plan_report.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._lightning import callbacks_of
from lightning_vitcompress._plan import PlanRow
from lightning_vitcompress._structure import record_edit
from lightning_vitcompress.callbacks._plan_report import (
    Timing,
    built_speedup,
    measured_speedup,
    verify_choice,
    why_chosen,
    write_plan_report,
)
from lightning_vitcompress.callbacks._plan_setup import (
    DISTILLATION,
    PLANNED,
    check_candidates,
    check_goal,
    check_options,
    check_plan_fit,
    example_batch,
    recipe_callbacks,
    resumed_choice,
    saved_plan_state,
)
from lightning_vitcompress.callbacks.pruning import PruningSchedule
from lightning_vitcompress.callbacks.token_merging import TokenMerging
from lightning_vitcompress.functional.plan import (
    NUM_LANDMARKS,
    PRUNING_RATIOS,
    Candidate,
    Recipe,
    SpeedModel,
    choose_recipe,
    format_frontier,
    measure_speed_model,
    plan_frontier,
    recipe_code,
)
from lightning_vitcompress.functional.token_merging import TokenMergingConfig, merge_tokens

__all__ = ["CompressionPlan"]


class CompressionPlan(CompressionCallback):
    """Make the model ``target_speedup`` times faster on this machine, losing at most ``max_accuracy_drop`` points.

    At ``setup`` it times the parts of the real model on this CPU (the whole model and one block per pruning
    ratio and int8 config, at a few token counts; the token-merging step; Nystrom blocks where the sequence is
    long enough), predicts every candidate recipe's speed from them, picks the recipe cheapest in accuracy (the
    study's measured costs, as a prior) predicted to reach the target, and times that recipe built whole to
    check. It then adds the recipe's plain callbacks to the Trainer (``PruningSchedule``, ``TokenMerging``,
    ``NystromSwap``, ``QuantizeOnFit``, and ``DistillationTeacher`` with a frozen copy of the model as it
    entered fit), so the fit trains the compressed model against the uncompressed one.

    The budget is checked on the validation data at each step: pruning steps beyond it are rolled back
    (``PruningSchedule(max_accuracy_drop=...)``), Nystrom blocks swapped back, int8 layers kept in float (their
    own budgets); token merging, which has no budget of its own, is backed off here at train end, after its
    recovery, to the next smaller ``r`` until the model is within budget (not at epoch starts: a fit's first
    epochs dip below the model entering fit whatever merges, and the dip is not the merging's).

    At ``fit`` end it writes ``compression_plan.md`` (the frontier, the recipe and why, the final speed and
    accuracy against the target), the recipe as plain callbacks (``compression_plan_callbacks.py``) and
    ``compression_plan.png`` to ``output_dir`` (default: the Trainer's log dir), and logs ``plan/*``.

    Why one callback that adds the others, not a function returning them: the recipe depends on the model, the
    data and the machine, all known only at ``setup``; one entry in ``Trainer(callbacks=[...])`` composes with
    ``BenchmarkCallback`` and ``ExportOnFit`` like any other. It must come before them in the list (it is
    refused at ``setup`` otherwise), and the callbacks it configures must not be in the list too.

    Args:
        target_speedup: wanted throughput over the uncompressed model (fp32, same runtime), e.g. 4.0; or
            ``"max"``: the fastest recipe whose prior accuracy cost is within ``max_accuracy_drop``.
        max_accuracy_drop: points of validation top-1 the model may lose against the model entering fit
            (None: no checks, no back-off). Needs validation data.
        device: where the model will be deployed; ``"cpu"`` (the only one planned for now).
        runtime: ``"torch"`` (eager) or ``"openvino"`` (float parts timed through OpenVINO).
        pruning_ratios: candidate ratios (0 is always one).
        r_values: candidate token-merging ``r``; None: quarters of the largest ``r`` the model takes; ``()``: none.
        num_landmarks: candidate Nystrom landmark counts (each tried only where tokens > 4x landmarks).
        quantization: candidate int8 configs (names in ``QUANTIZATION_CONFIGS``); ``()``: none.
        batch_size: images per timed batch.
        num_threads: threads of the timing (None: torch's current count).
        distill: train against a frozen copy of the model entering fit (``DistillationTeacher``).
        distillation: its options (None: ``mode="soft", alpha=0.5, temperature=2.0``).
        pruning_steps: a pruning recipe is reached in this many steps (one per epoch, fewer in short fits), so a
            step beyond the budget rolls back to the last good width rather than to no pruning.
        speed_model: a :class:`~lightning_vitcompress.functional.plan.SpeedModel` measured before, reused instead of
            timing at setup (the same model and machine).
        verify: time the chosen recipe built whole (untrained) at setup against the model entering fit, in seconds:
            a target it misses by over 10% moves the choice on to the next candidates (three in all, else the
            fastest measured, warned about); for ``"max"`` the fastest measured of three becomes the goal.
        rounds, min_run_time: interleaved timing rounds, and the seconds each part runs per round.
        plot: write the frontier plot (needs matplotlib).
        output_dir: where the report goes (None: the Trainer's log dir or ``default_root_dir``).
        model_attribute: attribute holding the ViT (None finds it).

    Example (a tiny model, one epoch, and a target every recipe reaches, so it runs in seconds and the
    uncompressed model, cheapest, is chosen; ask a real model for e.g. ``target_speedup=4.0``):

        >>> from pathlib import Path
        >>> import lightning as L
        >>> from lightning_vitcompress import CompressionPlan
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> plan = CompressionPlan(target_speedup=1.0, max_accuracy_drop=1.0, pruning_ratios=(0, 0.5), r_values=(2,),
        ...                        quantization=(), rounds=1, min_run_time=0.005, plot=False)
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[plan])  # first in the list; the datamodule has a val_dataloader
        >>> trainer.fit(DigitsClassifier(embed_dim=32, depth=2, num_heads=4), DigitsDataModule())
        >>> plan.chosen.recipe.label(), [type(cb).__name__ for cb in plan.added]
        ('uncompressed', ['DistillationTeacher'])
        >>> sorted(path.name for path in Path(".").glob("compression_plan*"))
        ['compression_plan.json', 'compression_plan.md', 'compression_plan_callbacks.py']
    """

    order = 5
    LOG_PREFIX = "plan"

    def __init__(
        self,
        target_speedup: Union[float, Literal["max"]],
        max_accuracy_drop: Optional[float] = 1.0,
        device: str = "cpu",
        runtime: Literal["torch", "openvino"] = "torch",
        *,
        pruning_ratios: Sequence[float] = PRUNING_RATIOS,
        r_values: Optional[Sequence[int]] = None,
        num_landmarks: Sequence[int] = NUM_LANDMARKS,
        quantization: Sequence[str] = ("int8_dynamic",),
        batch_size: int = 4,
        num_threads: Optional[int] = None,
        distill: bool = True,
        distillation: Optional[dict[str, Any]] = None,
        pruning_steps: int = 2,
        speed_model: Optional[SpeedModel] = None,
        verify: bool = True,
        rounds: int = 3,
        min_run_time: float = 0.05,
        plot: bool = True,
        output_dir: Optional[Union[str, Path]] = None,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        check_goal(target_speedup, max_accuracy_drop, device, runtime, quantization)
        ratios, r_values, landmarks, configs = check_candidates(pruning_ratios, r_values, num_landmarks, quantization)
        check_options(
            batch_size, pruning_steps, rounds, num_threads, min_run_time, distill, distillation, speed_model, verify
        )
        self.target_speedup: Union[float, Literal["max"]] = "max" if target_speedup == "max" else float(target_speedup)
        #: the speedup aimed at: ``target_speedup``, or for ``"max"`` the chosen recipe's, measured built whole at
        #: setup (its prediction with ``verify=False``)
        self.goal: float = 0.0 if target_speedup == "max" else float(target_speedup)
        self.max_accuracy_drop = None if max_accuracy_drop is None else float(max_accuracy_drop)
        self.device, self.runtime = device, runtime
        self.pruning_ratios, self.r_values, self.num_landmarks, self.quantization = ratios, r_values, landmarks, configs
        self.batch_size, self.num_threads, self.distill = batch_size, num_threads, distill
        self.distillation = dict(DISTILLATION if distillation is None else distillation)
        self.pruning_steps, self.speed_model = pruning_steps, speed_model
        self.verify = verify
        #: the chosen recipe's speedup measured whole at setup (``verify``), and each recipe timed so
        self.verified_speedup: Optional[float] = None
        self.verified: list[dict[str, Any]] = []
        self.rounds, self.min_run_time, self.plot, self.output_dir = rounds, min_run_time, plot, output_dir
        #: what setup decided: the frontier, the chosen candidate, the callbacks added
        self.frontier: list[Candidate] = []
        self.chosen: Optional[Candidate] = None
        self.added: list[Callback] = []
        #: the token-merging r in force (backed off from the recipe's) and each back-off
        self.r: int = 0
        self.backed_off: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {}
        self._baseline: Optional[torch.nn.Module] = None
        self._example: Optional[torch.Tensor] = None
        self._pruning_schedule_steps = (1, 0)
        self._planned_for: Optional[int] = None
        self._given_speed_model = speed_model

    # ----------------------------------------------------------------------- hooks, in the order Lightning calls them
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._planned_for != id(trainer):  # once per Trainer (a new one plans afresh)
            self._plan(trainer, pl_module)
        super().setup(trainer, pl_module, stage)  # the pipeline's setup, the added callbacks included

    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._planned_for != id(trainer):  # another callback's setup ran the pipeline first
            self._plan(trainer, pl_module)  # raises: CompressionPlan must come first

    def ordered_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_metrics(trainer, {"r": self.r})

    def ordered_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._back_off(trainer, pl_module, "train end")

    def ordered_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.chosen is None or self._baseline is None:
            return
        final = self.target(pl_module)
        accuracy = self.validation_accuracy(trainer) if self.budget is not None else None
        measured = None
        if trainer.is_global_zero:
            assert self._example is not None  # set at setup, with _baseline
            measured = measured_speedup(self._baseline, final, self._example, self._timing())
        budget = self.budget
        self.report = {
            "target_speedup": self.goal,
            "asked": self.target_speedup,
            "chosen": self.chosen.recipe.as_dict(),
            "label": self.chosen.recipe.label(),
            "kept_label": self._kept().label(),
            "predicted_speedup": self.chosen.predicted_speedup,
            "verified_speedup": self.verified_speedup,
            "verified": self.verified,
            "predicted_kept_speedup": self.speed_model.speedup(self._kept()) if self.speed_model else None,
            "prior_accuracy_cost": self.chosen.accuracy_cost,
            "why": why_chosen(self.chosen, self.frontier, self.target_speedup, self.max_accuracy_drop),
            "measured_speedup": measured,
            "r_final": self.r,
            "backed_off": self.backed_off,
            "reference_accuracy": None if budget is None else budget.reference,
            "final_accuracy": accuracy,
            "accuracy_drop": None if budget is None or accuracy is None else budget.drop(accuracy),
            "max_accuracy_drop": self.max_accuracy_drop,
            "kept": self._kept().as_dict(),  # after roll-backs and back-offs
            "decisions": {type(cb).__name__: d for cb in self.added if (d := getattr(cb, "decisions", lambda: None)())},
            "skipped": self.speed_model.skipped if self.speed_model else {},
            "code": self._code(trainer),
        }
        self.log_metrics(
            trainer,
            {
                "target_speedup": self.goal,
                "predicted_speedup": self.chosen.predicted_speedup,
                "measured_speedup": measured,
                "accuracy_drop": self.report["accuracy_drop"],
                "r": self.r,
            },
        )
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir: a collective call
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(
                    {"plan/recipe": self.report["kept_label"], "plan/callbacks": self.report["code"]}
                )
            write_plan_report(folder, self.report, self.frontier, self.chosen, self.batch_size, self.plot)
        self._baseline = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "recipe": None if self.chosen is None else self.chosen.recipe.as_dict(),
            "speed_model": None if self.speed_model is None else self.speed_model.as_dict(),
            "r": self.r,
            "backed_off": self.backed_off,
            "budget_reference": self.budget_reference,
            "verified_speedup": self.verified_speedup,
        }

    # ----------------------------------------------------------------------------------------- what the pipeline asks
    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        if self.chosen is None:
            return []
        chosen = self.chosen
        return [
            PlanRow(
                "CompressionPlan",
                f"chose {chosen.recipe.label()} for {self._asked()}",
                "setup (measured and verified), back-off at train end",
                f"predicted {chosen.predicted_speedup:.2f}x, prior cost {chosen.accuracy_cost:.2f} pt",
            )
        ]

    def decisions(self) -> Optional[dict[str, Any]]:
        if self.chosen is None:
            return None
        return {
            "chosen": self.chosen.recipe.label(),
            "predicted_speedup": self.chosen.predicted_speedup,
            "token_merging_backed_off": self.backed_off,
        }

    # -------------------------------------------------------------------------------------------------------- helpers
    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_plan_fit(trainer, self, PLANNED, self.max_accuracy_drop)
        self._planned_for, self.backed_off, self.report = id(trainer), [], {}
        self.speed_model = self._given_speed_model  # a later fit of an already compressed model times it afresh
        target = self.target(pl_module)
        self._baseline = copy.deepcopy(target).cpu().eval()
        self._example = example_batch(trainer, self.batch_size)
        saved = saved_plan_state(trainer, self.state_key)
        if saved is not None and self.speed_model is None:  # a resume plans from the first fit's timings
            self.speed_model = SpeedModel.from_dict(saved["speed_model"])
        speed = self.speed_model
        if speed is None:
            message: Any = None
            if trainer.is_global_zero:  # one process measures (ranks on one machine would disturb each other)
                rank_zero_info(
                    f"CompressionPlan: timing the parts of the model on this CPU (batch "
                    f"{self.batch_size}, {self.runtime})..."
                )
                try:
                    message = self._measure(target)
                except Exception as err:
                    message = f"{type(err).__name__}: {err}"
            message = trainer.strategy.broadcast(message, src=0)
            if isinstance(message, str):
                raise RuntimeError(f"CompressionPlan could not time the model: {message}")
            speed = message
        self.speed_model = speed
        self.frontier = plan_frontier(speed)
        # UnreachableTargetError names the fastest; "max": the fastest within the budget's prior
        self.chosen = choose_recipe(self.frontier, self.target_speedup, self.max_accuracy_drop)
        self.verified_speedup = None
        if self.verify and saved is None:
            self._verify(trainer)
        self.r = self.chosen.recipe.r
        if saved is not None:  # the first fit's choice (its verification may have moved it on) and back-offs stand
            trained, budget = Recipe(**saved["recipe"]), self.max_accuracy_drop
            self.chosen = resumed_choice(self.frontier, self.target_speedup, self.chosen, trained, budget)
            self.verified_speedup = saved.get("verified_speedup")
            self.r, self.backed_off = int(saved["r"]), list(saved["backed_off"])
        if self.target_speedup == "max":  # the figure measured built whole, else the prediction
            self.goal = self.verified_speedup or self.chosen.predicted_speedup
        teacher = copy.deepcopy(self._baseline) if self.distill else None
        steps = self._pruning_schedule(trainer) if self.chosen.recipe.pruning_ratio else (1, 0)
        self.added = recipe_callbacks(
            self.chosen.recipe,
            self.r,
            self.max_accuracy_drop,
            steps,
            teacher,
            self.distillation,
            lambda module: self._merge_at(module, self.r),  # after a rollback undid it
            model_attribute=self.model_attribute,
        )
        callbacks = callbacks_of(trainer)
        callbacks[callbacks.index(self) + 1 : callbacks.index(self) + 1] = self.added
        rank_zero_info(
            f"CompressionPlan: {self.chosen.recipe.label()}, predicted {self.chosen.predicted_speedup:.2f}x "
            f"(target {self._asked()}), prior cost {self.chosen.accuracy_cost:.2f} pt; timed in "
            f"{speed.seconds_measuring:.1f} s.\n{format_frontier(self.frontier, self.chosen)}"
        )

    def _measure(self, target: torch.nn.Module) -> SpeedModel:
        assert self._example is not None
        return measure_speed_model(
            target,
            self._example,
            pruning_ratios=self.pruning_ratios,
            r_values=self.r_values,
            num_landmarks=self.num_landmarks,
            quantization=self.quantization,
            runtime=self.runtime,
            num_threads=self.num_threads,
            rounds=self.rounds,
            min_run_time=self.min_run_time,
            calibration_inputs=[self._example],
        )

    def _verify(self, trainer: pl.Trainer) -> None:
        """Time the choice built whole (untrained) against the model entering fit: :func:`verify_choice` keeps it,
        or moves on (a numeric target missed by over 10%; for ``"max"``, the fastest measured of three)."""
        assert self.chosen is not None and self._baseline is not None and self._example is not None
        baseline, example = self._baseline, self._example

        def timed(recipe: Recipe) -> float:
            return built_speedup(trainer, baseline, recipe, example, self._timing())

        self.chosen, self.verified_speedup, self.verified = verify_choice(
            self.frontier, self.target_speedup, self.chosen, timed, self.max_accuracy_drop
        )

    def _timing(self) -> Timing:
        """How whole models are timed: at the speed model's thread count."""
        threads = self.speed_model.num_threads if self.speed_model else torch.get_num_threads()
        return Timing(self.runtime, threads, self.rounds, self.min_run_time)

    def _pruning_schedule(self, trainer: pl.Trainer) -> tuple[int, int]:
        """``(num_steps, end_epoch)``: steps one per epoch, each followed by at least one recovery epoch."""
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else 1
        steps = max(1, min(self.pruning_steps, max_epochs - 1))
        self._pruning_schedule_steps = (steps, steps - 1)
        return steps, steps - 1

    def _back_off(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        """While the model is beyond the budget, merge fewer tokens (the next smaller candidate ``r``, then none)."""
        budget, speed = self.budget, self.speed_model
        if budget is None or speed is None or not self.r:
            return
        accuracy = self.validation_accuracy(trainer)  # rank zero measures; every rank decides alike
        while self.r and not budget.allows(accuracy):
            smaller = max((r for r in speed.timings.merge if r < self.r), default=0)  # the next candidate
            before = self.r
            self._merge_at(pl_module, smaller)
            after = self.validation_accuracy(trainer)
            self.backed_off.append({"when": when, "r": [before, smaller], "accuracy": [accuracy, after]})
            rank_zero_info(
                f"CompressionPlan: at {when} the model is beyond the budget ({budget.describe(accuracy)}): "
                f"token merging backed off r={before} -> r={smaller} ({budget.describe(after)})."
            )
            accuracy = after

    def _merge_at(self, pl_module: pl.LightningModule, r: int) -> None:
        """Merge ``r`` tokens per block from now on (recorded, so a checkpoint replays it)."""
        plan = merge_tokens(self.target(pl_module), r)
        config = {**TokenMergingConfig(r=r).as_record(), "start_epoch": 0}
        record_edit(pl_module, {"kind": "tome", "target": self.target_path or "", **plan, "config": config})
        for callback in self.added:
            if isinstance(callback, TokenMerging):
                callback.plan = {**plan, "config": config}
        self.r = r

    def _asked(self) -> str:
        """The target as asked: ``4.00x``, or ``max (1.52x)`` once chosen."""
        return f"{self.goal:.2f}x" if self.target_speedup != "max" else f"max ({self.goal:.2f}x)"

    def _kept(self) -> Recipe:
        """The recipe as the fit left it: pruning steps rolled back and token merging backed off taken out."""
        assert self.chosen is not None
        chosen, ratio = self.chosen.recipe, self.chosen.recipe.pruning_ratio
        for callback in self.added:
            if isinstance(callback, PruningSchedule) and (decisions := callback.decisions()):
                steps, _ = self._pruning_schedule_steps
                ratio = round(ratio * decisions["steps_kept"] / steps, 4)  # the linear schedule's
        return Recipe(ratio, self.r, chosen.num_landmarks, chosen.quantization)

    def _code(self, trainer: pl.Trainer) -> str:
        recipe = self._kept()
        steps, end_epoch = self._pruning_schedule(trainer)
        distill = self.distillation if self.distill else None
        return recipe_code(recipe, self.max_accuracy_drop, steps, end_epoch, distill)
