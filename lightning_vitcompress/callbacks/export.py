"""ExportOnFit: write the compressed model as a file a server loads without this library, when ``fit`` ends.

It acts at train end after every edit (pruning, Nystrom, quantization, which
QuantizeOnFit saved to its checkpoints first) and before BenchmarkCallback's
final measurement, which then also measures the loaded file ("deployed").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._checks import check_choice, check_output_file, check_path, config_or_options
from lightning_vitcompress._model import stated_input_shape
from lightning_vitcompress.functional.export import ARTIFACT_FORMATS, ExportConfig, check_exportable, export_compressed

__all__ = ["ExportOnFit"]

_MB = 1e6
#: rows of the first training batch kept to check the exported file against the live model
_CHECK_ROWS = 8


class ExportOnFit(CompressionCallback):
    """Export the final model to ``path`` when training ends, load it back and check its outputs.

    ``format="pt2"``: ``torch.export`` + AOTInductor, compiled ahead of time for the
    device the model trained on, with the lowering QuantizeOnFit's compiled model
    uses (inductor freezing, oneDNN int8, bf16-mixed); the server loads it with
    ``torch._inductor.aoti_load_package(path)`` and pays no compile.
    ``format="onnx"``: the dynamo ONNX exporter, checked with onnxruntime.
    The file takes images and returns logits, for any batch size (``dynamic_batch``).

    The model is checked at ``setup`` (``torch.export`` captures it; the path is
    writable; the ONNX packages are installed), so a model that cannot export
    fails before training. The export runs after QuantizeOnFit wrote its
    checkpoints; it never changes the model. Rank zero exports.

    Example::

        from lightning_vitcompress import BenchmarkCallback, ExportOnFit, PruningSchedule, QuantizeOnFit

        trainer = Trainer(callbacks=[PruningSchedule(0.5), QuantizeOnFit("int8_static_x86", save_path="int8.ckpt"),
                                     ExportOnFit("vit-int8.pt2"), BenchmarkCallback()])
        trainer.fit(model, datamodule)
        runner = torch._inductor.aoti_load_package("vit-int8.pt2")  # in the server: torch only

    Args:
        path: the file to write (``.pt2`` or ``.onnx``).
        format: ``"pt2"`` or ``"onnx"``; None: from the suffix of ``path`` (else ``"pt2"``).
        inference_precision: ``"32-true"`` or ``"bf16-mixed"`` (pt2); None: the QuantizeOnFit's in the
            Trainer when it has one (``"32-true"`` for ONNX), else ``"32-true"``.
        dynamic_batch: any batch size (default) or the training batch's only.
        device: ``"cpu"``/``"cuda"``; None: the device the model trained on.
        tolerance: largest relative difference between the file's logits and the live model's
            (None: :data:`~lightning_vitcompress.functional.export.TOLERANCES` per precision).
        on_error: ``"raise"`` (default) or ``"warn"`` when the export or its check fails.
        config: an :class:`~lightning_vitcompress.functional.ExportConfig` instead of the options.
        model_attribute: attribute of the LightningModule holding the ViT (None: found automatically).

    After fit, :attr:`summary` says what was written (path, size, export/load/first-call seconds,
    relative error, tolerance); metrics are logged under ``export/``.
    """

    order = 70
    LOG_PREFIX = "export"

    def __init__(
        self,
        path: Union[str, Path],
        format: Optional[Literal["pt2", "onnx"]] = None,
        *,
        inference_precision: Optional[Literal["32-true", "bf16-mixed"]] = None,
        dynamic_batch: bool = True,
        device: Optional[str] = None,
        tolerance: Optional[float] = None,
        on_error: Literal["raise", "warn"] = "raise",
        config: Optional[ExportConfig] = None,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        path = check_path(path, "path")
        if path is None:
            raise ValueError("path=None: pass the file to write, e.g. 'model.pt2' or 'model.onnx'.")
        if format is None and config is None:
            format = next((name for name, suffix in ARTIFACT_FORMATS.items() if path.suffix == suffix), "pt2")
        options = dict(
            format=format or "pt2", inference_precision=inference_precision, dynamic_batch=dynamic_batch,
            device=device, tolerance=tolerance,
        )
        #: the export options (``inference_precision`` None is resolved at setup)
        self.config: ExportConfig = config_or_options(config, ExportConfig, options, "ExportOnFit")
        check_choice(on_error, "on_error", ("raise", "warn"))
        self.path = path
        self.on_error = on_error
        #: what the export wrote (``None`` before it ran, or when it failed with on_error="warn")
        self.summary: Optional[dict[str, Any]] = None
        self._config: ExportConfig = self.config
        self._example: Optional[torch.Tensor] = None
        self._capture_handle: Optional[Any] = None

    # ------------------------------------------------------------- setup: fail fast
    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        check_output_file(self.path, "path")
        self._config = self._resolved_config(trainer)
        self._config.check_environment()
        model = self.target(pl_module)
        shape = _input_shape(pl_module, model)
        if shape is not None:  # torch.export captures it (not a 10-hour fit later); on every rank: same answer
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            check_exportable(model, torch.zeros(2, *shape, device=device), self._config)
        self.summary = None
        self._start_capture(model)

    def _resolved_config(self, trainer: "pl.Trainer") -> ExportConfig:
        if self.config.inference_precision is not None or self.config.format == "onnx":
            return self.config
        from lightning_vitcompress.callbacks.quantization import QuantizeOnFit

        quantize = next((cb for cb in trainer.callbacks if isinstance(cb, QuantizeOnFit)), None)
        precision = quantize.inference_precision if quantize is not None else "32-true"
        return dataclasses.replace(self.config, inference_precision=precision)

    def _start_capture(self, model: nn.Module) -> None:
        """Keep a few rows of the first training input: the real batch the exported file is checked on."""
        self._stop_capture()
        self._example = None

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                self._example = args[0].detach()[:_CHECK_ROWS].clone()
                self._stop_capture()

        self._capture_handle = model.register_forward_pre_hook(capture)

    def _stop_capture(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    def train_end_action(self) -> Optional[tuple[str, str]]:
        return (f"ExportOnFit(path={str(self.path)!r}) writes its file",
                "or call export_compressed(model, path, images) on the trained model")

    # ------------------------------------------------------------- train end: export
    def ordered_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stop_capture()
        # rank zero writes and checks the file; every rank learns how it went, so a failure raises everywhere
        # (a lone raise on rank zero would leave the others waiting in a collective) and summary is the same
        summary, failure, error = self._export(pl_module) if trainer.is_global_zero else (None, None, None)
        summary, failure = trainer.strategy.broadcast((summary, failure), src=0)  # the exception stays on rank zero
        if failure is not None:
            self._fail(failure, error)
            return
        self.summary = summary
        for logger in trainer.loggers:
            logger.log_hyperparams({"export/path": summary["path"], "export/format": summary["format"],
                                    "export/inference_precision": summary["inference_precision"]})
        self.log_metrics(
            trainer,
            {
                "size_mb": summary["size_bytes"] / _MB,
                "export_seconds": summary["export_seconds"],
                "load_seconds": summary["load_seconds"],
                "first_call_seconds": summary["first_call_seconds"],
                "relative_error": summary["relative_error"],
            },
        )
        error = summary["relative_error"]
        rank_zero_info(
            f"ExportOnFit: wrote {summary['path']} ({summary['format']}, {summary['inference_precision']}, "
            f"{summary['size_bytes'] / _MB:.2f} MB) in {summary['export_seconds']:.1f} s"
            + (f"; loaded back, logits within {error:.2g} of the live model's (tolerance {summary['tolerance']:g})"
               if error is not None else "")
        )

    def _export(
        self, pl_module: "pl.LightningModule"
    ) -> tuple[Optional[dict[str, Any]], Optional[str], Optional[Exception]]:
        """``(summary, None, None)``, or ``(None, why, error or None)`` when no checked file was written."""
        model = self.target(pl_module)
        example = self._example
        if example is None:
            shape = _input_shape(pl_module, model)
            if shape is None:
                return None, "no training step ran, so there is no real batch to check the file on", None
            rank_zero_warn("ExportOnFit: no training step ran; the exported file is checked on random images.")
            example = torch.randn(2, *shape)
        try:
            return export_compressed(model, self.path, example, self._config), None, None
        except Exception as err:  # noqa: BLE001 - the model is untouched; say so
            return None, f"{type(err).__name__}: {err}", err

    def _fail(self, reason: str, err: Optional[Exception]) -> None:
        message = (
            f"ExportOnFit(path={str(self.path)!r}, format={self._config.format!r}) failed: {reason}. The trained "
            "model is unchanged (QuantizeOnFit's checkpoints and fp32 copy were written before the export); "
            "export it later with lightning_vitcompress.functional.export_compressed(model, path, images)."
        )
        if self.on_error == "raise":
            raise RuntimeError(message) from err
        rank_zero_warn(message)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stop_capture()
        self._example = None
        super().teardown(trainer, pl_module, stage)


def _input_shape(pl_module: "pl.LightningModule", model: nn.Module) -> Optional[tuple[int, ...]]:
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor) and example.dim() == 4:
        return tuple(example.shape[1:])
    return stated_input_shape(model)
