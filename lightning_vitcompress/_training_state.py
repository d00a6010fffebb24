"""Keeping Lightning's training state consistent after a structural change mid-fit.

Edits made in ``setup`` are free: the optimizers and the DDP wrapper do not
exist yet. An edit later in training (pruning at an epoch boundary, a Nystrom
swap at epoch k) replaces parameters, so the optimizer(s), LR scheduler(s) and
the DDP wrapper must be rebuilt around the new ones. This is the ONE place that
touches Lightning's strategy internals for that; it is tested with Lightning
2.4-2.6 (``Strategy.setup_optimizers``, ``DDPStrategy.configure_ddp``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lightning_vitcompress._base import resume_checkpoint_path
from lightning_vitcompress._structure import read_checkpoint

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)
_RESUMED_STATES = "_vitcompress_resumed_callback_states"


def check_strategy_supported(trainer: "pl.Trainer", callback_name: str) -> None:
    """Fail fast for strategies that shard parameters (FSDP, DeepSpeed, model parallel).

    Structural edits need every rank to hold the whole model; the single-device
    and DDP strategies (``"auto"``, ``"ddp"``, ``"ddp_spawn"``...) do.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, SUPPORTED_STRATEGIES):
        raise RuntimeError(
            f"{callback_name} changes the model's structure, which {type(strategy).__name__} does not support "
            "(parameters are sharded or wrapped). Use strategy='auto' (one device) or strategy='ddp'."
        )


def resumed_callback_state(trainer: "pl.Trainer", callback: Callback) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """At ``setup`` of a resumed fit: the checkpoint path and the state ``callback`` saved in it.

    Lightning restores callback state only after the weights, later than
    ``setup``; reading it here lets a callback refuse arguments that disagree
    with the checkpoint's run before anything is loaded. ``(path, None)`` when
    there is no checkpoint or it holds no state for this callback (e.g. a
    ``save_weights_only`` checkpoint).
    """
    path, weights_only = resume_checkpoint_path(trainer)
    if not path or not Path(path).is_file():
        return path, None
    stat = Path(path).stat()
    key = (path, stat.st_mtime_ns, stat.st_size, weights_only)
    cached = trainer.__dict__.get(_RESUMED_STATES)
    if cached is None or cached[0] != key:  # one read per checkpoint, however many callbacks ask
        checkpoint = read_checkpoint(path, weights_only=weights_only, argument="ckpt_path")
        cached = trainer.__dict__[_RESUMED_STATES] = (key, dict(checkpoint.get("callbacks") or {}))
    return path, cached[1].get(callback.state_key)


def _parameters_of(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def refresh_after_structural_change(trainer: "pl.Trainer") -> None:
    """Rebuild DDP wrapper, optimizers and LR schedulers around the current parameters.

    Call after replacing or reshaping parameters while fitting. What is kept:

    * each LR scheduler's position (``last_epoch`` and its other state) and the
      current learning rate of every param group, so the schedule goes on;
    * optimizer state (e.g. Adam moments) of parameters that were not replaced.
      State of replaced parameters starts fresh: their shapes changed.

    Outside ``trainer.fit`` (or before the optimizers exist) this does nothing.

    Example::

        class MyEdit(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                shrink(pl_module)                       # parameters replaced
                refresh_after_structural_change(trainer)
    """
    strategy = trainer.strategy
    if not trainer.training or not strategy.optimizers:
        return
    pl_module = strategy.lightning_module
    assert pl_module is not None

    old_optimizers = list(strategy.optimizers)
    old_schedulers = [config.scheduler.state_dict() for config in strategy.lr_scheduler_configs]
    old_lrs = [[group["lr"] for group in opt.param_groups] for opt in old_optimizers]
    old_state = [
        {id(p): opt.state[p] for group in opt.param_groups for p in group["params"] if p in opt.state}
        for opt in old_optimizers
    ]

    if isinstance(strategy, DDPStrategy):
        # unwrap, then let the strategy wrap the edited module exactly as it did at setup
        strategy.model = pl_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)

    if len(strategy.optimizers) != len(old_optimizers):
        rank_zero_warn(
            "configure_optimizers returned a different number of optimizers after a structural change; "
            "their learning rates and states were not carried over."
        )
        return
    for optimizer, lrs, state in zip(strategy.optimizers, old_lrs, old_state):
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            if id(p) in state:
                optimizer.state[p] = state[id(p)]
    for config, scheduler_state in zip(strategy.lr_scheduler_configs, old_schedulers):
        # a scheduler's state_dict holds counters and lrs, no parameter references
        config.scheduler.load_state_dict(scheduler_state)

