"""ExportOnFit: write the compressed model as a file a server loads without this library, when ``fit`` ends.

It acts at train end after every edit (pruning, Nystrom, quantization, which
QuantizeOnFit saved to its checkpoints first) and before BenchmarkCallback's
final measurement, which then also measures the loaded file ("deployed").
An OpenVINO IR is the exception: OpenVINO converts float models, so it is
written just *before* QuantizeOnFit acts, from the trained float model, and
NNCF quantizes it (``quantize="int8"``); should it fail, the error is raised
at ``on_fit_end``, after QuantizeOnFit saved its checkpoints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Optional, Union, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback, in_training_step, validation_data
from lightning_vitcompress._checks import check_choice, check_int, check_output_file, check_path
from lightning_vitcompress._lightning import callbacks_of
from lightning_vitcompress._model import stated_input_shape
from lightning_vitcompress._options import passed_config, takes_config
from lightning_vitcompress._plan import PlanRow
from lightning_vitcompress._progress import stage_bar
from lightning_vitcompress.functional.export import (
    ARTIFACT_FORMATS,
    ExportConfig,
    check_exportable,
    export_compressed,
    export_stages,
    load_artifact,
)
from lightning_vitcompress.functional.measure import eval_mode, images_of
from lightning_vitcompress.models.base import logits_of

__all__ = ["ExportOnFit"]

_MB = 1e6
#: rows of the first training batch kept to check the exported file against the live model
_CHECK_ROWS = 8
#: validation batches the file's top-1 agreement with the live model is measured on
_AGREEMENT_BATCHES = 8
#: where an OpenVINO export runs in the canonical order: after every edit, before QuantizeOnFit (60) quantizes
_OPENVINO_ORDER = 55


def _path_and_format(arguments: dict[str, Any]) -> None:
    """``path`` checked first; ``format=None``: from the suffix of ``path`` (``.onnx``, ``.xml``), else ``"pt2"``."""
    path = check_path(arguments["path"], "path")
    if path is None:
        raise ValueError("path=None: pass the file to write, e.g. 'model.pt2' or 'model.onnx'.")
    if arguments["format"] is None and arguments["config"] is None:
        arguments["format"] = next((name for name, suffix in ARTIFACT_FORMATS.items() if path.suffix == suffix), "pt2")
    arguments["format"] = arguments["format"] or "pt2"


@takes_config(
    ExportConfig,
    positional=("path", "format"),
    exclude=("check", "opset_version"),
    defaults={"format": None},
    prepare=_path_and_format,
)
class ExportOnFit(CompressionCallback):
    """Export the final model to ``path`` when training ends, load it back and check its outputs.

    ``format="pt2"``: ``torch.export`` + AOTInductor, compiled ahead of time for the
    device the model trained on, with the lowering QuantizeOnFit's compiled model
    uses (inductor freezing, oneDNN int8, bf16-mixed); the server loads it with
    ``torch._inductor.aoti_load_package(path)`` and pays no compile.
    ``format="onnx"``: the dynamo ONNX exporter, checked with onnxruntime.
    ``format="openvino"``: an OpenVINO IR (``.xml`` + ``.bin``) of the trained float model,
    ``quantize="int8"`` by NNCF (transformer preset) calibrated on ``calibration_batches``
    training batches of the last epoch; the fastest CPU runtime measured here. With a
    ``QuantizeOnFit`` in the Trainer it is written before torchao quantizes the live model
    (OpenVINO does not convert torchao's int8 layers), so it needs ``quantize="int8"``.
    The file takes images and returns logits, for any batch size (``dynamic_batch``).
    Its top-1 agreement with the live model on validation batches is logged (``export/top1_agreement``).

    The model is checked at ``setup`` (``torch.export`` captures it; the path is
    writable; the ONNX packages are installed), so a model that cannot export
    fails before training. The export runs after QuantizeOnFit wrote its
    checkpoints; it never changes the model. Rank zero exports.

    Example (a tiny ViT on scikit-learn's digits, to ONNX; ``"vit.pt2"`` is loaded with
    ``torch._inductor.aoti_load_package`` and ``ExportOnFit("vit-int8.xml", quantize="int8")`` with
    ``ov.Core().compile_model``, each without this library)::

        >>> import lightning as L
        >>> import numpy as np
        >>> import onnxruntime
        >>> from lightning_vitcompress import ExportOnFit
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> export = ExportOnFit("digits.onnx")
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[export])
        >>> trainer.fit(DigitsClassifier(embed_dim=32, depth=2, num_heads=4), DigitsDataModule())
        >>> export.summary["path"], export.summary["format"]
        ('digits.onnx', 'onnx')
        >>> session = onnxruntime.InferenceSession("digits.onnx")  # in the server: onnxruntime only
        >>> session.run(None, {session.get_inputs()[0].name: np.zeros((2, 3, 32, 32), np.float32)})[0].shape
        (2, 10)

    Args:
        path: the file to write (``.pt2``, ``.onnx`` or ``.xml``).
        format: ``"pt2"``, ``"onnx"`` or ``"openvino"``; None: from the suffix of ``path`` (else ``"pt2"``).
        calibration_batches: training batches NNCF calibrates on (``quantize="int8"``): the first ones of
            the last epoch, whole.
        on_error: ``"raise"`` (default) or ``"warn"`` when the export or its check fails.
        config: an :class:`~lightning_vitcompress.functional.ExportConfig` instead of the options
            (passing both is an error).
        model_attribute: attribute of the LightningModule holding the ViT (None: found automatically).

    After fit, :attr:`summary` says what was written (path, size, export/load/first-call seconds,
    relative error, tolerance); metrics are logged under ``export/``.
    """

    order = 70
    LOG_PREFIX = "export"

    def __init__(
        self,
        path: Union[str, Path],
        *args: Any,
        calibration_batches: int = 8,
        on_error: Literal["raise", "warn"] = "raise",
        config: Optional[ExportConfig] = None,
        model_attribute: Optional[str] = None,
        **options: Any,
    ) -> None:
        super().__init__(model_attribute)
        #: the export options (``inference_precision`` None is resolved at setup)
        self.config: ExportConfig = passed_config(config, args, options)
        path = Path(path)  # checked by _path_and_format
        check_choice(on_error, "on_error", ("raise", "warn"))
        check_int(calibration_batches, "calibration_batches", minimum=1, example="8")
        if self.config.format == "openvino":
            if path.suffix != ".xml":
                raise ValueError(
                    f"path={str(path)!r} with format='openvino': an OpenVINO IR is an .xml file (its "
                    f"weights go to the .bin beside it). Pass e.g. {str(path.with_suffix('.xml'))!r}."
                )
            self.order = _OPENVINO_ORDER  # type: ignore[misc]  # this instance (only) acts before QuantizeOnFit
        self.path = path
        self.on_error = on_error
        self.calibration_batches = calibration_batches
        #: what the export wrote (``None`` before it ran, or when it failed with on_error="warn")
        self.summary: Optional[dict[str, Any]] = None
        self._config: ExportConfig = self.config
        self._example: Optional[torch.Tensor] = None
        #: training images NNCF calibrates on (OpenVINO int8): the first batches of the current epoch
        self._calibration: list[torch.Tensor] = []
        self._capture_handle: Optional[Any] = None
        #: an OpenVINO export's failure, raised at fit end (after QuantizeOnFit saved)
        self._deferred: Optional[tuple[str, Optional[Exception]]] = None

    # ----------------------------------------------------- hooks, in the order Lightning calls them
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_output_file(self.path, "path")
        self._config = self._resolved_config(trainer)
        self._config.check_environment()
        self._check_with_quantize_on_fit(trainer)
        model = self.target(pl_module)
        shape = _input_shape(pl_module, model)
        if shape is not None:  # torch.export captures it (not a 10-hour fit later); on every rank: same answer
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            check_exportable(model, torch.zeros(2, *shape, device=device), self._config)
        self.summary = None
        self._start_capture(trainer, model)

    def ordered_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibration = []  # calibrate on the last epoch's inputs, seen by the most trained weights

    def ordered_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_capture()
        # rank zero writes and checks the file; every rank learns how it went, so a failure raises everywhere
        # (a lone raise on rank zero would leave the others waiting in a collective) and summary is the same
        summary, failure, error = self._export(trainer, pl_module) if trainer.is_global_zero else (None, None, None)
        summary, failure = trainer.strategy.broadcast((summary, failure), src=0)  # the exception stays on rank zero
        self._calibration = []
        if failure is not None:
            if self._config.format == "openvino" and self.on_error == "raise":
                self._deferred = (failure, error)  # QuantizeOnFit acts (and saves) after this: raise at fit end
            else:
                self._fail(failure, error)
            return
        assert summary is not None  # _export returns a summary whenever it reports no failure
        self.summary = summary
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {
                    "export/path": summary["path"],
                    "export/format": summary["format"],
                    "export/inference_precision": summary["inference_precision"],
                }
            )
        self.log_metrics(
            trainer,
            {
                "size_mb": summary["size_bytes"] / _MB,
                "export_seconds": summary["export_seconds"],
                "load_seconds": summary["load_seconds"],
                "first_call_seconds": summary["first_call_seconds"],
                "relative_error": summary["relative_error"],
                "top1_agreement": summary.get("top1_agreement"),
            },
        )
        error = summary["relative_error"]
        rank_zero_info(
            f"ExportOnFit: wrote {summary['path']} ({summary['format']}, {summary['inference_precision']}, "
            f"{summary['size_bytes'] / _MB:.2f} MB) in {summary['export_seconds']:.1f} s"
            + (
                f"; loaded back, logits within {error:.2g} of the live model's (tolerance {summary['tolerance']:g})"
                if error is not None
                else ""
            )
            + (
                f"; top-1 agreement with it {summary['top1_agreement']:.2%} on validation data"
                if summary.get("top1_agreement") is not None
                else ""
            )
        )

    def ordered_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._fail(*deferred)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_capture()
        self._example = None
        super().teardown(trainer, pl_module, stage)

    # ----------------------------------------------------------------------- what the pipeline asks
    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        c = self._config
        what = f"writes {self.path.name} ({c.format}{', NNCF ' + c.quantize if c.quantize else ''})"
        when = "train end, before QuantizeOnFit" if c.format == "openvino" else "train end, after QuantizeOnFit"
        return [
            PlanRow(
                "ExportOnFit",
                what,
                when,
                f"precision {c.precision}, checked against the live model (tolerance "
                f"{'per precision' if c.tolerance is None else c.tolerance})",
            )
        ]

    def train_end_action(self) -> Optional[tuple[str, str]]:
        return (
            f"ExportOnFit(path={str(self.path)!r}) writes its file",
            "or call export_compressed(model, path, images) on the trained model",
        )

    # -------------------------------------------------------------------------------------- helpers
    def _check_with_quantize_on_fit(self, trainer: pl.Trainer) -> None:
        from lightning_vitcompress.callbacks.quantization import QuantizeOnFit

        if self._config.format != "openvino" or self._config.quantize is not None:
            return
        if any(isinstance(cb, QuantizeOnFit) for cb in callbacks_of(trainer)):
            raise ValueError(
                f"ExportOnFit(path={str(self.path)!r}, format='openvino', quantize=None) with a QuantizeOnFit in the "
                "Trainer: OpenVINO does not convert torchao's int8 layers, so the IR would be the float model while "
                "the live model is int8. Pass quantize='int8' (NNCF quantizes the trained float model for OpenVINO), "
                "or use format='pt2' for the torch int8 model."
            )

    def _resolved_config(self, trainer: pl.Trainer) -> ExportConfig:
        if self.config.inference_precision is not None or self.config.format in ("onnx", "openvino"):
            return self.config
        from lightning_vitcompress.callbacks.quantization import QuantizeOnFit

        quantize = next((cb for cb in callbacks_of(trainer) if isinstance(cb, QuantizeOnFit)), None)
        precision = quantize.inference_precision if quantize is not None else "32-true"
        # a str in the quantization layer, checked to be one of these by QuantizeOnFit's constructor
        return dataclasses.replace(self.config, inference_precision=cast(Literal["32-true", "bf16-mixed"], precision))

    def _start_capture(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Keep a few rows of the first training input (the real batch the exported file is checked on) and, for
        NNCF int8, the first ``calibration_batches`` training inputs of each epoch."""
        self._stop_capture()
        self._example = None
        self._calibration = []
        calibrates = self._config.quantize is not None

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not (args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4):
                return
            if self._example is None:
                self._example = args[0].detach()[:_CHECK_ROWS].clone()
            if not calibrates:
                self._stop_capture()
            elif in_training_step(trainer) and len(self._calibration) < self.calibration_batches:
                self._calibration.append(args[0].detach().clone())  # by the Trainer's progress: eval() models too

        self._capture_handle = model.register_forward_pre_hook(capture)

    def _stop_capture(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    def _export(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
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
        calibration = self._calibration if self._config.quantize is not None and self._calibration else None
        stages = export_stages(self._config)
        try:
            with stage_bar(trainer, f"ExportOnFit: {self.path.name}", total=len(stages), unit="stage") as bar:
                summary = export_compressed(
                    model,
                    self.path,
                    example,
                    self._config,
                    calibration_data=calibration,
                    progress=lambda stage: bar.step(stage),
                )
        except Exception as err:  # the model is untouched; say so
            return None, f"{type(err).__name__}: {err}", err
        # the file's own quantization (NNCF) can change decisions: how often, on real data (other formats hold
        # the live model's own layers, and its compiled call would recompile for the validation batch's shape)
        summary["top1_agreement"] = _top1_agreement(trainer, model, summary) if self._config.quantize else None
        return summary, None, None

    def _fail(self, reason: str, err: Optional[Exception]) -> None:
        message = (
            f"ExportOnFit(path={str(self.path)!r}, format={self._config.format!r}) failed: {reason.rstrip('.')}. The "
            "trained "
            "model is unchanged (QuantizeOnFit's checkpoints and fp32 copy were written"
            f"{' after' if self._config.format == 'openvino' else ' before'} the export, ModelCheckpoint's during "
            "training); export it later with lightning_vitcompress.functional.export_compressed(model, path, images)."
        )
        if self.on_error == "raise":
            raise RuntimeError(message) from err
        rank_zero_warn(message)


def _top1_agreement(trainer: pl.Trainer, model: nn.Module, summary: dict[str, Any]) -> Optional[float]:
    """How often the written file's top-1 class equals the live model's, on up to :data:`_AGREEMENT_BATCHES`
    validation batches; None without validation data (or a file for another device)."""
    loader, limit = validation_data(trainer)
    if loader is None or summary["device"] != "cpu":
        return None
    artifact = load_artifact(summary["path"], format=summary["format"])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    agree = total = 0
    batches = min(limit if limit is not None else _AGREEMENT_BATCHES, _AGREEMENT_BATCHES)
    with eval_mode(model), torch.inference_mode():
        for index, batch in enumerate(loader):
            if index >= batches:
                break
            images = images_of(batch)
            if images is None:
                return None
            live = logits_of(model(images.to(device))).argmax(-1).cpu()
            agree += int((artifact(images.cpu()).argmax(-1) == live).sum())
            total += live.numel()
    return agree / total if total else None


def _input_shape(pl_module: pl.LightningModule, model: nn.Module) -> Optional[tuple[int, ...]]:
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor) and example.dim() == 4:
        return tuple(example.shape[1:])
    return stated_input_shape(model)
