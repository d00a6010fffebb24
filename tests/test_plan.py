"""CompressionPlan: a speed target and an accuracy budget in, a recipe chosen from measured parts, applied in fit."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, fast_trainer, run_ddp_script

from lightning_vitcompress import BenchmarkCallback, CompressionPlan, PruningSchedule, TokenMerging
from lightning_vitcompress.callbacks._plan_report import verify_choice
from lightning_vitcompress.callbacks._plan_setup import resumed_choice
from lightning_vitcompress.functional import merged_token_counts
from lightning_vitcompress.functional.plan import (
    PlanTimings,
    Recipe,
    SpeedModel,
    UnreachableTargetError,
    choose_recipe,
    measure_speed_model,
    plan_frontier,
    recipe_code,
)


def made_up_speed_model() -> SpeedModel:
    """Timings of the tiny model (65 tokens, 2 blocks) as if measured: pruning 0.5 halves everything, merging is
    free. Predicted: ToMe r=16 1.25x, prune 0.5 2.0x, both 2.5x (fixed numbers, so the choice is deterministic)."""
    full = {17: 0.1, 33: 0.2, 49: 0.3, 65: 0.4}
    timings = PlanTimings(
        whole={(0.0, None): 1.0, (0.5, None): 0.5},
        block={(0.0, None, None): full, (0.5, None, None): {n: t / 2 for n, t in full.items()}},
        merge={8: 0.0, 16: 0.0},
    )
    return SpeedModel(timings, tokens_in=65, num_prefix_tokens=1, depth=2, batch_size=4, runtime="torch", num_threads=1)


#: the fit-end timing of the final model against the base: one short round; no verification at setup (the made-up
#: speed model's figures are not this machine's, so timing the choice built whole would move it)
CHEAP = dict(rounds=1, min_run_time=0.005, num_threads=1, plot=False, verify=False)


def quick(**overrides):
    """A plan that times little: two ratios, one r, no int8, one short round."""
    options = dict(
        pruning_ratios=(0.0, 0.5),
        r_values=(16,),
        quantization=(),
        rounds=1,
        min_run_time=0.005,
        num_threads=1,
        plot=False,
    )
    return CompressionPlan(**{**options, **overrides})


def short_trainer(tmp_path, **overrides):
    """``fast_trainer`` with two training batches and one validation batch: the plan's fits need no more."""
    return fast_trainer(tmp_path, **{"limit_train_batches": 2, "limit_val_batches": 1, **overrides})


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_speed_model_predicts_from_parts_and_the_choice_reaches_the_target():
    speed = made_up_speed_model()
    assert speed.speedup(Recipe(0.5)) == pytest.approx(2.0)
    assert speed.speedup(Recipe(0.0, 16)) == pytest.approx(1.0 / 0.8)  # blocks at (65+49)/2 and (49+33)/2 tokens
    frontier = plan_frontier(speed)
    assert choose_recipe(frontier, 1.2).recipe == Recipe(0.0, 16)  # merging costs less accuracy than pruning
    assert choose_recipe(frontier, 1.5).recipe == Recipe(0.5, 0)
    assert choose_recipe(frontier, 2.3).recipe == Recipe(0.5, 16)
    with pytest.raises(UnreachableTargetError, match=r"fastest reachable is 2\.50x \(prune 0\.50 \+ ToMe r=16\)"):
        choose_recipe(frontier, 3.0)
    # "max": the fastest whose prior cost fits the budget (prune 0.5 costs 2.9 pt by the study's prior)
    assert choose_recipe(frontier, "max", max_cost=1.0).recipe == Recipe(0.0, 16)
    assert choose_recipe(frontier, "max", max_cost=None).recipe == Recipe(0.5, 16)
    code = recipe_code(Recipe(0.5, 16, None, "int8_dynamic"), 1.0, 2, 1, {"mode": "soft"})
    namespace: dict = {"model": torch.nn.Linear(2, 2)}
    exec(code, namespace)  # the report's code runs as written
    assert [type(cb).__name__ for cb in namespace["callbacks"]] == [
        "PruningSchedule",
        "TokenMerging",
        "DistillationTeacher",
        "QuantizeOnFit",
    ]


def test_measuring_the_real_model_takes_seconds_and_leaves_it_alone(tiny_classifier, digits):
    model = tiny_classifier().model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = next(iter(digits.val_dataloader()))[0][:4]
    speed = measure_speed_model(
        model,
        images,
        pruning_ratios=(0.0, 0.5),
        r_values=(16,),
        quantization=(),
        rounds=1,
        min_run_time=0.005,
        num_threads=1,
    )
    assert speed.tokens_in == 65 and speed.depth == 2
    assert set(speed.timings.whole) == {(0.0, None), (0.5, None)}
    assert {r.label() for r in speed.recipes()} == {"uncompressed", "ToMe r=16", "prune 0.50", "prune 0.50 + ToMe r=16"}
    assert all(s > 0 for s in map(speed.speedup, speed.recipes()))
    assert speed.seconds_measuring < 60
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_reachable_target_is_planned_and_fit_ends_with_the_recipe_applied(tmp_path, tiny_classifier, digits):
    module = tiny_classifier()
    before = parameter_count(module.model)
    plan = CompressionPlan(target_speedup=2.3, max_accuracy_drop=None, speed_model=made_up_speed_model(), **CHEAP)
    trainer = short_trainer(tmp_path, callbacks=[plan], max_epochs=2)
    trainer.fit(module, digits)
    assert plan.chosen.recipe == Recipe(0.5, 16) and plan.chosen.predicted_speedup >= 2.3
    assert [type(cb).__name__ for cb in plan.added] == ["PruningSchedule", "TokenMerging", "DistillationTeacher"]
    assert all(cb in trainer.callbacks for cb in plan.added)
    assert parameter_count(module.model) < before  # pruned
    assert merged_token_counts(module.model) == [49, 33]  # merging
    report = (tmp_path / "compression_plan.md").read_text()
    assert "Chosen: **prune 0.50 + ToMe r=16**" in report and "PruningSchedule(0.5" in report
    assert (tmp_path / "compression_plan_callbacks.py").read_text() == plan.report["code"]
    assert plan.report["measured_speedup"] > 0


def test_max_runs_the_fastest_recipe_the_budget_is_expected_to_allow(tmp_path, tiny_classifier, digits):
    plan = CompressionPlan(target_speedup="max", max_accuracy_drop=1.0, speed_model=made_up_speed_model(), **CHEAP)
    short_trainer(tmp_path, callbacks=[plan], max_epochs=1).fit(tiny_classifier(), digits)
    assert plan.chosen.recipe == Recipe(0.0, 16) and plan.goal == pytest.approx(1.25)
    assert plan.report["asked"] == "max" and plan.report["target_speedup"] == pytest.approx(1.25)
    kept = Recipe(0.0, plan.r)  # token merging may have been backed off: the prediction follows what was kept
    assert plan.report["predicted_kept_speedup"] == pytest.approx(made_up_speed_model().speedup(kept))
    report = (tmp_path / "compression_plan.md").read_text()
    assert "Target: max, 1.25x" in report and "whose prior accuracy cost is within max_accuracy_drop=1.0" in report


def test_a_choice_that_measures_short_of_the_target_built_whole_moves_on_to_the_next_candidate():
    frontier = plan_frontier(made_up_speed_model())
    chosen = choose_recipe(frontier, 1.2)  # ToMe r=16, predicted 1.25x
    measured = {Recipe(0.0, 16): 1.0, Recipe(0.5): 1.9, Recipe(0.5, 16): 2.6}
    kept, speedup, tried = verify_choice(frontier, 1.2, chosen, measured.__getitem__)
    assert (kept.recipe, speedup) == (Recipe(0.5), 1.9)  # the next cheapest that reaches 1.2x, and measures it
    assert [t["recipe"] for t in tried] == ["ToMe r=16", "prune 0.50"]
    slow = {Recipe(0.0, 16): 0.5, Recipe(0.5): 0.5, Recipe(0.5, 8): 0.8}  # the three cheapest that reach 1.2x
    with pytest.warns(
        UserWarning, match=r"measure ToMe r=16 0\.50x, prune 0\.50 0\.50x, prune 0\.50 \+ ToMe r=8 0\.80x"
    ):
        kept, speedup, tried = verify_choice(frontier, 1.2, chosen, slow.__getitem__)
    assert (kept.recipe, speedup, len(tried)) == (Recipe(0.5, 8), 0.8, 3)  # the fastest of the three, said
    # "max": the predicted fastest within the prior budget are timed, the fastest measured is kept
    fastest = choose_recipe(frontier, "max")  # prune 0.5 + ToMe r=16, then prune 0.5 + ToMe r=8 (2.2x)
    kept, speedup, tried = verify_choice(frontier, "max", fastest, lambda r: measured.get(r, 2.7), None, 2)
    assert (kept.recipe, speedup) == (Recipe(0.5, 8), 2.7) and len(tried) == 2
    budgeted = {Recipe(0.0, 16): 1.3, Recipe(0.0, 8): 1.4, Recipe(): 1.0}  # within 1 pt: no pruning
    kept, speedup, tried = verify_choice(
        frontier, "max", choose_recipe(frontier, "max", 1.0), budgeted.__getitem__, 1.0
    )
    assert (kept.recipe, speedup) == (Recipe(0.0, 8), 1.4) and tried[0]["recipe"] == "ToMe r=16"
    # a resume goes on with what the first fit trained, if it reaches the target; other arguments are refused
    assert resumed_choice(frontier, 1.2, chosen, Recipe(0.5)).recipe == Recipe(0.5)
    with pytest.raises(ValueError, match=r"chooses ToMe r=16, but the checkpoint being resumed trained prune 0\.50"):
        resumed_choice(frontier, 2.3, chosen, Recipe(0.5))
    fastest_within = choose_recipe(frontier, "max", 1.0)  # for "max": any recipe within the budget's prior
    assert resumed_choice(frontier, "max", fastest_within, Recipe(0.0, 8), 1.0).recipe == Recipe(0.0, 8)
    with pytest.raises(ValueError, match=r"trained prune 0\.50"):
        resumed_choice(frontier, "max", fastest_within, Recipe(0.5), 1.0)


def test_the_plan_measures_at_setup_when_given_no_speed_model(tmp_path, tiny_classifier, digits):
    plan = quick(target_speedup=1.0, max_accuracy_drop=None)
    short_trainer(tmp_path, callbacks=[plan], max_epochs=1).fit(tiny_classifier(), digits)
    assert plan.speed_model is not None and plan.speed_model.seconds_measuring > 0
    assert plan.chosen.predicted_speedup >= 1.0
    # and verified: the choice built whole and timed against the model entering fit
    assert [t["recipe"] for t in plan.verified] == [plan.chosen.recipe.label()]
    assert plan.verified_speedup == plan.verified[0]["measured_speedup"] > 0


def test_an_impossible_target_is_refused_at_setup_with_the_fastest_reachable(tmp_path, tiny_classifier, digits):
    module = tiny_classifier()
    before = parameter_count(module.model)
    with pytest.raises(UnreachableTargetError, match=r"target_speedup=50\.0 is beyond .* fastest reachable is \d"):
        short_trainer(tmp_path, callbacks=[quick(target_speedup=50.0)]).fit(module, digits)
    assert parameter_count(module.model) == before


def test_a_budget_broken_mid_fit_backs_token_merging_off(tmp_path, tiny_classifier, digits, monkeypatch):
    # force the break: the validation top-1 falls 5 points whenever tokens merge (a recipe that loses accuracy)
    def accuracy(self, trainer, model=None):
        return self.budget.reference - (0.05 if self.r else 0.0)

    monkeypatch.setattr(CompressionPlan, "validation_accuracy", accuracy)
    module = tiny_classifier()
    plan = CompressionPlan(target_speedup=1.2, max_accuracy_drop=0.0, speed_model=made_up_speed_model(), **CHEAP)
    short_trainer(tmp_path, callbacks=[plan], max_epochs=2).fit(module, digits)
    assert plan.chosen.recipe == Recipe(0.0, 16)
    assert [b["r"] for b in plan.backed_off] == [[16, 8], [8, 0]]  # after its recovery: the next r, then none
    assert {b["when"] for b in plan.backed_off} == {"train end"}
    assert merged_token_counts(module.model) == [65, 65]
    assert "TokenMerging(r=" not in plan.report["code"]  # the copyable recipe is what was kept


def test_a_pruning_step_beyond_the_budget_rolls_back_though_token_merging_came_after_it(
    tmp_path, tiny_classifier, digits, monkeypatch
):
    # force the break on pruning alone: top-1 falls 5 points while the model is pruned, whatever the merging
    module = tiny_classifier()
    unpruned = parameter_count(module.model)

    def accuracy(trainer, model):
        return 0.9 - (0.05 if parameter_count(model) < unpruned else 0.0)

    monkeypatch.setattr("lightning_vitcompress._base.measure_validation_accuracy", accuracy)
    monkeypatch.setattr("lightning_vitcompress.callbacks._budget.measure_validation_accuracy", accuracy)
    plan = CompressionPlan(target_speedup=2.3, max_accuracy_drop=1.0, speed_model=made_up_speed_model(), **CHEAP)
    short_trainer(tmp_path, callbacks=[plan], max_epochs=3).fit(module, digits)
    assert plan.chosen.recipe == Recipe(0.5, 16)
    pruning = next(cb for cb in plan.added if isinstance(cb, PruningSchedule))
    # the merging applied after the step (and the plan's back-offs) no longer block the rollback: it is undone
    # with the step, and merged again at the r in force
    assert [r["rolled_back"] for r in pruning.rollbacks] == [True]
    assert parameter_count(module.model) == unpruned
    assert merged_token_counts(module.model) == [65 - plan.r, 65 - 2 * plan.r]
    assert module.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert plan.report["kept"]["pruning_ratio"] == 0.0


def test_a_resumed_fit_keeps_the_first_fits_choice_and_back_off_without_measuring(
    tmp_path, tiny_classifier, digits, monkeypatch
):
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class StopAfterEpoch1(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    monkeypatch.setattr(
        CompressionPlan,
        "validation_accuracy",
        lambda self, trainer, model=None: self.budget.reference - (0.05 if self.r else 0.0),
    )
    first = CompressionPlan(target_speedup=1.2, max_accuracy_drop=0.0, speed_model=made_up_speed_model(), **CHEAP)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    short_trainer(
        tmp_path, callbacks=[first, StopAfterEpoch1(), checkpoints], max_epochs=3, enable_checkpointing=True
    ).fit(tiny_classifier(), digits)
    assert first.r == 0  # backed off at train end (the stop after epoch 1 ends training)

    def no_measuring(self, target):
        raise AssertionError("a resumed plan reuses the first fit's timings")

    monkeypatch.setattr(CompressionPlan, "_measure", no_measuring)
    resumed, module = CompressionPlan(target_speedup=1.2, max_accuracy_drop=0.0, **CHEAP), tiny_classifier()
    short_trainer(tmp_path, callbacks=[resumed], max_epochs=3).fit(
        module, digits, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed.chosen.recipe == Recipe(0.0, 16) and resumed.r == 0
    assert [b["r"] for b in resumed.backed_off] == [[16, 8], [8, 0]]
    assert merged_token_counts(module.model) == [65, 65]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_speedup=0.5), r"target_speedup=0\.5: pass a number >= 1"),
        (dict(target_speedup="fastest"), r"target_speedup='fastest': pass a number >= 1 .*or 'max'"),
        (dict(target_speedup="max", verify="yes"), r"verify='yes': pass True .* or False"),
        (dict(target_speedup=2.0, max_accuracy_drop=-1), r"max_accuracy_drop=-1: pass a number >= 0"),
        (dict(target_speedup=2.0, device="cuda"), r"device='cuda'.*device='cpu'"),
        (dict(target_speedup=2.0, runtime="onnx"), r"runtime='onnx': pass 'torch' or 'openvino'"),
        (dict(target_speedup=2.0, pruning_ratios=(0, 1.5)), r"pruning_ratios=\(0, 1\.5\): each a fraction in \[0, 1\)"),
        (dict(target_speedup=2.0, quantization=("int3",)), r"\['int3'\] are not configs; known: "),
        (dict(target_speedup=2.0, r_values=(0,)), r"r_values=0: pass positive integers"),
        (dict(target_speedup=2.0, runtime="openvino"), r"quantization=\('int8_dynamic',\) with runtime='openvino'"),
    ],
)
def test_bad_arguments_name_the_argument_and_what_works(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionPlan(**kwargs)


def test_a_budget_without_validation_data_is_refused_at_setup(tmp_path, tiny_classifier, digits):
    with pytest.raises(ValueError, match=r"CompressionPlan\(max_accuracy_drop=1\.0\).*no validation data"):
        short_trainer(tmp_path, callbacks=[quick(target_speedup=1.0)], limit_val_batches=0).fit(
            tiny_classifier(), digits
        )


def test_the_plan_must_come_first_and_alone(tmp_path, tiny_classifier, digits):
    bench = BenchmarkCallback(devices=["cpu"], plot=False)
    with pytest.raises(ValueError, match=r"comes after BenchmarkCallback.*Put CompressionPlan first"):
        short_trainer(tmp_path, callbacks=[bench, quick(target_speedup=1.0)]).fit(tiny_classifier(), digits)
    with pytest.raises(ValueError, match=r"configures PruningSchedule, TokenMerging itself"):
        short_trainer(tmp_path, callbacks=[quick(target_speedup=1.0), PruningSchedule(0.5), TokenMerging(4)]).fit(
            tiny_classifier(), digits
        )


def test_ddp_two_processes_plan_alike_and_train_in_lock_step(tmp_path):
    body = f"""
    import lightning as L
    from test_plan import made_up_speed_model
    from lightning_vitcompress import CompressionPlan
    from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
    from lightning_vitcompress.functional import merged_token_counts

    class Measured(CompressionPlan):  # rank zero "measures" (the fixed timings); the others get them by broadcast
        def _measure(self, target):
            assert trainer.is_global_zero
            return made_up_speed_model()

    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(**{TINY!r})
    plan = Measured(target_speedup=2.3, max_accuracy_drop=None, plot=False)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=OUT, callbacks=[plan],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    report(trainer, recipe=plan.chosen.recipe.label(), tokens=merged_token_counts(model.model),
           checksum=sum(p.double().sum().item() for p in model.parameters()))
    """
    rank0, rank1 = run_ddp_script(body, tmp_path)
    assert rank0["recipe"] == rank1["recipe"] == "prune 0.50 + ToMe r=16"
    assert rank0["tokens"] == rank1["tokens"] == [49, 33]
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-6)
