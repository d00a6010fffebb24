"""Every model family x every callback alone, and all five together, each reloaded with load_compressed.

The families are the tiny models of ``tests/families.py`` (timm ViT, registers and
distilled DeiT; torchvision; transformers ViT eager/SDPA, DeiT and DeiT with its
teacher head; hand-written nn.MultiheadAttention ViTs, batch-first or not). Each
case trains two steps on digits inside :class:`~families.FamilyClassifier`, a
LightningModule that knows nothing of compression, saves a checkpoint after
``fit`` and checks that ``load_compressed`` gives the trained model's outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from families import FAMILIES, FamilyClassifier, build_family
from helpers import fast_trainer, run_ddp_script
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_vitcompress import (
    BenchmarkCallback,
    DistillationTeacher,
    NystromAttention,
    NystromSwap,
    PruningSchedule,
    QuantizeOnFit,
    load_compressed,
)
from lightning_vitcompress.functional.report import REPORT_FILENAME
from lightning_vitcompress.models import adapter_for

TEACHER_SEED = 1


def _teacher(family: str) -> nn.Module:
    return build_family(family, seed=TEACHER_SEED).eval()


CALLBACKS: dict[str, Callable[[str, Path], list]] = {
    "benchmark": lambda family, out: [
        BenchmarkCallback(batch_size=4, rounds=1, min_run_time=0.02, latency_repeats=2, plot=False, output_dir=out)
    ],
    "quantize": lambda family, out: [QuantizeOnFit("int8_dynamic")],
    "prune": lambda family, out: [PruningSchedule(0.5)],
    "distill": lambda family, out: [DistillationTeacher(_teacher(family), mode="soft")],
    "nystrom": lambda family, out: [NystromSwap(num_landmarks=4)],
    "all": lambda family, out: [
        PruningSchedule(0.5),
        DistillationTeacher(_teacher(family), mode="soft"),
        NystromSwap(num_landmarks=4),
        QuantizeOnFit("int8_dynamic"),
        BenchmarkCallback(batch_size=4, rounds=1, min_run_time=0.02, latency_repeats=2, plot=False, output_dir=out),
    ],
}

IMAGES = torch.rand(4, 3, 32, 32)


def _widths(model: nn.Module) -> tuple[int, list[int]]:
    adapter = adapter_for(model)
    return adapter.embed_dim(), [linear.out_features for linear in adapter.mlp_input_layers()]


@pytest.mark.parametrize("callbacks", list(CALLBACKS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_callback_then_load_compressed(tmp_path, digits, family, callbacks):
    module = FamilyClassifier(family)
    embed_before, mlp_before = _widths(module.model)
    trainer = fast_trainer(tmp_path, callbacks=CALLBACKS[callbacks](family, tmp_path), max_steps=2)
    trainer.fit(module, digits)
    trainer.save_checkpoint(tmp_path / "final.ckpt")

    model = module.model
    if callbacks in ("prune", "all"):  # really smaller: embedding and MLP halved, whatever the family
        embed, mlp = _widths(model)
        assert embed == embed_before // 2 and mlp == [width // 2 for width in mlp_before]
    if callbacks in ("nystrom", "all"):
        assert all(isinstance(block, NystromAttention) for _, block in adapter_for(model).attention_blocks())
    if callbacks in ("quantize", "all"):
        assert all(type(linear.weight) is not nn.Parameter for linear in adapter_for(model).mlp_input_layers())
    if callbacks in ("benchmark", "all"):
        report = json.loads((tmp_path / REPORT_FILENAME).read_text())
        assert report["final"]["cpu_images_per_s"] > 0 and report["final"]["accuracy"] is not None
        assert report["final"]["params"] <= report["baseline"]["params"]

    loaded = load_compressed(FamilyClassifier, tmp_path / "final.ckpt")
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGES), module(IMAGES), rtol=1e-4, atol=1e-4)


def test_deit_mode_trains_the_distillation_head_of_a_transformers_deit(tmp_path, digits):
    module = FamilyClassifier("hf-deit-teacher")
    distillation_head = module.model.distillation_classifier.weight.detach().clone()
    callback = DistillationTeacher(_teacher("timm-vit"), mode="deit", alpha=0.5)  # a timm teacher, transformers student
    trainer = fast_trainer(tmp_path, callbacks=[callback], max_steps=2, limit_val_batches=0)
    trainer.fit(module, digits)
    assert not torch.equal(module.model.distillation_classifier.weight, distillation_head)
    assert trainer.callback_metrics["distill/loss"] > 0


@pytest.mark.parametrize(("student", "teacher"), [("timm-vit", "hf-vit-sdpa"), ("hf-vit-eager", "torchvision")])
def test_teacher_of_another_family(tmp_path, digits, student, teacher):
    module = FamilyClassifier(student)
    trainer = fast_trainer(tmp_path, callbacks=[DistillationTeacher(_teacher(teacher))], max_steps=2)
    trainer.fit(module, digits)
    assert trainer.callback_metrics["distill/loss"] > 0


def test_ddp_torchvision_and_transformers_pipelines_keep_ranks_identical(tmp_path):
    pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    reports = run_ddp_script(
        f"""
        import lightning as L
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from families import FamilyClassifier
        from lightning_vitcompress import NystromSwap, PruningSchedule, QuantizeOnFit
        from lightning_vitcompress.digits import DigitsDataModule

        sums = {{}}
        for family in ("torchvision", "hf-vit-sdpa"):
            L.seed_everything(0, verbose=False)
            module = FamilyClassifier(family)
            trainer = L.Trainer(
                accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=2,
                limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[PruningSchedule(0.5, start_epoch=0, end_epoch=1, num_steps=2), NystromSwap(num_landmarks=4),
                           QuantizeOnFit("int8_dynamic")],
            )
            trainer.fit(module, DigitsDataModule(batch_size=16))
            sums[family] = [float(module.model.state_dict()[k].float().sum()) if module.model.state_dict()[k].is_floating_point() else 0.0
                            for k in sorted(module.model.state_dict()) if "weight" not in k or "norm" in k]
            sums[family + "/params"] = sum(p.numel() for p in module.parameters())
        report(trainer, **sums)
        """,
        tmp_path,
        timeout=400,
    )
    assert reports[0]["torchvision/params"] == reports[1]["torchvision/params"]
    assert reports[0]["hf-vit-sdpa/params"] == reports[1]["hf-vit-sdpa/params"]
    for family in ("torchvision", "hf-vit-sdpa"):
        assert reports[0][family] == pytest.approx(reports[1][family], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("family", ["torchvision", "hf-vit-sdpa", "hf-deit-teacher", "mha-seq-first"])
def test_resume_mid_schedule_reaches_the_uninterrupted_structure(tmp_path, digits, family):
    """Pruned in two steps (epochs 0 and 1), swapped at epoch 1: resuming after epoch 0 rebuilds step one first."""

    def callbacks() -> list:
        return [
            PruningSchedule(0.5, start_epoch=0, end_epoch=1, num_steps=2),
            NystromSwap(num_landmarks=4, swap_epoch=1),
        ]

    def shapes(module: FamilyClassifier) -> dict[str, tuple]:
        return {name: tuple(p.shape) for name, p in module.named_parameters()}

    whole = FamilyClassifier(family)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=-1, filename="{epoch}")
    trainer = fast_trainer(
        tmp_path, callbacks=[*callbacks(), every_epoch], max_epochs=2, limit_train_batches=2, enable_checkpointing=True
    )
    trainer.fit(whole, digits)

    resumed = FamilyClassifier(family)
    fast_trainer(tmp_path, callbacks=callbacks(), max_epochs=2, limit_train_batches=2).fit(
        resumed, digits, ckpt_path=tmp_path / "checkpoints" / "epoch=0.ckpt"
    )
    assert shapes(resumed) == shapes(whole) != shapes(FamilyClassifier(family))
    assert all(isinstance(block, NystromAttention) for _, block in adapter_for(resumed.model).attention_blocks())
