"""QuantizeOnFit: torchao quantization of the trained model when ``fit`` ends, optionally after QAT.

The model trains in full precision (or, from ``qat_start_epoch``, with
fake-quantized linears: quantization-aware training). When training ends,
after the last optimizer step and before ``on_fit_end`` (so before
``BenchmarkCallback`` measures, and before any ``trainer.test``/``predict``
that follows), the selected ``nn.Linear`` layers are quantized with torchao's
``quantize_``. Nothing happens inside ``fit`` that a resume would need to undo:
checkpoints saved during training hold the fp32 weights.

Quantizing works on copies of the layers; only when every copy quantized and a
forward pass of the model on a real input ran are they swapped in. On any
failure the fp32 model is put back and the error says what failed. The class
reads top-down: constructor, hooks (``setup`` checks, QAT at an epoch start,
the train-end recipe), then helpers. Beside it: ``_quantization_setup.py``
(argument checks, the default config), ``_quantization_auto.py``
(``config="auto"`` and ``max_accuracy_drop``, which measure before they
decide) and ``_quantization_io.py`` (inputs kept, files and logs written).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._model import set_submodule
from lightning_vitcompress._plan import PlanRow, budget_phrase
from lightning_vitcompress._structure import recorded_edits
from lightning_vitcompress._training_state import refresh_after_structural_change
from lightning_vitcompress.callbacks._quantization_auto import AUTO, AutoQuantization
from lightning_vitcompress.callbacks._quantization_io import (
    StepFailed,
    TrainingInputs,
    compile_quantized,
    log_summary,
    quantize_on_inputs,
    save_checkpoint,
    save_fp32_copy,
    save_quantized,
)
from lightning_vitcompress.callbacks._quantization_setup import (
    check_arguments,
    check_calibration_data,
    check_inference_precision,
    check_not_quantized,
    check_output_files,
    check_resume,
    check_save_paths,
    choose_default,
    selected_layers,
    warn_if_too_narrow,
)
from lightning_vitcompress.functional.multihead_attention import restore_multihead_attention
from lightning_vitcompress.functional.quantize import RECORD_KIND, remove_fake_quantization, split_attention_to_quantize
from lightning_vitcompress.functional.quantize_configs import (
    QUANTIZATION_CONFIGS,
    DefaultChoice,
    QuantizationSpec,
    resolve_quantization,
)
from lightning_vitcompress.functional.quantize_layers import SkipSpec, check_skip_matches
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16

__all__ = ["QuantizeOnFit"]

#: ``config=None`` warns below this width (the widest quantized layer's in_features) when its choice runs eager:
#: eager int8's per-layer overhead outweighs the cheaper math there (``benchmarks/bench_int8_width.py``)
INT8_PAYS_FROM_WIDTH = 256


# ----------------------------------------------------------------------------- the callback
class QuantizeOnFit(CompressionCallback):
    r"""Quantize the trained model's linear layers with torchao when training ends; optional QAT.

    Example (a tiny ViT on scikit-learn's digits)::

        >>> import lightning as L
        >>> from lightning_vitcompress import QuantizeOnFit, load_compressed
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[QuantizeOnFit("int8_dynamic", save_path="model-int8.ckpt")])
        >>> trainer.fit(model, DigitsDataModule())
        >>> _ = trainer.test(model, DigitsDataModule(), verbose=False)  # runs the quantized model
        >>> type(model.model.blocks[0].mlp.fc1.weight).__name__
        'Int8Tensor'
        >>> type(load_compressed(DigitsClassifier, "model-int8.ckpt").model.blocks[0].mlp.fc1.weight).__name__
        'Int8Tensor'

        Without a config (``QuantizeOnFit(save_path=...)``) it picks the one fast on the Trainer's device.

    Args:
        config: ``None`` (default): the int8 config that is fast on the device the Trainer runs on, read from what the
            hardware reports at ``setup`` (no timing; :func:`~lightning_vitcompress.functional.default_quantization`):
            on x86 CPUs with VNNI/AMX ``"int8_static_x86"`` (``"bf16-mixed"`` where bf16 is native), on CUDA
            ``"int8_dynamic"`` (``"float8_dynamic"`` on SM >= 8.9), elsewhere ``"int8_dynamic"``; the choice and why are
            logged and kept in :attr:`default_choice`. Or name one: ``"int8_dynamic"`` (int8 per-token activations, int8
            per-channel weights; CPU and CUDA; torchao's portable int8 path), ``"int8_dynamic_x86"`` (x86 CPUs: uint8
            per-tensor activations, int8 per-channel weights, compiled to oneDNN int8 GEMMs, see
            :class:`~lightning_vitcompress.Int8DynamicX86Config`), ``"int8_static_x86"`` (the same with activation
            scales calibrated on ``calibration_batches`` training inputs at train end: the fastest CPU path),
            ``"int8_weight_only"`` (CPU and CUDA), ``"int4_weight_only"`` (CUDA; groups of 128, layers cast to bf16),
            ``"float8_dynamic"`` (CUDA, compute capability >= 8.9), any name registered in
            :data:`~lightning_vitcompress.functional.QUANTIZATION_CONFIGS`, any torchao config object
            (``torchao.quantization.*Config``), or a :class:`~lightning_vitcompress.functional.QuantizationSpec`.
            Resolved once into :attr:`spec`. ``"auto"``: at train end, every config that runs on this machine (x86 int8
            paths, also bf16-mixed where the CPU has native bf16; portable int8; weight-only; on CUDA int8, int4
            weight-only and float8 on SM >= 8.9) is built on a copy of the trained model and timed against the
            unquantized model with the package's timing, at the ``BenchmarkCallback``'s batch size (32 without one); the
            fastest one that is at least 1.05x faster (and within ``max_accuracy_drop``) is applied, else the model
            stays unquantized and the log says why. The table is logged under ``quant/auto/`` and kept in
            :attr:`auto_result`.
        skip: layers to keep in full precision: a name or glob pattern relative to the model (``"head"``,
            ``"blocks.0.*"``), a list of them, or ``fn(name, module) -> bool``. ``nn.MultiheadAttention``'s ``out_proj``
            is always kept (with a note in :attr:`summary`).
        qat_start_epoch: start quantization-aware training at this epoch (the linear layers are swapped for torchao's
            fake-quantized ones that share the same parameters, so the optimizer trains on); converted to the real
            quantized model when training ends. ``None``: no QAT.
        compile: ``True`` (or a dict of ``torch.compile`` keyword arguments) compiles the quantized model in place
            (``nn.Module.compile``: the state-dict keys do not change); the int8 kernels are fastest compiled. ``None``
            (default): compile where the config is only fast compiled (its spec's ``compiled_by_default``: the x86
            configs, compiled with inductor freezing). The compile cost is paid once at train end, on a captured
            training input under ``inference_mode``, and logged as ``quant/compile_seconds`` (about 15-30 s for ViT-B/16
            on 2 cores); inputs of another shape, device or grad mode compile again on first use.
        inference_precision: ``None`` (default: the default config's choice, else ``"32-true"``), ``"32-true"`` or
            ``"bf16-mixed"``: the compiled x86 model runs its unquantized ops (attention, norms, GELU, residual adds) in
            bf16 under CPU autocast and returns float32 (PyTorch's int8-mixed-bf16 recipe; for CPUs with AVX512-BF16 or
            AMX, checked at setup). x86 configs only.
        calibration_batches: how many training batches ``"int8_static_x86"`` calibrates on: the target model's inputs of
            the first ``calibration_batches`` training steps of the last epoch are kept (on their device) and run
            through the trained model in eval mode.
        save_path: write the quantized model here as a checkpoint that :func:`~lightning_vitcompress.load_compressed`
            loads back. Checked at setup (not a directory, its folder writable). Should writing it fail, the model is
            put back in full precision (a half-written file is removed) and the error says where the fp32 copy is.
        save_fp32_path: write the trained full-precision model here first (also loadable with ``load_compressed``); must
            differ from ``save_path``. If writing it fails, nothing is quantized. The checkpoints ``ModelCheckpoint``
            saved during training hold the fp32 weights too.
        on_error: ``"raise"`` (default) or ``"warn"`` when quantizing or saving fails; the fp32 model stays in place
            either way.
        max_accuracy_drop: points of validation top-1 the quantized model may lose against the model as it entered fit
            (needs validation data; checked at setup). Beyond it, the layers whose quantization moves the output most
            (measured one layer at a time on a validation batch) are kept in full precision, as few as the budget allows
            (bisection); ``summary["higher_precision"]`` lists them. If only the unquantized model is within budget, it
            is left unquantized.
        auto_time_budget_s: with ``config="auto"``: the seconds the search may spend (building, compiling and timing);
            candidates it does not reach are logged as "not tried".
        auto_configs: with ``config="auto"``: the config names it may choose from (default: every one that runs on this
            machine).
        model_attribute: attribute of the LightningModule holding the ViT (``None``: found automatically).

    Resuming (``trainer.fit(ckpt_path=...)``): until QAT has started in the checkpoint's run, any argument may change.
    Once it has, the weights were trained for one format, so ``config``, ``skip`` and ``qat_start_epoch`` must match the
    checkpoint's (an error at setup names both values).

    After fit, :attr:`summary` holds what was done: config, quantized layers, skipped layers with why, size before and
    after, output error on a real input. Metrics are logged under ``quant/``.
    """

    order = 60
    KIND = RECORD_KIND
    EDITS_STRUCTURE = True
    LOG_PREFIX = "quant"

    def __init__(
        self,
        config: Any = None,
        *,
        skip: SkipSpec = None,
        qat_start_epoch: Optional[int] = None,
        compile: Union[bool, dict[str, Any], None] = None,
        inference_precision: Optional[Literal["32-true", "bf16-mixed"]] = None,
        calibration_batches: int = 8,
        save_path: Optional[Union[str, Path]] = None,
        save_fp32_path: Optional[Union[str, Path]] = None,
        on_error: Literal["raise", "warn"] = "raise",
        max_accuracy_drop: Optional[float] = None,
        auto_time_budget_s: float = 300.0,
        auto_configs: Optional[Sequence[str]] = None,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        #: ``config="auto"``: the config is chosen at train end by measuring (:attr:`spec` is None until then)
        self.auto = isinstance(config, str) and config == AUTO
        #: ``config=None``: the config is read from the hardware at setup (:attr:`default_choice`)
        self.default = config is None
        #: the config resolved once: what it is, how it quantizes, compiles and replays
        self.spec: Optional[QuantizationSpec] = None if self.auto or self.default else resolve_quantization(config)
        check_arguments(
            config,
            self.spec,
            auto=self.auto,
            skip=skip,
            qat_start_epoch=qat_start_epoch,
            compile=compile,
            inference_precision=inference_precision,
            calibration_batches=calibration_batches,
            on_error=on_error,
            max_accuracy_drop=max_accuracy_drop,
            auto_time_budget_s=auto_time_budget_s,
            auto_configs=auto_configs,
        )
        self.save_path, self.save_fp32_path = check_save_paths(save_path, save_fp32_path)
        self.config = config
        self.skip = skip
        self.qat_start_epoch = qat_start_epoch
        self.compile = compile
        #: what the user passed (None: the default's choice); :attr:`inference_precision` is what is used
        self.requested_inference_precision = inference_precision
        self.inference_precision: str = inference_precision or "32-true"
        #: what ``config=None`` chose at the last setup, and why
        self.default_choice: Optional[DefaultChoice] = None
        self.calibration_batches = calibration_batches
        self.on_error = on_error
        self.max_accuracy_drop = max_accuracy_drop
        self.auto_time_budget_s = float(auto_time_budget_s)
        self.auto_configs = list(auto_configs) if auto_configs is not None else None
        #: what ``config="auto"`` and ``max_accuracy_drop`` decide by measuring at train end
        self.search = AutoQuantization(self.auto_configs, skip, compile, self.auto_time_budget_s, max_accuracy_drop)
        #: what the last quantization did (``None`` before it ran)
        self.summary: Optional[dict[str, Any]] = None
        self._qat_active = False
        #: the training inputs kept for train end: the check and compile example, the calibration batches
        self._inputs = TrainingInputs(calibration_batches)
        #: the ``nn.MultiheadAttention`` modules split for quantization, by name
        self._split: dict[str, nn.MultiheadAttention] = {}

    # ------------------------------------------------------------- setup: fail fast
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_not_quantized(self.replayed_records(trainer, RECORD_KIND))
        device = trainer.strategy.root_device
        check_output_files(self.save_path, self.save_fp32_path)
        if self.default:
            self.default_choice, self.spec, self.inference_precision = choose_default(
                trainer, device, self.requested_inference_precision, self.compile
            )
        check_resume(*self.resumed_callback_state(trainer), self.state_dict())
        model = self.target(pl_module)
        check_skip_matches(model, self.skip)
        if self.auto:
            self.spec, self.inference_precision = None, "32-true"  # chosen afresh at train end
            self.search.setup(trainer, device)
            spec = QUANTIZATION_CONFIGS[self.search.candidates[0].config]
        else:
            assert self.spec is not None  # resolved in the constructor, or by choose_default above
            spec = self.spec
            spec.check_device(device)
            check_inference_precision(self.inference_precision, native_bf16=cpu_supports_bfloat16)
            check_calibration_data(trainer, spec, self.calibration_batches)
            spec.dry_run(device, qat=self.qat_start_epoch is not None)
        selected = selected_layers(spec, model, self.skip, self.config_label)
        if self.default:
            warn_if_too_narrow(model, spec, self.compile, selected, width=INT8_PAYS_FROM_WIDTH)
        self.search.result = None
        self.summary = None
        self._qat_active = False
        candidates = [QUANTIZATION_CONFIGS[candidate.config] for candidate in self.search.candidates]
        specs = [self.spec] if self.spec is not None else candidates
        self._inputs.start(trainer, model, calibrates=any(spec.calibrates for spec in specs))

    # ------------------------------------------------------------- training: QAT
    def ordered_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._inputs.new_epoch()
        if self.qat_start_epoch is None or self._qat_active or trainer.current_epoch < self.qat_start_epoch:
            return
        model = self.target(pl_module)
        params_before = [id(p) for p in pl_module.parameters()]
        assert self.spec is not None  # "auto" refuses qat_start_epoch
        selected = self.spec.prepare_qat(model, self.skip)
        self._qat_active = True
        if [id(p) for p in pl_module.parameters()] != params_before:
            refresh_after_structural_change(trainer)  # torchao shares the parameters today; in case it stops
        rank_zero_info(
            f"QuantizeOnFit: quantization-aware training from epoch {trainer.current_epoch} "
            f"({len(selected)} fake-quantized linear layers, config={self.spec.name!r})."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        # read back at a resume's setup (check_resume); plain data, safe to load with weights_only=True
        skip = self.skip
        return {
            "config": AUTO if self.auto else (self.spec.name if self.spec is not None else None),
            "qat_start_epoch": self.qat_start_epoch,
            "skip": None if skip is None or callable(skip) else ([skip] if isinstance(skip, str) else sorted(skip)),
            "skip_callable": callable(skip),
            "qat_active": self._qat_active,
            # with a budget: the top-1 of the model as it entered the first fit, what a resumed fit's budget is against
            **({"budget_reference": self.budget_reference} if self.max_accuracy_drop is not None else {}),
        }

    # ------------------------------------------------------------- train end: the recipe
    def ordered_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The recipe: choose the config ("auto"); write the fp32 copy, quantize (within the budget), record and write
        the quantized model, all or nothing (:meth:`_or_put_back`); compile and log. Or write the unquantized model."""
        self._inputs.stop()
        model = self.target(pl_module)
        if self.auto:
            self._choose_auto(trainer, model)
        if self.spec is None:  # "auto" found nothing faster within budget
            summary: Optional[dict[str, Any]] = self.search.unquantized_summary()
        else:
            summary = self._quantize_and_save(trainer, pl_module, model)
        self._inputs.calibration = []
        if summary is not None and summary.get("config") is None:  # "auto" or the budget left it unquantized
            self.summary = summary
            for path in (self.save_fp32_path, self.save_path):
                if path is not None:
                    save_checkpoint(trainer, pl_module, path)
        elif summary is not None:  # None: a step failed with on_error="warn", the trained model is in place
            assert self.spec is not None
            if self.spec.compiles(self.compile):
                summary["compile_seconds"] = compile_quantized(
                    trainer, model, self.spec, self.inference_precision, self.compile, self._inputs.example
                )
            summary["auto"] = self.auto_result
            self.summary = summary
            log_summary(trainer, summary, self.log_metrics)

    # ------------------------------------------------------------- teardown
    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._inputs.clear()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------- what the base class and the report ask
    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        if self.auto:
            what = f"int8: the fastest of {len(self.search.candidates)} configs timed here ('auto')"
            why = f"search bounded by {self.auto_time_budget_s:g} s"
        else:
            assert self.spec is not None
            what = f"int8: {self.spec.name}, {self.inference_precision}"
            why = self.default_choice.reason if self.default_choice is not None else "named in config="
        if self.spec is not None and self.spec.calibrates:
            why += f"; calibrated on {self.calibration_batches} training batches"
        qat = f"QAT from epoch {self.qat_start_epoch}, " if self.qat_start_epoch is not None else ""
        return [PlanRow("QuantizeOnFit", what, f"{qat}train end", why + budget_phrase(self))]

    def scheduled_epochs(self) -> dict[str, int]:
        return {} if self.qat_start_epoch is None else {"qat_start_epoch": self.qat_start_epoch}

    def train_end_action(self) -> Optional[tuple[str, str]]:
        saved = f" and writes save_path={str(self.save_path)!r}" if self.save_path is not None else ""
        return (
            f"QuantizeOnFit(config={self.config_label!r}) quantizes the model{saved}",
            "or load the checkpoint with load_compressed(...) and call quantize_model(model, config)",
        )

    def decisions(self) -> Optional[dict[str, Any]]:
        return self.search.decisions(self.summary) if self.auto or self.max_accuracy_drop is not None else None

    @property
    def config_label(self) -> str:
        """The config's name (``"auto"`` until "auto" has chosen)."""
        return self.spec.name if self.spec is not None else AUTO

    @property
    def auto_result(self) -> Optional[dict[str, Any]]:
        """What ``"auto"`` tried and chose in the last fit (``None`` before, or without ``"auto"``)."""
        return self.search.result

    # ------------------------------------------------------------- train end helpers
    def _choose_auto(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """``config="auto"``: measure, log what was tried, take the choice (``spec`` stays None: none was faster)."""
        chosen = self.search.choose(trainer, model, self._inputs.example, self._inputs.calibration, self.budget)
        self.log_metrics(trainer, self.search.metrics())
        if chosen is not None:
            self.spec = QUANTIZATION_CONFIGS[chosen.config]
            self.inference_precision = chosen.inference_precision

    def _quantize_and_save(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module
    ) -> Optional[dict[str, Any]]:
        """Every step that changes the model or writes it, under :meth:`_or_put_back`; ``None`` when one failed."""
        assert self.spec is not None
        with self._or_put_back(pl_module, model):
            if self.save_fp32_path is not None:  # during QAT too: fake-quantized layers keep nn.Linear's keys
                save_fp32_copy(trainer, pl_module, self.save_fp32_path, self.spec.name)
            # nn.MultiheadAttention gets linear projections that can quantize (the same parameters, the same function)
            self._split = split_attention_to_quantize(model)
            # the layers as trained: quantize_model swaps in quantized copies and leaves these objects untouched
            trained: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            summary = self._quantize(model, trainer)
            if self.budget is not None:
                requantize = functools.partial(self._quantize, model, trainer, quiet=True)
                summary = self.search.fit_budget(
                    trainer, model, self.spec, self.budget, summary, trained, requantize, self._inputs.example
                )
            if summary.get("config") is None:  # the budget left nothing to quantize
                self._unsplit(model)
            else:
                layers, skipped = list(summary["quantized"]), dict(summary["skipped"])
                split = summary["split_attention"]
                self.record(pl_module, config=self.spec.name, layers=layers, skipped=skipped, split_attention=split)
                if self.save_path is not None:  # before compiling: the same keys
                    save_quantized(trainer, pl_module, self.save_path, self.spec.name, self.save_fp32_path)
            return summary
        return None

    @contextlib.contextmanager
    def _or_put_back(self, pl_module: pl.LightningModule, model: nn.Module) -> Iterator[None]:
        """Run the block; should it fail, put the model back as trained (its layers in full precision, no fake
        quantization, ``nn.MultiheadAttention`` whole, no new record) and raise or warn as ``on_error`` says."""
        assert self.spec is not None
        failed = f"QuantizeOnFit(config={self.spec.name!r}) failed, the full-precision model was left in place"
        layers = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        records = len(recorded_edits(pl_module))
        try:
            yield
        except Exception as err:  # reported with its cause; the fp32 model is put back
            for name, layer in layers.items():
                if model.get_submodule(name) is not layer:
                    set_submodule(model, name, layer)
            del recorded_edits(pl_module)[records:]
            if self._qat_active:
                remove_fake_quantization(model)
                self._qat_active = False
            self._unsplit(model)
            message = str(err) if isinstance(err, StepFailed) else f"{failed}: {type(err).__name__}: {err}"
            cause = err.__cause__ if isinstance(err, StepFailed) else err
            if self.on_error == "raise":
                raise RuntimeError(message) from cause
            rank_zero_warn(message)

    def _quantize(
        self, model: nn.Module, trainer: pl.Trainer, skip: SkipSpec = None, quiet: bool = False
    ) -> dict[str, Any]:
        """Quantize ``model`` in place on the captured inputs (``skip``: instead of the callback's); its summary."""
        assert self.spec is not None
        skip = self.skip if skip is None else skip
        summary = quantize_on_inputs(trainer, model, self.spec, skip, self._inputs, quiet)
        summary["qat"] = self._qat_active
        summary["inference_precision"] = self.inference_precision
        summary["split_attention"] = list(self._split)  # split by _quantize_and_save, before quantize_model
        return summary

    def _unsplit(self, model: nn.Module) -> None:
        """Put back the ``nn.MultiheadAttention`` modules split for quantization (none: nothing to do)."""
        restore_multihead_attention(model, self._split)
        self._split = {}
