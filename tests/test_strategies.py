"""Strategies that shard parameters are refused at setup, with real Lightning strategy objects (not a mocked list).

A Trainer with ``FSDPStrategy`` cannot be built on a CPU-only machine (Lightning: "The strategy `fsdp`
requires a GPU accelerator"), so the check is called with a stub trainer holding a real strategy object;
``DeepSpeedStrategy`` is checked the same way where deepspeed is installed.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from lightning_vitcompress import NystromSwap, PruningSchedule, QuantizeOnFit
from lightning_vitcompress._training_state import check_strategy_supported


def test_an_fsdp_trainer_cannot_be_built_on_cpu_which_is_why_a_stub_holds_the_strategy():
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", strategy=FSDPStrategy(), devices=1, logger=False)


def _sharded_strategies() -> list:
    strategies = [FSDPStrategy()]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return strategies
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return [*strategies, DeepSpeedStrategy()]


@pytest.mark.parametrize("strategy", _sharded_strategies(), ids=lambda s: type(s).__name__)
def test_sharded_strategies_are_refused_naming_the_strategy_and_what_works(strategy, tiny_classifier):
    trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(RuntimeError, match=rf"QuantizeOnFit .* {type(strategy).__name__} does not support.*'ddp'"):
        check_strategy_supported(trainer, "QuantizeOnFit")
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SimpleNamespace(strategy=strategy, max_epochs=2)
    for callback in (QuantizeOnFit(), PruningSchedule(0.5), NystromSwap(num_landmarks=8)):
        with pytest.raises(RuntimeError, match=type(strategy).__name__):
            callback.check_fit(trainer)  # what the base class runs at setup before the callback's own setup
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("strategy", [SingleDeviceStrategy("cpu"), DDPStrategy()], ids=lambda s: type(s).__name__)
def test_single_device_and_ddp_pass(strategy):
    check_strategy_supported(SimpleNamespace(strategy=strategy), "QuantizeOnFit")
