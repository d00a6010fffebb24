"""CompressionPlan's timings of whole models (the chosen recipe at setup, the final model at fit end) and its report:
the Markdown, JSON and copyable-callbacks files, and the frontier plot."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_vitcompress.functional.measure import thread_count
from lightning_vitcompress.functional.plan import (
    Candidate,
    Recipe,
    build_recipe,
    eligible_candidates,
    format_frontier,
    runner_for,
    time_interleaved,
)

__all__ = [
    "Timing",
    "built_speedup",
    "measured_speedup",
    "plot_frontier",
    "verify_choice",
    "why_chosen",
    "write_plan_report",
]


class Timing(NamedTuple):
    """How whole models are timed against each other: the runtime, threads, interleaved rounds, seconds per round."""

    runtime: str
    num_threads: int
    rounds: int
    min_run_time: float


def measured_speedup(baseline: nn.Module, final: nn.Module, example: torch.Tensor, timing: Timing) -> float:
    """The final model's speedup over the model that entered fit, timed interleaved on ``example`` (in
    ``timing.runtime``, or eager torch where the runtime refuses the final model)."""
    calls = {}
    for name, model in (("base", baseline), ("final", final)):
        was = model.training
        model.eval()
        try:
            calls[name] = runner_for(model, (example,), {}, timing.runtime, timing.num_threads)
        except Exception:
            calls[name] = runner_for(model, (example,), {}, "torch", timing.num_threads)
        model.train(was)
    with thread_count(timing.num_threads):
        seconds = time_interleaved(calls, timing.rounds, timing.min_run_time)
    return seconds["base"] / seconds["final"]


def built_speedup(
    trainer: pl.Trainer, baseline: nn.Module, recipe: Recipe, example: torch.Tensor, timing: Timing
) -> float:
    """``recipe`` built whole on a copy of ``baseline`` (untrained) and timed against it: the speed model's prediction
    checked. Every rank builds it (pruning agrees its draw across ranks), rank zero times it, all get the figure."""
    measured: Any = None
    built = build_recipe(baseline, recipe, example)
    if trainer.is_global_zero:
        measured = measured_speedup(baseline, built, example, timing)
    return float(trainer.strategy.broadcast(measured, src=0))


def verify_choice(
    frontier: Sequence[Candidate],
    target_speedup: Union[float, Literal["max"]],
    chosen: Candidate,
    timed: Callable[[Recipe], float],
    max_cost: Optional[float] = None,
    tries: int = 3,
) -> tuple[Candidate, float, list[dict[str, Any]]]:
    """Time ``chosen`` built whole (``timed``). For a numeric target it misses by over 10%, go on to the next
    candidates predicted to reach it, cheapest first, ``tries`` in all, and keep the first within 10% (else the
    fastest measured, warned about). For ``"max"``, time the ``tries`` predicted fastest whose prior cost is within
    ``max_cost`` and keep the fastest measured (parts predict a ranking that close recipes can swap). Returns the
    candidate kept, its measured speedup and every try."""
    eligible = eligible_candidates(frontier, target_speedup, max_cost)
    candidates = [chosen, *(c for c in eligible if c.recipe != chosen.recipe)][:tries]
    if target_speedup == "max":
        timings = [(c, timed(c.recipe)) for c in candidates]
        kept, speedup = max(timings, key=lambda t: t[1])
        return kept, speedup, [{"recipe": c.recipe.label(), "measured_speedup": s} for c, s in timings]
    goal = float(target_speedup)
    tried: list[tuple[Candidate, float]] = []
    for candidate in candidates:
        tried.append((candidate, timed(candidate.recipe)))
        if tried[-1][1] >= 0.9 * goal:
            break
    else:
        rank_zero_warn(
            f"CompressionPlan: the {len(tried)} cheapest recipes predicted to reach target_speedup={goal!r} measure "
            f"{', '.join(f'{c.recipe.label()} {s:.2f}x' for c, s in tried)} built whole; the fastest is kept."
        )
    kept, speedup = tried[-1] if tried[-1][1] >= 0.9 * goal else max(tried, key=lambda t: t[1])
    return kept, speedup, [{"recipe": c.recipe.label(), "measured_speedup": s} for c, s in tried]


def write_plan_report(
    folder: Path,
    report: dict[str, Any],
    frontier: Sequence[Candidate],
    chosen: Candidate,
    batch_size: int,
    plot: bool,
) -> None:
    """``compression_plan.md``, ``.json``, ``_callbacks.py`` (and ``.png`` when ``plot``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    r = report
    measured = "n/a" if r["measured_speedup"] is None else f"{r['measured_speedup']:.2f}x"
    accuracy = (
        "not measured (no budget)"
        if r["final_accuracy"] is None
        else (
            f"{r['final_accuracy']:.2%} vs {r['reference_accuracy']:.2%} entering fit "
            f"({-r['accuracy_drop']:+.2f} pt, budget {r['max_accuracy_drop']:.2f} pt)"
        )
    )
    backed = "; ".join(f"{b['when']}: r {b['r'][0]} -> {b['r'][1]}" for b in r["backed_off"]) or "none"
    text = "\n".join(
        [
            "# Compression plan",
            "",
            f"Target: {'max, ' if r['asked'] == 'max' else ''}{r['target_speedup']:.2f}x, at most "
            f"{r['max_accuracy_drop']} pt of validation top-1.",
            "",
            f"Chosen: **{r['label']}**, predicted {r['predicted_speedup']:.2f}x: {r['why']}.",
            "",
            f"Kept after the budget checks: **{Recipe(**r['kept']).label()}**"
            + (f", predicted {r['predicted_kept_speedup']:.2f}x." if r["predicted_kept_speedup"] else "."),
            "",
            (
                f"Final: {measured} measured (interleaved with the uncompressed model, batch {batch_size}); "
                f"accuracy {accuracy}. Token-merging back-offs: {backed}."
            ),
            "",
            "Frontier (predicted from measured parts; accuracy cost is the study's prior, not a measurement):",
            "",
            format_frontier(frontier, chosen),
            "",
            "The recipe as plain callbacks:",
            "",
            "```python",
            r["code"].rstrip(),
            "```",
            "",
        ]
    )
    (folder / "compression_plan.md").write_text(text)
    (folder / "compression_plan_callbacks.py").write_text(r["code"])
    (folder / "compression_plan.json").write_text(
        json.dumps(
            {
                **r,
                "frontier": [
                    {
                        **c.recipe.as_dict(),
                        "predicted_speedup": c.predicted_speedup,
                        "accuracy_cost": c.accuracy_cost,
                        "on_frontier": c.on_frontier,
                    }
                    for c in frontier
                ],
            },
            indent=2,
            default=str,
        )
    )
    if plot:
        plot_frontier(folder / "compression_plan.png", frontier, chosen, r["target_speedup"])
    rank_zero_info(f"CompressionPlan: report in {folder / 'compression_plan.md'}")


def plot_frontier(
    path: Path, frontier: Sequence[Candidate], chosen: Optional[Candidate], target_speedup: float
) -> None:
    """Predicted speedup against prior accuracy cost of every recipe, the frontier, the chosen one and the target
    (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        [c.predicted_speedup for c in frontier],
        [c.accuracy_cost for c in frontier],
        s=12,
        c=["tab:blue" if c.on_frontier else "lightgrey" for c in frontier],
    )
    if chosen is not None:
        ax.scatter(
            [chosen.predicted_speedup],
            [chosen.accuracy_cost],
            s=60,
            c="tab:red",
            label=f"chosen: {chosen.recipe.label()}",
        )
    ax.axvline(target_speedup, ls="--", c="grey", label=f"target {target_speedup:.2f}x")
    ax.set_xlabel("predicted speedup (measured parts)")
    ax.set_ylabel("prior accuracy cost (pt)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def why_chosen(
    chosen: Candidate,
    frontier: Sequence[Candidate],
    target_speedup: Union[float, Literal["max"]],
    max_accuracy_drop: Any,
) -> str:
    """Why the plan chose ``chosen`` for ``target_speedup`` (a speedup, or ``"max"``), in words for the report."""
    if target_speedup == "max":
        return (
            f"the fastest of the {len(frontier)} recipes whose prior accuracy cost is within "
            f"max_accuracy_drop={max_accuracy_drop!r}"
        )
    reaching = eligible_candidates(frontier, float(target_speedup))
    return (
        f"the cheapest in prior accuracy cost ({chosen.accuracy_cost:.2f} pt) of the "
        f"{len(reaching)} of {len(frontier)} recipes predicted to reach {float(target_speedup):.2f}x"
    )
