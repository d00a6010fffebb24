"""Plan a compression recipe for a speed target: candidates, a speed model from measured parts, the choice.

Pure torch (no Lightning). A :class:`Recipe` is one combination of the
techniques (pruning ratio, token-merging ``r``, Nystrom landmarks, an int8
config). Timing every recipe would cost a fit's worth of minutes, and MACs are
not time (the attention share, int8 kernels and token counts differ by CPU), so
:func:`measure_speed_model` times the *parts* of the real model on this machine,
interleaved in one run:

* per pruning ratio and int8 config (a "variant": the model pruned / quantized
  as the recipe would leave it): the whole model at its full token count, and
  its first transformer block at a few token counts;
* per token-merging ``r``: the merge step's own cost (the merged model against
  the sum of its parts);
* per Nystrom landmark count: the swapped block at the same token counts.

A recipe's time is then ``rest + sum over blocks of block(tokens the block
sees) + merge cost``, with ``rest = whole - depth x block(all tokens)`` (patch
embedding, final norm, head). Ratios measured in one interleaved run are what
count; absolute seconds on a shared machine are not.

Each recipe also carries a *prior* accuracy cost, for ordering only (the
budget on validation data decides inside fit): the Fashion-MNIST study's
paired deltas, assumed additive (``README.md``, "The study on Fashion-MNIST"):
int8 PTQ about free, Nystrom ~0.5 pt at m=8 on 49 tokens (scaled by tokens per
landmark), token merging ~0.5 pt for half the tokens, pruning ~2.9 pt at 50%
(quadratic in the ratio).

The speed model (recipes, timings, prediction) lives in
:mod:`lightning_vitcompress.functional.plan_speed`; its names import from here too.

Example (a tiny ViT and a reachable target, so it runs in seconds; ask a real model for e.g. 4.0)::

    >>> import timm
    >>> import torch
    >>> from lightning_vitcompress.functional.plan import (
    ...     choose_recipe, format_frontier, measure_speed_model, plan_frontier)
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    >>> images = torch.randn(4, 3, 32, 32)
    >>> speed = measure_speed_model(vit, images, pruning_ratios=(0, 0.5), r_values=(4,), quantization=(),
    ...                             rounds=1, min_run_time=0.005)
    >>> speed.tokens_in, speed.depth, speed.skipped["nystrom"]  # 16 patches + the class token
    (17, 2, 'm=[32, 64]: 17 tokens is too short')
    >>> frontier = plan_frontier(speed)
    >>> sorted(c.recipe.label() for c in frontier)
    ['ToMe r=4', 'prune 0.50', 'prune 0.50 + ToMe r=4', 'uncompressed']
    >>> chosen = choose_recipe(frontier, target_speedup=1.0)  # every recipe reaches 1x: the cheapest wins
    >>> chosen.recipe.label(), chosen.accuracy_cost
    ('uncompressed', 0.0)
    >>> print(format_frontier(frontier, chosen).splitlines()[0])
    | recipe | predicted speedup | prior accuracy cost (pt) | |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from lightning_vitcompress.functional.plan_speed import (
    NUM_LANDMARKS,
    PRUNING_RATIOS,
    R_FRACTIONS,
    PlanTimings,
    Recipe,
    Runtime,
    SpeedModel,
    build_recipe,
    measure_speed_model,
    r_candidates,
    runner_for,
    time_interleaved,
)

__all__ = [
    "NUM_LANDMARKS",
    "PRUNING_RATIOS",
    "R_FRACTIONS",
    "Candidate",
    "PlanTimings",
    "Recipe",
    "Runtime",
    "SpeedModel",
    "UnreachableTargetError",
    "build_recipe",
    "candidate_recipes",
    "choose_recipe",
    "eligible_candidates",
    "format_frontier",
    "measure_speed_model",
    "plan_frontier",
    "prior_accuracy_cost",
    "r_candidates",
    "recipe_code",
    "runner_for",
    "time_interleaved",
]

# the study's paired deltas (points of top-1), Fashion-MNIST, 3 seeds: the prior, for ordering only
_PRUNE_POINTS_AT_HALF = 2.9  # structured pruning 50% L2 + fine-tune: -2.93 pt
_MERGE_POINTS_AT_HALF = 0.5  # ToMe r=12 (half the tokens) + fine-tune: -0.49 pt
_NYSTROM_POINTS_PER_TOKENS_PER_LANDMARK = 0.54 / (49 / 8)  # m=8 on 49 patches: -0.54 pt
_QUANTIZE_POINTS = 0.05  # int8 dynamic PTQ: -0.01 pt


class UnreachableTargetError(ValueError):
    """No candidate recipe is predicted to reach the speed target (the message names the fastest reachable)."""


@dataclass(frozen=True)
class Candidate:
    """A recipe with its predicted speedup (against the uncompressed model) and prior accuracy cost (points)."""

    recipe: Recipe
    predicted_speedup: float
    accuracy_cost: float
    on_frontier: bool = False


# ---------------------------------------------------------------------------------------- candidates
def candidate_recipes(
    pruning_ratios: Sequence[float], r_values: Sequence[int], num_landmarks: Sequence[int], quantization: Sequence[str]
) -> list[Recipe]:
    """The full grid of recipes (each technique off or at one of its values)."""
    return [
        Recipe(float(p), int(r), m, q)
        for p in pruning_ratios
        for r in (0, *r_values)
        for m in (None, *num_landmarks)
        for q in (None, *quantization)
    ]


def prior_accuracy_cost(recipe: Recipe, tokens_in: int, token_counts: Optional[Sequence[int]] = None) -> float:
    """Points of top-1 the recipe is expected to cost: the study's deltas, additive (ordering only, never a promise).

    ``token_counts``: tokens after each block under the recipe's merging (the share merged away sets its cost).
    """
    cost = _PRUNE_POINTS_AT_HALF * (recipe.pruning_ratio / 0.5) ** 2
    if recipe.r and token_counts:
        merged_share = 1.0 - (sum(token_counts) / len(token_counts)) / tokens_in
        cost += _MERGE_POINTS_AT_HALF * merged_share / 0.5
    if recipe.num_landmarks:
        cost += _NYSTROM_POINTS_PER_TOKENS_PER_LANDMARK * tokens_in / recipe.num_landmarks
    if recipe.quantization:
        cost += _QUANTIZE_POINTS
    return round(cost, 4)


def plan_frontier(speed: SpeedModel, recipes: Optional[Sequence[Recipe]] = None) -> list[Candidate]:
    """Every recipe with its predicted speedup and prior cost, fastest first; ``on_frontier``: no other recipe is
    at least as fast and at most as costly (one of the two strictly)."""
    scored = []
    for recipe in recipes if recipes is not None else speed.recipes():
        _, after = speed.token_counts(recipe.r)
        scored.append((recipe, speed.speedup(recipe), prior_accuracy_cost(recipe, speed.tokens_in, after)))
    out = []
    for recipe, speedup, cost in scored:
        dominated = any(
            s >= speedup and c <= cost and (s > speedup or c < cost) for other, s, c in scored if other != recipe
        )
        out.append(Candidate(recipe, round(speedup, 4), cost, not dominated))
    return sorted(out, key=lambda c: (-c.predicted_speedup, c.accuracy_cost))


def eligible_candidates(
    frontier: Sequence[Candidate], target_speedup: Union[float, Literal["max"]], max_cost: Optional[float] = None
) -> list[Candidate]:
    """The candidates ``target_speedup`` may choose, in order of preference: those predicted to reach it, cheapest
    in prior accuracy first (ties: the faster); for ``"max"``, those whose prior cost is at most ``max_cost`` (None:
    all), fastest first (ties: the cheaper)."""
    if target_speedup == "max":
        allowed = [c for c in frontier if max_cost is None or c.accuracy_cost <= max_cost]
        return sorted(allowed, key=lambda c: (-c.predicted_speedup, c.accuracy_cost))
    reaching = [c for c in frontier if c.predicted_speedup >= target_speedup]
    return sorted(reaching, key=lambda c: (c.accuracy_cost, -c.predicted_speedup))


def choose_recipe(
    frontier: Sequence[Candidate], target_speedup: Union[float, Literal["max"]], max_cost: Optional[float] = None
) -> Candidate:
    """The recipe cheapest in (prior) accuracy among those predicted to reach ``target_speedup``; ties: the faster.

    ``target_speedup="max"``: the fastest recipe whose prior cost is at most ``max_cost`` (None: the fastest of
    all; ties: the cheaper), i.e. the fastest the accuracy budget is expected to allow.

    Raises:
        UnreachableTargetError: no recipe reaches it; the message names the fastest reachable.
    """
    eligible = eligible_candidates(frontier, target_speedup, max_cost)
    if eligible:
        return eligible[0]
    if target_speedup == "max":
        raise UnreachableTargetError(f"no candidate recipe has a prior cost within max_cost={max_cost!r}")
    fastest = max(frontier, key=lambda c: c.predicted_speedup)
    raise UnreachableTargetError(
        f"target_speedup={target_speedup!r} is beyond every candidate recipe on this machine: the fastest "
        f"reachable is {fastest.predicted_speedup:.2f}x ({fastest.recipe.label()}). Pass target_speedup <= "
        f"{fastest.predicted_speedup:.2f}, or widen the candidates (pruning_ratios=..., quantization=...)."
    )


# -------------------------------------------------------------------------------------------- report
def format_frontier(frontier: Sequence[Candidate], chosen: Optional[Candidate] = None, limit: int = 20) -> str:
    """A Markdown table of the recipes on the frontier (fastest first), the chosen one marked."""
    rows = [c for c in frontier if c.on_frontier or c is chosen][:limit]
    lines = ["| recipe | predicted speedup | prior accuracy cost (pt) | |", "|---|---|---|---|"]
    for c in rows:
        mark = "**chosen**" if chosen is not None and c.recipe == chosen.recipe else ""
        lines.append(f"| {c.recipe.label()} | {c.predicted_speedup:.2f}x | {c.accuracy_cost:.2f} | {mark} |")
    return "\n".join(lines)


def recipe_code(
    recipe: Recipe,
    max_accuracy_drop: Optional[float] = 1.0,
    pruning_steps: int = 1,
    pruning_end_epoch: int = 0,
    distill: Optional[dict[str, Any]] = None,
) -> str:
    """The recipe as plain callbacks a user can copy into ``Trainer(callbacks=[...])``."""
    budget = f"max_accuracy_drop={max_accuracy_drop!r}"
    entries = []
    if recipe.pruning_ratio:
        steps = f", end_epoch={pruning_end_epoch}, num_steps={pruning_steps}" if pruning_steps > 1 else ""
        entries.append(("PruningSchedule", f"PruningSchedule({recipe.pruning_ratio!r}{steps}, {budget})"))
    if recipe.num_landmarks:
        entries.append(("NystromSwap", f"NystromSwap(num_landmarks={recipe.num_landmarks}, {budget})"))
    if recipe.r:
        entries.append(("TokenMerging", f"TokenMerging(r={recipe.r})"))
    if distill is not None:
        options = "".join(f", {k}={_literal(v)}" for k, v in distill.items())
        entries.append(("DistillationTeacher", f"DistillationTeacher(teacher{options})"))
    if recipe.quantization:
        entries.append(("QuantizeOnFit", f"QuantizeOnFit({_literal(recipe.quantization)}, {budget})"))
    names = ", ".join(sorted(name for name, _ in entries))
    lines = ["import copy", ""] if distill is not None else []
    lines += [f"from lightning_vitcompress import {names}", ""] if entries else []
    if distill is not None:
        lines.append("teacher = copy.deepcopy(model)  # the model as it enters fit, the uncompressed one")
    lines += ["callbacks = [", *(f"    {call}," for _, call in entries), "]"]
    return "\n".join(lines) + "\n"


def _literal(value: Any) -> str:
    """``repr`` with double-quoted strings, as ``ruff format`` writes them."""
    return f'"{value}"' if isinstance(value, str) else repr(value)
