"""What each way of shipping a ViT-B/16 runs at on this CPU: our defaults and artifacts against what a team picks instead.

timm ``vit_base_patch16_224`` (random weights: speed and size do not depend on
them) in three shapes, each its own table, all rows of a table timed in one
process, interleaved (``compare_throughput``):

* **unpruned**; **pruned 50%** (``prune_vit``, torch-pruning L2); **pruned 50% +
  token merging r=16** (``merge_tokens``).

Rows (what a user would pick, then ours):

* fp32 eager; bf16 compiled (the uncompressed shape under bf16 autocast,
  inductor; what a team runs without us);
* the study's method: ``torch.ao.quantization.quantize_dynamic`` (deprecated);
* OpenVINO + NNCF int8 **by hand**: ``ov.convert_model`` of the same model,
  ``nncf.quantize(..., model_type=TRANSFORMER)`` on the same calibration
  batches, ``compile_model`` with the same thread count;
* ``QuantizeOnFit()``'s **default** (read from the hardware: ``default_quantization``),
  compiled as the callback compiles it, and every fixed int8 config beside it;
* our best torch artifact, the ``.pt2`` (``export_compressed``, AOTInductor);
* ONNX Runtime running our ``.onnx`` of the int8 static model;
* **our OpenVINO IR** (``export_compressed(..., "vit.xml", quantize="int8")``).

Columns: images/s, ratio to fp32 eager (of that shape, and of the unpruned
model, timed in the same loop), to bf16 compiled, to the study's
``quantize_dynamic``; size (state dict or file); first call (compile or load +
first call). The header names the CPU: int8 rankings flip between CPUs.

    python benchmarks/bench_deploy.py [--batch-size 4] [--threads 2] [--rounds 3] [--shapes unpruned pruned merged]
    python benchmarks/bench_deploy.py --fast   # wiring only: a tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lightning_vitcompress import export_compressed, load_artifact, merge_tokens, quantize_model
from lightning_vitcompress.functional import (
    INFERENCE_PRECISIONS,
    QUANTIZATION_CONFIGS,
    compare_throughput,
    default_quantization,
    prune_vit,
    serialized_size_bytes,
)
from lightning_vitcompress.functional.baselines import build_baseline
from lightning_vitcompress.functional.measure import first_call_seconds
from lightning_vitcompress.functional.report import cpu_name
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16

#: the fixed x86 configs the default is compared with: (config, inference_precision)
FIXED = [
    ("int8_static_x86", "32-true"),
    ("int8_static_x86", "bf16-mixed"),
    ("int8_dynamic_x86", "32-true"),
    ("int8_dynamic_x86", "bf16-mixed"),
    ("int8_dynamic", "32-true"),
]


class Row:
    """One variant: how it was built and what it costs before its first call."""

    def __init__(self, model: nn.Module, size_bytes: int, note: str = "") -> None:
        self.model = model
        self.size_bytes = size_bytes
        self.note = note
        self.first_call: float = float("nan")


def study_quantize_dynamic(model: nn.Module) -> nn.Module:
    """The seed study's int8: ``torch.ao.quantization.quantize_dynamic`` on the linear layers (deprecated API)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


class OpenVINOByHand(nn.Module):
    """What a team does with OpenVINO's own docs: convert, NNCF int8 (transformer preset), compile for the CPU."""

    def __init__(self, model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], threads: int) -> None:
        super().__init__()
        import nncf
        import openvino as ov

        ov_model = ov.convert_model(copy.deepcopy(model).eval(), example_input=example)
        dataset = nncf.Dataset([batch.numpy() for batch in calibration])
        quantized = nncf.quantize(
            ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration)
        )
        self.folder = Path(tempfile.mkdtemp(prefix="ov_by_hand_"))
        ov.save_model(quantized, str(self.folder / "model.xml"))
        self.size_bytes = sum(f.stat().st_size for f in self.folder.iterdir())
        self.compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": threads})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(images.numpy())[0])


def quantized_copy(
    model: nn.Module, config: str, precision: str, example: torch.Tensor, calibration: list[torch.Tensor]
) -> nn.Module:
    """``model`` quantized and compiled as ``QuantizeOnFit(config, inference_precision=precision)`` leaves it."""
    quantized = copy.deepcopy(model).eval()
    spec = QUANTIZATION_CONFIGS[config]
    quantize_model(quantized, spec, example_input=example, calibration_inputs=calibration)
    spec.compile(quantized, precision) if spec.compiled_by_default else quantized.compile()
    return quantized


def timed_build(build: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = build()
    return result, time.perf_counter() - start


REFERENCE = "fp32 eager, unpruned (reference)"
#: the artifacts' logit check in this speed benchmark (see shape_rows)
SPEED_ONLY_TOLERANCE = 0.25


def shape_rows(
    model: nn.Module,
    x: torch.Tensor,
    calibration: list[torch.Tensor],
    args: argparse.Namespace,
    out: Path,
    reference: nn.Module,
) -> dict[str, Row]:
    """Every variant of one model shape, built (compiles paid here, first calls recorded); ``reference`` (the
    unpruned fp32 model) is timed beside them when it is another model, for speedups against the original."""
    default = default_quantization(torch.device("cpu"))
    rows: dict[str, Row] = {}
    if reference is not model:
        rows[REFERENCE] = Row(reference, serialized_size_bytes(reference))
    rows["fp32 eager"] = Row(model, serialized_size_bytes(model))
    rows["bf16 compiled (no compression)"] = Row(build_baseline(model, "bf16_compiled"), serialized_size_bytes(model))
    rows["study: quantize_dynamic"] = Row(study_quantize_dynamic(model), 0)
    rows["study: quantize_dynamic"].size_bytes = serialized_size_bytes(rows["study: quantize_dynamic"].model)
    if importlib.util.find_spec("nncf") is not None:
        by_hand, seconds = timed_build(lambda: OpenVINOByHand(model, x, calibration, args.threads))
        rows["OpenVINO NNCF int8, by hand"] = Row(by_hand, by_hand.size_bytes, f"convert + NNCF {seconds:.0f} s")
    for config, precision in FIXED:
        if precision == "bf16-mixed" and not cpu_supports_bfloat16():
            continue
        is_default = (config, precision) == (default.config, default.inference_precision)
        label = f"{config} {precision}" + (" = QuantizeOnFit() default" if is_default else "")
        quantized = quantized_copy(model, config, precision, x, calibration)
        rows[label] = Row(quantized, serialized_size_bytes(quantized))
    best = quantized_copy(model, default.config, "32-true", x, calibration)
    best._compiled_call_impl = None  # exported from the eager quantized model
    # speed rows: random weights and token merging (whose merges can flip on a rounding difference) move logits
    # past the export's own checks, which the tests hold on trained and untrained tiny models
    pt2 = export_compressed(
        best, out / "vit.pt2", x, inference_precision=default.inference_precision, tolerance=SPEED_ONLY_TOLERANCE
    )
    rows["ours: .pt2 (default config, AOTInductor)"] = Row(
        load_artifact(pt2["path"]), pt2["size_bytes"], f"export {pt2['export_seconds']:.0f} s"
    )
    if importlib.util.find_spec("onnxruntime") is not None and not args.no_onnx:
        static = copy.deepcopy(model).eval()
        quantize_model(static, "int8_static_x86", example_input=x, calibration_inputs=calibration)
        # onnxruntime's int8 kernels round differently from oneDNN's: on random ViT-B weights its logits moved
        # 4.4% of the largest one, past export_compressed's 3% check
        onnx = export_compressed(static, out / "vit.onnx", x, tolerance=SPEED_ONLY_TOLERANCE)
        rows["ours: .onnx int8 static, onnxruntime"] = Row(
            load_artifact(onnx["path"]), onnx["size_bytes"], f"export {onnx['export_seconds']:.0f} s"
        )
    if importlib.util.find_spec("nncf") is not None:
        ir = export_compressed(
            model, out / "vit.xml", x, quantize="int8", calibration_data=calibration, tolerance=SPEED_ONLY_TOLERANCE
        )
        rows["ours: OpenVINO IR int8 (ExportOnFit)"] = Row(
            load_artifact(ir["path"]),
            ir["size_bytes"],
            f"export {ir['export_seconds']:.0f} s, {ir['inference_precision']}",
        )
    for row in rows.values():
        row.first_call = first_call_seconds(row.model, x)
    return rows


def print_table(title: str, rows: dict[str, Row], ips: dict[str, float]) -> None:
    eager, bf16 = ips["fp32 eager"], ips["bf16 compiled (no compression)"]
    study = ips["study: quantize_dynamic"]
    original = ips.get(REFERENCE, eager)
    print(f"\n### {title}\n")
    print(
        "| variant | CPU images/s | vs fp32 eager | vs unpruned fp32 eager | vs bf16 compiled | vs quantize_dynamic "
        "| size (MB) | first call (s) | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {ips[name]:.2f} | {ips[name] / eager:.2f}x | {ips[name] / original:.2f}x "
            f"| {ips[name] / bf16:.2f}x | {ips[name] / study:.2f}x | {row.size_bytes / 1e6:.1f} | {row.first_call:.1f} "
            f"| {row.note} |"
        )
    fixed = {n: v for n, v in ips.items() if n.startswith("int8_")}
    chosen = next(n for n in fixed if n.endswith("default"))
    fastest = max(fixed, key=fixed.get)
    print(
        f"\ndefault vs fastest fixed config ({fastest}): {fixed[chosen] / fixed[fastest]:.3f}x; "
        f"default vs the study's quantize_dynamic: {fixed[chosen] / study:.2f}x"
    )
    ir = next((n for n in ips if n.startswith("ours: OpenVINO")), None)
    if ir is not None:
        print(
            f"our OpenVINO IR vs OpenVINO by hand: {ips[ir] / ips['OpenVINO NNCF int8, by hand']:.3f}x; "
            f"vs our .pt2: {ips[ir] / ips['ours: .pt2 (default config, AOTInductor)']:.2f}x; "
            f"vs fp32 eager: {ips[ir] / eager:.2f}x; vs unpruned fp32 eager: {ips[ir] / original:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument(
        "--shapes", nargs="+", default=["unpruned", "pruned", "merged"], choices=["unpruned", "pruned", "merged"]
    )
    parser.add_argument("--merge-r", type=int, default=16)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--fast", action="store_true", help="a tiny ViT at 32x32: checks the wiring in seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # a dozen compiled variants of one model class per table: past dynamo's default recompile_limit (8) the rest
    # would silently run eager
    torch._dynamo.config.recompile_limit = 64
    if args.fast:
        name, size, kwargs = "vit_tiny_patch16_224", 32, dict(img_size=32, patch_size=8, depth=2)
        args.rounds, args.min_run_time, args.merge_r = 1, 0.05, 2
    else:
        name, size, kwargs = "vit_base_patch16_224", 224, {}
    x = torch.randn(args.batch_size, 3, size, size)
    calibration = [torch.randn_like(x) for _ in range(4)]
    default = default_quantization(torch.device("cpu"))
    print(
        f"{name} at {size}x{size}, batch {args.batch_size}, {args.threads} threads of {cpu_name()}; torch "
        f"{torch.__version__}; QuantizeOnFit() default here: {default.config} {default.inference_precision} "
        f"({default.reason}); precisions {list(INFERENCE_PRECISIONS)}"
    )
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    for shape in args.shapes:
        model = copy.deepcopy(reference)
        title = f"{name} unpruned"
        if shape in ("pruned", "merged"):
            prune_vit(model, 0.5, x[:1])
            title = f"{name} pruned 50% (torch-pruning L2)"
        if shape == "merged":
            merge_tokens(model, args.merge_r)
            title += f" + token merging r={args.merge_r}"
        out = Path(tempfile.mkdtemp(prefix=f"bench_deploy_{shape}_"))
        rows = shape_rows(model, x, calibration, args, out, reference if shape != "unpruned" else model)
        print(f"timing {len(rows)} variants of {title} ...", flush=True)
        ips = compare_throughput(
            {n: r.model for n, r in rows.items()}, x, rounds=args.rounds, min_run_time=args.min_run_time
        )
        print("timed", flush=True)
        print_table(title, rows, ips)
        del rows


if __name__ == "__main__":
    main()
