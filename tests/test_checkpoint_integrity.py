"""Checkpoint integrity: the SHA-256 digest saved with the tensors refuses damaged files everywhere we read them.

The fuzz test flips random bytes inside the tensor data of real checkpoints (pruned, Nyström, QAT, int8),
built once for the module, and counts how many damaged files were detected and how many loaded.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TINY, fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import DistillationTeacher, NystromSwap, PruningSchedule, QuantizeOnFit, load_compressed
from lightning_vitcompress._structure import DIGEST_KEY, CheckpointIntegrityError
from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule

TRIALS_PER_CHECKPOINT = 60


def _fit(folder: Path, *callbacks: L.Callback, **trainer_kwargs) -> None:
    L.seed_everything(0, verbose=False)
    trainer = fast_trainer(
        folder,
        callbacks=list(callbacks),
        limit_train_batches=2,
        limit_val_batches=0,
        enable_checkpointing=True,
        **trainer_kwargs,
    )
    trainer.fit(DigitsClassifier(**TINY), DigitsDataModule(batch_size=64))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One real checkpoint of each kind (built once for the module)."""
    root = tmp_path_factory.mktemp("integrity")
    _fit(root / "p", PruningSchedule(0.5), ModelCheckpoint(dirpath=root / "p", filename="pruned"))
    _fit(root / "n", NystromSwap(num_landmarks=8), ModelCheckpoint(dirpath=root / "n", filename="nystrom"))
    _fit(
        root / "q",
        QuantizeOnFit("int8_dynamic", qat_start_epoch=0, save_path=root / "q" / "int8.ckpt"),
        ModelCheckpoint(dirpath=root / "q", filename="qat"),
    )  # saved at epoch end: during QAT
    return {
        "pruned": root / "p" / "pruned.ckpt",
        "nystrom": root / "n" / "nystrom.ckpt",
        "qat": root / "q" / "qat.ckpt",
        "int8": root / "q" / "int8.ckpt",
    }


def _tensor_regions(path: Path) -> list[tuple[int, int]]:
    """``(start, size)`` in the file of each stored tensor's bytes (the zip entries ``<archive>/data/<n>``)."""
    data = path.read_bytes()
    regions = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if len(parts) >= 3 and parts[-2] == "data" and parts[-1].isdigit() and info.file_size:
                header = data[info.header_offset : info.header_offset + 30]
                start = (
                    info.header_offset
                    + 30
                    + int.from_bytes(header[26:28], "little")
                    + int.from_bytes(header[28:30], "little")
                )
                regions.append((start, info.file_size))
    return regions


def _damaged_copy(path: Path, out: Path, rng: random.Random) -> Path:
    """``path`` with 1-3 bytes inside its tensor data xor-ed with a nonzero value."""
    data = bytearray(path.read_bytes())
    regions = _tensor_regions(path)
    weights = [size for _, size in regions]
    for _ in range(rng.randint(1, 3)):
        start, size = rng.choices(regions, weights=weights)[0]
        data[start + rng.randrange(size)] ^= rng.randint(1, 255)
    out.write_bytes(bytes(data))
    return out


def test_every_kind_of_checkpoint_carries_a_digest_and_loads_intact(checkpoints):
    for kind, path in checkpoints.items():
        assert DIGEST_KEY in torch.load(path, weights_only=True), kind
        assert _tensor_regions(path), kind
        load_compressed(DigitsClassifier, path)  # the intact file loads


def test_fuzz_flipped_tensor_bytes_are_always_refused(checkpoints, tmp_path):
    rng = random.Random(0)
    trials = detected = loaded = 0
    for kind, path in checkpoints.items():
        for trial in range(TRIALS_PER_CHECKPOINT):
            damaged = _damaged_copy(path, tmp_path / f"{kind}-{trial}.ckpt", rng)
            trials += 1
            try:
                load_compressed(DigitsClassifier, damaged)
            except CheckpointIntegrityError as err:
                detected += 1
                assert str(damaged) in str(err) and "checkpoint_path=" in str(err)
            except Exception as err:
                pytest.fail(f"{kind} trial {trial}: refused by {type(err).__name__}, not the digest: {err}")
            else:
                loaded += 1
            damaged.unlink()
    print(f"\nfuzz: {trials} trials, {detected} detected, {loaded} loaded")
    assert trials >= 200 and detected == trials and loaded == 0


def test_a_damaged_checkpoint_is_refused_on_resume_and_as_a_teacher(checkpoints, tmp_path, digits):
    damaged = _damaged_copy(checkpoints["pruned"], tmp_path / "damaged.ckpt", random.Random(1))
    model = DigitsClassifier(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fast_trainer(tmp_path, callbacks=[PruningSchedule(0.5)], max_epochs=2)
    with pytest.raises(CheckpointIntegrityError, match=r"ckpt_path=.*damaged"):
        trainer.fit(model, digits, ckpt_path=damaged)
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    trainer = fast_trainer(tmp_path, callbacks=[DistillationTeacher(str(damaged))])
    with pytest.raises(CheckpointIntegrityError, match=r"teacher=.*damaged"):
        trainer.fit(DigitsClassifier(**TINY), digits)
    assert trainer.global_step == 0


def test_weights_only_checkpoints_carry_no_digest_and_still_load(tmp_path):
    """Lightning calls no callback while writing ModelCheckpoint(save_weights_only=True) files: nothing to verify."""
    _fit(tmp_path, PruningSchedule(0.5), ModelCheckpoint(dirpath=tmp_path, filename="w", save_weights_only=True))
    assert DIGEST_KEY not in torch.load(tmp_path / "w.ckpt", weights_only=True)
    load_compressed(DigitsClassifier, tmp_path / "w.ckpt")
