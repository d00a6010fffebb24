"""BenchmarkCallback: size, speed and accuracy of the model before and after compression.

Also usable without a Trainer: :func:`benchmark_model` measures one model,
:func:`compare_models` measures two side by side (interleaved) and reports the
ratios. Numbers always come with their conditions (batch size, threads,
CPU/GPU names, library versions); a device that is absent is reported as
``None`` (``n/a`` in the table), never as a number.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress.functional.measure import check_positive, resolve_device
from lightning_vitcompress.functional.report import REPORT_FILENAME, compare_models, format_report, save_plot, summarize

__all__ = ["BenchmarkCallback"]


class BenchmarkCallback(CompressionCallback):
    """Measure the model as the user built it and as it is after every other callback acted.

    The baseline is snapshotted at ``setup`` before any of this package's
    callbacks edits the model, whatever their order in the list (a
    third-party callback that edits the model in ``setup`` must be listed
    after this one). The final model is measured at ``on_fit_end``, after
    training, pruning, swapping and quantization, side by side with the
    baseline. Rank zero only.

    Args:
        batch_size: images per timed forward for throughput.
        num_threads: CPU threads for timing (default: torch's current count).
        devices: which of ``"cpu"``, ``"cuda"`` to time; CUDA is skipped (``None``) when absent.
        input_shape: ``(C, H, W)`` of one image; default from ``pl_module.example_input_array``
            or the timm model's ``patch_embed``.
        dataloader: ``(images, labels)`` batches for top-1 accuracy; default the
            datamodule's / trainer's validation data. ``None`` found: accuracy ``None``.
        accuracy_batches: measure accuracy on at most this many batches.
        baseline_model: a reference model to compare against instead of the snapshot
            (e.g. an uncompressed model trained for the same epochs).
        output_dir: where ``vitcompress_benchmark.json`` (and the PNG) go; default the
            trainer's ``log_dir`` or ``default_root_dir``.
        rounds, min_run_time, latency_repeats: timing precision vs time (see :func:`compare_models`).
        plot: also write ``vitcompress_benchmark.png`` when matplotlib is installed.

    Example::

        bench = BenchmarkCallback(batch_size=32, num_threads=2)
        trainer = Trainer(callbacks=[PruningSchedule(0.5), QuantizeOnFit(), bench])
        trainer.fit(model, datamodule)
        bench.report["ratios"]["cpu_speedup"]
    """

    order = 10

    def __init__(
        self,
        batch_size: int = 32,
        num_threads: Optional[int] = None,
        devices: Sequence[str] = ("cpu", "cuda"),
        input_shape: Optional[Sequence[int]] = None,
        dataloader: Optional[Iterable[Any]] = None,
        accuracy_batches: Optional[int] = None,
        baseline_model: Optional[nn.Module] = None,
        output_dir: Optional[Union[str, Path]] = None,
        rounds: int = 3,
        min_run_time: float = 0.5,
        latency_repeats: int = 30,
        plot: bool = True,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        check_positive(batch_size, "batch_size", "32")
        if num_threads is not None:
            check_positive(num_threads, "num_threads", "2")
        if isinstance(devices, str):
            devices = (devices,)
        for device in devices:
            resolve_device(device, "devices")
        if input_shape is not None and (len(input_shape) != 3 or any(int(s) <= 0 for s in input_shape)):
            raise ValueError(f"input_shape={tuple(input_shape)!r}: give (channels, height, width), e.g. (3, 224, 224).")
        if accuracy_batches is not None:
            check_positive(accuracy_batches, "accuracy_batches", "10")
        check_positive(rounds, "rounds", "3")
        check_positive(min_run_time, "min_run_time", "0.5")
        check_positive(latency_repeats, "latency_repeats", "30")
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.devices = tuple(devices)
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        self.dataloader = dataloader
        self.accuracy_batches = accuracy_batches
        self.baseline_model = baseline_model
        self.output_dir = output_dir
        self.rounds = rounds
        self.min_run_time = min_run_time
        self.latency_repeats = latency_repeats
        self.plot = plot
        self.report: Optional[dict[str, Any]] = None
        self.report_path: Optional[Path] = None
        self._baseline: Optional[nn.Module] = None

    # ------------------------------------------------------------------ setup
    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        model = self.target(pl_module)
        self.input_shape = self._infer_input_shape(pl_module, model)
        if trainer.is_global_zero:
            source = self.baseline_model if self.baseline_model is not None else model
            # a CPU copy: the live model is about to be edited, moved and trained
            self._baseline = copy.deepcopy(source).cpu()

    def _infer_input_shape(self, pl_module: "pl.LightningModule", model: nn.Module) -> tuple[int, ...]:
        if self.input_shape is not None:
            return self.input_shape
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, torch.Tensor) and example.dim() == 4:
            return tuple(example.shape[1:])
        patch_embed = getattr(model, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        proj = getattr(patch_embed, "proj", None)
        if img_size is not None and isinstance(proj, nn.Conv2d):
            return (proj.in_channels, *img_size)
        raise ValueError(
            f"BenchmarkCallback cannot tell the input shape of {type(model).__name__}: pass "
            "input_shape=(channels, height, width), or set example_input_array on the LightningModule."
        )

    # ---------------------------------------------------------------- measure
    def ordered_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.is_global_zero or self._baseline is None:
            return
        final = self.target(pl_module)
        generator = torch.Generator().manual_seed(0)
        example_input = torch.randn(self.batch_size, *self.input_shape, generator=generator)
        batches = self._accuracy_batches(trainer)
        measured = compare_models(
            {"baseline": self._baseline, "final": final},
            example_input,
            batches=batches,
            devices=self.devices,
            num_threads=self.num_threads,
            rounds=self.rounds,
            min_run_time=self.min_run_time,
            latency_repeats=self.latency_repeats,
        )
        self.report = {
            "baseline": measured["baseline"],
            "final": measured["final"],
            "ratios": summarize(measured["baseline"], measured["final"]),
            **measured["conditions"],
        }
        self._baseline = None  # free the copy
        self._write(trainer)

    def _accuracy_batches(self, trainer: "pl.Trainer") -> Optional[list[Any]]:
        loader = self.dataloader
        if loader is None and trainer.datamodule is not None:
            try:
                loader = trainer.datamodule.val_dataloader()
            except Exception:  # noqa: BLE001 - a datamodule without validation data
                loader = None
        if loader is None:
            loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            rank_zero_warn(
                "BenchmarkCallback: no dataloader to measure accuracy on (pass dataloader=... or give the "
                "Trainer validation data); accuracy is reported as None."
            )
            return None
        batches = []
        for index, batch in enumerate(loader):
            if self.accuracy_batches is not None and index >= self.accuracy_batches:
                break
            batches.append(batch)
        return batches

    # ----------------------------------------------------------------- output
    def _resolve_output_dir(self, trainer: "pl.Trainer") -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write(self, trainer: "pl.Trainer") -> None:
        assert self.report is not None
        output_dir = self._resolve_output_dir(trainer)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.report_path = output_dir / REPORT_FILENAME
        self.report_path.write_text(json.dumps(self.report, indent=2))
        if self.plot:
            save_plot(self.report, output_dir / "vitcompress_benchmark.png")
        metrics = {
            f"bench/{stage}_{key}": float(value)
            for stage in ("baseline", "final")
            for key, value in self.report[stage].items()
            if value is not None
        }
        metrics.update({f"bench/{key}": float(v) for key, v in self.report["ratios"].items() if v is not None})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        rank_zero_info(f"\nBenchmark ({self.report_path}):\n{format_report(self.report)}")

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"report": self.report}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.report = state_dict.get("report")
