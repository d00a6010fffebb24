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
failure the fp32 model stays in place and the error says what failed.
``config="auto"`` and ``max_accuracy_drop``, which measure before they decide,
live in ``_quantization_auto.py``.
"""

from __future__ import annotations

import copy
import functools
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_vitcompress._base import (
    CompressionCallback,
    in_training_step,
    first_batch,
)
from lightning_vitcompress._checks import (
    check_choice,
    check_int,
    check_max_accuracy_drop,
    check_output_file,
    check_path,
    check_positive,
)
from lightning_vitcompress._model import set_submodule
from lightning_vitcompress._plan import PlanRow, budget_phrase
from lightning_vitcompress._progress import stage_bar
from lightning_vitcompress._structure import (
    STRUCTURE_KEY,
    add_digest,
    recorded_edits,
)
from lightning_vitcompress._training_state import (
    refresh_after_structural_change,
)
from lightning_vitcompress.callbacks._quantization_auto import AUTO, _AutoAndBudget, _check_auto_arguments
from lightning_vitcompress.functional.measure import images_of
from lightning_vitcompress.functional.quantize import (
    EXAMPLE_ROWS,
    MB,
    RECORD_KIND,
    ModelInputs,
    Ranges,
    run_model,
    quantize_model,
    remove_fake_quantization,
    split_attention_to_quantize,
)
from lightning_vitcompress.functional.quantize_auto import AutoCandidate
from lightning_vitcompress.functional.multihead_attention import restore_multihead_attention
from lightning_vitcompress.functional.quantize_configs import (
    INFERENCE_PRECISIONS,
    QUANTIZATION_CONFIGS,
    DefaultChoice,
    QuantizationSpec,
    check_compile,
    default_quantization,
    resolve_quantization,
)
from lightning_vitcompress.functional.quantize_layers import (
    SkipSpec,
    check_skip_matches,
    check_skip,
)
from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16

__all__ = ['QuantizeOnFit']

#: ``config=None`` warns below this width (the widest quantized layer's in_features) when its choice runs eager:
#: eager int8's per-layer overhead outweighs the cheaper math there (``benchmarks/bench_int8_width.py``)
INT8_PAYS_FROM_WIDTH = 256

# ----------------------------------------------------------------------------- the callback
class QuantizeOnFit(_AutoAndBudget, CompressionCallback):
    r"""Quantize the trained model's linear layers with torchao when training ends; optional QAT.

    Example::

        from lightning_vitcompress import QuantizeOnFit, load_compressed

        trainer = Trainer(callbacks=[QuantizeOnFit(save_path="model-int8.ckpt")])  # the config fast on this device
        trainer.fit(model, datamodule)
        trainer.test(model, datamodule)      # runs the quantized model
        model = load_compressed(LitModel, "model-int8.ckpt")

    Args:
        config: ``None`` (default): the int8 config that is fast on the device the
            Trainer runs on, read from what the hardware reports at ``setup`` (no timing;
            :func:`~lightning_vitcompress.functional.default_quantization`): on x86 CPUs
            with VNNI/AMX ``"int8_static_x86"`` (``"bf16-mixed"`` where bf16 is native),
            on CUDA ``"int8_dynamic"`` (``"float8_dynamic"`` on SM >= 8.9), elsewhere
            ``"int8_dynamic"``; the choice and why are logged and kept in
            :attr:`default_choice`. Or name one:
            ``"int8_dynamic"`` (int8 per-token activations, int8 per-channel
            weights; CPU and CUDA; torchao's portable int8 path),
            ``"int8_dynamic_x86"`` (x86 CPUs: uint8 per-tensor activations, int8
            per-channel weights, compiled to oneDNN int8 GEMMs, see
            :class:`~lightning_vitcompress.Int8DynamicX86Config`),
            ``"int8_static_x86"`` (the same with activation scales calibrated on
            ``calibration_batches`` training inputs at train end: the fastest CPU path),
            ``"int8_weight_only"`` (CPU and CUDA),
            ``"int4_weight_only"`` (CUDA; groups of 128, layers cast to bf16),
            ``"float8_dynamic"`` (CUDA, compute capability >= 8.9), any name
            registered in :data:`~lightning_vitcompress.functional.QUANTIZATION_CONFIGS`,
            any torchao config object (``torchao.quantization.*Config``), or a
            :class:`~lightning_vitcompress.functional.QuantizationSpec`. Resolved once
            into :attr:`spec`. ``"auto"``: at train end, every config that runs on this
            machine (x86 int8 paths, also bf16-mixed where the CPU has native bf16;
            portable int8; weight-only; on CUDA int8, int4 weight-only and float8 on
            SM >= 8.9) is built on a copy of the trained model and timed against the
            unquantized model with the package's timing, at the ``BenchmarkCallback``'s
            batch size (32 without one); the fastest one that is at least 1.05x faster
            (and within ``max_accuracy_drop``) is applied, else the model stays
            unquantized and the log says why. The table is logged under ``quant/auto/``
            and kept in :attr:`auto_result`.
        skip: layers to keep in full precision: a name or glob pattern relative
            to the model (``"head"``, ``"blocks.0.*"``), a list of them, or
            ``fn(name, module) -> bool``. ``nn.MultiheadAttention``'s
            ``out_proj`` is always kept (with a note in :attr:`summary`).
        qat_start_epoch: start quantization-aware training at this epoch (the
            linear layers are swapped for torchao's fake-quantized ones that
            share the same parameters, so the optimizer trains on); converted
            to the real quantized model when training ends. ``None``: no QAT.
        compile: ``True`` (or a dict of ``torch.compile`` keyword arguments)
            compiles the quantized model in place (``nn.Module.compile``: the
            state-dict keys do not change); the int8 kernels are fastest
            compiled. ``None`` (default): compile where the config is only fast
            compiled (its spec's ``compiled_by_default``: the x86 configs,
            compiled with inductor freezing).
            The compile cost is paid once at train end, on a captured
            training input under ``inference_mode``, and logged as
            ``quant/compile_seconds`` (about 15-30 s for ViT-B/16 on 2 cores);
            inputs of another shape, device or grad mode compile again on first use.
        inference_precision: ``None`` (default: the default config's choice, else
            ``"32-true"``), ``"32-true"`` or ``"bf16-mixed"``: the
            compiled x86 model runs its unquantized ops (attention, norms, GELU,
            residual adds) in bf16 under CPU autocast and returns float32
            (PyTorch's int8-mixed-bf16 recipe; for CPUs with AVX512-BF16 or AMX,
            checked at setup). x86 configs only.
        calibration_batches: how many training batches ``"int8_static_x86"``
            calibrates on: the target model's inputs of the first
            ``calibration_batches`` training steps of the last epoch are kept
            (on their device) and run through the trained model in eval mode.
        save_path: write the quantized model here as a checkpoint that
            :func:`~lightning_vitcompress.load_compressed` loads back. Checked at
            setup (not a directory, its folder writable). Should writing it fail,
            the model is put back in full precision (a half-written file is removed)
            and the error says where the fp32 copy is.
        save_fp32_path: write the trained full-precision model here first (also
            loadable with ``load_compressed``); must differ from ``save_path``. If
            writing it fails, nothing is quantized. The checkpoints ``ModelCheckpoint``
            saved during training hold the fp32 weights too.
        on_error: ``"raise"`` (default) or ``"warn"`` when quantizing or saving
            fails; the fp32 model stays in place either way.
        max_accuracy_drop: points of validation top-1 the quantized model may lose
            against the model as it entered fit (needs validation data; checked at setup).
            Beyond it, the layers whose quantization moves the output most (measured one
            layer at a time on a validation batch) are kept in full precision, as few as
            the budget allows (bisection); ``summary["higher_precision"]`` lists them. If
            only the unquantized model is within budget, it is left unquantized.
        auto_time_budget_s: with ``config="auto"``: the seconds the search may spend
            (building, compiling and timing); candidates it does not reach are logged as
            "not tried".
        auto_configs: with ``config="auto"``: the config names it may choose from
            (default: every one that runs on this machine).
        model_attribute: attribute of the LightningModule holding the ViT
            (``None``: found automatically).

    Resuming (``trainer.fit(ckpt_path=...)``): until QAT has started in the
    checkpoint's run, any argument may change. Once it has, the weights were
    trained for one format, so ``config``, ``skip`` and ``qat_start_epoch``
    must match the checkpoint's (an error at setup names both values).

    After fit, :attr:`summary` holds what was done: config, quantized layers,
    skipped layers with why, size before and after, output error on a real input.
    Metrics are logged under ``quant/``.
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
        compile: Union[None, bool, dict[str, Any]] = None,
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
        check_skip(skip)
        if qat_start_epoch is not None:
            check_int(qat_start_epoch, "qat_start_epoch", minimum=0, example="0 (or None for no QAT)")
        check_compile(compile)
        check_choice(on_error, "on_error", ("raise", "warn"))
        check_max_accuracy_drop(max_accuracy_drop)
        check_positive(auto_time_budget_s, "auto_time_budget_s", "300 (seconds)")
        if inference_precision is not None and inference_precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"inference_precision={inference_precision!r}: pass one of {list(INFERENCE_PRECISIONS)}, "
                             "or None (the default config's choice).")
        if not self.auto:
            if self.spec is not None:
                self.spec.check_inference_precision(inference_precision or "32-true", compile)
            if auto_configs is not None:
                raise ValueError(
                    f"auto_configs={auto_configs!r} restricts config='auto', but config={config!r}: pass "
                    "config='auto', or auto_configs=None."
                )
        else:
            _check_auto_arguments(qat_start_epoch, inference_precision, auto_configs)
        check_int(calibration_batches, "calibration_batches", minimum=1, example="8")
        save_path, save_fp32_path = check_path(save_path, "save_path"), check_path(save_fp32_path, "save_fp32_path")
        if save_path is not None and save_fp32_path is not None and save_path.resolve() == save_fp32_path.resolve():
            raise ValueError(
                f"save_path={str(save_path)!r} and save_fp32_path={str(save_fp32_path)!r} are the same file: the "
                "quantized model would overwrite the fp32 copy. Pass two paths, e.g. 'model-int8.ckpt' and "
                "'model-fp32.ckpt'."
            )
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
        self.save_path = save_path
        self.save_fp32_path = save_fp32_path
        self.on_error = on_error
        self.max_accuracy_drop = max_accuracy_drop
        self.auto_time_budget_s = float(auto_time_budget_s)
        self.auto_configs = list(auto_configs) if auto_configs is not None else None
        #: what ``"auto"`` tried and chose in the last fit (``None`` before, or without ``"auto"``)
        self.auto_result: Optional[dict[str, Any]] = None
        #: the candidates ``"auto"`` will try (found at setup)
        self._auto_candidates: list[AutoCandidate] = []
        #: what the last quantization did (``None`` before it ran)
        self.summary: Optional[dict[str, Any]] = None
        self._qat_active = False
        self._example: Optional[ModelInputs] = None
        #: training inputs of the current epoch kept for static calibration
        self._calibration: list[ModelInputs] = []
        #: the Trainer whose training steps are captured (set at setup)
        self._capture_trainer: Optional["pl.Trainer"] = None
        self._split: dict[str, nn.Module] = {}  # nn.MultiheadAttention modules split for quantization, by name
        self._capture_handle: Optional[Any] = None

    # ------------------------------------------------------------- setup: fail fast
    def fit_plan(self, trainer: "pl.Trainer") -> list[PlanRow]:
        if self.auto:
            what = f"int8: the fastest of {len(self._auto_candidates)} configs timed here ('auto')"
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

    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self.replayed_records(trainer, RECORD_KIND):
            raise RuntimeError(
                "QuantizeOnFit: the checkpoint being resumed was saved after the model was quantized; "
                "a quantized model cannot train on. Resume from a checkpoint saved during training "
                "(they hold the fp32 weights), or load this one for inference with load_compressed(...)."
            )
        device = trainer.strategy.root_device
        for argument, path in (("save_path", self.save_path), ("save_fp32_path", self.save_fp32_path)):
            if path is not None:
                check_output_file(path, argument)
        if self.default:
            self._choose_default(trainer, device)
        self._check_resume(trainer)
        check_skip_matches(self.target(pl_module), self.skip)
        if self.auto:
            self.spec, self.inference_precision = None, "32-true"  # chosen afresh at train end
            self._setup_auto(trainer, device)
            spec = QUANTIZATION_CONFIGS[self._auto_candidates[0].config]
        else:
            spec = self.spec
            spec.check_device(device)
            self._check_inference_precision()
            self._check_calibration_data(trainer)
            spec.dry_run(device, qat=self.qat_start_epoch is not None)
        selected, skipped = spec.select_layers(self.target(pl_module), self.skip)
        if not selected:
            raise ValueError(
                f"QuantizeOnFit(config={self.config_label!r}, skip={self.skip!r}) selects no nn.Linear "
                f"layer of the model; skipped: {skipped}. Loosen `skip`."
            )
        if self.default:
            self._warn_if_too_narrow(self.target(pl_module), selected)
        self.auto_result = None
        self.summary = None
        self._qat_active = False
        self._capture_trainer = trainer
        self._start_capture(self.target(pl_module))

    def _choose_default(self, trainer: "pl.Trainer", device: torch.device) -> None:
        """``config=None``: the config (and precision, unless given) fast on ``device``, said in the log."""
        trains = trainer.max_epochs != 0 and trainer.limit_train_batches != 0
        choice = default_quantization(device, calibrates=trains)
        self.default_choice = choice
        self.spec = QUANTIZATION_CONFIGS[choice.config]
        if self.requested_inference_precision is None:
            self.inference_precision = choice.inference_precision if self.spec.bf16_mixed else "32-true"
        self.spec.check_inference_precision(self.inference_precision, self.compile)
        rank_zero_info(f"QuantizeOnFit: config={choice.config!r}, inference_precision={self.inference_precision!r} "
                       f"for {device.type}: {choice.reason}.")

    def _warn_if_too_narrow(self, model: nn.Module, selected: list[str]) -> None:
        """Where the default runs eager int8 on a narrow model (its per-layer overhead outweighing the cheaper
        math), say so. Compiled x86 int8 paid at every width measured (``benchmarks/bench_int8_width.py``)."""
        assert self.spec is not None
        if self.spec.compiles(self.compile):
            return
        widest = max(model.get_submodule(name).in_features for name in selected)
        if widest < INT8_PAYS_FROM_WIDTH:
            rank_zero_warn(
                f"QuantizeOnFit: config={self.spec.name!r} runs eager here and the widest linear layer of this model "
                f"takes {widest} features; below {INT8_PAYS_FROM_WIDTH} eager int8 is usually slower than float32 "
                "(on an AMD EPYC: 0.37x at width 64, 0.92x at 192, 1.23x at 256; benchmarks/bench_int8_width.py "
                "measures your machine). It will be quantized as asked; to "
                "decide by measurement use config='auto' (keeps float when int8 is not faster), or drop QuantizeOnFit."
            )

    def train_end_action(self) -> Optional[tuple[str, str]]:
        saved = f" and writes save_path={str(self.save_path)!r}" if self.save_path is not None else ""
        return (f"QuantizeOnFit(config={self.config_label!r}) quantizes the model{saved}",
                "or load the checkpoint with load_compressed(...) and call quantize_model(model, config)")

    @property
    def config_label(self) -> str:
        """The config's name (``"auto"`` until "auto" has chosen)."""
        return self.spec.name if self.spec is not None else AUTO

    def _check_resume(self, trainer: "pl.Trainer") -> None:
        """Once the resumed run is in QAT, its weights were trained for one format: config, skip and
        qat_start_epoch must stay. Before QAT started, any argument may change (nothing was fake-quantized)."""
        path, saved = self.resumed_callback_state(trainer)
        if not saved or not saved.get("qat_active"):
            return
        mine = self.state_dict()
        for argument in ("config", "qat_start_epoch", "skip"):
            if argument == "skip" and (saved.get("skip_callable") or mine["skip_callable"]):
                continue  # functions cannot be compared
            if saved.get(argument) != mine[argument]:
                raise ValueError(
                    f"{argument}={mine[argument]!r}, but the checkpoint being resumed ({path}) is in "
                    f"quantization-aware training with {argument}={saved.get(argument)!r}: its weights were trained "
                    f"for that setting. Resume with {argument}={saved.get(argument)!r}, or start a new fit."
                )

    @override
    def state_dict(self) -> dict[str, Any]:
        # read back at a resume's setup (_check_resume); plain data, safe to load with weights_only=True
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

    def _check_inference_precision(self) -> None:
        if self.inference_precision == "bf16-mixed" and not cpu_supports_bfloat16():
            raise ValueError(
                "inference_precision='bf16-mixed': this CPU has no native bf16 math (AVX512-BF16 or AMX), "
                "so bf16 would be slower than float32 here. Use inference_precision='32-true'."
            )

    def _check_calibration_data(self, trainer: "pl.Trainer") -> None:
        assert self.spec is not None
        if self.spec.calibrates:
            images = images_of(first_batch(trainer, validation=False))
            if images is not None and not bool(torch.isfinite(images).all()):
                raise ValueError(
                    f"config={self.spec.name!r} calibrates its activation scales on training inputs (calibration_"
                    f"batches={self.calibration_batches}), but the first training batch holds NaN or Inf values, "
                    "which give no usable scale. Clean the data (check its normalisation), or use "
                    "config='int8_dynamic_x86', which needs no calibration."
                )

    # ------------------------------------------------------------- example and calibration input capture
    def _start_capture(self, model: nn.Module) -> None:
        """Keep the first training input (a few rows: the check and compile example) and, for a
        static config, the first ``calibration_batches`` training inputs of each epoch."""
        self._stop_capture()
        self._example = None
        self._calibration = []
        if self.spec is not None:
            calibrates = self.spec.calibrates
        else:
            calibrates = any(QUANTIZATION_CONFIGS[c.config].calibrates for c in self._auto_candidates)

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # a training step by the Trainer's progress, not the module's mode (a model left in eval() trains in
            # eval); validation steps and other callbacks' forwards (the example pruning traces) are not inputs
            trainer = self._capture_trainer
            if not (in_training_step(trainer) if trainer is not None else module.training):
                return
            if self._example is None:
                self._example = ModelInputs.detached(args, kwargs, rows=EXAMPLE_ROWS)
            if not calibrates:
                self._stop_capture()
            elif len(self._calibration) < self.calibration_batches:
                self._calibration.append(ModelInputs.detached(args, kwargs))

        self._capture_handle = model.register_forward_pre_hook(capture, with_kwargs=True)

    def _stop_capture(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    # ------------------------------------------------------------- QAT
    def ordered_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._calibration = []  # calibrate on the last epoch's inputs, seen by the most trained weights
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

    # ------------------------------------------------------------- train end: quantize
    def ordered_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stop_capture()
        model = self.target(pl_module)
        if self.auto:
            chosen = self._choose(trainer, model)
            if chosen is None:
                self._keep_unquantized(trainer, pl_module)
                return
            self.spec = QUANTIZATION_CONFIGS[chosen.config]
            self.inference_precision = chosen.inference_precision
        assert self.spec is not None
        label = self.spec.name
        if self.save_fp32_path is not None:
            try:
                # during QAT too: fake-quantized layers keep nn.Linear's keys and hold the fp32 weights
                self._save(trainer, pl_module, pl_module.state_dict(), self.save_fp32_path)
            except Exception as err:  # noqa: BLE001 - nothing was quantized yet
                self._fail(
                    model,
                    f"QuantizeOnFit(config={label!r}) did not quantize: writing the full-precision copy to "
                    f"save_fp32_path={str(self.save_fp32_path)!r} failed ({type(err).__name__}: {err}). The trained "
                    "full-precision model was left in place; save it (trainer.save_checkpoint) before anything else.",
                    err,
                )
                return
        # nn.MultiheadAttention gets linear projections that can quantize (the same parameters, the same
        # function); put back wherever this ends without a quantized model, so the record always tells
        self._split = split_attention_to_quantize(model)
        # the layers as trained: quantize_model swaps in quantized copies and leaves these objects untouched
        trained = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        try:
            summary = self._quantize(model, trainer)
            if self.budget is not None:
                summary = self._fit_budget(trainer, model, summary, trained)
        except Exception as err:  # noqa: BLE001 - reported with its cause; the fp32 model is in place
            for name, layer in trained.items():
                if model.get_submodule(name) is not layer:
                    set_submodule(model, name, layer)
            self._calibration = []
            self._fail(
                model,
                f"QuantizeOnFit(config={label!r}) failed, the full-precision model was left in place: "
                f"{type(err).__name__}: {err}",
                err,
            )
            return
        self._calibration = []
        if summary.get("config") is None:  # the budget left nothing to quantize
            self._unsplit(model)
            self.summary = summary
            for path in (self.save_fp32_path, self.save_path):
                if path is not None:
                    self._save(trainer, pl_module, pl_module.state_dict(), path)
            return
        self.record(pl_module, config=label, layers=list(summary["quantized"]), skipped=dict(summary["skipped"]),
                    split_attention=summary["split_attention"])
        if self.save_path is not None:
            previous = _file_stamp(self.save_path)
            try:
                self._save(trainer, pl_module, pl_module.state_dict(), self.save_path)  # before compiling: same keys
            except Exception as err:  # noqa: BLE001 - undo the quantization: the user keeps the trained model
                recorded_edits(pl_module).pop()
                for name in summary["quantized"]:
                    set_submodule(model, name, trained[name])
                if trainer.is_global_zero and _file_stamp(self.save_path) != previous:
                    self.save_path.unlink(missing_ok=True)  # a half-written file must not pass for the quantized model
                fp32 = (
                    f"the fp32 copy is at save_fp32_path={str(self.save_fp32_path)!r}"
                    if self.save_fp32_path is not None
                    else "no fp32 copy was written (pass save_fp32_path to keep one)"
                )
                self._fail(
                    model,
                    f"QuantizeOnFit(config={label!r}): writing the quantized model to save_path="
                    f"{str(self.save_path)!r} failed ({type(err).__name__}: {err}); nothing new was left there. The "
                    "model was put back in "
                    f"full precision, as trained, and {fp32}. Save it with trainer.save_checkpoint(...), or "
                    "quantize it with quantize_model(...) once the path is writable.",
                    err,
                )
                return
        if self.spec.compiles(self.compile):
            with stage_bar(trainer, f"QuantizeOnFit: compiling {self.spec.name}", total=1, unit="compile") as bar:
                bar.step("one-time cost, about 15-30 s for ViT-B/16 on 2 cores")
                summary["compile_seconds"] = self._compile(model)
        summary["auto"] = self.auto_result
        self.summary = summary
        self._log(trainer, summary)

    def _fail(self, model: nn.Module, message: str, err: Exception) -> None:
        """The model is in full precision again; raise or warn with ``message`` as ``on_error`` says."""
        if self._qat_active:
            remove_fake_quantization(model)
            self._qat_active = False
        self._unsplit(model)
        if self.on_error == "raise":
            raise RuntimeError(message) from err
        rank_zero_warn(message)

    def _unsplit(self, model: nn.Module) -> None:
        """Put back the ``nn.MultiheadAttention`` modules split for quantization (none: nothing to do)."""
        restore_multihead_attention(model, self._split)
        self._split = {}

    def _quantize(
        self, model: nn.Module, trainer: "pl.Trainer", skip: SkipSpec = None, quiet: bool = False
    ) -> dict[str, Any]:
        """Quantize ``model`` in place (``skip``: instead of the callback's ``skip``); its summary."""
        assert self.spec is not None
        if self.spec.calibrates and not self._calibration:
            raise RuntimeError(
                f"config={self.spec.name!r} calibrates on training inputs, but no training step ran "
                "in this fit (nothing to calibrate on)."
            )
        calibrates = self.spec.calibrates and not quiet
        with stage_bar(trainer if calibrates else None, f"QuantizeOnFit: calibrating {self.spec.name}",
                       total=len(self._calibration), unit="batch") as bar:
            summary = quantize_model(
                model,
                self.spec,
                skip=self.skip if skip is None else skip,
                example_input=self._example,
                calibration_inputs=self._calibration,
                reduce_ranges=functools.partial(_reduce_ranges, trainer),  # the same model on every rank
                progress=bar.step,
            )
        summary["qat"] = self._qat_active
        summary["inference_precision"] = self.inference_precision
        summary["split_attention"] = list(self._split)  # split by ordered_train_end, before quantize_model
        if summary["skipped"] and not quiet:
            rank_zero_info(
                "QuantizeOnFit kept in full precision: "
                + ", ".join(f"{name} ({why})" for name, why in summary["skipped"].items())
            )
        return summary

    def _compile(self, model: nn.Module) -> Optional[float]:
        assert self.spec is not None
        self.spec.compile(model, self.inference_precision, **(self.compile if isinstance(self.compile, dict) else {}))
        if self._example is None:
            return None
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                run_model(model, self._example)
        except Exception as err:  # noqa: BLE001 - the quantized model is fine, only compiling failed
            model._compiled_call_impl = None  # undo nn.Module.compile
            rank_zero_warn(f"QuantizeOnFit(compile={self.compile!r}): compiling the quantized model failed, "
                           f"it runs eager: {type(err).__name__}: {err}")
            return None
        return time.perf_counter() - start

    # ------------------------------------------------------------- files and logs
    @staticmethod
    def _save(trainer: "pl.Trainer", pl_module: "pl.LightningModule", state_dict: dict[str, Any], path: Path) -> None:
        checkpoint: dict[str, Any] = {
            "state_dict": state_dict,
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

    def _log(self, trainer: "pl.Trainer", summary: dict[str, Any]) -> None:
        for logger in trainer.loggers:  # what the deployed model is, next to the run's other settings
            logger.log_hyperparams(
                {
                    "quant/config": summary["config"],
                    "quant/qat": summary["qat"],
                    "quant/inference_precision": summary["inference_precision"],
                }
            )
        self.log_metrics(
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

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stop_capture()
        self._example = None
        self._calibration = []
        self._capture_trainer = None
        super().teardown(trainer, pl_module, stage)


def _file_stamp(path: Path) -> Optional[tuple[int, int]]:
    """``(mtime_ns, size)`` of the file at ``path``, ``None`` when there is none: did a write touch it?"""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _reduce_ranges(trainer: "pl.Trainer", ranges: Ranges) -> Ranges:
    """The union of the calibration ranges of all ranks (each rank calibrated on its own batches)."""
    if trainer.world_size <= 1:
        return ranges
    names = sorted(ranges)
    bounds = torch.tensor([[-ranges[n][0], ranges[n][1]] for n in names], device=trainer.strategy.root_device)
    bounds = trainer.strategy.reduce(bounds, reduce_op="max")
    return {name: (-float(low), float(high)) for name, (low, high) in zip(names, bounds.tolist())}
