"""Bad inputs to ``TokenMerging`` (see tests/bad_inputs.py for the harness)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bad_inputs import Case, check_case, tiny_model

from lightning_vitcompress import TokenMerging, TokenMergingConfig

T = "TokenMerging"


def init(id: str, argument: str, error: type = ValueError, **kwargs: Any) -> Case:
    return Case(id, lambda t: TokenMerging(**kwargs), argument, "init", T, error)


def setup(
    id: str, argument: str, model: Any = tiny_model, trainer: Any = None, error: Any = ValueError, **kwargs: Any
) -> Case:
    return Case(
        id, lambda t: TokenMerging(**kwargs), argument, "setup", T, error, model=model, trainer_kwargs=trainer or {}
    )


def _position_bias_model() -> Any:
    """A block holding a fixed-length relative position table (as BEiT/Swin-style attention does)."""
    model = tiny_model()
    model.model.blocks[1].attn.register_buffer("relative_position_index", torch.zeros(65, 65, dtype=torch.long))
    return model


CASES = [
    init("r-negative", "r=-1", r=-1),
    init("r-string", "r='8'", r="8"),
    init("r-bool", "r=True", r=True),
    init("r-list-negative", "r=[1, -1]", r=[1, -1]),
    init("r-empty-list", "r=[]", r=[]),
    init("schedule-unknown", "schedule=", schedule="linear"),
    init("schedule-with-list", "schedule='decreasing'", r=[1, 2], schedule="decreasing"),
    init("blocks-empty", "blocks=[]", blocks=[]),
    init("blocks-int", "blocks=0", blocks=0),
    init(
        "proportional-attention-string",
        "proportional_attention=",
        error=(TypeError, ValueError),
        proportional_attention="yes",
    ),
    init("start-epoch-negative", "start_epoch=-1", start_epoch=-1),
    init("config-and-r", "r=4", r=4, config=TokenMergingConfig(r=8)),
    init("config-wrong-type", "config=", error=TypeError, config={"r": 8}),
    # ------------------------------------------------------------ setup: needs the model or the Trainer
    setup("r-too-large", "r=40", r=40),
    setup("r-list-wrong-length", "r=[1, 2, 3]", r=[1, 2, 3]),
    setup("blocks-out-of-range", "blocks=[5]", blocks=[5]),
    setup("blocks-unknown-name", "blocks=['head']", blocks=["head"]),
    setup("start-epoch-past-max-epochs", "start_epoch=3", start_epoch=3, trainer=dict(max_epochs=3)),
    setup("position-bias-in-block", "relative_position_index", model=_position_bias_model, error=TypeError),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, digits):
    check_case(case, tmp_path, digits)
