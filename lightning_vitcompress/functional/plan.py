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

Example::

    speed = measure_speed_model(vit, images, pruning_ratios=(0, 0.25, 0.5), quantization=("int8_dynamic",))
    frontier = plan_frontier(speed)
    chosen = choose_recipe(frontier, target_speedup=4.0)
    print(format_frontier(frontier, chosen))
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from lightning_vitcompress.functional.measure import eval_mode, thread_count
from lightning_vitcompress.functional.nystrom import swap_attention
from lightning_vitcompress.functional.prune import prune_vit
from lightning_vitcompress.functional.quantize import quantize_model
from lightning_vitcompress.functional.token_merging import (
    TokenMergingConfig,
    merge_tokens,
    plan_token_merging,
    token_schedule,
)
from lightning_vitcompress.models import adapter_for

__all__ = [
    "Candidate",
    "PlanTimings",
    "Recipe",
    "SpeedModel",
    "UnreachableTargetError",
    "candidate_recipes",
    "choose_recipe",
    "format_frontier",
    "measure_speed_model",
    "plan_frontier",
    "prior_accuracy_cost",
    "recipe_code",
]

Runtime = Literal["torch", "openvino"]

#: the candidate pruning ratios when none are given
PRUNING_RATIOS = (0.0, 0.25, 0.4, 0.5, 0.6)
#: Nystrom landmark counts tried, each only where the sequence has more than 4x as many tokens
NUM_LANDMARKS = (32, 64)
#: token-merging r candidates, as fractions of the largest r the model takes
R_FRACTIONS = (0.25, 0.5, 0.75, 1.0)

# the study's paired deltas (points of top-1), Fashion-MNIST, 3 seeds: the prior, for ordering only
_PRUNE_POINTS_AT_HALF = 2.9  # structured pruning 50% L2 + fine-tune: -2.93 pt
_MERGE_POINTS_AT_HALF = 0.5  # ToMe r=12 (half the tokens) + fine-tune: -0.49 pt
_NYSTROM_POINTS_PER_TOKENS_PER_LANDMARK = 0.54 / (49 / 8)  # m=8 on 49 patches: -0.54 pt
_QUANTIZE_POINTS = 0.05  # int8 dynamic PTQ: -0.01 pt


class UnreachableTargetError(ValueError):
    """No candidate recipe is predicted to reach the speed target (the message names the fastest reachable)."""


@dataclass(frozen=True, order=True)
class Recipe:
    """One combination of the techniques; all zero / None is the uncompressed model.

    Example::

        Recipe(pruning_ratio=0.4, r=8, quantization="int8_dynamic").label()
        # 'prune 0.40 + ToMe r=8 + int8_dynamic'
    """

    pruning_ratio: float = 0.0
    """fraction of the prunable channels removed (``PruningSchedule``)"""
    r: int = 0
    """tokens each block merges (``TokenMerging``); 0: no merging"""
    num_landmarks: Optional[int] = None
    """Nystrom landmarks in every block (``NystromSwap``); None: exact attention"""
    quantization: Optional[str] = None
    """int8 config applied at train end (``QuantizeOnFit``); None: float"""

    def label(self) -> str:
        parts = []
        if self.pruning_ratio:
            parts.append(f"prune {self.pruning_ratio:.2f}")
        if self.r:
            parts.append(f"ToMe r={self.r}")
        if self.num_landmarks:
            parts.append(f"Nystrom m={self.num_landmarks}")
        if self.quantization:
            parts.append(self.quantization)
        return " + ".join(parts) or "uncompressed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "pruning_ratio": self.pruning_ratio,
            "r": self.r,
            "num_landmarks": self.num_landmarks,
            "quantization": self.quantization,
        }


@dataclass(frozen=True)
class Candidate:
    """A recipe with its predicted speedup (against the uncompressed model) and prior accuracy cost (points)."""

    recipe: Recipe
    predicted_speedup: float
    accuracy_cost: float
    on_frontier: bool = False


@dataclass
class PlanTimings:
    """Seconds per call of each measured part (median over interleaved rounds), keyed as the speed model reads them."""

    whole: dict[tuple[float, Optional[str]], float] = field(default_factory=dict)
    """``(pruning ratio, int8 config)`` -> the whole variant at the full token count"""
    block: dict[tuple[float, Optional[str], Optional[int]], dict[int, float]] = field(default_factory=dict)
    """``(ratio, config, landmarks)`` -> {tokens: seconds of the first block}"""
    merge: dict[int, float] = field(default_factory=dict)
    """``r`` -> seconds the merge step adds per forward (all blocks)"""


@dataclass
class SpeedModel:
    """Predicts a recipe's seconds per batch from :class:`PlanTimings` of this model on this machine."""

    timings: PlanTimings
    tokens_in: int
    num_prefix_tokens: int
    depth: int
    batch_size: int
    runtime: str
    num_threads: int
    seconds_measuring: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)
    """what could not be measured (a technique, a config) and why"""

    def as_dict(self) -> dict[str, Any]:
        """Plain data (what ``torch.load(weights_only=True)`` reads back): for checkpoints."""
        t = self.timings
        return {
            "whole": [[*key, value] for key, value in t.whole.items()],
            "block": [[*key, sorted(points.items())] for key, points in t.block.items()],
            "merge": sorted(t.merge.items()),
            **{name: getattr(self, name) for name in _SPEED_FIELDS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedModel:
        """The speed model :meth:`as_dict` wrote."""
        timings = PlanTimings(
            whole={(float(ratio), config): value for ratio, config, value in data["whole"]},
            block={(float(r), c, m): {int(n): v for n, v in points} for r, c, m, points in data["block"]},
            merge={int(r): value for r, value in data["merge"]},
        )
        return cls(timings, **{name: data[name] for name in _SPEED_FIELDS})

    def token_counts(self, r: int) -> tuple[list[int], list[int]]:
        """Tokens entering and leaving each block under token merging ``r`` (all blocks merge)."""
        after = token_schedule(self.tokens_in, self.num_prefix_tokens, [r] * self.depth)
        return [self.tokens_in, *after[:-1]], after

    def predict_seconds(self, recipe: Recipe) -> float:
        """Seconds per batch of ``batch_size`` the recipe is predicted to take.

        The variant's (pruning ratio, int8 config) whole-model time, scaled by what its parts say the recipe's
        blocks change: ``rest + sum(block(tokens each block sees))`` over the same at all tokens with exact
        attention, ``rest`` being the whole minus its blocks. Anchored so, a recipe without merging or Nystrom
        is predicted at exactly its measured whole (parts timed apart never add up to the whole exactly).
        """
        variant = (recipe.pruning_ratio, recipe.quantization)
        if variant not in self.timings.whole or (recipe.r and recipe.r not in self.timings.merge):
            raise KeyError(
                f"{recipe.label()} was not measured (see skipped: {self.skipped}); measured: "
                f"{[r.label() for r in self.recipes()]}"
            )
        whole = self.timings.whole[variant]
        exact = _interpolate(self.timings.block[(*variant, None)], self.tokens_in)
        rest = max(0.0, whole - self.depth * exact)
        blocks = self.timings.block[(*variant, recipe.num_landmarks)]
        entering, leaving = self.token_counts(recipe.r)
        # attention sees the tokens entering a block, its MLP those left after the merge: half each
        parts = rest + sum(
            _interpolate(blocks, (n_in + n_out) / 2) for n_in, n_out in zip(entering, leaving, strict=True)
        )
        seconds = whole * parts / (rest + self.depth * exact)
        return seconds + (self.timings.merge.get(recipe.r, 0.0) if recipe.r else 0.0)

    def speedup(self, recipe: Recipe) -> float:
        """Predicted speedup of ``recipe`` over the uncompressed model, in this runtime."""
        return self.timings.whole[(0.0, None)] / self.predict_seconds(recipe)

    def recipes(self) -> list[Recipe]:
        """Every recipe the measurements can predict."""
        ratios = sorted({ratio for ratio, _ in self.timings.whole})
        configs = sorted({config for _, config in self.timings.whole}, key=lambda c: (c is not None, c or ""))
        landmarks = sorted({m for _, _, m in self.timings.block if m is not None})
        rs = [0, *sorted(self.timings.merge)]
        return [
            Recipe(ratio, r, m, config)
            for ratio in ratios
            for config in configs
            for r in rs
            for m in (None, *landmarks)
            if (ratio, config) in self.timings.whole and (ratio, config, m) in self.timings.block
        ]


_SPEED_FIELDS = (
    "tokens_in",
    "num_prefix_tokens",
    "depth",
    "batch_size",
    "runtime",
    "num_threads",
    "seconds_measuring",
    "skipped",
)


def _interpolate(points: dict[int, float], tokens: float) -> float:
    """Piecewise-linear in the token count between measured points (extended linearly past the ends), through
    their non-decreasing fit: a block never gets faster with more tokens, so a point below a smaller count's is
    timing noise (a shared machine) and is pooled with it."""
    xs = sorted(points)
    ys = _non_decreasing([points[x] for x in xs])
    if len(xs) == 1:
        return ys[0] * tokens / xs[0]
    for (lo, y_lo), (hi, y_hi) in itertools.pairwise(zip(xs, ys, strict=True)):
        if tokens <= hi or hi == xs[-1]:
            return max(0.0, y_lo + (y_hi - y_lo) / (hi - lo) * (tokens - lo))
    raise AssertionError("unreachable")


def _non_decreasing(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [mean for mean, count in blocks for _ in range(int(count))]


# ---------------------------------------------------------------------------------------- candidates
def r_candidates(model: nn.Module, example_input: torch.Tensor, fractions: Sequence[float] = R_FRACTIONS) -> list[int]:
    """Token-merging ``r`` values worth trying: fractions of the largest ``r`` the model takes in every block."""
    adapter = adapter_for(model)
    depth = len(adapter.token_blocks())
    prefix = adapter.prefix_tokens().count
    tokens = _tokens_in(model, example_input)
    largest = max(0, (tokens - prefix - 1) // max(1, depth))
    found = []
    for r in sorted({max(1, round(largest * f)) for f in fractions if largest}):
        try:
            plan_token_merging(model, TokenMergingConfig(r=r), example_input[:1])
        except (TypeError, ValueError):
            continue
        found.append(r)
    return found


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


def choose_recipe(frontier: Sequence[Candidate], target_speedup: float) -> Candidate:
    """The recipe cheapest in (prior) accuracy among those predicted to reach ``target_speedup``; ties: the faster.

    Raises:
        UnreachableTargetError: no recipe reaches it; the message names the fastest reachable.
    """
    reaching = [c for c in frontier if c.predicted_speedup >= target_speedup]
    if not reaching:
        fastest = max(frontier, key=lambda c: c.predicted_speedup)
        raise UnreachableTargetError(
            f"target_speedup={target_speedup!r} is beyond every candidate recipe on this machine: the fastest "
            f"reachable is {fastest.predicted_speedup:.2f}x ({fastest.recipe.label()}). Pass target_speedup <= "
            f"{fastest.predicted_speedup:.2f}, or widen the candidates (pruning_ratios=..., quantization=...)."
        )
    return min(reaching, key=lambda c: (c.accuracy_cost, -c.predicted_speedup))


# ------------------------------------------------------------------------------------------ measuring
def _tokens_in(model: nn.Module, example_input: torch.Tensor) -> int:
    ((args, _),) = _block_inputs(model, example_input[:1]).values()
    return int(args[0].shape[1])


def _first_block(model: nn.Module) -> nn.Module:
    return adapter_for(model).token_blocks()[0][1]


def _block_inputs(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """What the first block receives (positional and keyword arguments) when ``model`` runs ``example_input``."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.setdefault("first", (args, kwargs))

    handle = _first_block(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), eval_mode(model):
            model(example_input)
    finally:
        handle.remove()
    return seen


def runner_for(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], runtime: str, num_threads: int
) -> Callable[[], Any]:
    """A zero-argument call of ``module`` on these inputs, in the deploy runtime."""
    if runtime == "openvino":
        import openvino as ov

        from lightning_vitcompress.functional.openvino import convert_to_openvino

        if kwargs or len(args) != 1:
            raise ValueError("OpenVINO timing takes modules called with one tensor")
        compiled = ov.Core().compile_model(
            convert_to_openvino(module, args[0], dynamic_batch=False),
            "CPU",
            {"INFERENCE_NUM_THREADS": num_threads, "INFERENCE_PRECISION_HINT": "f32"},
        )
        array = args[0].numpy()
        return lambda: compiled(array)

    def call() -> Any:
        with torch.inference_mode():
            return module(*args, **kwargs)

    return call


def time_interleaved(calls: dict[Any, Callable[[], Any]], rounds: int, min_run_time: float) -> dict[Any, float]:
    """Median seconds per call of each, measured round-robin (every round times each once) so load hits all alike."""
    numbers = {}
    for key, call in calls.items():
        call()  # warm-up
        start = time.perf_counter()
        call()
        once = max(time.perf_counter() - start, 1e-6)
        numbers[key] = max(1, int(min_run_time / once))
    samples: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            for _ in range(numbers[key]):
                call()
            samples[key].append((time.perf_counter() - start) / numbers[key])
    return {key: statistics.median(values) for key, values in samples.items()}


def _token_grid(tokens_in: int, num_prefix_tokens: int) -> list[int]:
    """Token counts to time a block at: all of them down to a quarter of the patches."""
    patches = tokens_in - num_prefix_tokens
    return sorted({tokens_in, *(num_prefix_tokens + max(2, round(patches * f)) for f in (0.75, 0.5, 0.25))})


def _variant(
    model: nn.Module,
    ratio: float,
    config: Optional[str],
    example_input: torch.Tensor,
    calibration_inputs: Sequence[torch.Tensor],
) -> nn.Module:
    """A copy of ``model`` pruned by ``ratio`` and quantized with ``config``, as the recipe would leave it."""
    variant = copy.deepcopy(model).eval()
    if ratio:
        prune_vit(variant, ratio, example_input[:1])
    if config:
        quantize_model(variant, config, calibration_inputs=list(calibration_inputs) or [example_input])
    return variant


def measure_speed_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    pruning_ratios: Sequence[float] = PRUNING_RATIOS,
    r_values: Optional[Sequence[int]] = None,
    num_landmarks: Sequence[int] = NUM_LANDMARKS,
    quantization: Sequence[str] = ("int8_dynamic",),
    runtime: Runtime = "torch",
    num_threads: Optional[int] = None,
    rounds: int = 3,
    min_run_time: float = 0.05,
    calibration_inputs: Sequence[torch.Tensor] = (),
) -> SpeedModel:
    """Time the parts of ``model`` (on CPU, batch ``example_input``) that the candidate recipes are made of.

    ``r_values`` None: :func:`r_candidates`. Nystrom ``num_landmarks`` are tried only where the sequence has
    more than 4x as many tokens. A config or technique this model or runtime refuses is left out and said in
    ``SpeedModel.skipped``. ``model`` is not changed (every variant is a copy).
    """
    start = time.perf_counter()
    model = copy.deepcopy(model).cpu().eval()
    example_input = example_input.cpu()
    adapter = adapter_for(model)
    depth = len(adapter.token_blocks())
    prefix = adapter.prefix_tokens().count
    tokens_in = _tokens_in(model, example_input)
    grid = _token_grid(tokens_in, prefix)
    skipped: dict[str, str] = {}
    r_values = r_candidates(model, example_input) if r_values is None else list(r_values)
    landmarks = [m for m in num_landmarks if tokens_in > 4 * m]
    if len(landmarks) < len(num_landmarks):
        skipped["nystrom"] = f"m={[m for m in num_landmarks if m not in landmarks]}: {tokens_in} tokens is too short"
    calls: dict[Any, Callable[[], Any]] = {}
    keep_alive: list[nn.Module] = []
    with thread_count(num_threads) as threads:
        for ratio in sorted({0.0, *map(float, pruning_ratios)}):
            for config in (None, *quantization):
                try:
                    variant = _variant(model, ratio, config, example_input, calibration_inputs)
                    ((args, kwargs),) = _block_inputs(variant, example_input).values()
                    calls[("whole", ratio, config)] = runner_for(variant, (example_input,), {}, runtime, threads)
                    block = _first_block(variant)
                    for n in grid:
                        sliced = (args[0][:, :n].contiguous(), *args[1:])
                        calls[("block", ratio, config, None, n)] = runner_for(block, sliced, kwargs, runtime, threads)
                    keep_alive.append(variant)
                except Exception as err:
                    if ratio == 0.0 and config is None:
                        raise
                    skipped[f"prune {ratio:.2f} / {config or 'float'}"] = f"{type(err).__name__}: {err}"[:300]
                    continue
                for m in landmarks:
                    try:
                        swapped = copy.deepcopy(variant)
                        swap_attention(swapped, m)
                        ((s_args, s_kwargs),) = _block_inputs(swapped, example_input).values()
                        block = _first_block(swapped)
                        for n in grid:
                            sliced = (s_args[0][:, :n].contiguous(), *s_args[1:])
                            key = ("block", ratio, config, m, n)
                            calls[key] = runner_for(block, sliced, s_kwargs, runtime, threads)
                        keep_alive.append(swapped)
                    except Exception as err:
                        skipped[f"Nystrom m={m} (prune {ratio:.2f} / {config or 'float'})"] = f"{err}"[:300]
        for r in r_values:
            try:
                merged = copy.deepcopy(model)
                merge_tokens(merged, r, example_input=example_input[:1])
                calls[("merged", r)] = runner_for(merged, (example_input,), {}, runtime, threads)
                keep_alive.append(merged)
            except Exception as err:
                skipped[f"ToMe r={r}"] = f"{type(err).__name__}: {err}"[:300]
        seconds = time_interleaved(calls, rounds, min_run_time)
    timings = PlanTimings()
    for key, value in seconds.items():
        if key[0] == "whole":
            timings.whole[key[1:]] = value
        elif key[0] == "block":
            timings.block.setdefault(key[1:4], {})[key[4]] = value
    speed = SpeedModel(
        timings, tokens_in, prefix, depth, int(example_input.shape[0]), runtime, threads, skipped=skipped
    )
    for key, value in seconds.items():
        if key[0] == "merged":  # the merge step: what the merged model takes beyond its blocks at fewer tokens
            timings.merge[key[1]] = 0.0
            timings.merge[key[1]] = max(0.0, value - speed.predict_seconds(Recipe(r=key[1])))
    speed.seconds_measuring = time.perf_counter() - start
    return speed


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
