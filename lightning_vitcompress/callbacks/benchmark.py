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
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback, example_from_data, first_batch, progress_line
from lightning_vitcompress._checks import (
    check_bool,
    check_output_dir,
    check_path,
    check_positive,
)
from lightning_vitcompress._lightning import callbacks_of, datamodule_of
from lightning_vitcompress._model import stated_input_shape
from lightning_vitcompress._plan import PlanRow
from lightning_vitcompress._progress import stage_bar
from lightning_vitcompress.functional.baselines import BASELINES, build_baseline, check_baselines
from lightning_vitcompress.functional.measure import (
    eval_mode,
    images_and_labels,
    resolve_device,
)
from lightning_vitcompress.functional.report import (
    REPORT_FILENAME,
    check_devices,
    check_input_shape,
    compare_models,
    format_report,
    measurement_steps,
    save_plot,
    summarize,
)
from lightning_vitcompress.functional.token_merging import merged_token_counts

__all__ = ["BenchmarkCallback"]


class BenchmarkCallback(CompressionCallback):
    """Measure the model as the user built it and as it is after every other callback acted.

    The baseline is snapshotted at ``setup`` before any of this package's
    callbacks edits the model, whatever their order in the list (a
    third-party callback that edits the model in ``setup`` must be listed
    after this one). The final model is measured at ``on_fit_end``, after
    training, pruning, swapping and quantization, side by side with the
    baseline. Rank zero only. When an :class:`~lightning_vitcompress.ExportOnFit` in the
    Trainer wrote a file (CPU, dynamic batch), that file is loaded afresh and measured too: the
    ``"deployed"`` column, with its load + first-call seconds next to the in-process compile's.

    Args:
        batch_size: images per timed forward for throughput.
        num_threads: CPU threads for timing (default: torch's current count).
        devices: which of ``"cpu"``, ``"cuda"`` to time; CUDA next to the CPU is skipped
            (``None``) when absent, while CUDA alone or ``"cuda:N"`` on a machine without
            that device is an error at setup.
        input_shape: ``(C, H, W)`` of one image; default from ``pl_module.example_input_array``
            or the timm model's ``patch_embed``. The model (and ``baseline_model``) run one
            such image at setup, so a wrong shape fails before training.
        dataloader: ``(images, labels)`` batches for top-1 accuracy; default the
            datamodule's / trainer's validation data. ``None`` found: accuracy ``None``.
        accuracy_batches: measure accuracy on at most this many batches.
        baseline_model: a reference model to compare against instead of the snapshot
            (e.g. an uncompressed model trained for the same epochs).
        output_dir: where ``vitcompress_benchmark.json`` (and the PNG) go; default the
            trainer's ``log_dir`` or ``default_root_dir``.
        rounds, min_run_time, latency_repeats: timing precision vs time (see :func:`compare_models`).
        plot: also write ``vitcompress_benchmark.png`` when matplotlib is installed.
        baselines: also measure what a team would run without compressing, built from the
            baseline model and timed interleaved with it: ``("bf16_compiled",)`` is the
            uncompressed model under bf16 autocast (where the CPU/GPU runs bf16 natively,
            else fp32) compiled with inductor. The report then gives the final model's
            speedup against fp32 eager (``ratios``) and against each of these
            (``report["baselines"][name]["ratios"]``). Compiling costs a minute or more
            on a small CPU. Default ``()``: none.

    Example (a tiny ViT on scikit-learn's digits, timed briefly)::

        >>> import lightning as L
        >>> from lightning_vitcompress import BenchmarkCallback, PruningSchedule
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> bench = BenchmarkCallback(batch_size=8, devices=("cpu",), rounds=1, min_run_time=0.01)
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[PruningSchedule(0.5), bench])
        >>> trainer.fit(DigitsClassifier(embed_dim=32, depth=2, num_heads=4), DigitsDataModule())
        >>> round(bench.report["ratios"]["params_ratio"], 2)  # and cpu_speedup, size_ratio, accuracy_delta...
        0.29
    """

    order = 10
    LOG_PREFIX = "bench"

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
        baselines: Sequence[str] = (),
    ) -> None:
        super().__init__(model_attribute)
        check_positive(batch_size, "batch_size", "32", integer=True)
        if num_threads is not None:
            check_positive(num_threads, "num_threads", "2", integer=True)
        devices = check_devices(devices)
        if input_shape is not None:
            input_shape = check_input_shape(input_shape)
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise TypeError(
                f"dataloader={dataloader!r}: pass an iterable of (images, labels) batches, e.g. "
                "datamodule.val_dataloader(), or None for the Trainer's validation data."
            )
        if accuracy_batches is not None:
            check_positive(accuracy_batches, "accuracy_batches", "10", integer=True)
        if baseline_model is not None and not isinstance(baseline_model, nn.Module):
            raise TypeError(
                f"baseline_model={baseline_model!r} ({type(baseline_model).__name__}): pass an nn.Module to compare "
                "against, or None to compare against the model as it was at setup."
            )
        output_dir = check_path(output_dir, "output_dir")
        check_positive(rounds, "rounds", "3", integer=True)
        check_positive(min_run_time, "min_run_time", "0.5")
        check_positive(latency_repeats, "latency_repeats", "30", integer=True)
        check_bool(plot, "plot", "write vitcompress_benchmark.png")
        self.baselines = check_baselines(baselines)
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.devices = devices
        self.input_shape: Optional[tuple[int, ...]] = input_shape
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
        #: ``input_shape``, or the one inferred from the model at setup
        self._input_shape: Optional[tuple[int, ...]] = input_shape

    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        timing = self.rounds * 2 * len(self.devices) * self.min_run_time
        return [
            PlanRow(
                "BenchmarkCallback",
                "measures size, MACs, accuracy, throughput, latency",
                "baseline at setup, final at fit end",
                f"batch {self.batch_size}, devices {list(self.devices)}, about {timing:.0f} s of timing",
            )
        ]

    # ------------------------------------------------------------------ setup
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = self.target(pl_module)
        self._check_devices_present()
        if self.output_dir is not None:
            check_output_dir(self.output_dir, "output_dir")
        self._input_shape = self._infer_input_shape(pl_module, model, trainer)
        for label, candidate in (("model", model), ("baseline_model", self.baseline_model)):
            if candidate is not None:
                self._check_runs(candidate, label)
        self._check_accuracy_batch(trainer)
        if trainer.is_global_zero:
            source = self.baseline_model if self.baseline_model is not None else model
            # a CPU copy: the live model is about to be edited, moved and trained
            self._baseline = copy.deepcopy(source).cpu()

    def _check_devices_present(self) -> None:
        """A CUDA device asked for explicitly must exist; CUDA next to the CPU is just ``n/a`` without one."""
        cuda = [resolve_device(d) for d in self.devices if resolve_device(d).type == "cuda"]
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [str(d) for d in cuda if (d.index or 0) >= count]
        if missing and (len(missing) == len(self.devices) or any(d.index is not None for d in cuda)):
            raise ValueError(
                f"devices={self.devices!r}: this machine has {count} CUDA device(s), so {missing} cannot be timed. "
                "Pass devices=('cpu',), or the default ('cpu', 'cuda') to time CUDA where present."
            )

    def _check_runs(self, model: nn.Module, label: str) -> None:
        """One batch-1 forward of ``input_shape`` now, not a crash after training."""
        assert self._input_shape is not None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            with eval_mode(model), torch.inference_mode():
                model(torch.zeros(1, *self._input_shape, device=device))
        except Exception as err:  # reported with its cause
            raise ValueError(
                f"input_shape={self._input_shape!r}: the {label} ({type(model).__name__}) cannot run an input of "
                f"this shape ({type(err).__name__}: {err}). Pass the (channels, height, width) the model takes."
            ) from err

    def _check_accuracy_batch(self, trainer: pl.Trainer) -> None:
        """The accuracy data's first batch holds images and labels we can find (tuple or dict), known now rather
        than after training."""
        if self.dataloader is not None:
            with torch.random.fork_rng(devices=[]):
                batch = next(iter(self.dataloader), None)
            source = "dataloader="
        else:
            batch, source = first_batch(trainer, validation=True), "the Trainer's validation data"
        if batch is None:
            return  # no accuracy data: reported as None, with a warning, at the end
        try:
            images_and_labels(batch)
        except ValueError as err:
            raise ValueError(
                f"BenchmarkCallback: {source} cannot be measured for accuracy: {err}. Pass dataloader= "
                "yielding such batches."
            ) from err

    def _infer_input_shape(
        self, pl_module: pl.LightningModule, model: nn.Module, trainer: pl.Trainer
    ) -> tuple[int, ...]:
        if self.input_shape is not None:
            return self.input_shape
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, torch.Tensor) and example.dim() == 4:
            return tuple(example.shape[1:])
        stated = stated_input_shape(model)
        if stated is not None:
            return stated
        example = example_from_data(trainer)
        if example is not None:
            return tuple(example.shape[1:])
        raise ValueError(
            f"BenchmarkCallback cannot tell the input shape of {type(model).__name__}: it states none and the "
            "Trainer has no data to take a batch from. Pass input_shape=(channels, height, width), or set "
            "example_input_array on the LightningModule."
        )

    # ---------------------------------------------------------------- measure
    def ordered_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._baseline is None or self._input_shape is None:
            return
        final = self.target(pl_module)
        generator = torch.Generator().manual_seed(0)
        example_input = torch.randn(self.batch_size, *self._input_shape, generator=generator)
        batches = self._accuracy_batches(trainer)
        timing = self.rounds * 2 * len(self.devices) * self.min_run_time
        progress_line(
            trainer,
            f"BenchmarkCallback: measuring the baseline and final models (size, MACs, "
            f"{'accuracy on ' + str(len(batches)) + ' batches, ' if batches else ''}throughput "
            f"at batch {self.batch_size}: about {timing:.0f} s of timing plus latency)",
        )
        models: dict[str, nn.Module] = {"baseline": self._baseline}
        references = {name: build_baseline(self._baseline, name) for name in self.baselines}
        models.update(references)
        models["final"] = final
        deployed, startup = _deployed_artifact(trainer, example_input)
        if deployed is not None:
            models["deployed"] = deployed
        total = measurement_steps(len(models), self.devices, self.rounds)
        with stage_bar(trainer, "BenchmarkCallback: measuring", total=total, unit="measurement") as bar:
            measured = compare_models(
                models,
                example_input,
                batches=batches,
                devices=self.devices,
                num_threads=self.num_threads,
                rounds=self.rounds,
                min_run_time=self.min_run_time,
                latency_repeats=self.latency_repeats,
                progress=bar.step,
            )
        self.report = {
            "baseline": measured["baseline"],
            "final": measured["final"],
            "ratios": summarize(measured["baseline"], measured["final"]),
            **measured["conditions"],
        }
        if references:
            self.report["baselines"] = {
                name: {
                    "description": BASELINES[name],
                    **measured[name],
                    "ratios": summarize(measured[name], measured["final"]),
                }
                for name in references
            }
        tokens = merged_token_counts(final)  # a merging model's tokens per block, from the forwards just timed
        if tokens is not None:
            self.report["final_tokens_per_block"] = tokens
        if deployed is not None:
            self.report["deployed"] = measured["deployed"]
            self.report["deployed_ratios"] = summarize(measured["baseline"], measured["deployed"])
            self.report["deployed_startup"] = startup
        decisions = {  # what the budgets and "auto" decided: rolled-back steps, layers kept, the chosen config
            type(callback).__name__: decided
            for callback in callbacks_of(trainer)
            if isinstance(callback, CompressionCallback) and (decided := callback.decisions()) is not None
        }
        if decisions:
            self.report["decisions"] = decisions
        self._baseline = None  # free the copy
        self._write(trainer)

    def _accuracy_batches(self, trainer: pl.Trainer) -> Optional[list[Any]]:
        loader = self.dataloader
        datamodule = datamodule_of(trainer)
        if loader is None and datamodule is not None:
            try:
                loader = datamodule.val_dataloader()
            except Exception:  # a datamodule without validation data
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
    def _resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write(self, trainer: pl.Trainer) -> None:
        assert self.report is not None
        output_dir = self._resolve_output_dir(trainer)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.report_path = output_dir / REPORT_FILENAME
        self.report_path.write_text(json.dumps(self.report, indent=2))
        if self.plot:
            save_plot(self.report, output_dir / "vitcompress_benchmark.png")
        stages = [stage for stage in ("baseline", "final", "deployed") if stage in self.report]
        metrics = {f"{stage}_{key}": value for stage in stages for key, value in self.report[stage].items()}
        for name, reference in self.report.get("baselines", {}).items():
            metrics.update({f"vs_{name}_{key}": value for key, value in reference["ratios"].items()})
        deployed_ratios = {
            f"deployed_{key}": value for key, value in (self.report.get("deployed_ratios") or {}).items()
        }
        self.log_metrics(trainer, {**metrics, **self.report["ratios"], **deployed_ratios})
        for logger in trainer.loggers:
            logger.save()
        rank_zero_info(f"\nBenchmark ({self.report_path}):\n{format_report(self.report)}")

    # ------------------------------------------------------------ persistence
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"report": self.report}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.report = state_dict.get("report")


def _deployed_artifact(
    trainer: pl.Trainer, example_input: torch.Tensor
) -> tuple[Optional[nn.Module], Optional[dict[str, Any]]]:
    """The file ExportOnFit wrote, loaded afresh and called once on ``example_input`` (what a server pays at start),
    with those timings next to the in-process compile time it replaces; ``(None, None)`` without one.

    Measured when it runs on the CPU at any batch size (``dynamic_batch=True``)."""
    from lightning_vitcompress.callbacks.export import ExportOnFit
    from lightning_vitcompress.callbacks.quantization import QuantizeOnFit
    from lightning_vitcompress.functional.artifact import load_artifact

    export = next((cb for cb in callbacks_of(trainer) if isinstance(cb, ExportOnFit) and cb.summary), None)
    if export is None or export.summary is None:
        return None, None
    summary = export.summary
    if not summary["dynamic_batch"] or summary["device"] != "cpu":
        rank_zero_warn(
            f"BenchmarkCallback: the exported file {summary['path']} is not measured (it runs on "
            f"{summary['device']!r}, dynamic_batch={summary['dynamic_batch']}); export for the CPU with "
            "dynamic_batch=True to see it next to the final model."
        )
        return None, None
    artifact = load_artifact(summary["path"], format=summary["format"])
    with torch.inference_mode():
        artifact(example_input)
    quantize = next((cb for cb in callbacks_of(trainer) if isinstance(cb, QuantizeOnFit) and cb.summary), None)
    return artifact, {
        "path": summary["path"],
        "format": summary["format"],
        "load_seconds": artifact.load_seconds,
        "first_call_seconds": artifact.first_call_seconds,
        "compile_seconds": (quantize.summary or {}).get("compile_seconds") if quantize is not None else None,
        "export_seconds": summary["export_seconds"],
    }
