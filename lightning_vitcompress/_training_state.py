"""Keeping Lightning's training state consistent after a structural change mid-fit.

Edits made in ``setup`` are free: the optimizers and the DDP wrapper do not
exist yet. An edit later in training (pruning at an epoch boundary, a Nystrom
swap at epoch k) replaces parameters, so the optimizer(s), LR scheduler(s) and
the DDP wrapper must be rebuilt around the new ones. Rebuilding them goes
through :func:`~lightning_vitcompress._lightning.rewrap_and_setup_optimizers`
(Lightning's seam); what is carried over (learning rates, scheduler positions,
optimizer state) is kept here.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lightning_vitcompress._lightning import rewrap_and_setup_optimizers

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)


def check_strategy_supported(trainer: pl.Trainer, callback_name: str) -> None:
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


def refresh_after_structural_change(trainer: pl.Trainer) -> None:
    """Rebuild DDP wrapper, optimizers and LR schedulers around the current parameters.

    Call after replacing or reshaping parameters while fitting. What is kept:

    * each LR scheduler's position (``last_epoch`` and its other state) and the
      current learning rate of every param group, so the schedule goes on;
    * optimizer state (e.g. Adam moments) of parameters that were not replaced.
      State of replaced parameters starts fresh: their shapes changed.

    Outside ``trainer.fit`` (or before the optimizers exist) this does nothing.

    Example (a tiny ViT on scikit-learn's digits)::

        >>> import lightning as L
        >>> import torch
        >>> from lightning_vitcompress._training_state import refresh_after_structural_change
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> class NewHead(L.Callback):
        ...     def on_train_epoch_start(self, trainer, pl_module):
        ...         pl_module.model.head = torch.nn.Linear(32, 10)  # parameters replaced
        ...         refresh_after_structural_change(trainer)
        ...         groups = trainer.optimizers[0].param_groups
        ...         self.trains_head = any(p is pl_module.model.head.weight for g in groups for p in g["params"])
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[edit := NewHead()])
        >>> trainer.fit(DigitsClassifier(embed_dim=32, depth=2, num_heads=4), DigitsDataModule())
        >>> edit.trains_head  # the optimizer holds the new parameters
        True
    """
    strategy = trainer.strategy
    if not trainer.training or not strategy.optimizers:
        return
    assert strategy.lightning_module is not None

    old_optimizers = list(strategy.optimizers)
    old_schedulers = [config.scheduler.state_dict() for config in strategy.lr_scheduler_configs]
    old_lrs = [[group["lr"] for group in opt.param_groups] for opt in old_optimizers]
    old_state = [
        {id(p): opt.state[p] for group in opt.param_groups for p in group["params"] if p in opt.state}
        for opt in old_optimizers
    ]

    rewrap_and_setup_optimizers(trainer)

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
