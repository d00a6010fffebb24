"""Every file the package reads is loaded with ``weights_only=True``; nothing falls back silently."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY, fast_trainer

from lightning_vitcompress import DistillationTeacher, PruningSchedule, load_compressed
from lightning_vitcompress._structure import UnsafeCheckpointError, read_checkpoint
from lightning_vitcompress.digits import DigitsClassifier


class _Payload:
    """Unpickling this object opens (creates) ``marker``: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A Lightning-shaped checkpoint of a real model whose pickle also creates a marker file."""
    marker = tmp_path / "payload-ran"
    model = DigitsClassifier(**TINY)
    path = tmp_path / "crafted.ckpt"
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.6.0",
        "extra": _Payload(marker),
    }
    torch.save(checkpoint, path)
    assert not marker.exists()
    return path, marker


def test_load_compressed_refuses_a_crafted_checkpoint(tmp_path):
    path, marker = _crafted_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_path=.*crafted\.ckpt.*weights_only=False"):
        load_compressed(DigitsClassifier, path)
    assert not marker.exists()


def test_teacher_path_refuses_a_crafted_checkpoint(tmp_path, digits):
    path, marker = _crafted_checkpoint(tmp_path)
    trainer = fast_trainer(tmp_path, callbacks=[DistillationTeacher(str(path))])
    with pytest.raises(UnsafeCheckpointError, match=r"teacher=.*crafted\.ckpt"):
        trainer.fit(DigitsClassifier(**TINY), digits)
    assert trainer.global_step == 0
    assert not marker.exists()


def test_resume_refuses_a_crafted_checkpoint_before_lightning_reads_it(tmp_path, digits):
    path, marker = _crafted_checkpoint(tmp_path)
    trainer = fast_trainer(tmp_path, callbacks=[PruningSchedule(0.5)])
    with pytest.raises(UnsafeCheckpointError, match=r"ckpt_path=.*crafted\.ckpt"):
        trainer.fit(DigitsClassifier(**TINY), digits, ckpt_path=path)
    assert not marker.exists()


def test_unsafe_loading_only_on_explicit_request_and_with_a_warning(tmp_path):
    path, marker = _crafted_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        checkpoint = read_checkpoint(path, weights_only=False)
    assert marker.exists()  # the user asked for it: the pickle ran
    assert set(checkpoint["state_dict"]) == set(DigitsClassifier(**TINY).state_dict())


def test_safe_checkpoint_loads_without_a_warning(tmp_path):
    model = DigitsClassifier(**TINY)
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_compressed(DigitsClassifier, path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_file_error_names_the_path(tmp_path, damage):
    model = DigitsClassifier(**TINY)
    path = tmp_path / "damaged.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"checkpoint_path=.*damaged\.ckpt.*not a readable torch checkpoint"):
        load_compressed(DigitsClassifier, path)


def test_missing_file_error_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint_path=.*nowhere\.ckpt"):
        load_compressed(DigitsClassifier, tmp_path / "nowhere.ckpt")


def test_distillation_weights_only_must_be_a_bool():
    with pytest.raises(TypeError, match="weights_only='yes'"):
        DistillationTeacher("vit_tiny_patch16_224", weights_only="yes")
