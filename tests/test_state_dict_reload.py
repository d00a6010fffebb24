"""load_compressed on files without structure records: weights-only checkpoints, bare state dicts, safetensors.

Each compressed model is trained once per module; every save format of it
must load into a fresh ``DigitsClassifier`` with the trained outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import TINY, fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import (
    NystromAttention,
    NystromSwap,
    PruningSchedule,
    QuantizeOnFit,
    load_compressed,
    save_safetensors,
)
from lightning_vitcompress._state_dict_structure import StructureMismatchError
from lightning_vitcompress._structure import STRUCTURE_KEY, read_checkpoint, recorded_edits
from lightning_vitcompress.digits import DigitsClassifier
from lightning_vitcompress.functional.prune import HEADS_BUFFER

FORMATS = ("weights_only_ckpt", "lightning_state_dict", "vit_state_dict", "safetensors")


def _train(tmp_path: Path, digits: Any, callback: L.Callback) -> tuple[DigitsClassifier, Path]:
    """A tiny classifier fitted with ``callback``, and the weights-only checkpoint of the compressed model."""
    L.seed_everything(0, verbose=False)
    model = DigitsClassifier(**TINY)
    weights_only = ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True)
    trainer = fast_trainer(
        tmp_path,
        callbacks=[callback, weights_only],
        enable_checkpointing=True,
        limit_train_batches=2,
        limit_val_batches=1,
    )
    trainer.fit(model, digits)
    path = tmp_path / "after_fit.ckpt"  # QuantizeOnFit acts after ModelCheckpoint's last save
    trainer.save_checkpoint(path, weights_only=True)  # what ModelCheckpoint(save_weights_only=True) writes
    assert STRUCTURE_KEY not in read_checkpoint(path)
    return model.eval(), path


def _save(model: DigitsClassifier, checkpoint: Path, form: str, tmp_path: Path) -> Path:
    if form == "weights_only_ckpt":
        return checkpoint
    state_dict = model.model.state_dict() if form == "vit_state_dict" else model.state_dict()
    if form == "safetensors":
        path = tmp_path / "model.safetensors"
        save_safetensors(state_dict, path)
        return path
    path = tmp_path / f"{form}.pt"
    torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def images(digits) -> torch.Tensor:
    return next(iter(digits.test_dataloader()))[0][:32]


def _trained(make_callback: Callable[[], L.Callback]) -> Any:
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory, digits) -> tuple[DigitsClassifier, Path]:
        return _train(tmp_path_factory.mktemp("fit"), digits, make_callback())

    return fixture


pruned = _trained(lambda: PruningSchedule(0.5))
nystrom = _trained(lambda: NystromSwap(num_landmarks=8, conv_kernel_size=3))
int8_dynamic = _trained(lambda: QuantizeOnFit("int8_dynamic"))
int8_dynamic_x86 = _trained(lambda: QuantizeOnFit("int8_dynamic_x86", compile=False))
int8_static_x86 = _trained(lambda: QuantizeOnFit("int8_static_x86", compile=False, calibration_batches=1))


def _assert_loads_with_trained_outputs(trained: DigitsClassifier, path: Path, images: torch.Tensor) -> DigitsClassifier:
    loaded = load_compressed(DigitsClassifier, path, **({} if path.suffix == ".ckpt" else TINY))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained(images), rtol=1e-5, atol=1e-6)
    return loaded


@pytest.mark.parametrize("form", FORMATS)
def test_pruned_model_reloads_from_every_format(form, pruned, images, tmp_path):
    trained, checkpoint = pruned
    loaded = _assert_loads_with_trained_outputs(trained, _save(trained, checkpoint, form, tmp_path), images)
    attn = loaded.model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (trained.model.blocks[0].attn.num_heads, 4)  # head dims pruned
    assert loaded.model.embed_dim == trained.model.embed_dim < TINY["embed_dim"]


@pytest.mark.parametrize("form", FORMATS)
def test_nystrom_model_reloads_from_every_format(form, nystrom, images, tmp_path):
    trained, checkpoint = nystrom
    loaded = _assert_loads_with_trained_outputs(trained, _save(trained, checkpoint, form, tmp_path), images)
    attn = loaded.model.blocks[1].attn
    assert isinstance(attn, NystromAttention)
    assert (attn.num_landmarks, attn.conv_kernel_size, attn.num_prefix_tokens) == (8, 3, 1)


@pytest.mark.parametrize("form", FORMATS)
def test_int8_dynamic_x86_model_reloads_from_every_format(form, int8_dynamic_x86, images, tmp_path):
    trained, checkpoint = int8_dynamic_x86
    loaded = _assert_loads_with_trained_outputs(trained, _save(trained, checkpoint, form, tmp_path), images)
    assert type(loaded.model.blocks[0].mlp.fc1).__name__ == "X86Int8DynamicLinear"


@pytest.mark.parametrize("form", FORMATS[:3])
def test_torchao_and_static_x86_models_reload_from_torch_files(form, int8_dynamic, int8_static_x86, images, tmp_path):
    for trained, checkpoint in (int8_dynamic, int8_static_x86):
        loaded = _assert_loads_with_trained_outputs(trained, _save(trained, checkpoint, form, tmp_path), images)
        fc1 = loaded.model.blocks[0].mlp.fc1
        assert type(fc1.weight) is not torch.Tensor or fc1.weight.dtype == torch.int8
    static_fc1 = loaded.model.blocks[0].mlp.fc1
    assert static_fc1.input_scale == int8_static_x86[0].model.blocks[0].mlp.fc1.input_scale


def test_safetensors_refuses_torchao_weights_and_static_scales_with_a_clear_error(
    int8_dynamic, int8_static_x86, tmp_path
):
    # safetensors holds plain tensors only: torchao's subclasses and the static layers' (dict) extra state
    # cannot go there (safetensors itself says "invalid python storage"); torch.save files do (above)
    for (trained, _), kind in ((int8_dynamic, r"Int8Tensor|AffineQuantizedTensor"), (int8_static_x86, "dict")):
        with pytest.raises(
            TypeError,
            match=rf"model\.blocks\.0\..* is a ({kind}), which safetensors cannot hold.*"
            r"torch\.save",
        ):
            save_safetensors(trained, tmp_path / "model.safetensors")


def test_records_that_disagree_with_the_weights_name_the_module(pruned, tmp_path):
    trained, _ = pruned
    records = copy.deepcopy(recorded_edits(trained))
    records[0]["modules"]["blocks.0.mlp.fc1"]["tensors"]["weight"][0] = 60
    path = tmp_path / "full.ckpt"
    torch.save(
        {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams), STRUCTURE_KEY: records}, path
    )
    with pytest.raises(
        StructureMismatchError,
        match=r"records disagree.*model\.blocks\.0\.mlp\.fc1 \(weight\): "
        r"rebuilt \[60, 16\], saved \[64, 16\]$",
    ):
        load_compressed(DigitsClassifier, path)


def test_head_count_that_shapes_cannot_tell_is_an_error_asking_for_the_records(pruned, tmp_path):
    trained, _ = pruned
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in trained.state_dict().items() if not k.endswith(HEADS_BUFFER)}, path)
    with pytest.raises(
        StructureMismatchError,
        match=r"model\.blocks\.0\.attn: .*16 wide.*fits 2 heads of 8 or 4 "
        r"heads of 4.*structure records",
    ):
        load_compressed(DigitsClassifier, path, **TINY)


@pytest.mark.parametrize(
    "source, match",
    [
        (
            lambda: DigitsClassifier(**{**TINY, "embed_dim": 48}).state_dict(),
            r"model\.cls_token: saved with shape \[1, 1, 48\].*at model is built.*only narrows",
        ),
        (lambda: DigitsClassifier(**{**TINY, "depth": 3}).state_dict(), r"unexpected model\.blocks\.2\."),
        (lambda: torch.nn.Linear(4, 2).state_dict(), r"none of its keys \(bias, weight\)"),
    ],
    ids=["wider", "deeper", "unrelated"],
)
def test_weights_of_another_architecture_are_a_clear_error(source, match, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(source(), path)
    with pytest.raises(StructureMismatchError, match=match):
        load_compressed(DigitsClassifier, path, **TINY)


def test_bare_state_dict_without_init_kwargs_says_to_pass_them(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(DigitsClassifier(**TINY).state_dict(), path)
    with pytest.raises(StructureMismatchError, match=r"bare state dict.*built with its defaults.*\*\*init_kwargs"):
        load_compressed(DigitsClassifier, path)  # the defaults build 4 blocks, the file has 2


def test_resume_from_a_checkpoint_without_records_reads_the_pruned_shapes(pruned, tmp_path, digits):
    trained, _ = pruned
    path = tmp_path / "no_records.ckpt"
    fit = fast_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    fit.fit(DigitsClassifier(**TINY), digits)  # a real full checkpoint to borrow the loop state from
    fit.save_checkpoint(path)
    full = torch.load(path, weights_only=True)
    full.pop(STRUCTURE_KEY, None)
    full["state_dict"], full["optimizer_states"] = trained.state_dict(), []
    torch.save(full, path)

    with pytest.raises(RuntimeError, match=r"no record of the pruning steps"):
        fast_trainer(tmp_path, callbacks=[PruningSchedule(0.5)], max_epochs=2).fit(
            DigitsClassifier(**TINY), digits, ckpt_path=path
        )
    resumed = DigitsClassifier(**TINY)
    trainer = fast_trainer(tmp_path, callbacks=[QuantizeOnFit("int8_dynamic")], max_epochs=2, limit_train_batches=1)
    trainer.fit(resumed, digits, ckpt_path=path)  # trains on in the pruned shapes, then quantizes
    assert resumed.model.embed_dim == trained.model.embed_dim
    assert resumed.model.blocks[0].attn.head_dim == 4 and trainer.callbacks[0].summary["quantized"]
    assert recorded_edits(resumed)[0]["inferred"] and recorded_edits(resumed)[0]["kind"] == "prune"
