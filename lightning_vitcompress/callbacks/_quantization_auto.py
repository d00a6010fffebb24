"""The two ways QuantizeOnFit chooses at train end: ``config="auto"`` and ``max_accuracy_drop``.

:class:`AutoQuantization` is the part of :class:`~lightning_vitcompress.QuantizeOnFit`
that measures instead of applying one fixed recipe: "auto" times every config
that runs on this machine against the unquantized model and keeps the fastest
within budget (:meth:`~AutoQuantization.choose`); the budget keeps the most
sensitive layers in full precision, as few as the accuracy allows
(:meth:`~AutoQuantization.fit_budget`, on the shared budget check
:func:`~lightning_vitcompress.callbacks._budget.judge`). Both decide on rank zero and broadcast.
It is built from the callback's arguments and gets what each fit brings (the
budget, the captured inputs) as arguments; it reads nothing of the callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_vitcompress._base import local_validation_accuracy, progress_line, validation_data
from lightning_vitcompress._lightning import callbacks_of
from lightning_vitcompress._model import set_submodule, stated_input_shape
from lightning_vitcompress._progress import stage_bar
from lightning_vitcompress.callbacks._budget import Verdict, judge
from lightning_vitcompress.functional.budget import AccuracyBudget
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
AUTO_BATCH_SIZE = 32


def check_auto_arguments(qat_start_epoch: Any, inference_precision: Any, auto_configs: Any) -> None:
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
    if (
        isinstance(auto_configs, str)
        or not isinstance(auto_configs, Sequence)
        or not auto_configs
        or not all(isinstance(name, str) and name in QUANTIZATION_CONFIGS for name in auto_configs)
    ):
        raise ValueError(
            f"auto_configs={auto_configs!r}: pass a non-empty list of config names to choose from, out of "
            f"{sorted(QUANTIZATION_CONFIGS)}, or None for all that run here."
        )


class AutoQuantization:
    """QuantizeOnFit's "auto" search and accuracy budget (see the module docstring).

    Args:
        configs: the config names "auto" may choose from (``None``: every one that runs here).
        skip, compile: as for ``QuantizeOnFit``.
        time_budget_s: the seconds the "auto" search may spend.
        max_accuracy_drop: the callback's accuracy budget in points (``None``: none); named in the log.
    """

    def __init__(
        self,
        configs: Optional[Sequence[str]],
        skip: SkipSpec,
        compile: Union[bool, dict[str, Any], None],
        time_budget_s: float = 300.0,
        max_accuracy_drop: Optional[float] = None,
    ) -> None:
        self.configs = configs
        self.skip = skip
        self.compile = compile
        self.time_budget_s = time_budget_s
        self.max_accuracy_drop = max_accuracy_drop
        #: the candidates "auto" will try (found at :meth:`setup`)
        self.candidates: list[AutoCandidate] = []
        #: what "auto" tried and chose in the last fit (``None`` before, or without "auto")
        self.result: Optional[dict[str, Any]] = None

    def setup(self, trainer: pl.Trainer, device: torch.device) -> None:
        """The candidates "auto" will try on ``device``: those that run here (a dry run each), calibrated
        ones only when training steps run; an error naming what was tried when none does."""
        trains = not (trainer.max_epochs == 0 or trainer.limit_train_batches == 0)
        listed = auto_candidates(device, calibration=trains)
        if self.compile is False:  # the x86 int8 paths are only fast compiled
            listed = [c for c in listed if not QUANTIZATION_CONFIGS[c.config].compiled_by_default]
        if self.configs is not None:
            listed = [c for c in listed if c.config in self.configs]
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
                f"QuantizeOnFit(config='auto', auto_configs={self.configs!r}, compile={self.compile!r}): no "
                f"quantization config can run on {device} here (tried {[c.label for c in listed]}; "
                f"{'; '.join(refused) or 'none listed'}). Pass auto_configs=None, or a config name."
            )
        self.candidates = candidates

    # ------------------------------------------------------------- "auto"
    def choose(
        self,
        trainer: pl.Trainer,
        model: nn.Module,
        example: Optional[ModelInputs],
        calibration: list[ModelInputs],
        budget: Optional[AccuracyBudget],
    ) -> Optional[AutoCandidate]:
        """Rank zero tries every candidate on copies of ``model`` and logs the table (:meth:`metrics` has its
        numbers); every rank gets its choice (None: keep the model unquantized)."""
        result: Optional[dict[str, Any]] = None
        if trainer.is_global_zero:
            bench = next((cb for cb in callbacks_of(trainer) if type(cb).__name__ == "BenchmarkCallback"), None)
            batch_size = getattr(bench, "batch_size", AUTO_BATCH_SIZE)
            timing_input = _timing_input(model, batch_size, example, getattr(bench, "_input_shape", None))
            with stage_bar(
                trainer, "QuantizeOnFit(config='auto'): configs", total=len(self.candidates) + 1, unit="config"
            ) as bar:
                result = select_quantization(
                    model,
                    self.candidates,
                    timing_input,
                    skip=self.skip,
                    example_input=example,
                    calibration_inputs=calibration or None,
                    compile=self.compile,
                    accuracy=lambda candidate: local_validation_accuracy(trainer, candidate),
                    budget=budget,
                    time_budget_s=self.time_budget_s,
                    min_run_time=getattr(bench, "min_run_time", 0.5),
                    num_threads=getattr(bench, "num_threads", None),
                    progress=bar.step,
                )
            chosen = result["chosen"]
            for logger in trainer.loggers:
                logger.log_hyperparams({"quant/auto/choice": chosen.label if chosen is not None else "unquantized"})
            rank_zero_info(f"QuantizeOnFit(config='auto') tried:\n{format_auto_table(result)}")
        self.result = result
        return trainer.strategy.broadcast(result["chosen"] if result is not None else None, src=0)

    def metrics(self) -> dict[str, Optional[float]]:
        """The last search's table as ``auto/...`` metrics for the callback to log (none off rank zero)."""
        result = self.result
        if result is None:
            return {}
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
        return metrics

    def unquantized_summary(self) -> dict[str, Any]:
        """ "auto" found nothing faster within budget: the summary of the model left as trained, said in the log."""
        reason = self.result["reason"] if self.result is not None else "see rank zero's log"
        rank_zero_info(f"QuantizeOnFit(config='auto') kept the model unquantized: {reason}.")
        return {"config": None, "quantized": [], "skipped": {}, "qat": False, "auto": self.result}

    def decisions(self, summary: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """What "auto" and the budget decided in the fit that ended with ``summary``, for the benchmark report."""
        if summary is None:
            return None
        decided: dict[str, Any] = {"config": summary.get("config")}
        if summary.get("higher_precision"):
            decided["kept_in_higher_precision"] = list(summary["higher_precision"])
        auto = summary.get("auto")
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
    def fit_budget(
        self,
        trainer: pl.Trainer,
        model: nn.Module,
        spec: QuantizationSpec,
        budget: AccuracyBudget,
        summary: dict[str, Any],
        trained: dict[str, nn.Module],
        quantize: Callable[[SkipSpec], dict[str, Any]],
        example: Optional[ModelInputs],
    ) -> dict[str, Any]:
        """Keep the most sensitive layers in full precision, as few as ``budget`` allows (bisection).

        ``model`` comes quantized with ``spec`` as ``summary`` says and leaves quantized as the returned
        summary says; ``trained`` holds its layers as trained, ``quantize(skip)`` quantizes it again with
        ``skip`` and returns the summary. ``{"config": None, ...}`` when even the unquantized model is
        beyond the budget.
        """
        name = f"QuantizeOnFit(config={spec.name!r}, max_accuracy_drop={self.max_accuracy_drop!r})"
        quantized = judge(trainer, budget, model)
        summary.update(accuracy=quantized.accuracy, higher_precision=[])
        if quantized.within:
            rank_zero_info(f"{name}: every selected layer quantized, within budget: {quantized.describe()}.")
            return summary

        def undo(layers: list[str]) -> None:
            for layer in layers:
                set_submodule(model, layer, trained[layer])

        undo(summary["quantized"])
        fp32 = judge(trainer, budget, model)
        if not fp32.within:
            rank_zero_warn(
                f"{name}: the model is beyond the accuracy budget before quantizing "
                f"({fp32.describe()}); it was left unquantized."
            )
            return {
                "config": None,
                "quantized": [],
                "skipped": {},
                "qat": False,
                "accuracy": fp32.accuracy,
                "reason": "beyond the accuracy budget before quantizing",
            }
        layers = list(summary["quantized"])
        progress_line(
            trainer,
            f"{name}: all layers quantized is beyond budget ({quantized.describe()}); "
            f"measuring the sensitivity of {len(layers)} layers",
        )
        order: Optional[list[str]] = None
        if trainer.is_global_zero:
            loader, _ = validation_data(trainer)
            if loader is not None:
                images = next(iter(loader))[0]
            else:  # the budget measured on validation data, so there is some; else the example input
                assert example is not None, "QuantizeOnFit(config='auto') needs validation data or an example input"
                images = example.args[0]
            sensitivity = layer_sensitivity(model, spec, layers, [images])
            order = sorted(layers, key=lambda layer: -sensitivity[layer])
        order = trainer.strategy.broadcast(order, src=0)
        assert order is not None
        beyond, within = 0, len(order)  # keeping k layers: 0 is beyond budget, all of them is the fp32 model
        measured: dict[int, Verdict] = {0: quantized, len(order): fp32}
        while within - beyond > 1:
            keep = (beyond + within) // 2
            progress_line(trainer, f"{name}: trying with the {keep} most sensitive layers in full precision")
            trial = quantize(skip_also(self.skip, order[:keep]))
            measured[keep] = judge(trainer, budget, model)
            undo(trial["quantized"])
            if measured[keep].within:
                within = keep
            else:
                beyond = keep
        if within == len(order):
            rank_zero_info(f"{name}: only the unquantized model is within budget; it was left unquantized.")
            return {
                "config": None,
                "quantized": [],
                "skipped": {},
                "qat": False,
                "accuracy": fp32.accuracy,
                "reason": "no layer can be quantized within the accuracy budget",
            }
        kept = order[:within]
        summary = quantize(skip_also(self.skip, kept))
        for rank, layer in enumerate(kept, 1):
            summary["skipped"][layer] = f"kept in full precision for the accuracy budget (sensitivity rank {rank})"
        summary.update(accuracy=measured[within].accuracy, higher_precision=kept)
        rank_zero_info(
            f"{name}: kept {len(kept)} of {len(order)} layers in full precision, most sensitive first ({kept}); "
            f"{measured[within].describe()}."
        )
        return summary


def _timing_input(
    model: nn.Module, batch_size: int, example: Optional[ModelInputs], input_shape: Optional[tuple[int, ...]]
) -> torch.Tensor:
    """A batch of ``batch_size`` random inputs shaped like the training inputs, on the model's device."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    first = example.args[0] if example is not None and example.args else None
    shape: Optional[tuple[int, ...]]
    if isinstance(first, torch.Tensor) and first.dim() >= 1:
        shape = tuple(first.shape[1:])
    else:
        shape = input_shape or stated_input_shape(model)
    if shape is None:
        raise RuntimeError(
            "QuantizeOnFit(config='auto') cannot tell the input shape to time the model on: no training "
            "input was seen and the model states none. Add a BenchmarkCallback(input_shape=...)."
        )
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *shape, generator=generator).to(device)
