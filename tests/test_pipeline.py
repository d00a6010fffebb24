"""All five callbacks in one Trainer: order-free, checkpoints, one-call load, DDP, LightningCLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, fast_trainer, run_ddp_script
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
from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress.digits import DigitsClassifier, small_vit

EXAMPLES = Path(__file__).parents[1] / "examples"


def pipeline(teacher: nn.Module, tmp_path: Path, order: str = "forward") -> list:
    callbacks = [
        PruningSchedule(0.5, start_epoch=0, end_epoch=1, num_steps=2),
        DistillationTeacher(teacher, mode="soft", alpha=0.5, temperature=2.0),
        NystromSwap(num_landmarks=16, swap_epoch=1),
        QuantizeOnFit("int8_dynamic"),
        BenchmarkCallback(batch_size=8, rounds=1, min_run_time=0.05, latency_repeats=3, output_dir=tmp_path),
    ]
    return callbacks if order == "forward" else callbacks[::-1]


def structure(model: nn.Module) -> dict[str, tuple]:
    """Every parameter's shape and type, and each attention module's class and head layout."""
    shapes = {name: (tuple(p.shape), type(p).__name__) for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if hasattr(module, "num_heads") and hasattr(module, "head_dim"):
            shapes[name] = (type(module).__name__, module.num_heads, module.head_dim)
    return shapes


@pytest.fixture
def teacher() -> nn.Module:
    torch.manual_seed(1)
    return small_vit(embed_dim=48, depth=2, num_heads=4).eval()


def test_list_order_does_not_change_the_result(tmp_path, tiny_classifier, digits, teacher):
    results = []
    for order in ("forward", "reverse"):
        model = tiny_classifier()
        callbacks = pipeline(teacher, tmp_path / order, order)
        fast_trainer(tmp_path / order, callbacks=callbacks, max_epochs=2).fit(model, digits)
        bench = next(cb for cb in callbacks if isinstance(cb, BenchmarkCallback))
        results.append((structure(model.model), bench.report))
    (first_structure, first_report), (second_structure, second_report) = results
    assert first_structure == second_structure
    assert set(first_report) == set(second_report) and set(first_report["final"]) == set(second_report["final"])
    assert first_report["final"]["params"] == second_report["final"]["params"]
    # the baseline is the unpruned fp32 model, the final one pruned, swapped and quantized
    assert first_report["baseline"]["params"] == sum(p.numel() for p in tiny_classifier().model.parameters())
    assert first_report["final"]["params"] < 0.6 * first_report["baseline"]["params"]
    assert first_report["ratios"]["size_ratio"] < 0.3
    assert all(type(a).__name__ == "NystromAttention" for a in (b.attn for b in model.model.blocks))
    assert "Int8" in type(model.model.blocks[0].mlp.fc1.weight).__name__


def test_resume_mid_pipeline_reaches_the_same_structure_and_loads_in_one_call(tmp_path, tiny_classifier, digits, teacher):
    uninterrupted = tiny_classifier()
    fast_trainer(tmp_path / "full", callbacks=pipeline(teacher, tmp_path / "full"), max_epochs=3).fit(
        uninterrupted, digits
    )

    first = fast_trainer(
        tmp_path / "a",
        callbacks=[*pipeline(teacher, tmp_path / "a"), ModelCheckpoint(dirpath=tmp_path / "a", save_last=True)],
        enable_checkpointing=True,
        max_epochs=2,
    )
    first.fit(tiny_classifier(), digits)
    last = tmp_path / "a" / "last.ckpt"  # saved after epoch 1: pruned twice, swapped, not yet quantized
    loaded = load_compressed(DigitsClassifier, last)
    assert all(isinstance(b.attn, NystromAttention) for b in loaded.model.blocks)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in tiny_classifier().parameters())
    images = next(iter(digits.val_dataloader()))[0]
    assert loaded(images).shape == (len(images), 10)

    resumed = tiny_classifier()
    fast_trainer(tmp_path / "b", callbacks=pipeline(teacher, tmp_path / "b"), max_epochs=3).fit(
        resumed, digits, ckpt_path=last
    )
    assert structure(resumed.model) == structure(uninterrupted.model)


def test_ddp_pipeline_keeps_ranks_identical(tmp_path):
    reports = run_ddp_script(
        f"""
        import lightning as L, torch
        from lightning_vitcompress import *
        from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule, small_vit
        L.seed_everything(0)
        torch.manual_seed(1)
        teacher = small_vit(embed_dim=48, depth=2, num_heads=4).eval()
        bench = BenchmarkCallback(batch_size=4, rounds=1, min_run_time=0.05, latency_repeats=3, output_dir=OUT)
        callbacks = [QuantizeOnFit(), bench, NystromSwap(num_landmarks=16, swap_epoch=1),
                     DistillationTeacher(teacher), PruningSchedule(0.5, start_epoch=0, end_epoch=1, num_steps=2)]
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, limit_train_batches=2,
                            limit_val_batches=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        model = DigitsClassifier(**{TINY!r})
        trainer.fit(model, DigitsDataModule(batch_size=16))
        shapes = {{n: list(p.shape) for n, p in model.named_parameters()}}
        checksum = float(sum(p.dequantize().float().sum() if hasattr(p, "dequantize") else p.float().sum()
                             for p in model.parameters()))
        report(trainer, shapes=shapes, checksum=checksum, has_report=bench.report is not None)
        """,
        tmp_path,
    )
    assert reports[0]["shapes"] == reports[1]["shapes"]
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"], rel=1e-5)
    assert [r["has_report"] for r in reports] == [True, False]


def test_yaml_config_round_trips_through_lightning_cli(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    from cli import main

    config = EXAMPLES / "configs" / "pipeline.yaml"
    cli = main(["--config", str(config), "--trainer.max_epochs=2"], run=False)
    types = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    assert {"PruningSchedule", "DistillationTeacher", "NystromSwap", "QuantizeOnFit", "BenchmarkCallback"} <= set(types)
    expected = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    pruning_args = next(c["init_args"] for c in expected if c["class_path"].endswith("PruningSchedule"))
    assert types["PruningSchedule"].config.pruning_ratio == pruning_args["pruning_ratio"]
    # dump and parse again: the same callbacks and arguments come back
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(cli.parser.dump(cli.config, skip_none=False))
    again = main(["--config", str(dumped)], run=False)
    assert [type(cb).__name__ for cb in again.trainer.callbacks] == [type(cb).__name__ for cb in cli.trainer.callbacks]
    ours = [cb for cb in cli.trainer.callbacks if isinstance(cb, CompressionCallback)]
    assert len(ours) == 5
    for first, second in zip(ours, [cb for cb in again.trainer.callbacks if isinstance(cb, CompressionCallback)]):
        assert arguments(second) == arguments(first), type(first).__name__  # values, not only attribute names
    for entry in expected:  # and every value the YAML sets is the callback's
        callback = types[entry["class_path"].rsplit(".", 1)[1]]
        for name, value in entry["init_args"].items():
            assert plain(init_value(callback, name)) == value, (entry["class_path"], name)


def init_value(callback, name):
    """The value a callback holds for its ``__init__`` argument ``name`` (on itself or on its technique config)."""
    name = {"teacher": "teacher_spec"}.get(name, name)  # stored under another name
    if hasattr(callback, name):
        return getattr(callback, name)
    config = callback.config
    return config.importance_name if name == "importance" else getattr(config, name)


def plain(value):
    """YAML's view of an argument: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if type(value).__eq__ is object.__eq__ and hasattr(value, "__dict__"):  # e.g. a resolved importance object
        simple = (str, int, float, bool, type(None))
        return (type(value).__name__, {k: v for k, v in vars(value).items() if isinstance(v, simple)})
    return value


def arguments(callback) -> dict:
    return {k: plain(v) for k, v in vars(callback).items() if not k.startswith("_") and not isinstance(v, nn.Module)}
