"""Bad inputs to ``NystromSwap`` (see tests/bad_inputs.py for the harness)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_inputs import Case, check_case, tiny_model
from helpers import (
    TINY,
    CustomAttention,
    MaskedClassifier,
    StopAfterEpoch0,
    fast_trainer,
    masked_in_training_model,
    no_heads_model,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vitcompress import NystromSwap
from lightning_vitcompress.digits import DigitsDataModule

N = "NystromSwap"
MASK_EXAMPLE = torch.randn(2, 3, 32, 32)


def init(id: str, argument: str, **kwargs: Any) -> Case:
    return Case(id, lambda t: NystromSwap(**kwargs), argument, "init", N, ValueError)


def setup(id: str, argument: str, model: Any = tiny_model, trainer: Any = None, **kwargs: Any) -> Case:
    return Case(
        id, lambda t: NystromSwap(**kwargs), argument, "setup", N, ValueError, model=model, trainer_kwargs=trainer or {}
    )


def _custom_attention_model() -> Any:
    model = tiny_model()
    for block in model.model.blocks:
        block.attn = CustomAttention(TINY["embed_dim"], TINY["num_heads"])
    return model


def resume(id: str, argument: str, first: dict[str, Any], again: dict[str, Any]) -> Case:
    def make(tmp_path: Path) -> NystromSwap:
        folder = tmp_path / "first"
        trainer = fast_trainer(
            folder,
            callbacks=[NystromSwap(**first), StopAfterEpoch0(), ModelCheckpoint(dirpath=folder, save_last=True)],
            max_epochs=2,
            limit_train_batches=2,
            limit_val_batches=0,
            enable_checkpointing=True,
        )
        trainer.fit(tiny_model(), DigitsDataModule(batch_size=64))
        return NystromSwap(**again)

    return Case(
        id,
        make,
        argument,
        "setup",
        N,
        ValueError,
        trainer_kwargs=dict(max_epochs=3),
        fit_kwargs=lambda t: {"ckpt_path": t / "first" / "last.ckpt"},
    )


def _swapped_model() -> Any:
    """A model swapped to 4 landmarks by an earlier fit in this process."""
    model = tiny_model()
    fast_trainer(
        Path(tempfile.mkdtemp()), callbacks=[NystromSwap(num_landmarks=4)], max_steps=1, limit_val_batches=0
    ).fit(model, DigitsDataModule(batch_size=64))
    return model


CASES = [
    # ------------------------------------------------------------ constructor: the value alone is wrong
    init("landmarks-zero", "num_landmarks=0", num_landmarks=0),
    init("landmarks-bool", "num_landmarks=True", num_landmarks=True),
    init("landmarks-float", "num_landmarks=8.0", num_landmarks=8.0),
    init("landmarks-string", "num_landmarks='64'", num_landmarks="64"),
    init("swap-epoch-negative", "swap_epoch=-1", swap_epoch=-1),
    init("swap-epoch-bool", "swap_epoch=True", swap_epoch=True),
    init("swap-epoch-float", "swap_epoch=1.0", swap_epoch=1.0),
    init("blocks-string", "blocks='blocks.0.attn'", blocks="blocks.0.attn"),
    init("blocks-int", "blocks=0", blocks=0),
    init("blocks-empty", "blocks=[]", blocks=[]),
    init("blocks-bool-entry", "blocks=[True]", blocks=[True]),
    init("blocks-float-entry", "blocks=[0.5]", blocks=[0.5]),
    init("pinv-zero", "pinv_iterations=0", pinv_iterations=0),
    init("pinv-bool", "pinv_iterations=True", pinv_iterations=True),
    init("conv-even", "conv_kernel_size=4", conv_kernel_size=4),
    init("conv-zero", "conv_kernel_size=0", conv_kernel_size=0),
    init("conv-string", "conv_kernel_size='3'", conv_kernel_size="3"),
    init("prefix-negative", "num_prefix_tokens=-1", num_prefix_tokens=-1),
    init("prefix-bool", "num_prefix_tokens=False", num_prefix_tokens=False),
    init("example-input-string", "example_input='abc'", example_input="abc"),
    init("model-attribute-int", "model_attribute=3", model_attribute=3),
    # ------------------------------------------------------------ setup: needs the model or the Trainer
    setup("blocks-out-of-range", "blocks=[5]", blocks=[5]),
    setup("blocks-unknown-name", "blocks=['head']", blocks=["head"]),
    setup("swap-epoch-past-max-epochs", "swap_epoch=3", swap_epoch=3, trainer=dict(max_epochs=3)),
    setup("swap-epoch-under-fast-dev-run", "fast_dev_run=True", swap_epoch=1, trainer=dict(fast_dev_run=True)),
    setup(
        "budget-without-training-steps",
        "limit_train_batches=0",
        max_accuracy_drop=1.0,
        trainer=dict(limit_train_batches=0),
    ),
    setup("unsupported-attention", "blocks=None", model=_custom_attention_model),
    setup("masked-blocks", "blocks=None", model=MaskedClassifier, example_input=MASK_EXAMPLE),
    setup(
        "masked-blocks-later-swap",
        "blocks=None",
        model=MaskedClassifier,
        example_input=MASK_EXAMPLE,
        swap_epoch=1,
        trainer=dict(max_epochs=2),
    ),
    # 65 tokens (class + 64 patches): all of them prefix tokens, Nyström would never run
    setup("prefix-whole-sequence", "num_prefix_tokens=65", num_prefix_tokens=65),
    setup("prefix-past-sequence", "num_prefix_tokens=500", num_prefix_tokens=500),
    # an attention module no adapter can read: a TypeError, as for any unsupported attention type
    Case(
        "attention-without-num-heads",
        lambda t: NystromSwap(),
        "NoHeadsAttention",
        "setup",
        N,
        TypeError,
        model=no_heads_model,
    ),
    # nn.MultiheadAttention given a mask only in training: seen at setup, not at the first batch
    setup("mask-only-in-training", "blocks=None", model=masked_in_training_model),
    setup("example-input-wrong-shape", "example_input=", model=MaskedClassifier, example_input=torch.randn(2, 5)),
    Case(
        "second-fit-other-landmarks",
        lambda t: NystromSwap(num_landmarks=8),
        "num_landmarks=8",
        "setup",
        N,
        ValueError,
        model=_swapped_model,
    ),
    # resuming with arguments that differ from the checkpoint's: refused before the checkpoint is restored
    resume("resume-other-landmarks", "num_landmarks=8", dict(num_landmarks=4), dict(num_landmarks=8)),
    resume("resume-other-conv", "conv_kernel_size=3", dict(num_landmarks=4), dict(num_landmarks=4, conv_kernel_size=3)),
    resume("resume-other-blocks", "blocks=[0]", dict(num_landmarks=4), dict(num_landmarks=4, blocks=[0])),
    # a checkpoint written before the swap: the callback state holds the arguments
    resume(
        "resume-before-swap-other-landmarks",
        "num_landmarks=8",
        dict(num_landmarks=4, swap_epoch=1),
        dict(num_landmarks=8, swap_epoch=1),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, digits):
    check_case(case, tmp_path, digits)
