"""The shared machinery: canonical order, structure records on checkpoints, mid-fit refresh."""

from __future__ import annotations

import pytest
import torch
from helpers import DropLastBlock, fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import CompressionCallback, load_compressed
from lightning_vitcompress._structure import STRUCTURE_KEY, read_checkpoint
from lightning_vitcompress.digits import DigitsClassifier


class Recorder(CompressionCallback):
    order = 5

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def ordered_setup(self, trainer, pl_module, stage):
        self.seen.append(f"recorder saw {len(self.target(pl_module).blocks)} blocks")


@pytest.mark.parametrize("recorder_first", [True, False])
def test_hooks_run_in_canonical_order_whatever_the_list_order(tmp_path, tiny_classifier, digits, recorder_first):
    log: list[str] = []
    callbacks = [Recorder(log), DropLastBlock()]
    if not recorder_first:
        callbacks.reverse()
    model = tiny_classifier(depth=3)
    fast_trainer(tmp_path, callbacks=callbacks, max_steps=1).fit(model, digits)
    assert log == ["recorder saw 3 blocks"]  # order 5 acts before the edit at order 20
    assert len(model.model.blocks) == 2


def test_checkpoint_records_edits_and_load_compressed_rebuilds(tmp_path, tiny_classifier, digits):
    model = tiny_classifier(depth=3)
    trainer = fast_trainer(tmp_path, callbacks=[DropLastBlock()], enable_checkpointing=True)
    trainer.fit(model, digits)
    path = trainer.checkpoint_callback.best_model_path
    assert read_checkpoint(path)[STRUCTURE_KEY] == [{"kind": "test_drop_blocks", "target": "model", "keep": 2}]
    with pytest.raises(RuntimeError, match="Missing key"):  # why the replay is needed
        DigitsClassifier.load_from_checkpoint(path)
    loaded = load_compressed(DigitsClassifier, path)
    assert len(loaded.model.blocks) == 2 and not loaded.training
    images = next(iter(digits.val_dataloader()))[0]
    model.eval()
    torch.testing.assert_close(loaded(images), model(images))


def test_load_compressed_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint_path=.*missing.ckpt"):
        load_compressed(DigitsClassifier, tmp_path / "missing.ckpt")
    path = tmp_path / "bad.ckpt"
    weights = DigitsClassifier(embed_dim=32, depth=1, num_heads=4).state_dict()
    torch.save({"state_dict": weights, STRUCTURE_KEY: [{"kind": "nope", "target": ""}]}, path)
    with pytest.raises(KeyError, match="unknown kind 'nope'"):
        load_compressed(DigitsClassifier, path, embed_dim=32, depth=1, num_heads=4)


def test_mid_fit_edit_rebuilds_optimizer_and_keeps_schedule(tmp_path, tiny_classifier, digits):
    model = tiny_classifier(depth=3)
    trainer = fast_trainer(tmp_path, callbacks=[DropLastBlock(epoch=1)], max_epochs=3)
    trainer.fit(model, digits)
    assert len(model.model.blocks) == 2
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 3  # stepped once per epoch, across the rebuild
    expected_lr = 0.5 * model.hparams.lr * (1 + torch.cos(torch.tensor(torch.pi * 3 / 3))).item()
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected_lr, abs=1e-9)


def test_resume_replays_structure_before_weights_load(tmp_path, tiny_classifier, digits):
    first = fast_trainer(
        tmp_path,
        callbacks=[DropLastBlock(epoch=1), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        max_epochs=2,
        enable_checkpointing=True,
    )
    first.fit(tiny_classifier(depth=3), digits)
    resumed_model = tiny_classifier(depth=3)
    resumed = fast_trainer(tmp_path, callbacks=[DropLastBlock(epoch=1)], max_epochs=3)
    resumed.fit(resumed_model, digits, ckpt_path=tmp_path / "last.ckpt")
    assert len(resumed_model.model.blocks) == 2  # replayed, and not dropped a second time
    assert resumed.current_epoch == 3
