"""Accuracy and speed budgets: QuantizeOnFit("auto"), max_accuracy_drop, undoing what does not pay."""

from __future__ import annotations

import pytest
import torch
from helpers import fast_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_vitcompress import QuantizeOnFit
from lightning_vitcompress._structure import recorded_edits
from lightning_vitcompress.functional.budget import AccuracyBudget
from lightning_vitcompress.functional.quantize import RECORD_KIND
from lightning_vitcompress.functional.quantize_auto import AutoCandidate, select_quantization


# ----------------------------------------------------------------------------- QuantizeOnFit("auto")
def test_auto_keeps_a_tiny_model_unquantized_when_int8_is_slower_and_says_so(tmp_path, tiny_classifier, digits):
    # 32-wide layers: the int8 kernels cost more than they save (about 0.4x here); the compiled x86 configs are left
    # out by compile=False (they run only compiled), which keeps this test fast
    model = tiny_classifier()
    before = {name: type(m.weight.data) for name, m in model.model.named_modules() if isinstance(m, nn.Linear)}
    callback = QuantizeOnFit(
        "auto", compile=False, auto_configs=["int8_dynamic", "int8_dynamic_x86"], auto_time_budget_s=5
    )
    logger = CSVLogger(tmp_path)
    trainer = fast_trainer(tmp_path, callbacks=[callback], logger=logger, enable_progress_bar=True)
    trainer.fit(model, digits)
    result = callback.auto_result
    assert result["chosen"] is None, result
    assert "no config ran" in result["reason"]
    assert [t["label"] for t in result["trials"]] == ["int8_dynamic"]
    assert all(t["speedup"] is not None and t["status"].startswith("slower") for t in result["trials"])
    after = {name: type(m.weight.data) for name, m in model.model.named_modules() if isinstance(m, nn.Linear)}
    assert after == before  # nothing quantized
    assert not [r for r in recorded_edits(model) if r["kind"] == RECORD_KIND]
    assert callback.summary["config"] is None
    assert callback.decisions()["auto"]["chosen"] == "unquantized"
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "quant/auto/int8_dynamic/speedup" in logged and "quant/auto/selection_seconds" in logged


def test_auto_picks_an_int8_config_for_vit_b_sized_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).eval()
    tokens = torch.randn(8, 197, 768)
    candidates = [AutoCandidate("int8_dynamic_x86"), AutoCandidate("int8_weight_only")]
    result = select_quantization(
        model, candidates, tokens, example_input=tokens[:1], min_run_time=0.05, rounds=2, time_budget_s=120
    )
    assert result["chosen"] is not None, result
    assert result["chosen"].config in ("int8_dynamic_x86", "int8_weight_only")
    assert all(
        isinstance(m.weight.data, torch.Tensor) and m.weight.dtype == torch.float32
        for m in model
        if isinstance(m, nn.Linear)
    )  # the model itself is untouched


def test_auto_rejects_a_config_beyond_the_accuracy_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).eval()
    tokens = torch.randn(8, 197, 768)
    result = select_quantization(
        model,
        [AutoCandidate("int8_dynamic_x86")],
        tokens,
        example_input=tokens[:1],
        min_run_time=0.05,
        rounds=2,
        accuracy=lambda m: 0.5,
        budget=AccuracyBudget(max_drop=1.0, reference=0.9),
    )
    assert result["chosen"] is None
    assert result["trials"][0]["accuracy"] == 0.5 and result["trials"][0]["status"].startswith("beyond budget")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(qat_start_epoch=0), "qat_start_epoch=0 with config='auto'"),
        (dict(inference_precision="bf16-mixed"), "inference_precision='bf16-mixed' with config='auto'"),
        (dict(auto_configs=["int9"]), "auto_configs=\\['int9'\\]"),
        (dict(auto_time_budget_s=0), "auto_time_budget_s=0"),
        (dict(max_accuracy_drop=-1), "max_accuracy_drop=-1"),
    ],
)
def test_auto_and_budget_arguments_are_checked_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizeOnFit("auto", **kwargs)


def test_a_budget_without_validation_data_is_an_error_at_setup(tmp_path, tiny_classifier, digits):
    trainer = fast_trainer(tmp_path, callbacks=[QuantizeOnFit(max_accuracy_drop=1.0)], limit_val_batches=0)
    with pytest.raises(ValueError, match=r"QuantizeOnFit\(max_accuracy_drop=1.0\) measures validation top-1"):
        trainer.fit(tiny_classifier(), digits)


# ----------------------------------------------------------------------------- QuantizeOnFit(max_accuracy_drop)
def test_quantization_budget_keeps_the_measured_most_sensitive_layer_in_full_precision(
    tmp_path, tiny_classifier, digits, trained_tiny
):
    from lightning_vitcompress.functional import measure_accuracy

    model = tiny_classifier(lr=1e-9)
    model.load_state_dict(trained_tiny)
    with torch.no_grad():  # the same huge weight on one input of every class: fp32 argmax is unchanged, but
        model.model.head.weight[:, 0] = 1000.0  # per-channel int8 then rounds every other head weight to 0
    validation = list(digits.val_dataloader())
    entering = measure_accuracy(model.model, validation)
    callback = QuantizeOnFit("int8_dynamic", max_accuracy_drop=2.0)
    trainer = fast_trainer(tmp_path, callbacks=[callback], limit_train_batches=1, limit_val_batches=None)
    trainer.fit(model, digits)
    summary = callback.summary
    assert summary["higher_precision"][0] == "head", summary["higher_precision"]
    assert "head" not in summary["quantized"] and summary["quantized"]
    assert isinstance(model.model.head.weight.data, torch.Tensor) and model.model.head.weight.dtype == torch.float32
    assert (entering - measure_accuracy(model.model, validation)) * 100 <= 2.0 + 1e-6
    assert callback.decisions()["kept_in_higher_precision"] == summary["higher_precision"]


# ----------------------------------------------------------------------------- PruningSchedule(max_accuracy_drop)
def _channels(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_pruning_budget_rolls_back_an_absurd_step_and_a_resume_keeps_the_kept_structure(
    tmp_path, tiny_classifier, digits, trained_tiny
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_vitcompress import PruningSchedule, load_compressed
    from lightning_vitcompress.digits import DigitsClassifier
    from lightning_vitcompress.functional import measure_accuracy

    model = tiny_classifier(lr=5e-4)
    model.load_state_dict(trained_tiny)
    validation = list(digits.val_dataloader())
    entering = measure_accuracy(model.model, validation)

    def schedule(progress: float) -> float:  # a mild first step, then the whole absurd ratio at once
        return 0.1 if progress < 0.5 else 1.0

    def pruning() -> PruningSchedule:
        return PruningSchedule(0.85, start_epoch=0, end_epoch=2, num_steps=3, schedule=schedule, max_accuracy_drop=1.0)

    callback = pruning()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = fast_trainer(
        tmp_path,
        callbacks=[callback, checkpoints],
        max_epochs=3,
        limit_train_batches=6,
        limit_val_batches=None,
        enable_checkpointing=True,
    )
    trainer.fit(model, digits)
    assert callback.budget_reference == pytest.approx(entering)
    assert callback.stopped and callback.rollbacks and callback.rollbacks[0]["rolled_back"]
    final = measure_accuracy(model.model, validation)
    assert (entering - final) * 100 <= 1.0 + 1e-6
    kept = callback.config.fraction_removed(callback._original_widths, model.model)
    assert kept < callback.rollbacks[0]["ratio"]  # a step was made, measured and undone: fewer channels removed
    assert callback.decisions()["stopped_by_budget"]
    structure = _channels(model.model)

    # the checkpoint saved after the rollback (epoch 2 ends after it) rebuilds the kept structure, for inference ...
    last = tmp_path / "ckpt" / "last.ckpt"
    assert _channels(load_compressed(DigitsClassifier, last).model) == structure
    # ... and for a resumed fit, which prunes no further
    resumed_model = tiny_classifier(lr=5e-4)
    resumed = pruning()
    fast_trainer(tmp_path, callbacks=[resumed], max_epochs=4, limit_train_batches=2, limit_val_batches=2).fit(
        resumed_model, digits, ckpt_path=last
    )
    assert resumed.stopped and resumed.budget_reference == pytest.approx(entering)
    assert _channels(resumed_model.model) == structure


# ----------------------------------------------------------------------------- the benchmark report
def test_the_benchmark_report_lists_the_decisions():
    from lightning_vitcompress.functional.report import format_report

    row = dict.fromkeys(("params", "size_mb", "accuracy"), None)
    report = {
        "baseline": row,
        "final": row,
        "ratios": {"accuracy_delta": None},
        "batch_size": 4,
        "num_threads": 2,
        "cpu_name": "cpu",
        "gpu_name": None,
        "decisions": {
            "PruningSchedule": {
                "max_accuracy_drop": 1.0,
                "steps_kept": 1,
                "stopped_by_budget": True,
                "rolled_back": [
                    {
                        "step": 2,
                        "ratio": 0.858,
                        "accuracy": 0.0595,
                        "reference": 0.2528,
                        "rolled_back": True,
                        "after_rollback": False,
                    }
                ],
            },
            "QuantizeOnFit": {
                "config": None,
                "kept_in_higher_precision": ["head"],
                "auto": {
                    "chosen": "unquantized",
                    "reason": "no config ran 1.05x faster",
                    "selection_seconds": 3.0,
                    "tried": [{"label": "int8_dynamic", "speedup": 0.42, "accuracy": None, "status": "slower"}],
                },
            },
        },
    }
    text = format_report(report)
    assert "PruningSchedule: step 2 (0.858 of the channels removed, top-1 5.95% vs 25.28% entering fit)" in text
    assert "rolled back" in text and "stopped after step 1" in text
    assert "kept in higher precision for the accuracy budget, most sensitive first: head" in text
    assert (
        "QuantizeOnFit(config='auto') chose unquantized: no config ran 1.05x faster (tried: int8_dynamic 0.42x" in text
    )
