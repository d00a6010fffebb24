"""Measuring and reporting: one model, or several side by side with their ratios.

Pure torch (no Lightning): :func:`benchmark_model` measures one model,
:func:`compare_models` measures several side by side (interleaved) and reports
the ratios. Numbers always come with their conditions (batch size, threads,
CPU/GPU names, library versions); a device that is absent is reported as
``None`` (``n/a`` in the table), never as a number.
:class:`~lightning_vitcompress.BenchmarkCallback` runs them at the end of fit.
"""

from __future__ import annotations

import copy
import datetime
import platform
import warnings
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_vitcompress._checks import (
    check_positive,
)
from lightning_vitcompress.functional.artifact import LoadedArtifact
from lightning_vitcompress.functional.measure import (
    compare_throughput,
    count_macs,
    count_parameters,
    measure_accuracy,
    measure_latency,
    resolve_device,
    serialized_size_bytes,
    thread_count,
)

__all__ = ["benchmark_model", "compare_models", "format_report", "save_plot", "summarize"]


REPORT_FILENAME = "vitcompress_benchmark.json"
_MB, _MIB = 1e6, 2**20
_METRICS = (
    "params",
    "size_mb",
    "size_mib",
    "macs_per_image",
    "cpu_images_per_s",
    "gpu_images_per_s",
    "cpu_latency_ms_p50",
    "cpu_latency_ms_p95",
    "gpu_latency_ms_p50",
    "gpu_latency_ms_p95",
    "accuracy",
)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (int8 speed rankings depend on it), else the platform's name."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, Optional[str]]:
    """The installed version of each package a report names (``None`` where one is absent)."""
    names = ("torch", "lightning", "timm", "torchao", "torch-pruning", "torchmetrics", "lightning-vitcompress")
    versions: dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_devices(devices: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``devices`` as a tuple of valid device names (a single name is one device, not its letters)."""
    if isinstance(devices, (str, torch.device)):
        devices = (devices,)
    if not isinstance(devices, Sequence) or not devices:
        raise ValueError(f"devices={devices!r}: pass the devices to time, e.g. ('cpu',) or ('cpu', 'cuda').")
    for device in devices:
        resolve_device(device, "devices")
    return tuple(str(device) for device in devices)


def check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of positive ints, or a ``ValueError`` naming ``input_shape``."""
    if (
        isinstance(input_shape, (str, bytes))
        or not isinstance(input_shape, Sequence)
        or len(input_shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape)
    ):
        raise ValueError(
            f"input_shape={input_shape!r}: give (channels, height, width) of one image as positive ints, "
            "e.g. (3, 224, 224)."
        )
    return (input_shape[0], input_shape[1], input_shape[2])


def _cuda_copy(model: nn.Module, label: str) -> Optional[nn.Module]:
    try:
        return copy.deepcopy(model).to("cuda")
    except Exception as err:
        warnings.warn(f"could not move the {label} model to CUDA ({err}); GPU columns are n/a.", stacklevel=2)
        return None


def measurement_steps(models: int, devices: Sequence[str], rounds: int) -> int:
    """How many times :func:`compare_models` calls ``progress`` for ``models`` models (a bar's total): per model
    its size/MACs/accuracy, then per device present ``rounds`` timings and one latency."""
    present = [d for d in check_devices(devices) if resolve_device(d).type == "cpu" or torch.cuda.is_available()]
    return models * (1 + len(present) * (rounds + 1))


def compare_models(
    models: dict[str, nn.Module],
    example_input: torch.Tensor,
    *,
    batches: Optional[Iterable[Any]] = None,
    devices: Sequence[str] = ("cpu", "cuda"),
    num_threads: Optional[int] = None,
    rounds: int = 3,
    min_run_time: float = 0.5,
    latency_repeats: int = 30,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Measure several CPU-resident models side by side; throughput is timed interleaved.

    Args:
        models: ``{"baseline": vit, "final": compressed}`` (any names).
        example_input: a batch on the CPU; its batch size is the throughput batch size.
        batches: ``(images, labels)`` batches for top-1 accuracy (``None``: accuracy is ``None``).
        devices: ``"cpu"`` and/or ``"cuda"``; CUDA columns are ``None`` when it is unavailable.
        num_threads: CPU threads for timing (default: the current ``torch.get_num_threads()``).
        rounds, min_run_time: interleaved rounds x seconds per measurement; the timing
            costs about ``rounds * len(models) * len(devices) * min_run_time`` seconds.
            Fewer/shorter trade precision for time.
        latency_repeats: batch-1 calls timed for the latency percentiles.
        progress: called with what was just measured, :func:`measurement_steps` times in all.

    Returns:
        ``{name: {params, size_mb, ..., accuracy}}`` plus ``"conditions"``.

    Example::

        >>> import copy, timm, torch
        >>> from lightning_vitcompress.functional import compare_models, quantize_model
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
        >>> vit_int8 = copy.deepcopy(vit)
        >>> summary = quantize_model(vit_int8, "int8_dynamic")  # in place
        >>> report = compare_models({"fp32": vit, "int8": vit_int8}, torch.randn(8, 3, 32, 32), devices=["cpu"],
        ...                         rounds=1, min_run_time=0.05, latency_repeats=2)
        >>> speedup = report["int8"]["cpu_images_per_s"] / report["fp32"]["cpu_images_per_s"]
        >>> report["int8"]["size_mb"] < report["fp32"]["size_mb"]
        True
    """
    check_positive(example_input.shape[0], "batch_size", "32")
    devices = check_devices(devices)
    batches = list(batches) if batches is not None else None
    say = progress or (lambda message: None)
    results: dict[str, dict[str, Any]] = {name: dict.fromkeys(_METRICS) for name in models}
    with thread_count(num_threads) as threads:
        for name, model in models.items():
            # an exported file (LoadedArtifact) holds no parameters: its size is the file's, params and MACs n/a
            artifact = isinstance(model, LoadedArtifact)
            size = model.size_bytes if isinstance(model, LoadedArtifact) else serialized_size_bytes(model)
            results[name].update(
                params=None if artifact else count_parameters(model),
                size_mb=size / _MB,
                size_mib=size / _MIB,
                macs_per_image=None if artifact else count_macs(model, example_input[:1]),
                accuracy=measure_accuracy(model, batches, device="cpu") if batches else None,
            )
            say(f"size, MACs{', accuracy' if batches else ''}: {name}")
        if "cpu" in devices:
            for name, ips in compare_throughput(
                models,
                example_input,
                num_threads=threads,
                rounds=rounds,
                min_run_time=min_run_time,
                progress=lambda message: say(f"CPU {message}"),
            ).items():
                results[name]["cpu_images_per_s"] = ips
            for name, model in models.items():
                p50, p95 = measure_latency(model, example_input, num_threads=threads, repeats=latency_repeats)
                results[name].update(cpu_latency_ms_p50=p50, cpu_latency_ms_p95=p95)
                say(f"CPU latency: {name}")
        gpu_name = None
        if any(resolve_device(d).type == "cuda" for d in devices) and torch.cuda.is_available():
            gpu_name = torch.cuda.get_device_name()
            on_gpu = {name: _cuda_copy(model, name) for name, model in models.items()}
            movable = {name: model for name, model in on_gpu.items() if model is not None}
            if movable:
                gpu_input = example_input.to("cuda")
                for name, ips in compare_throughput(
                    movable,
                    gpu_input,
                    rounds=rounds,
                    min_run_time=min_run_time,
                    progress=lambda message: say(f"GPU {message}"),
                ).items():
                    results[name]["gpu_images_per_s"] = ips
                for name, model in movable.items():
                    p50, p95 = measure_latency(model, gpu_input, repeats=latency_repeats)
                    results[name].update(gpu_latency_ms_p50=p50, gpu_latency_ms_p95=p95)
                    say(f"GPU latency: {name}")
            del on_gpu, movable
            torch.cuda.empty_cache()
    conditions = {
        "batch_size": int(example_input.shape[0]),
        "input_shape": list(example_input.shape[1:]),
        "num_threads": threads,
        "cpu_name": cpu_name(),
        "gpu_name": gpu_name,
        "versions": package_versions(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {**results, "conditions": conditions}


def benchmark_model(model: nn.Module, example_input: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
    """Measure one model; the same numbers :class:`BenchmarkCallback` reports (see :func:`compare_models`).

    Example::

        >>> import timm, torch
        >>> from lightning_vitcompress.functional import benchmark_model
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
        >>> stats = benchmark_model(vit, torch.randn(8, 3, 32, 32), devices=["cpu"], rounds=1, min_run_time=0.05,
        ...                         latency_repeats=2)
        >>> stats["cpu_images_per_s"] > 0, stats["params"] == sum(p.numel() for p in vit.parameters())
        (True, True)
    """
    report = compare_models({"model": model}, example_input, **kwargs)
    return {**report["model"], **report["conditions"]}


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or not denominator else numerator / denominator


def summarize(baseline: dict[str, Any], final: dict[str, Any]) -> dict[str, Optional[float]]:
    """Final/baseline ratios: speedups (>1 is faster), size and params ratios (<1 is smaller)."""
    accuracy_delta = None
    if baseline.get("accuracy") is not None and final.get("accuracy") is not None:
        accuracy_delta = final["accuracy"] - baseline["accuracy"]
    return {
        "cpu_speedup": _ratio(final.get("cpu_images_per_s"), baseline.get("cpu_images_per_s")),
        "gpu_speedup": _ratio(final.get("gpu_images_per_s"), baseline.get("gpu_images_per_s")),
        "size_ratio": _ratio(final.get("size_mb"), baseline.get("size_mb")),
        "params_ratio": _ratio(final.get("params"), baseline.get("params")),
        "macs_ratio": _ratio(final.get("macs_per_image"), baseline.get("macs_per_image")),
        "accuracy_delta": accuracy_delta,
    }


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table of a :class:`BenchmarkCallback` report (baseline, final, ratio)."""
    rows = [
        ("params", "params", 0),
        ("size (MB)", "size_mb", 2),
        ("size (MiB)", "size_mib", 2),
        ("MACs / image", "macs_per_image", 0),
        ("CPU images/s", "cpu_images_per_s", 1),
        ("GPU images/s", "gpu_images_per_s", 1),
        ("CPU latency p50 (ms)", "cpu_latency_ms_p50", 2),
        ("CPU latency p95 (ms)", "cpu_latency_ms_p95", 2),
        ("GPU latency p50 (ms)", "gpu_latency_ms_p50", 2),
        ("top-1 accuracy", "accuracy", 4),
    ]
    baseline, final = report["baseline"], report["final"]
    deployed = report.get("deployed")  # the exported file as loaded (ExportOnFit), when there is one
    lines = ["| metric | baseline | final | final / baseline |", "|---|---|---|---|"]
    if deployed is not None:
        lines = [
            "| metric | baseline | final | final / baseline | deployed | deployed / baseline |",
            "|---|---|---|---|---|---|",
        ]
    for label, key, digits in rows:
        ratio = _ratio(final.get(key), baseline.get(key))
        if key == "accuracy":
            delta = report["ratios"]["accuracy_delta"]
            ratio_text = "n/a" if delta is None else f"{delta * 100:+.2f} pt"
        else:
            ratio_text = "n/a" if ratio is None else f"{ratio:.3f}x"
        line = f"| {label} | {_cell(baseline.get(key), digits)} | {_cell(final.get(key), digits)} | {ratio_text} |"
        if deployed is not None:
            deployed_ratio = _ratio(deployed.get(key), baseline.get(key))
            if key == "accuracy":
                delta = report["deployed_ratios"]["accuracy_delta"]
                deployed_text = "n/a" if delta is None else f"{delta * 100:+.2f} pt"
            else:
                deployed_text = "n/a" if deployed_ratio is None else f"{deployed_ratio:.3f}x"
            line += f" {_cell(deployed.get(key), digits)} | {deployed_text} |"
        lines.append(line)
    if report.get("final_tokens_per_block"):
        lines.append(f"| tokens after each block (final) | | {report['final_tokens_per_block']} | |")
    startup = report.get("deployed_startup")
    if startup is not None:
        lines.append(
            f"\ndeployed: {startup['path']}; load {_cell(startup['load_seconds'])} s + first call "
            f"{_cell(startup['first_call_seconds'])} s, instead of the in-process compile's "
            f"{_cell(startup['compile_seconds'])} s"
        )
    gpu = report.get("gpu_name") or "no CUDA"
    lines.append(
        f"\nbatch {report['batch_size']}, {report['num_threads']} CPU threads, CPU: {report['cpu_name']}, GPU: {gpu}"
    )
    lines += _baselines_table(report)
    lines.extend(_decision_lines(report.get("decisions") or {}))
    return "\n".join(lines)


def _baselines_table(report: dict[str, Any]) -> list[str]:
    """The final model against what a team would run without compressing (``BenchmarkCallback(baselines=...)``)."""
    references = report.get("baselines") or {}
    if not references:
        return []
    lines = [
        "",
        "| against | CPU images/s | GPU images/s | final CPU speedup | final GPU speedup |",
        "|---|---|---|---|---|",
    ]
    baseline_ratios = report["ratios"]
    lines.append(
        f"| fp32 eager (baseline) | {_cell(report['baseline'].get('cpu_images_per_s'), 1)} "
        f"| {_cell(report['baseline'].get('gpu_images_per_s'), 1)} | {_cell(baseline_ratios['cpu_speedup'])}x "
        f"| {_cell(baseline_ratios['gpu_speedup'])}x |"
    )
    for name, reference in references.items():
        ratios = reference["ratios"]
        lines.append(
            f"| {name} | {_cell(reference.get('cpu_images_per_s'), 1)} | {_cell(reference.get('gpu_images_per_s'), 1)} "
            f"| {_cell(ratios['cpu_speedup'])}x | {_cell(ratios['gpu_speedup'])}x |"
        )
    return lines


def _decision_lines(decisions: dict[str, Any]) -> list[str]:
    """One line per decision the callbacks took (``report["decisions"]``): undone steps, layers kept, "auto"."""
    lines: list[str] = []
    for name, decided in decisions.items():
        for undone in decided.get("rolled_back", []):
            accuracy = undone.get("accuracy")
            what = "the training after a rollback" if undone.get("after_rollback") else f"step {undone['step']}"
            lines.append(
                f"- {name}: {what} ({undone['ratio']:.3f} of the channels removed, top-1 "
                f"{'n/a' if accuracy is None else f'{accuracy:.2%}'} vs {undone['reference']:.2%} entering fit) "
                f"was beyond max_accuracy_drop={decided.get('max_accuracy_drop')}: "
                + ("rolled back" if undone.get("rolled_back") else "kept (could not be rolled back)")
            )
        for back in decided.get("swapped_back", []):
            after = back.get("accuracy_after")
            lines.append(
                f"- {name}: {back['block']} swapped back to exact attention for max_accuracy_drop="
                f"{decided.get('max_accuracy_drop')} (alone it gains {back['accuracy_gain']:+.2f} pt; top-1 after "
                f"{'n/a' if after is None else f'{after:.2%}'} vs {back['reference']:.2%} entering fit)"
            )
        for block, why in (decided.get("skipped_blocks") or {}).items():
            lines.append(f"- {name}: {block} kept exact: {why}")
        if "break_even_tokens" in decided:
            even = decided["break_even_tokens"]
            lines.append(
                f"- {name}(min_tokens='auto'): measured break-even "
                f"{'not reached' if even is None else f'{even} tokens'}"
            )
        if decided.get("stopped_by_budget"):
            lines.append(f"- {name}: the schedule stopped after step {decided.get('steps_kept')}")
        if decided.get("kept_in_higher_precision"):
            lines.append(
                f"- {name}: kept in higher precision for the accuracy budget, most sensitive first: "
                f"{', '.join(decided['kept_in_higher_precision'])}"
            )
        auto = decided.get("auto")
        if auto:
            tried = ", ".join(
                f"{t['label']} {'n/a' if t['speedup'] is None else format(t['speedup'], '.2f') + 'x'}"
                for t in auto["tried"]
            )
            lines.append(
                f"- {name}(config='auto') chose {auto['chosen']}: {auto['reason']} (tried: {tried}; "
                f"{auto['selection_seconds']:.0f} s)"
            )
    return ["", "Decisions:", *lines] if lines else []


def save_plot(report: dict[str, Any], path: Union[str, Path]) -> Optional[Path]:
    """PNG of accuracy vs CPU throughput (baseline -> final); ``None`` without matplotlib or accuracy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = [(name, report[name]) for name in ("baseline", "final")]
    if any(p["accuracy"] is None or p["cpu_images_per_s"] is None for _, p in points):
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, point in points:
        ax.scatter(point["cpu_images_per_s"], point["accuracy"] * 100, s=60, label=name)
    (_, start), (_, end) = points
    ax.annotate(
        "",
        xy=(end["cpu_images_per_s"], end["accuracy"] * 100),
        xytext=(start["cpu_images_per_s"], start["accuracy"] * 100),
        arrowprops=dict(arrowstyle="->", color="gray"),
    )
    ax.set_xlabel(f"CPU images/s (batch {report['batch_size']}, {report['num_threads']} threads)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
