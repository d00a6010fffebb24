"""What QuantizeOnFit keeps during training and writes at train end.

:class:`TrainingInputs` watches the target model's forward calls during
training steps (by the Trainer's progress, not the module's mode); it keeps a
few rows of the first input (the post-quantization check and the compile
example) and, for a static config, the first ``batches`` inputs of each epoch.
:func:`reduce_ranges` is the union of the calibration ranges of all ranks.
:func:`quantize_on_inputs` quantizes on those inputs; :func:`save_checkpoint`
writes the model as ``load_compressed`` reads it back (:func:`save_fp32_copy`
and :func:`save_quantized` raise :class:`StepFailed` saying what is left where);
:func:`compile_quantized` compiles the quantized model on the captured input;
:func:`log_summary` says what was quantized.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_vitcompress._data import in_training_step
from lightning_vitcompress._progress import stage_bar
from lightning_vitcompress._structure import STRUCTURE_KEY, add_digest, recorded_edits
from lightning_vitcompress.functional._torch_internals import set_compiled_call
from lightning_vitcompress.functional.quantize import EXAMPLE_ROWS, MB, ModelInputs, Ranges, quantize_model, run_model
from lightning_vitcompress.functional.quantize_configs import QuantizationSpec
from lightning_vitcompress.functional.quantize_layers import SkipSpec


class TrainingInputs:
    """The first training input (a few rows) and, when ``calibrates``, the first ``batches`` inputs of each epoch."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        #: the first training input, cut to a few rows (``None`` until a training step ran)
        self.example: Optional[ModelInputs] = None
        #: the current epoch's first ``batches`` training inputs, kept for static calibration
        self.calibration: list[ModelInputs] = []
        self._handle: Optional[Any] = None

    def start(self, trainer: pl.Trainer, model: nn.Module, calibrates: bool) -> None:
        """Watch ``model``'s forward calls in ``trainer``'s training steps (forgetting what was kept before)."""
        self.clear()

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # a training step by the Trainer's progress, not the module's mode (a model left in eval() trains in
            # eval); validation steps and other callbacks' forwards (the example pruning traces) are not inputs
            if not in_training_step(trainer):
                return
            if self.example is None:
                self.example = ModelInputs.detached(args, kwargs, rows=EXAMPLE_ROWS)
            if not calibrates:
                self.stop()
            elif len(self.calibration) < self.batches:
                self.calibration.append(ModelInputs.detached(args, kwargs))

        self._handle = model.register_forward_pre_hook(capture, with_kwargs=True)

    def new_epoch(self) -> None:
        """Calibrate on the last epoch's inputs, seen by the most trained weights."""
        self.calibration = []

    def stop(self) -> None:
        """Stop watching (what was kept stays)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def clear(self) -> None:
        """Stop watching and forget what was kept."""
        self.stop()
        self.example = None
        self.calibration = []


def reduce_ranges(trainer: pl.Trainer, ranges: Ranges) -> Ranges:
    """The union of the calibration ranges of all ranks (each rank calibrated on its own batches)."""
    if trainer.world_size <= 1:
        return ranges
    names = sorted(ranges)
    bounds = torch.tensor([[-ranges[n][0], ranges[n][1]] for n in names], device=trainer.strategy.root_device)
    bounds = trainer.strategy.reduce(bounds, reduce_op="max")
    return {name: (-float(low), float(high)) for name, (low, high) in zip(names, bounds.tolist())}


def save_checkpoint(trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> None:
    """Write ``pl_module`` as it is now to ``path`` (rank zero writes), with its structure records and a digest."""
    checkpoint: dict[str, Any] = {
        "state_dict": pl_module.state_dict(),
        STRUCTURE_KEY: copy.deepcopy(recorded_edits(pl_module)),
        "pytorch-lightning_version": pl.__version__,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
    }
    if pl_module.hparams:
        checkpoint[pl_module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
    if trainer.is_global_zero:
        add_digest(checkpoint)  # load_compressed refuses the file if its tensors are damaged later
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.strategy.save_checkpoint(checkpoint, path)  # rank zero writes
    trainer.strategy.barrier("QuantizeOnFit.save")
    rank_zero_info(f"QuantizeOnFit: saved {path}")


def file_stamp(path: Path) -> Optional[tuple[int, int]]:
    """``(mtime_ns, size)`` of the file at ``path``, ``None`` when there is none: did a write touch it?"""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class StepFailed(Exception):
    """A step of QuantizeOnFit's train-end recipe failed; the message says what and where the model is, the cause
    is chained."""


def save_fp32_copy(trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path, config: str) -> None:
    """:func:`save_checkpoint` of the trained model, before anything is quantized."""
    try:
        save_checkpoint(trainer, pl_module, path)
    except Exception as err:  # nothing was quantized yet
        raise StepFailed(
            f"QuantizeOnFit(config={config!r}) did not quantize: writing the full-precision copy to "
            f"save_fp32_path={str(path)!r} failed ({type(err).__name__}: {err}). The trained "
            "full-precision model was left in place; save it (trainer.save_checkpoint) before anything else."
        ) from err


def save_quantized(
    trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path, config: str, fp32_path: Optional[Path]
) -> None:
    """:func:`save_checkpoint` of the quantized model; on failure a half-written file is removed."""
    previous = file_stamp(path)
    try:
        save_checkpoint(trainer, pl_module, path)
    except Exception as err:  # the quantization is undone: the user keeps the trained model
        if trainer.is_global_zero and file_stamp(path) != previous:
            path.unlink(missing_ok=True)  # a half-written file must not pass for the quantized model
        fp32 = (
            f"the fp32 copy is at save_fp32_path={str(fp32_path)!r}"
            if fp32_path is not None
            else "no fp32 copy was written (pass save_fp32_path to keep one)"
        )
        raise StepFailed(
            f"QuantizeOnFit(config={config!r}): writing the quantized model to save_path={str(path)!r} failed "
            f"({type(err).__name__}: {err}); nothing new was left there. The model was put back in full precision, "
            f"as trained, and {fp32}. Save it with trainer.save_checkpoint(...), or quantize it with "
            "quantize_model(...) once the path is writable."
        ) from err


def compile_quantized(
    trainer: pl.Trainer,
    model: nn.Module,
    spec: QuantizationSpec,
    inference_precision: str,
    compile: Union[bool, dict[str, Any], None],
    example: Optional[ModelInputs],
) -> Optional[float]:
    """Compile ``model`` in place as ``spec`` does and run it once on ``example`` (with a progress bar): the seconds
    that took (None without an example, or when compiling failed: then it runs eager, with a warning)."""
    with stage_bar(trainer, f"QuantizeOnFit: compiling {spec.name}", total=1, unit="compile") as bar:
        bar.step("one-time cost, about 15-30 s for ViT-B/16 on 2 cores")
        spec.compile(model, inference_precision, **(compile if isinstance(compile, dict) else {}))
        if example is None:
            return None
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                run_model(model, example)
        except Exception as err:  # the quantized model is fine, only compiling failed
            set_compiled_call(model, None)  # undo nn.Module.compile
            rank_zero_warn(
                f"QuantizeOnFit(compile={compile!r}): compiling the quantized model failed, "
                f"it runs eager: {type(err).__name__}: {err}"
            )
            return None
        return time.perf_counter() - start


def quantize_on_inputs(
    trainer: pl.Trainer, model: nn.Module, spec: QuantizationSpec, skip: SkipSpec, inputs: TrainingInputs, quiet: bool
) -> dict[str, Any]:
    """:func:`quantize_model` on the captured ``inputs`` (calibration ranges reduced over ranks) with a progress
    bar and a note of the skipped layers, unless ``quiet`` (the budget's trials)."""
    calibration = inputs.calibration
    if spec.calibrates and not calibration:
        raise RuntimeError(
            f"config={spec.name!r} calibrates on training inputs, but no training step ran "
            "in this fit (nothing to calibrate on)."
        )
    shown = trainer if spec.calibrates and not quiet else None
    with stage_bar(shown, f"QuantizeOnFit: calibrating {spec.name}", total=len(calibration), unit="batch") as bar:
        summary = quantize_model(
            model,
            spec,
            skip=skip,
            example_input=inputs.example,
            calibration_inputs=calibration,
            reduce_ranges=functools.partial(reduce_ranges, trainer),  # the same model on every rank
            progress=bar.step,
        )
    if summary["skipped"] and not quiet:
        rank_zero_info(
            "QuantizeOnFit kept in full precision: "
            + ", ".join(f"{name} ({why})" for name, why in summary["skipped"].items())
        )
    return summary


def log_summary(
    trainer: pl.Trainer,
    summary: dict[str, Any],
    log_metrics: Callable[[pl.Trainer, Mapping[str, Optional[float]]], None],
) -> None:
    """What the quantized model is: hyperparameters to the loggers, ``quant/`` metrics through ``log_metrics``
    (the callback's), one line to the console."""
    for logger in trainer.loggers:  # what the deployed model is, next to the run's other settings
        logger.log_hyperparams(
            {
                "quant/config": summary["config"],
                "quant/qat": summary["qat"],
                "quant/inference_precision": summary["inference_precision"],
            }
        )
    log_metrics(
        trainer,
        {
            "layers_quantized": len(summary["quantized"]),
            "layers_skipped": len(summary["skipped"]),
            "size_before_mb": summary["size_before_bytes"] / MB,
            "size_after_mb": summary["size_after_bytes"] / MB,
            "size_ratio": summary["size_after_bytes"] / summary["size_before_bytes"],
            "output_relative_error": summary["output_relative_error"],
            "compile_seconds": summary.get("compile_seconds"),
            "accuracy": summary.get("accuracy"),
            "layers_higher_precision": len(summary["higher_precision"]) if "higher_precision" in summary else None,
        },
    )
    error = summary["output_relative_error"]
    rank_zero_info(
        f"QuantizeOnFit: {summary['config']} quantized {len(summary['quantized'])} linear layers"
        f"{' after QAT' if summary['qat'] else ''}, kept {len(summary['skipped'])}; "
        f"size {summary['size_before_bytes'] / MB:.2f} MB -> {summary['size_after_bytes'] / MB:.2f} MB"
        + (f"; relative output change {error:.4f} on a training input" if error is not None else "")
    )
