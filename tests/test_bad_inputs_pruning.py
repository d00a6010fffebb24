"""Bad inputs to ``PruningSchedule`` (see tests/bad_inputs.py for the harness)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_inputs import Case, check_case, tiny_model
from helpers import EXAMPLE_IMAGES as IMAGES
from helpers import MHAClassifier, StopAfterEpoch0, fast_trainer, grey_loaders, no_heads_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import PruningSchedule
from lightning_vitcompress.digits import DigitsDataModule

P = "PruningSchedule"


def init(id: str, argument: str, error: type[Exception] = ValueError, **kwargs: Any) -> Case:
    return Case(id, lambda t: PruningSchedule(**kwargs), argument, "init", P, error)


def setup(
    id: str, argument: str, error: Any = ValueError, model: Any = tiny_model, trainer: Any = None, **kwargs: Any
) -> Case:
    return Case(
        id, lambda t: PruningSchedule(**kwargs), argument, "setup", P, error, model=model, trainer_kwargs=trainer or {}
    )


def _first_run(tmp_path: Path, callback: PruningSchedule, model: Any = None) -> Path:
    """A short fit with ``callback`` that stops after epoch 0 and leaves last.ckpt."""
    folder = tmp_path / "first"
    trainer = fast_trainer(
        folder,
        callbacks=[callback, StopAfterEpoch0(), ModelCheckpoint(dirpath=folder, save_last=True)],
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    trainer.fit(model or tiny_model(), DigitsDataModule(batch_size=64))
    return folder / "last.ckpt"


def resume(id: str, argument: str, first: dict[str, Any], again: dict[str, Any]) -> Case:
    def make(tmp_path: Path) -> PruningSchedule:
        _first_run(tmp_path, PruningSchedule(**first))
        return PruningSchedule(**again)

    return Case(
        id,
        make,
        argument,
        "setup",
        P,
        ValueError,
        trainer_kwargs=dict(max_epochs=3),
        fit_kwargs=lambda t: {"ckpt_path": t / "first" / "last.ckpt"},
    )


def _pruned_model() -> Any:
    """A model pruned to 0.5 by an earlier fit in this process."""
    model = tiny_model()
    fast_trainer(Path(tempfile.mkdtemp()), callbacks=[PruningSchedule(0.5)], max_steps=1, limit_val_batches=0).fit(
        model, DigitsDataModule(batch_size=64)
    )
    return model


def _int8_model() -> Any:
    """A model quantized to int8 (dynamic, torchao) before it meets PruningSchedule."""
    from lightning_vitcompress import quantize_model

    model = tiny_model()
    quantize_model(model.model, "int8_dynamic")
    return model


CASES = [
    # ------------------------------------------------------------ constructor: the value alone is wrong
    init("ratio-zero", "pruning_ratio=0.0", pruning_ratio=0.0),
    init("ratio-one", "pruning_ratio=1.0", pruning_ratio=1.0),
    init("ratio-negative", "pruning_ratio=-0.5", pruning_ratio=-0.5),
    init("ratio-string", "pruning_ratio='0.5'", pruning_ratio="0.5"),
    init("ratio-bool", "pruning_ratio=True", pruning_ratio=True),
    init("ratio-nan", "pruning_ratio=nan", pruning_ratio=float("nan")),
    init("start-negative", "start_epoch=-1", start_epoch=-1),
    init("start-bool", "start_epoch=True", start_epoch=True),
    init("start-float", "start_epoch=1.5", start_epoch=1.5),
    init("end-before-start", "end_epoch=1", start_epoch=2, end_epoch=1),
    init("num-steps-zero", "num_steps=0", num_steps=0),
    init("num-steps-string", "num_steps='2'", num_steps="2"),
    init("num-steps-too-many", "num_steps=3", end_epoch=1, num_steps=3),
    init("interval-unknown", "interval='batch'", interval="batch"),
    init("schedule-unknown", "schedule='quadratic'", schedule="quadratic"),
    init("schedule-negative", "schedule=", schedule=lambda progress: -1),
    init("schedule-above-one", "schedule=", schedule=lambda progress: 2.0),
    init("schedule-not-number", "schedule=", schedule=lambda progress: "half"),
    init("schedule-decreasing", "schedule=", end_epoch=1, schedule=lambda progress: 1.0 - progress / 2),
    init("schedule-never-prunes", "schedule=", schedule=lambda progress: 0.0),
    init("importance-int", "importance=42", importance=42),
    init("importance-unknown", "importance='magic'", importance="magic"),
    init("target-unknown", "target='flops'", target="flops"),
    init("round-to-zero", "round_to=0", round_to=0),
    init("round-to-bool", "round_to=True", round_to=True),
    init("prune-heads-string", "prune_heads='yes'", TypeError, prune_heads="yes"),
    init("nothing-to-prune", "prune_embed_dim", prune_embed_dim=False, prune_attention=False, prune_mlp=False),
    init("ignored-layers-string", "ignored_layers='head'", ignored_layers="head"),
    init("ignored-layers-empty-name", "ignored_layers=['']", ignored_layers=[""]),
    init("gradient-batches-zero", "gradient_batches=0", gradient_batches=0),
    init("gradient-batches-string", "gradient_batches='four'", gradient_batches="four"),
    init("seed-string", "seed='x'", seed="x"),
    init("seed-negative", "seed=-1", seed=-1),
    init("example-input-string", "example_input='abc'", example_input="abc"),
    init("example-input-empty", "example_input=", example_input=torch.empty(0, 3, 32, 32)),
    init("model-attribute-empty", "model_attribute=''", model_attribute=""),
    # ------------------------------------------------------------ setup: needs the model or the Trainer
    setup("end-past-max-epochs", "end_epoch=3", end_epoch=3, trainer=dict(max_epochs=2)),
    setup("ratio-empties-layers", "pruning_ratio=0.999", pruning_ratio=0.999),
    setup("ratio-empties-heads", "pruning_ratio=0.9", pruning_ratio=0.9, prune_heads=True),
    setup("round-to-removes-nothing", "round_to=8", pruning_ratio=0.05, round_to=8),
    setup("params-target-out-of-reach", "pruning_ratio=0.99", pruning_ratio=0.99, target="params"),
    setup("ignored-layer-missing", "ignored_layers=['nope']", ignored_layers=["nope"]),
    setup("model-attribute-missing", "model_attribute='net'", AttributeError, model_attribute="net"),
    setup("example-input-wrong-shape", "example_input=", example_input=torch.randn(1, 3, 7, 7)),
    setup("mha-heads-not-prunable", "prune_heads", model=MHAClassifier, prune_heads=True, example_input=IMAGES),
    setup(
        "mha-attention-without-embedding",
        "prune_embed_dim",
        model=MHAClassifier,
        prune_embed_dim=False,
        example_input=IMAGES,
    ),
    setup("attention-without-num-heads", "num_heads", TypeError, model=no_heads_model),
    setup("budget-without-training-steps", "max_steps=0", max_accuracy_drop=1.0, trainer=dict(max_steps=0)),
    setup("model-already-int8", "already quantized", model=_int8_model),
    # 1-channel data for a 3-channel model: refused before pruning, not at the first batch after it
    Case(
        "grey-images-for-a-3-channel-model",
        lambda t: PruningSchedule(0.5),
        "(1, 32, 32)",
        "setup",
        P,
        ValueError,
        data=grey_loaders,
    ),
    Case(
        "second-fit-other-ratio",
        lambda t: PruningSchedule(0.25),
        "pruning_ratio=0.25",
        "setup",
        P,
        ValueError,
        model=_pruned_model,
    ),
    # resuming with arguments that differ from the checkpoint's: refused before the checkpoint is restored
    resume("resume-other-ratio", "pruning_ratio=0.25", dict(pruning_ratio=0.5), dict(pruning_ratio=0.25)),
    resume(
        "resume-other-heads", "prune_heads=True", dict(pruning_ratio=0.5), dict(pruning_ratio=0.5, prune_heads=True)
    ),
    resume("resume-other-importance", "importance='l1'", dict(pruning_ratio=0.5), dict(importance="l1")),
    resume("resume-other-target", "target='params'", dict(pruning_ratio=0.5), dict(target="params")),
    # a checkpoint written before the first pruning step: the callback state holds the arguments
    resume(
        "resume-before-first-step-other-ratio",
        "pruning_ratio=0.25",
        dict(pruning_ratio=0.5, start_epoch=1),
        dict(pruning_ratio=0.25, start_epoch=1),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, digits):
    check_case(case, tmp_path, digits)


def test_resume_error_names_both_values(tmp_path, digits):
    path = _first_run(tmp_path, PruningSchedule(0.5))
    trainer = fast_trainer(tmp_path, callbacks=[PruningSchedule(0.25)], max_epochs=3)
    with pytest.raises(ValueError, match=r"pruning_ratio=0.25 \(was pruning_ratio=0.5\)") as info:
        trainer.fit(tiny_model(), digits, ckpt_path=path)
    assert str(path) in str(info.value)
