"""The two ways QuantizeOnFit chooses at train end: ``config="auto"`` and ``max_accuracy_drop``.

:class:`_AutoAndBudget` is the part of :class:`~lightning_vitcompress.QuantizeOnFit`
that measures instead of applying one fixed recipe: "auto" times every config
that runs on this machine against the unquantized model and keeps the fastest
within budget; the budget keeps the most sensitive layers in full precision,
as few as the accuracy allows. Both decide on rank zero and broadcast. The
callback (``quantization.py``) calls them from ``ordered_setup`` and
``ordered_train_end``; they read its settings and use its ``_quantize``/``_save``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_vitcompress._base import local_validation_accuracy, progress_line, validation_data
from lightning_vitcompress._model import set_submodule, stated_input_shape
from lightning_vitcompress._progress import stage_bar
from lightning_vitcompress.functional.quantize import ModelInputs
from lightning_vitcompress.functional.quantize_auto import (
    AutoCandidate,
    auto_candidates,
    format_auto_table,
    select_quantization,
)
from lightning_vitcompress.functional.quantize_configs import QUANTIZATION_CONFIGS, QuantizationSpec
from lightning_vitcompress.functional.quantize_layers import SkipSpec
from lightning_vitcompress.functional.quantize_sensitivity import layer_sensitivity, skip_also

#: ``QuantizeOnFit(config=AUTO)`` measures the configs this machine runs and keeps the fastest within budget
AUTO = "auto"
#: the timing batch when no BenchmarkCallback states one (its default)
_AUTO_BATCH_SIZE = 32


def _check_auto_arguments(qat_start_epoch: Any, inference_precision: Any, auto_configs: Any) -> None:
    """What ``config="auto"`` cannot take: QAT (trained for one format), a fixed precision, unknown names."""
    if qat_start_epoch is not None:
        raise ValueError(
            f"qat_start_epoch={qat_start_epoch!r} with config='auto': quantization-aware training trains the "
            "weights for one format, chosen before it starts. Name the config (e.g. 'int8_dynamic_x86'), or "
            "pass qat_start_epoch=None."
        )
    if inference_precision not in (None, "32-true"):
        raise ValueError(
            f"inference_precision={inference_precision!r} with config='auto': 'auto' tries bf16-mixed itself "
            "where the CPU has native bf16. Leave inference_precision at None, or name the config."
        )
    if auto_configs is None:
        return
    if isinstance(auto_configs, str) or not isinstance(auto_configs, Sequence) or not auto_configs or not all(
        isinstance(name, str) and name in QUANTIZATION_CONFIGS for name in auto_configs
    ):
        raise ValueError(
            f"auto_configs={auto_configs!r}: pass a non-empty list of config names to choose from, out of "
            f"{sorted(QUANTIZATION_CONFIGS)}, or None for all that run here."
        )


class _AutoAndBudget:
    """QuantizeOnFit's "auto" search and accuracy budget (see the module docstring); a mixin, not used alone."""

    # what the callback sets (QuantizeOnFit.__init__ / ordered_setup); it also provides budget,
    # validation_accuracy and log_metrics (CompressionCallback) and _quantize and _save
    spec: Optional[QuantizationSpec]
    skip: SkipSpec
    compile: Union[bool, dict[str, Any]]
    auto: bool
    auto_configs: Optional[Sequence[str]]
    auto_time_budget_s: float
    auto_result: Optional[dict[str, Any]]
    save_path: Optional[Path]
    save_fp32_path: Optional[Path]
    summary: Optional[dict[str, Any]]
    _example: Optional[ModelInputs]
    _calibration: list[ModelInputs]
    _auto_candidates: list[AutoCandidate]

    def _setup_auto(self, trainer: "pl.Trainer", device: torch.device) -> None:
        """The candidates "auto" will try on ``device``: those that run here (a dry run each), calibrated
        ones only when training steps run; an error naming what was tried when none does."""
        trains = not (trainer.max_epochs == 0 or trainer.limit_train_batches == 0)
        listed = auto_candidates(device, calibration=trains)
        if self.compile is False:  # the x86 int8 paths are only fast compiled
            listed = [c for c in listed if not QUANTIZATION_CONFIGS[c.config].compiled_by_default]
        if self.auto_configs is not None:
            listed = [c for c in listed if c.config in self.auto_configs]
        candidates, refused = [], []
        for candidate in listed:
            spec = QUANTIZATION_CONFIGS[candidate.config]
            try:
                spec.check_device(device)
                spec.dry_run(device)
            except ValueError as err:
                refused.append(f"{candidate.label}: {err}")
                continue
            candidates.append(candidate)
        if not candidates:
            raise ValueError(
                f"QuantizeOnFit(config='auto', auto_configs={self.auto_configs!r}, compile={self.compile!r}): no "
                f"quantization config can run on {device} here (tried {[c.label for c in listed]}; "
                f"{'; '.join(refused) or 'none listed'}). Pass auto_configs=None, or a config name."
            )
        self._auto_candidates = candidates

    # ------------------------------------------------------------- "auto"
    def _choose(self, trainer: "pl.Trainer", model: nn.Module) -> Optional[AutoCandidate]:
        """Rank zero tries every candidate on copies of ``model``; every rank gets its choice (None: keep fp32)."""
        result: Optional[dict[str, Any]] = None
        if trainer.is_global_zero:
            bench = next((cb for cb in trainer.callbacks if type(cb).__name__ == "BenchmarkCallback"), None)
            batch_size = getattr(bench, "batch_size", _AUTO_BATCH_SIZE)
            timing_input = self._timing_input(model, batch_size, getattr(bench, "_input_shape", None))
            with stage_bar(trainer, "QuantizeOnFit(config='auto'): configs",
                           total=len(self._auto_candidates) + 1, unit="config") as bar:
                result = select_quantization(
                    model,
                    self._auto_candidates,
                    timing_input,
                    skip=self.skip,
                    example_input=self._example,
                    calibration_inputs=self._calibration or None,
                    compile=self.compile,
                    accuracy=lambda candidate: local_validation_accuracy(trainer, candidate),
                    budget=self.budget,
                    time_budget_s=self.auto_time_budget_s,
                    min_run_time=getattr(bench, "min_run_time", 0.5),
                    num_threads=getattr(bench, "num_threads", None),
                    progress=bar.step,
                )
            self._log_auto(trainer, result)
        chosen = trainer.strategy.broadcast(result["chosen"] if result is not None else None, src=0)
        self.auto_result = result
        return chosen

    def _timing_input(
        self, model: nn.Module, batch_size: int, input_shape: Optional[tuple[int, ...]]
    ) -> torch.Tensor:
        """A batch of ``batch_size`` random inputs shaped like the training inputs, on the model's device."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        example = self._example.args[0] if self._example is not None and self._example.args else None
        if isinstance(example, torch.Tensor) and example.dim() >= 1:
            shape = tuple(example.shape[1:])
        else:
            shape = input_shape or stated_input_shape(model)
        if shape is None:
            raise RuntimeError(
                "QuantizeOnFit(config='auto') cannot tell the input shape to time the model on: no training "
                "input was seen and the model states none. Add a BenchmarkCallback(input_shape=...)."
            )
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch_size, *shape, generator=generator).to(device)

    def _log_auto(self, trainer: "pl.Trainer", result: dict[str, Any]) -> None:
        metrics: dict[str, Optional[float]] = {
            "auto/baseline_images_per_s": result["baseline_images_per_s"],
            "auto/selection_seconds": result["seconds"],
            "auto/batch_size": result["batch_size"],
        }
        for trial in result["trials"]:
            for key in ("images_per_s", "speedup", "accuracy", "build_seconds"):
                metrics[f"auto/{trial['label']}/{key}"] = trial[key]
        chosen = result["chosen"]
        if chosen is not None:
            metrics["auto/chosen_speedup"] = next(t["speedup"] for t in result["trials"] if t["label"] == chosen.label)
        self.log_metrics(trainer, metrics)
        for logger in trainer.loggers:
            logger.log_hyperparams({"quant/auto/choice": chosen.label if chosen is not None else "unquantized"})
        rank_zero_info(f"QuantizeOnFit(config='auto') tried:\n{format_auto_table(result)}")

    def _keep_unquantized(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """"auto" found nothing faster within budget: the trained model stays as it is, and is saved as asked."""
        reason = self.auto_result["reason"] if self.auto_result is not None else "see rank zero's log"
        self.summary = {"config": None, "quantized": [], "skipped": {}, "qat": False, "auto": self.auto_result}
        rank_zero_info(f"QuantizeOnFit(config='auto') kept the model unquantized: {reason}.")
        for path in (self.save_fp32_path, self.save_path):
            if path is not None:
                self._save(trainer, pl_module, pl_module.state_dict(), path)

    def decisions(self) -> Optional[dict[str, Any]]:
        if self.summary is None or (not self.auto and self.max_accuracy_drop is None):
            return None
        decided: dict[str, Any] = {"config": self.summary.get("config")}
        if self.summary.get("higher_precision"):
            decided["kept_in_higher_precision"] = list(self.summary["higher_precision"])
        auto = self.summary.get("auto")
        if auto is not None:
            chosen = auto["chosen"]
            decided["auto"] = {
                "chosen": chosen.label if chosen is not None else "unquantized",
                "reason": auto["reason"],
                "selection_seconds": auto["seconds"],
                "tried": [{k: t[k] for k in ("label", "speedup", "accuracy", "status")} for t in auto["trials"]],
            }
        return decided

    # ------------------------------------------------------------- max_accuracy_drop
    def _fit_budget(
        self, trainer: "pl.Trainer", model: nn.Module, summary: dict[str, Any], trained: dict[str, nn.Module]
    ) -> dict[str, Any]:
        """Keep the most sensitive layers in full precision, as few as the budget allows (bisection).

        ``model`` comes quantized as ``summary`` says and leaves quantized as the returned summary
        says; ``{"config": None, ...}`` when even the unquantized model is beyond the budget.
        """
        budget = self.budget
        assert budget is not None and self.spec is not None
        name = f"QuantizeOnFit(config={self.spec.name!r}, max_accuracy_drop={self.max_accuracy_drop!r})"
        accuracy = self.validation_accuracy(trainer, model)
        summary.update(accuracy=accuracy, higher_precision=[])
        if budget.allows(accuracy):
            rank_zero_info(f"{name}: every selected layer quantized, within budget: {budget.describe(accuracy)}.")
            return summary

        def undo(quantized: list[str]) -> None:
            for layer in quantized:
                set_submodule(model, layer, trained[layer])

        undo(summary["quantized"])
        fp32 = self.validation_accuracy(trainer, model)
        if not budget.allows(fp32):
            rank_zero_warn(f"{name}: the model is beyond the accuracy budget before quantizing "
                           f"({budget.describe(fp32)}); it was left unquantized.")
            return {"config": None, "quantized": [], "skipped": {}, "qat": False, "accuracy": fp32,
                    "reason": "beyond the accuracy budget before quantizing"}
        layers = list(summary["quantized"])
        progress_line(trainer, f"{name}: all layers quantized is beyond budget ({budget.describe(accuracy)}); "
                               f"measuring the sensitivity of {len(layers)} layers")
        order: Optional[list[str]] = None
        if trainer.is_global_zero:
            loader, _ = validation_data(trainer)
            images = next(iter(loader))[0] if loader is not None else self._example.args[0]
            sensitivity = layer_sensitivity(model, self.spec, layers, [images])
            order = sorted(layers, key=lambda layer: -sensitivity[layer])
        order = trainer.strategy.broadcast(order, src=0)
        assert order is not None
        beyond, within = 0, len(order)  # keeping k layers: 0 is beyond budget, all of them is the fp32 model
        measured: dict[int, Optional[float]] = {0: accuracy, len(order): fp32}
        while within - beyond > 1:
            keep = (beyond + within) // 2
            progress_line(trainer, f"{name}: trying with the {keep} most sensitive layers in full precision")
            trial = self._quantize(model, trainer, skip=skip_also(self.skip, order[:keep]), quiet=True)
            measured[keep] = self.validation_accuracy(trainer, model)
            undo(trial["quantized"])
            if budget.allows(measured[keep]):
                within = keep
            else:
                beyond = keep
        if within == len(order):
            rank_zero_info(f"{name}: only the unquantized model is within budget; it was left unquantized.")
            return {"config": None, "quantized": [], "skipped": {}, "qat": False, "accuracy": fp32,
                    "reason": "no layer can be quantized within the accuracy budget"}
        kept = order[:within]
        summary = self._quantize(model, trainer, skip=skip_also(self.skip, kept), quiet=True)
        for rank, layer in enumerate(kept, 1):
            summary["skipped"][layer] = f"kept in full precision for the accuracy budget (sensitivity rank {rank})"
        summary.update(accuracy=measured[within], higher_precision=kept)
        rank_zero_info(
            f"{name}: kept {len(kept)} of {len(order)} layers in full precision, most sensitive first ({kept}); "
            f"{budget.describe(measured[within])}."
        )
        return summary
