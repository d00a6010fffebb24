"""The speed model of a compression plan: what a recipe is, the parts of the real model timed, the prediction.

Pure torch (no Lightning); :mod:`lightning_vitcompress.functional.plan` chooses
from what this predicts. Timing every recipe would cost a fit's worth of
minutes, and MACs are not time, so :func:`measure_speed_model` times the
*parts* of the real model on this machine, interleaved in one run (per pruning
ratio and int8 config: the whole variant and its first block at a few token
counts; per token-merging ``r``: the merge step; per Nystrom landmark count:
the swapped block), and :class:`SpeedModel` predicts a recipe's seconds as
``rest + sum over blocks of block(tokens the block sees) + merge cost``.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from lightning_vitcompress.functional.measure import eval_mode, settle_allocator, thread_count
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
    "NUM_LANDMARKS",
    "PRUNING_RATIOS",
    "R_FRACTIONS",
    "PlanTimings",
    "Recipe",
    "Runtime",
    "SpeedModel",
    "build_recipe",
    "measure_speed_model",
    "r_candidates",
    "runner_for",
    "time_interleaved",
]

Runtime = Literal["torch", "openvino"]

#: the candidate pruning ratios when none are given
PRUNING_RATIOS = (0.0, 0.25, 0.4, 0.5, 0.6)
#: Nystrom landmark counts tried, each only where the sequence has more than 4x as many tokens
NUM_LANDMARKS = (32, 64)
#: token-merging r candidates, as fractions of the largest r the model takes
R_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True, order=True)
class Recipe:
    """One combination of the techniques; all zero / None is the uncompressed model.

    Example:

        >>> from lightning_vitcompress.functional.plan import Recipe
        >>> Recipe(pruning_ratio=0.4, r=8, quantization="int8_dynamic").label()
        'prune 0.40 + ToMe r=8 + int8_dynamic'
        >>> Recipe().label()
        'uncompressed'
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
        ratio, config = variant
        exact = _interpolate(self.timings.block[(ratio, config, None)], self.tokens_in)
        rest = max(0.0, whole - self.depth * exact)
        blocks = self.timings.block[(ratio, config, recipe.num_landmarks)]
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


# ------------------------------------------------------------------------------- candidate r values
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
    settle_allocator()
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
    """Token counts to time a block at: all of them down to a few patches.

    Down to the few that heavy merging leaves (r=16 on 197 tokens ends at 5): a block's time is convex in the
    token count (attention is quadratic, fixed per-call costs stay), so extending the chord of a quarter and
    a half of the patches below a quarter underestimated the late blocks, and ViT-B's prune 0.6 + r=16 + int8
    was predicted at 15.9x where it measured 12.4x.
    """
    patches = tokens_in - num_prefix_tokens
    fractions = (0.75, 0.5, 0.25, 0.1, 0.03)
    return sorted({tokens_in, *(num_prefix_tokens + max(2, round(patches * f)) for f in fractions)})


def build_recipe(
    model: nn.Module, recipe: Recipe, example_input: torch.Tensor, calibration_inputs: Sequence[torch.Tensor] = ()
) -> nn.Module:
    """A copy of ``model`` compressed by ``recipe`` with no training, as the callbacks leave it (in their order:
    prune, Nystrom, merge, quantize): what a recipe's speed is measured on. ``model`` is not changed.

    Example::

        >>> import timm, torch
        >>> from lightning_vitcompress.functional.plan import Recipe, build_recipe
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
        >>> small = build_recipe(vit, Recipe(pruning_ratio=0.5, r=4), torch.randn(2, 3, 32, 32))
        >>> small(torch.randn(2, 3, 32, 32)).shape, small.embed_dim < vit.embed_dim
        (torch.Size([2, 10]), True)
    """
    built = copy.deepcopy(model).eval()
    if recipe.pruning_ratio:
        prune_vit(built, recipe.pruning_ratio, example_input[:1])
    if recipe.num_landmarks:
        swap_attention(built, recipe.num_landmarks)
    if recipe.r:
        merge_tokens(built, recipe.r, example_input=example_input[:1])
    if recipe.quantization:
        quantize_model(built, recipe.quantization, calibration_inputs=list(calibration_inputs) or [example_input])
    return built.eval()


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
                    variant = build_recipe(model, Recipe(ratio, quantization=config), example_input, calibration_inputs)
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
