"""The Fashion-MNIST study's bookkeeping (examples/fashion_mnist_study.py): pairing, resume, table. No training."""

from __future__ import annotations

import json

import pytest
from helpers import example_module


@pytest.fixture(scope="module")
def study():
    with example_module("fashion_mnist_study") as module:
        yield module


def _cell(study, recipe: str, seed: int, top1: float) -> dict:
    control = (
        None
        if recipe in (study.VANILLA, study.CONTROL)
        else (study.VANILLA if recipe == "int8 dynamic (PTQ)" else study.CONTROL)
    )
    return {
        "recipe": recipe,
        "seed": seed,
        "epochs": 15,
        "fine_tune_epochs": 3,
        "top1": top1,
        "control": control,
        "params": 1e5,
        "size_mb": 0.4,
    }


def _results(study, args) -> dict:
    cells = []
    for seed, (base, control, soft) in enumerate([(80.0, 81.0, 82.5), (79.0, 80.5, 80.0), (78.0, 79.0, 80.0)]):
        cells += [_cell(study, study.VANILLA, seed, base), _cell(study, "distillation soft", seed, soft)]
        if seed < 2:  # seed 2's control is missing: its soft cell has no pair yet
            cells.append(_cell(study, study.CONTROL, seed, control))
    return {"setup": study.setup_of(args), "cells": cells}


def test_delta_is_paired_per_seed_and_only_where_the_control_exists(study):
    args = study.parser().parse_args([])
    rows = {r["recipe"]: r for r in study.table_rows(_results(study, args))}
    soft = rows["distillation soft"]
    assert soft["seeds"] == [0, 1, 2]
    assert soft["delta_per_seed"] == [(0, pytest.approx(1.5)), (1, pytest.approx(-0.5))]
    assert soft["delta"][0] == pytest.approx(0.5)  # mean of the paired differences, not of unpaired means
    table = study.markdown(_results(study, args), list(rows.values()), target_seeds=3)
    assert "0: +1.50, 1: -0.50" in table
    assert "**Incomplete**" in table and "vanilla + fine-tune (control) (has seeds 0,1)" in table


def test_resume_skips_cells_already_in_the_json(study, tmp_path, monkeypatch):
    args = study.parser().parse_args(["--seeds", "1", "--recipes", "distillation soft"])
    path = tmp_path / "results.json"
    results = _results(study, args)
    study.write_results(path, results)
    monkeypatch.setattr(study, "Study", lambda *a: pytest.fail("nothing to train, yet a Study was built"))
    assert study.accuracy_run(args, path)["cells"] == results["cells"]


def test_resume_with_other_settings_names_them(study, tmp_path):
    path = tmp_path / "results.json"
    study.write_results(path, _results(study, study.parser().parse_args([])))
    with pytest.raises(SystemExit, match=r"fine_tune_epochs: file 3, now 5"):
        study.accuracy_run(study.parser().parse_args(["--fine-tune-epochs", "5"]), path)


def test_unknown_recipe_is_refused_with_the_list(study, tmp_path):
    with pytest.raises(SystemExit, match="no such row; the rows are"):
        study.accuracy_run(study.parser().parse_args(["--recipes", "distilation soft"]), tmp_path / "r.json")


def test_results_are_written_whole(study, tmp_path):
    path = tmp_path / "deep" / "results.json"
    study.write_results(path, {"cells": [1]})
    study.write_results(path, {"cells": [1, 2]})
    assert json.loads(path.read_text()) == {"cells": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no partial file left behind


def test_work_order_puts_a_seeds_teacherless_rows_first(study):
    order = study.order_of_work(study.RECIPES, seeds=2)
    first_distil = next(i for i, (r, _) in enumerate(order) if r.needs_teacher)
    assert all(seed == 0 and not r.needs_teacher for r, seed in order[:first_distil])
    assert [seed for _, seed in order] == sorted(seed for _, seed in order)  # seed 0 complete before seed 1


def test_conv_teacher_is_what_the_teacher_module_trains(study):
    import torch

    module = study.TeacherClassifier(lr=1e-2)
    assert isinstance(module.model, study.ConvTeacher)
    assert module(torch.randn(6, 1, 28, 28)).shape == (6, 10)
    # the optimizer takes module.parameters(): they must be the convnet's, with no leftover ViT
    assert {id(p) for p in module.parameters()} == {id(p) for p in module.model.parameters()}


def test_a_from_scratch_row_is_paired_with_the_vanilla_run_of_its_seed(study, tmp_path, monkeypatch):
    import torch

    recipe = "distillation hard, from scratch"
    args = study.parser().parse_args(["--seeds", "1", "--recipes", recipe])
    path = tmp_path / "results.json"
    results = _results(study, args)  # vanilla seed 0 at 80.0
    results["teacher"] = {"top1": 91.0}
    results["speed"] = {"rows": {study.VANILLA: {"cpu_speedup": 1.0, "size_mb": 346.3}}}
    study.write_results(path, results)

    class TrainedStudy:  # what Study gives once the recipe has trained: no training here
        teacher = torch.nn.Identity()  # already loaded: the teacher is not checked again
        test_images = 10000

        def __init__(self, args):
            pass

        def run(self, recipe, seed):
            return torch.nn.Linear(4, 10), {}

        def accuracy(self, model):
            return 81.25

    monkeypatch.setattr(study, "Study", TrainedStudy)
    written = study.accuracy_run(args, path)
    cell = study.find_cell(written, recipe, 0)
    # trained as long as the vanilla base, from the same seed: that base is its control, not the fine-tuned one
    assert (cell["control"], cell["epochs"], cell["fine_tune_epochs"]) == (study.VANILLA, args.epochs, 0)
    row = {r["recipe"]: r for r in study.table_rows(written)}[recipe]
    assert row["delta_per_seed"] == [(0, pytest.approx(1.25))]
    assert row["speed"] == {"cpu_speedup": 1.0, "size_mb": 346.3}  # the vanilla architecture's speed
