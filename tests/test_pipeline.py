"""All five callbacks in one Trainer: order-free, checkpoints, one-call load, DDP, LightningCLI."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, fast_trainer, run_ddp_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
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


def test_resume_mid_pipeline_reaches_the_same_structure_and_loads_in_one_call(
    tmp_path, tiny_classifier, digits, teacher
):
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
    theirs = [cb for cb in again.trainer.callbacks if isinstance(cb, CompressionCallback)]
    for first, second in zip(ours, theirs, strict=True):
        assert arguments(second) == arguments(first), type(first).__name__  # values, not only attribute names
    for entry in expected:  # and every value the YAML sets is the callback's
        callback = types[entry["class_path"].rsplit(".", 1)[1]]
        for name, value in entry["init_args"].items():
            assert plain(init_value(callback, name)) == value, (entry["class_path"], name)


@pytest.mark.parametrize("config", sorted((EXAMPLES / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_yaml_example_parses_into_its_callbacks_with_the_values_it_sets(config, tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    from cli import main

    cli = main(["--config", str(config)], run=False)
    types = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    for entry in yaml.safe_load(config.read_text())["trainer"]["callbacks"]:
        callback = types[entry["class_path"].rsplit(".", 1)[1]]
        for name, value in entry["init_args"].items():
            assert plain(init_value(callback, name)) == value, (config.name, entry["class_path"], name)


def test_the_yaml_examples_cover_every_callback():
    import lightning_vitcompress

    named = {
        entry["class_path"].rsplit(".", 1)[1]
        for path in (EXAMPLES / "configs").glob("*.yaml")
        for entry in yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    }
    public = {
        name
        for name in lightning_vitcompress.__all__
        if isinstance(getattr(lightning_vitcompress, name), type)
        and issubclass(getattr(lightning_vitcompress, name), CompressionCallback)
        and name != "CompressionCallback"
    }
    assert public == named, public - named


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


def test_resume_mid_pipeline_gives_the_weights_of_an_uninterrupted_run(tmp_path, tiny_classifier, digits, teacher):
    """All five callbacks, 2 epochs + resume for 1 = 3 straight epochs: same structure and the same outputs."""
    from torch.utils.data import DataLoader

    loader = DataLoader(digits.train_set, batch_size=64, shuffle=False)  # both runs see the same batches
    images = next(iter(digits.val_dataloader()))[0][:16]

    class StopAfterEpoch1(Callback):  # the interrupted run: same max_epochs (so the same LR schedule), cut short
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    def run(folder: str, *extra: Callback, **fit_kwargs) -> DigitsClassifier:
        model = tiny_classifier()
        callbacks = [*pipeline(teacher, tmp_path / folder), *extra]
        fast_trainer(
            tmp_path / folder, callbacks=callbacks, max_epochs=3, limit_val_batches=0, enable_checkpointing=bool(extra)
        ).fit(model, train_dataloaders=loader, **fit_kwargs)
        return model.eval()

    straight = run("straight")
    run("first", StopAfterEpoch1(), ModelCheckpoint(dirpath=tmp_path / "first", save_last=True))
    resumed = run("resumed", ckpt_path=tmp_path / "first" / "last.ckpt")
    assert structure(resumed.model) == structure(straight.model)
    with torch.no_grad():
        torch.testing.assert_close(resumed(images), straight(images), rtol=1e-4, atol=1e-4)


def test_ddp_resume_mid_schedule_keeps_ranks_identical_and_continues(tmp_path):
    """Two gloo ranks prune at epochs 0 and 1 and swap at 1; a checkpoint after epoch 0 resumes under DDP."""
    body = f"""
        import lightning as L, torch
        from lightning.pytorch.callbacks import Callback, ModelCheckpoint
        from lightning_vitcompress import NystromAttention, NystromSwap, PruningSchedule
        from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        L.seed_everything(0)
        resume = os.path.exists(os.path.join(OUT, "ckpt", "last.ckpt"))
        callbacks = [PruningSchedule(0.5, start_epoch=0, end_epoch=1, num_steps=2), NystromSwap(num_landmarks=8, swap_epoch=1)]
        class StopAfterEpoch0(L.Callback):  # the interrupted run keeps max_epochs=2 (the same schedule)
            def on_train_epoch_end(self, trainer, pl_module):
                trainer.should_stop = True

        if not resume:
            callbacks += [ModelCheckpoint(dirpath=os.path.join(OUT, "ckpt"), save_last=True), StopAfterEpoch0()]
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2,
                            limit_train_batches=2, limit_val_batches=0, logger=False, enable_checkpointing=not resume,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        model = DigitsClassifier(**{TINY!r})
        trainer.fit(model, DigitsDataModule(batch_size=16),
                    ckpt_path=os.path.join(OUT, "ckpt", "last.ckpt") if resume else None)
        shapes = {{n: list(p.shape) for n, p in model.named_parameters()}}
        swapped = sum(isinstance(m, NystromAttention) for m in model.modules())
        report(trainer, shapes=shapes, swapped=swapped, epoch=trainer.current_epoch,
               checksum=float(sum(p.float().sum() for p in model.parameters())))
    """
    first = run_ddp_script(body, tmp_path)
    for path in tmp_path.glob("rank*.json"):
        path.unlink()
    resumed = run_ddp_script(body, tmp_path)
    assert first[0]["swapped"] == 0 and resumed[0]["swapped"] == 2  # swapped at epoch 1, after the resume
    assert first[0]["epoch"] == 1 and resumed[0]["epoch"] == 2
    assert resumed[0]["shapes"] == resumed[1]["shapes"]
    assert resumed[0]["checksum"] == pytest.approx(resumed[1]["checksum"], rel=1e-6)
    first_params = sum(math.prod(s) for s in first[0]["shapes"].values())
    assert sum(math.prod(s) for s in resumed[0]["shapes"].values()) < first_params  # the second step pruned
