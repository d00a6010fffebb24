"""The plan's Fashion-MNIST run (examples/plan_fashion_mnist.py): its table says what was reached. No training."""

from __future__ import annotations

import pytest
from helpers import example_module


@pytest.fixture(scope="module")
def example():
    with example_module("plan_fashion_mnist") as module:
        yield module


def _cell(target, reachable, measured, goal=1.5, delta=-0.4):
    return {
        "target": target,
        "seed": 0,
        "reachable": reachable,
        "run_at": goal,
        "recipe": "ToMe r=12",
        "kept": "ToMe r=12",
        "predicted_speedup": 1.6,
        "predicted_kept_speedup": 1.6,
        "measured_speedup": measured,
        "top1": 84.0,
        "control_top1": 84.4,
        "delta": delta,
        "fit_cost_vs_control": 0.8,
        "fit_cost_with_timing": 1.1,
    }


def test_the_table_says_which_targets_were_reached_and_which_ran_at_max(example):
    results = {
        "fastest_reachable": 3.8,
        "cpu": "AMD EPYC",
        "timing_seconds": 34.0,
        "cells": {
            "maxx_seed0": _cell("max", True, measured=1.40),  # 0.93 of its goal: within 10%
            "4x_seed0": _cell("4", False, measured=1.40),
            "2x_seed0": _cell("2", True, measured=1.70, goal=2.0),  # 0.85 of the target: not within
        },
        "hand_written": {
            "token merging (ToMe r=12) + fine-tune": {"measured_speedup": 1.58, "delta_mean": -0.49, "seeds": 3}
        },
    }
    rows = example.markdown(results).splitlines()
    assert "Fastest reachable (predicted, any accuracy): 3.80x" in rows[0] and "AMD EPYC" in rows[0]
    cells = [row for row in rows if row.startswith("| ") and "seed" not in row and "recipe |" not in row]
    assert "| max | 0 |" in cells[0] and "| yes |" in cells[0]
    assert "| n/a | n/a |" in cells[0]  # the entering model's top-1 was not measured
    results["entering"] = {"0": 84.46}
    rows = example.markdown(results).splitlines()
    assert "| 84.00 | 84.40 | -0.40 | 84.46 | -0.46 |" in next(row for row in rows if row.startswith("| max"))
    assert "| 4 (unreachable: ran at max) | 0 |" in cells[1]
    assert "| 2 | 0 |" in cells[2] and "| no |" in cells[2]
    assert "| token merging (ToMe r=12) + fine-tune | 1.58x | -0.49 (3 seeds) |" in rows
