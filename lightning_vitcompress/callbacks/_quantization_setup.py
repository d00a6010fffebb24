"""What QuantizeOnFit checks and decides before training: each argument alone (constructor), then what needs the
Trainer and the model (setup): the default config for the device, a resume in QAT, the calibration data.

Every check raises ``ValueError`` naming the argument, its value and what would
work (contract 3, fail fast).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_vitcompress._base import first_batch
from lightning_vitcompress._checks import (
    check_choice,
    check_int,
    check_max_accuracy_drop,
    check_output_file,
    check_path,
    check_positive,
)
from lightning_vitcompress.callbacks._quantization_auto import check_auto_arguments
from lightning_vitcompress.functional.measure import images_of
from lightning_vitcompress.functional.quantize_configs import (
    INFERENCE_PRECISIONS,
    QUANTIZATION_CONFIGS,
    DefaultChoice,
    QuantizationSpec,
    check_compile,
    default_quantization,
)
from lightning_vitcompress.functional.quantize_layers import check_skip

if TYPE_CHECKING:
    import lightning.pytorch as pl


def check_not_quantized(replayed: list[Any]) -> None:
    """The checkpoint being resumed holds no quantize record (``replayed``): a quantized model cannot train on."""
    if replayed:
        raise RuntimeError(
            "QuantizeOnFit: the checkpoint being resumed was saved after the model was quantized; "
            "a quantized model cannot train on. Resume from a checkpoint saved during training "
            "(they hold the fp32 weights), or load this one for inference with load_compressed(...)."
        )


def check_arguments(
    config: Any,
    spec: Optional[QuantizationSpec],
    *,
    auto: bool,
    skip: Any,
    qat_start_epoch: Any,
    compile: Any,
    inference_precision: Any,
    calibration_batches: Any,
    on_error: Any,
    max_accuracy_drop: Any,
    auto_time_budget_s: Any,
    auto_configs: Any,
) -> None:
    """The constructor's arguments, each alone (``spec``: ``config`` resolved; None for "auto" and the default)."""
    check_skip(skip)
    if qat_start_epoch is not None:
        check_int(qat_start_epoch, "qat_start_epoch", minimum=0, example="0 (or None for no QAT)")
    check_compile(compile)
    check_choice(on_error, "on_error", ("raise", "warn"))
    check_max_accuracy_drop(max_accuracy_drop)
    check_positive(auto_time_budget_s, "auto_time_budget_s", "300 (seconds)")
    if inference_precision is not None and inference_precision not in INFERENCE_PRECISIONS:
        raise ValueError(
            f"inference_precision={inference_precision!r}: pass one of {list(INFERENCE_PRECISIONS)}, "
            "or None (the default config's choice)."
        )
    if not auto:
        if spec is not None:
            spec.check_inference_precision(inference_precision or "32-true", compile)
        if auto_configs is not None:
            raise ValueError(
                f"auto_configs={auto_configs!r} restricts config='auto', but config={config!r}: pass "
                "config='auto', or auto_configs=None."
            )
    else:
        check_auto_arguments(qat_start_epoch, inference_precision, auto_configs)
    check_int(calibration_batches, "calibration_batches", minimum=1, example="8")


def check_save_paths(save_path: Any, save_fp32_path: Any) -> tuple[Optional[Path], Optional[Path]]:
    """``save_path`` and ``save_fp32_path`` as paths, two different files (or None)."""
    save_path, save_fp32_path = check_path(save_path, "save_path"), check_path(save_fp32_path, "save_fp32_path")
    if save_path is not None and save_fp32_path is not None and save_path.resolve() == save_fp32_path.resolve():
        raise ValueError(
            f"save_path={str(save_path)!r} and save_fp32_path={str(save_fp32_path)!r} are the same file: the "
            "quantized model would overwrite the fp32 copy. Pass two paths, e.g. 'model-int8.ckpt' and "
            "'model-fp32.ckpt'."
        )
    return save_path, save_fp32_path


def check_output_files(save_path: Optional[Path], save_fp32_path: Optional[Path]) -> None:
    """At setup: each path given can be written (its folder exists or can be made, it is not a folder)."""
    for argument, path in (("save_path", save_path), ("save_fp32_path", save_fp32_path)):
        if path is not None:
            check_output_file(path, argument)


def selected_layers(spec: QuantizationSpec, model: nn.Module, skip: Any, label: str) -> list[str]:
    """The ``nn.Linear`` layers ``spec`` quantizes in ``model``; raises naming ``skip`` when there are none."""
    selected, skipped = spec.select_layers(model, skip)
    if not selected:
        raise ValueError(
            f"QuantizeOnFit(config={label!r}, skip={skip!r}) selects no nn.Linear layer of the model; "
            f"skipped: {skipped}. Loosen `skip`."
        )
    return selected


def check_resume(path: Optional[str], saved: Optional[dict[str, Any]], mine: dict[str, Any]) -> None:
    """Once the resumed run (``saved``: its callback state, from ``path``) is in QAT, its weights were trained for
    one format: config, skip and qat_start_epoch must stay as ``mine``. Before QAT started, any may change."""
    if not saved or not saved.get("qat_active"):
        return
    for argument in ("config", "qat_start_epoch", "skip"):
        if argument == "skip" and (saved.get("skip_callable") or mine["skip_callable"]):
            continue  # functions cannot be compared
        if saved.get(argument) != mine[argument]:
            raise ValueError(
                f"{argument}={mine[argument]!r}, but the checkpoint being resumed ({path}) is in "
                f"quantization-aware training with {argument}={saved.get(argument)!r}: its weights were trained "
                f"for that setting. Resume with {argument}={saved.get(argument)!r}, or start a new fit."
            )


def check_inference_precision(inference_precision: str, native_bf16: Callable[[], bool]) -> None:
    """``"bf16-mixed"`` only where the CPU has native bf16 math (``native_bf16()``, asked only then)."""
    if inference_precision == "bf16-mixed" and not native_bf16():
        raise ValueError(
            "inference_precision='bf16-mixed': this CPU has no native bf16 math (AVX512-BF16 or AMX), "
            "so bf16 would be slower than float32 here. Use inference_precision='32-true'."
        )


def check_calibration_data(trainer: pl.Trainer, spec: QuantizationSpec, calibration_batches: int) -> None:
    """A calibrated config needs finite training inputs: the first training batch holds no NaN or Inf."""
    if spec.calibrates:
        images = images_of(first_batch(trainer, validation=False))
        if images is not None and not bool(torch.isfinite(images).all()):
            raise ValueError(
                f"config={spec.name!r} calibrates its activation scales on training inputs (calibration_"
                f"batches={calibration_batches}), but the first training batch holds NaN or Inf values, "
                "which give no usable scale. Clean the data (check its normalisation), or use "
                "config='int8_dynamic_x86', which needs no calibration."
            )


def choose_default(
    trainer: pl.Trainer, device: torch.device, inference_precision: Optional[str], compile: Any
) -> tuple[DefaultChoice, QuantizationSpec, str]:
    """``config=None``: the config fast on ``device`` and its precision (``inference_precision`` unless None), said
    in the log."""
    trains = trainer.max_epochs != 0 and trainer.limit_train_batches != 0
    choice = default_quantization(device, calibrates=trains)
    spec = QUANTIZATION_CONFIGS[choice.config]
    if inference_precision is None:
        inference_precision = choice.inference_precision if spec.bf16_mixed else "32-true"
    spec.check_inference_precision(inference_precision, compile)
    rank_zero_info(
        f"QuantizeOnFit: config={choice.config!r}, inference_precision={inference_precision!r} "
        f"for {device.type}: {choice.reason}."
    )
    return choice, spec, inference_precision


def warn_if_too_narrow(model: nn.Module, spec: QuantizationSpec, compile: Any, selected: list[str], width: int) -> None:
    """Where the default runs eager int8 on a model narrower than ``width`` (its per-layer overhead outweighing the
    cheaper math), say so. Compiled x86 int8 paid at every width measured (``benchmarks/bench_int8_width.py``)."""
    if spec.compiles(compile):
        return
    widest = max(layer.in_features for layer in map(model.get_submodule, selected) if isinstance(layer, nn.Linear))
    if widest < width:
        rank_zero_warn(
            f"QuantizeOnFit: config={spec.name!r} runs eager here and the widest linear layer of this model "
            f"takes {widest} features; below {width} eager int8 is usually slower than float32 "
            "(on an AMD EPYC: 0.37x at width 64, 0.92x at 192, 1.23x at 256; benchmarks/bench_int8_width.py "
            "measures your machine). It will be quantized as asked; to "
            "decide by measurement use config='auto' (keeps float when int8 is not faster), or drop QuantizeOnFit."
        )
