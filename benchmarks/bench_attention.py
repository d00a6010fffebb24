"""Attention written out as bf16 matmuls vs the fused CPU kernel, in QuantizeOnFit()'s default x86 recipe.

``int8_static_x86`` compiled with ``inference_precision="bf16-mixed"`` (the
default on x86 CPUs with VNNI/AMX and native bf16) runs attention under CPU
autocast. ``F.scaled_dot_product_attention`` then reaches ATen's fused CPU
flash kernel; :class:`~lightning_vitcompress.functional.sdpa.DecomposedAttention`
writes it out as matmul -> softmax -> matmul, which inductor fuses and oneDNN
runs in bf16. This script times both, in one process, interleaved, on timm
ViT-B/16 (random weights) unpruned and pruned 50% at several image sizes, and,
for reference, fp32 eager and the OpenVINO NNCF int8 model a user would build by
hand (``--no-openvino`` to skip it). It also prints each variant's largest
logit difference to fp32 eager.

    python benchmarks/bench_attention.py [--shapes unpruned:224:4 pruned:224:4 pruned:224:1 pruned:384:1]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import timm
import torch

from lightning_vitcompress import prune_vit, quantize_model
from lightning_vitcompress.functional import QUANTIZATION_CONFIGS, compare_throughput
from lightning_vitcompress.functional.report import cpu_name
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16

CONFIG = "int8_static_x86"


def quantized(model: torch.nn.Module, x: torch.Tensor, decompose_attention: bool) -> torch.nn.Module:
    """``model`` as ``QuantizeOnFit()`` leaves it here (int8 static x86, bf16-mixed, compiled)."""
    copy_ = copy.deepcopy(model)
    spec = QUANTIZATION_CONFIGS[CONFIG]
    quantize_model(copy_, spec, example_input=x, calibration_inputs=[torch.randn_like(x) for _ in range(2)])
    spec.compile(copy_, "bf16-mixed", decompose_attention=decompose_attention)
    with torch.inference_mode():
        copy_(x)  # compiled before the timing starts
    return copy_


def openvino_by_hand(model: torch.nn.Module, x: torch.Tensor, threads: int) -> torch.nn.Module:
    """torch-pruning's model converted and NNCF-quantized by hand, as ``bench_deploy.py`` builds it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_deploy import OpenVINOByHand

    return OpenVINOByHand(model, x, [torch.randn_like(x) for _ in range(4)], threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["unpruned:224:4", "pruned:224:4", "pruned:224:1", "pruned:384:1"],
        help="pruned|unpruned:image size:batch",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--no-openvino", action="store_true")
    args = parser.parse_args()
    if not cpu_supports_bfloat16():
        raise SystemExit(f"{cpu_name()} has no native bf16: QuantizeOnFit() runs fp32 here and keeps the fused kernel.")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # many compiled ViTs of one class
    with_openvino = not args.no_openvino and all(importlib.util.find_spec(m) for m in ("openvino", "nncf"))
    print(
        f"{CONFIG} bf16-mixed compiled (QuantizeOnFit()'s default here), timm ViT-B/16 random weights, "
        f"{args.threads} threads of {cpu_name()}\n"
    )
    print(
        "| model | image | tokens | batch | fp32 eager (img/s) | fused attention | written out | "
        "written out vs fused | vs fp32 eager | OpenVINO int8 by hand | written out vs OpenVINO | "
        "max logit diff fused / written out |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        kind, size, batch = shape.split(":")
        x = torch.randn(int(batch), 3, int(size), int(size))
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=int(size)).eval()
        if kind == "pruned":
            prune_vit(model, 0.5, x[:1])
        variants = {"fp32": model, "fused": quantized(model, x, False), "decomposed": quantized(model, x, True)}
        if with_openvino:
            variants["openvino"] = openvino_by_hand(model, x, args.threads)
        with torch.inference_mode():
            reference = model(x)
            diff = {k: (variants[k](x) - reference).abs().max().item() for k in ("fused", "decomposed")}
        print(f"timing {shape} ...", file=sys.stderr, flush=True)
        ips = compare_throughput(variants, x, rounds=args.rounds, min_run_time=args.min_run_time)
        print("timed", file=sys.stderr, flush=True)
        tokens = (int(size) // 16) ** 2 + 1
        name = "pruned 50%" if kind == "pruned" else "unpruned"
        ov = ips.get("openvino")
        ov_cells = "n/a | n/a" if ov is None else f"{ov:.2f} | {ips['decomposed'] / ov:.2f}x"
        print(
            f"| {name} | {size} | {tokens} | {batch} | {ips['fp32']:.2f} | {ips['fused']:.2f} | "
            f"{ips['decomposed']:.2f} | {ips['decomposed'] / ips['fused']:.2f}x | "
            f"{ips['decomposed'] / ips['fp32']:.2f}x | {ov_cells} | {diff['fused']:.3f} / {diff['decomposed']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
