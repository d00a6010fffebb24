"""``config="auto"``: try the quantization configs this machine runs, keep the fastest within the accuracy budget.

Pure torch / torchao (no Lightning). :func:`auto_candidates` lists what can run
here (x86 int8 paths, in bf16-mixed where the CPU has native bf16; portable
int8; weight-only; on CUDA int8, int4 weight-only and, on SM >= 8.9, float8),
most promising first. :func:`select_quantization` quantizes (and compiles, as
each config runs fastest) a copy of the model per candidate, times them all
interleaved with the unquantized model using the package's own timing
(:func:`~lightning_vitcompress.functional.measure.compare_throughput`), then
checks the fastest ones' accuracy against the budget until one passes. A
config must beat the unquantized model by :data:`MIN_SPEEDUP` to be chosen;
if none does, the answer is "keep it unquantized".

Example (a tiny timm ViT, one candidate, short timings; ``auto_candidates("cpu")`` lists all of them)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.quantize_auto import (
    ...     AutoCandidate, format_auto_table, select_quantization)
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    >>> images = torch.randn(8, 3, 32, 32)
    >>> result = select_quantization(vit, [AutoCandidate("int8_dynamic")], images, example_input=images[:2],
    ...                              compile=False, rounds=1, min_run_time=0.01)
    >>> result["chosen"] in (None, AutoCandidate("int8_dynamic"))   # None: not faster here (machine-dependent)
    True
    >>> print(format_auto_table(result))   # images/s and the outcome depend on the machine
    | config | images/s | vs unquantized | top-1 | outcome |
    |---|---|---|---|---|
    | unquantized | ... | 1.00x | | |
    | int8_dynamic | ...
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_vitcompress.functional.budget import AccuracyBudget
from lightning_vitcompress.functional.measure import compare_throughput
from lightning_vitcompress.functional.quantize import quantize_model
from lightning_vitcompress.functional.quantize_configs import QUANTIZATION_CONFIGS
from lightning_vitcompress.functional.quantize_layers import SkipSpec
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16

__all__ = ["MIN_SPEEDUP", "AutoCandidate", "auto_candidates", "format_auto_table", "select_quantization"]

#: a config is kept only if it runs at least this much faster than the unquantized model (timing noise
#: on a loaded machine is a few percent; an equally fast quantized model costs accuracy for nothing)
MIN_SPEEDUP = 1.05


@dataclass(frozen=True)
class AutoCandidate:
    """One configuration ``"auto"`` tries: a registered config name and the precision of what is not quantized."""

    config: str
    inference_precision: str = "32-true"

    @property
    def label(self) -> str:
        """``"int8_static_x86"`` or ``"int8_static_x86+bf16"`` (the name logged under ``quant/auto/``)."""
        return self.config if self.inference_precision == "32-true" else f"{self.config}+bf16"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def auto_candidates(device: Union[str, torch.device], *, calibration: bool = True) -> list[AutoCandidate]:
    """The configs ``"auto"`` tries on ``device``, most promising first.

    CPU: on x86 the oneDNN int8 paths (static first when ``calibration`` inputs
    exist; each also in bf16-mixed where the CPU has AVX512-BF16 or AMX), then
    the portable ``int8_dynamic`` and ``int8_weight_only``. CUDA: ``float8_dynamic``
    (SM >= 8.9), ``int8_dynamic``, ``int4_weight_only``, ``int8_weight_only``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        names = ["float8_dynamic", "int8_dynamic", "int4_weight_only", "int8_weight_only"]
        capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else (0, 0)
        return [
            AutoCandidate(name)
            for name in names
            if (needed := QUANTIZATION_CONFIGS[name].min_capability) is None or capability >= needed
        ]
    candidates: list[AutoCandidate] = []
    if _is_x86() and torch.backends.mkldnn.is_available():
        flags = _cpu_flags()
        x86 = (["int8_static_x86"] if calibration else []) + ["int8_dynamic_x86"]
        bf16 = cpu_supports_bfloat16()
        # int8 GEMMs are fast with VNNI or AMX; without them oneDNN still runs, measured like the rest
        fast_int8 = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) or not flags
        precisions = (["bf16-mixed"] if bf16 else []) + ["32-true"]
        x86_candidates = [AutoCandidate(name, precision) for name in x86 for precision in precisions]
        candidates = x86_candidates if fast_int8 else []
        candidates += [AutoCandidate("int8_dynamic"), AutoCandidate("int8_weight_only")]
        if not fast_int8:
            candidates += x86_candidates
        return candidates
    return [AutoCandidate("int8_dynamic"), AutoCandidate("int8_weight_only")]


def _trial(candidate: AutoCandidate, status: str, **values: Any) -> dict[str, Any]:
    return {
        "label": candidate.label,
        "config": candidate.config,
        "inference_precision": candidate.inference_precision,
        "status": status,
        "images_per_s": None,
        "speedup": None,
        "accuracy": None,
        "build_seconds": None,
        **values,
    }


def select_quantization(
    model: nn.Module,
    candidates: Sequence[AutoCandidate],
    timing_input: torch.Tensor,
    *,
    skip: SkipSpec = None,
    example_input: Any = None,
    calibration_inputs: Optional[Sequence[Any]] = None,
    compile: Union[bool, dict[str, Any], None] = None,
    accuracy: Optional[Callable[[nn.Module], Optional[float]]] = None,
    budget: Optional[AccuracyBudget] = None,
    time_budget_s: float = 300.0,
    rounds: int = 3,
    min_run_time: float = 0.5,
    num_threads: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
    keep_models: bool = False,
) -> dict[str, Any]:
    """Try each candidate on a copy of ``model``; the fastest one within ``budget`` (``model`` is not changed).

    Args:
        model: the trained model (unquantized); only copies are quantized.
        candidates: what to try, in order (see :func:`auto_candidates`); once half of
            ``time_budget_s`` is spent building copies the rest are "not tried".
        timing_input: the batch every variant is timed on (its batch size is the one that counts).
        skip, example_input, calibration_inputs, compile: as for :func:`quantize_model` /
            ``QuantizeOnFit``; calibrated configs without ``calibration_inputs`` are "not tried".
        accuracy: ``fn(model) -> top-1`` on validation data; with ``budget`` the fastest
            candidates are checked in turn until one is within it; without, only the chosen one.
        time_budget_s: the whole selection's time, building and timing (the timing shrinks
            ``min_run_time`` to fit what is left).
        rounds, min_run_time, num_threads: as for :func:`compare_throughput`.
        progress: called with one line per step ("trying int8_static_x86 (2/6)...").
        keep_models: also return the quantized copies (``result["models"]``, by label), e.g. to
            time them again; by default they are freed.

    Returns:
        ``{"chosen": AutoCandidate or None, "trials": [one dict per candidate: label, config,
        inference_precision, status, images_per_s, speedup, accuracy, build_seconds],
        "baseline_images_per_s", "batch_size", "seconds", "reason"}``.
    """
    say = progress or (lambda message: None)
    start = time.perf_counter()
    built: dict[str, nn.Module] = {}
    by_label: dict[str, AutoCandidate] = {}
    trials: dict[str, dict[str, Any]] = {}
    build_times: list[float] = []
    for index, candidate in enumerate(candidates, 1):
        spec = QUANTIZATION_CONFIGS[candidate.config]
        elapsed = time.perf_counter() - start
        if built and elapsed > 0.5 * time_budget_s:
            trials[candidate.label] = _trial(candidate, f"not tried: time budget ({time_budget_s:g} s) spent")
            continue
        if spec.calibrates and not calibration_inputs:
            trials[candidate.label] = _trial(candidate, "not tried: no calibration inputs")
            continue
        typical = f", about {sum(build_times) / len(build_times):.0f} s each so far" if build_times else ""
        say(
            f"trying {candidate.label} ({index}/{len(candidates)}: quantize"
            f"{' + compile' if spec.compiles(compile) else ''}{typical})"
        )
        began = time.perf_counter()
        try:
            trial_model = copy.deepcopy(model)
            quantize_model(
                trial_model,
                spec,
                skip=skip,
                example_input=example_input,
                calibration_inputs=calibration_inputs if spec.calibrates else None,
            )
            if spec.compiles(compile):
                spec.compile(
                    trial_model, candidate.inference_precision, **(compile if isinstance(compile, dict) else {})
                )
            with torch.inference_mode():
                trial_model.eval()(timing_input)  # compiles for the timed shape (and fails here, not in the timer)
        except Exception as err:
            trials[candidate.label] = _trial(candidate, f"failed: {type(err).__name__}: {err}")
            continue
        seconds = time.perf_counter() - began
        build_times.append(seconds)
        built[candidate.label] = trial_model
        by_label[candidate.label] = candidate
        trials[candidate.label] = _trial(candidate, "timed", build_seconds=seconds)
    baseline_ips: Optional[float] = None
    chosen: Optional[AutoCandidate] = None
    reason = "no config could be built here"
    if built:
        left = max(0.0, time_budget_s - (time.perf_counter() - start))
        per_measurement = min(min_run_time, max(0.05, 0.5 * left / (rounds * (len(built) + 1))))
        say(
            f"timing {len(built)} configs against the unquantized model, interleaved (batch "
            f"{timing_input.shape[0]}, {rounds} rounds of {per_measurement:.2f} s or more each)"
        )
        variants = {"unquantized": model, **built}
        samples: dict[str, list[float]] = {label: [] for label in variants}
        for round_index in range(rounds):
            # one round at a time: a round or more is always measured, the next only while time is left
            measured = compare_throughput(
                variants,
                timing_input,
                num_threads=num_threads,
                rounds=1,
                min_run_time=per_measurement,
                warmup=1 if round_index == 0 else 0,
            )
            for label, value in measured.items():
                samples[label].append(value)
            if time.perf_counter() - start > time_budget_s:
                break
        ips = {label: sorted(values)[len(values) // 2] for label, values in samples.items()}
        baseline_ips = ips.pop("unquantized")
        for label, value in ips.items():
            trials[label].update(images_per_s=value, speedup=value / baseline_ips)
        ranked = sorted(ips, key=ips.__getitem__, reverse=True)
        faster = [label for label in ranked if ips[label] / baseline_ips >= MIN_SPEEDUP]
        for label in ranked:
            if label not in faster:
                trials[label]["status"] = f"slower than unquantized x{MIN_SPEEDUP:g}"
        reason = (
            f"no config ran {MIN_SPEEDUP:g}x faster than the unquantized model (fastest: {ranked[0]} at "
            f"{ips[ranked[0]] / baseline_ips:.2f}x)"
        )
        for label in faster:
            if accuracy is not None:
                say(f"checking the accuracy of {label} on the validation data")
                trials[label]["accuracy"] = top1 = accuracy(built[label])
                if budget is not None and not budget.allows(top1):
                    trials[label]["status"] = f"beyond budget ({budget.describe(top1)})"
                    continue
            chosen = by_label[label]
            trials[label]["status"] = "chosen"
            reason = (
                f"fastest config{' within the accuracy budget' if budget is not None else ''}: "
                f"{ips[label] / baseline_ips:.2f}x the unquantized model"
            )
            break
        else:
            if faster:
                reason = "every config faster than the unquantized model lost more accuracy than the budget allows"
        for label in faster[faster.index(chosen.label) + 1 :] if chosen is not None else ():
            trials[label]["status"] = "faster than unquantized, not needed"
    models = dict(built) if keep_models else {}
    built.clear()
    return {
        "models": models,
        "chosen": chosen,
        "trials": [trials[c.label] for c in candidates if c.label in trials],
        "baseline_images_per_s": baseline_ips,
        "batch_size": int(timing_input.shape[0]),
        "seconds": time.perf_counter() - start,
        "reason": reason,
    }


def format_auto_table(result: dict[str, Any]) -> str:
    """A Markdown table of what ``"auto"`` tried (one row per candidate) and what it chose, and why."""
    lines = ["| config | images/s | vs unquantized | top-1 | outcome |", "|---|---|---|---|---|"]
    baseline = result.get("baseline_images_per_s")
    lines.append(f"| unquantized | {baseline:.1f} | 1.00x | | |" if baseline else "| unquantized | n/a | | | |")
    for trial in result["trials"]:
        ips = f"{trial['images_per_s']:.1f}" if trial["images_per_s"] is not None else "n/a"
        speedup = f"{trial['speedup']:.2f}x" if trial["speedup"] is not None else "n/a"
        top1 = f"{trial['accuracy']:.2%}" if trial["accuracy"] is not None else ""
        lines.append(f"| {trial['label']} | {ips} | {speedup} | {top1} | {trial['status']} |")
    chosen = result["chosen"]
    verdict = f"chose {chosen.label}" if chosen is not None else "kept the model unquantized"
    lines.append(
        f"\n{verdict}: {result['reason']} (batch {result['batch_size']}, selection took {result['seconds']:.1f} s)"
    )
    return "\n".join(lines)
