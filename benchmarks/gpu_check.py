"""The CUDA paths, proven on a GPU in one run that fits in about 8 minutes.

1. The CUDA tests (the ones that skip or take another branch without a GPU),
   as a pytest subprocess with a time limit.
2. ViT-B/16 (random weights) at batch 64 on the GPU, compiled: bf16, int8
   dynamic (torchao), float8 dynamic (only on SM >= 8.9), int4 weight-only;
   pruned 50% alone and with each. Throughput (images/s, interleaved with
   ``compare_throughput``) and p50 latency at batch 1, fp32 eager as the reference.

Every variant is built and checked on its own: one that fails (an old torchao,
an unsupported GPU) becomes a row that says why, and the rest still run. A time
budget stops compiling new variants; what is left is reported, not silently
measured eager. Without CUDA the script says so and exits 0 (``--plan`` prints
what it would run).

    python benchmarks/gpu_check.py [--budget 420] [--skip-tests] [--no-compile] [--output-dir outputs/gpu_check]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
#: the tests that take a CUDA branch: skipped or different without a GPU
CUDA_TESTS = [
    "tests/test_distillation.py::test_teacher_on_the_students_gpu_and_precision",
    "tests/test_quantization.py::test_layers_a_cuda_config_cannot_take_are_reported_not_silently_skipped",
    "tests/test_benchmark.py::test_size_is_the_saved_state_dict_and_gpu_is_none_without_cuda",
    "tests/test_benchmark.py::test_baseline_is_the_model_before_any_edit",
    "tests/test_benchmark.py::test_bf16_compiled_baseline_gives_the_speedup_against_what_a_team_would_run",
    "tests/test_export.py::test_pt2_for_cuda_of_a_pruned_bf16_model_runs_on_the_gpu_like_the_live_model",
    "tests/test_bad_inputs_quantization.py",
    "tests/test_bad_inputs_benchmark.py",
]
QUANTIZED = ("int8_dynamic", "float8_dynamic", "int4_weight_only")


def plan(capability: Optional[tuple[int, int]]) -> list[tuple[str, bool, Optional[str], Optional[str]]]:
    """``(label, pruned, config, reason it is skipped or None)`` for every variant, in timing order."""
    rows: list[tuple[str, bool, Optional[str], Optional[str]]] = [("fp32 eager (reference)", False, None, None)]
    for pruned in (False, True):
        prefix = "pruned 50% + " if pruned else ""
        rows.append((f"{prefix}bf16" if pruned else "bf16", pruned, "bf16", None))
        for config in QUANTIZED:
            skip = None
            if config == "float8_dynamic" and (capability is None or capability < (8, 9)):
                skip = f"float8 needs SM >= 8.9 (this GPU: {capability})"
            rows.append((f"{prefix}{config}", pruned, config, skip))
    return rows


def run_tests(limit: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=limit,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        tail = (done.stdout + done.stderr)[-3000:]
        return {"returncode": done.returncode, "seconds": round(time.perf_counter() - start, 1), "tail": tail}
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"returncode": "timeout", "seconds": limit, "tail": out[-3000:]}


def build(
    label: str,
    pruned: bool,
    config: Optional[str],
    base: torch.nn.Module,
    pruned_base: torch.nn.Module,
    compile_model: bool,
    x: torch.Tensor,
) -> torch.nn.Module:
    from lightning_vitcompress import quantize_model

    model = copy.deepcopy(pruned_base if pruned else base)
    if config is None:  # the fp32 eager reference
        return model.float().cuda().eval()
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    if config != "bf16":
        quantize_model(model, config)
    if compile_model:
        model = torch.compile(model)
    with torch.inference_mode():
        model(x.to(torch.bfloat16))  # compile (and check) now, not inside the timing
        model(x[:1].to(torch.bfloat16))
    return model


class BF16Input(torch.nn.Module):
    """Feeds a bf16 model the fp32 timing input (one cast, as a bf16 pipeline would do on load)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for everything; no new compile after")
    parser.add_argument("--test-limit", type=int, default=150, help="seconds for the CUDA tests")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--plan", action="store_true", help="print the variants and exit (works without CUDA)")
    parser.add_argument("--output-dir", default=os.environ.get("OUT") or "outputs/gpu_check")
    args = parser.parse_args()
    start = time.perf_counter()
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    variants = plan(capability)
    if args.plan or not torch.cuda.is_available():
        if not torch.cuda.is_available():
            print("no CUDA device here: nothing to check (the GPU table needs a GPU). Planned variants:")
        for label, _, _, skip in variants:
            print(f"  {label}{'  [skipped: ' + skip + ']' if skip else ''}")
        return
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(capability),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
    }
    if not args.skip_tests:
        report["tests"] = run_tests(args.test_limit)
        print(f"CUDA tests: returncode {report['tests']['returncode']} in {report['tests']['seconds']} s")
        print(report["tests"]["tail"][-1500:], flush=True)

    import timm

    from lightning_vitcompress.functional import compare_throughput, measure_latency, prune_vit, serialized_size_bytes

    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    pruned_base = copy.deepcopy(base)
    prune_vit(pruned_base, 0.5, torch.randn(1, 3, 224, 224))
    x = torch.randn(args.batch_size, 3, 224, 224, device="cuda")
    models: dict[str, torch.nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    for label, pruned, config, skip in variants:
        row = rows[label] = {"status": "ok"}
        if skip:
            row["status"] = f"skipped: {skip}"
            continue
        if time.perf_counter() - start > args.budget:
            row["status"] = "not run: time budget spent"
            continue
        built = time.perf_counter()
        try:
            model = build(label, pruned, config, base, pruned_base, not args.no_compile and config is not None, x)
        except Exception as err:
            row["status"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            print(f"  {label}: {row['status']}", flush=True)
            continue
        row["build_and_compile_s"] = round(time.perf_counter() - built, 1)
        row["size_mb"] = serialized_size_bytes(model) / 1e6
        models[label] = model if config is None else BF16Input(model)
        print(f"  {label}: built in {row['build_and_compile_s']} s", flush=True)
    if models:
        ips = compare_throughput(models, x, rounds=3, min_run_time=1.0)
        reference = ips.get("fp32 eager (reference)")
        for label, model in models.items():
            p50, _ = measure_latency(model, x, repeats=30)
            rows[label].update(
                images_per_s=ips[label],
                latency_ms_p50=p50,
                speedup_vs_fp32=None if not reference else ips[label] / reference,
            )
        bf16 = ips.get("bf16")
        for label in models:
            rows[label]["speedup_vs_bf16"] = None if not bf16 else ips[label] / bf16
    report["rows"] = rows
    report["seconds"] = round(time.perf_counter() - start, 1)
    lines = [
        f"ViT-B/16 @224, batch {args.batch_size}, {report['gpu']} (SM {capability[0]}.{capability[1]}), "
        f"torch {torch.__version__}, {'eager' if args.no_compile else 'torch.compile'}; latency p50 at batch 1",
        "",
        "| variant | images/s | vs fp32 eager | vs bf16 | p50 latency (ms) | size (MB) | status |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(value: Any, digits: int = 2) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    for label, row in rows.items():
        lines.append(
            f"| {label} | {cell(row.get('images_per_s'), 1)} | {cell(row.get('speedup_vs_fp32'))}x "
            f"| {cell(row.get('speedup_vs_bf16'))}x | {cell(row.get('latency_ms_p50'))} "
            f"| {cell(row.get('size_mb'), 1)} | {row['status']} |"
        )
    table = "\n".join(lines)
    print("\n" + table + f"\n\ntotal {report['seconds']} s")
    (output / "gpu_check.md").write_text(table + "\n")
    (output / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
