"""Structured pruning that really shrinks a Vision Transformer, inside ``fit``.

:class:`PruningSchedule` removes embedding channels, attention head dimensions
(or whole heads) and MLP hidden channels with `torch-pruning`_, so the model's
weight matrices get smaller and its forward faster (mask pruning gives neither).
It prunes once at the start of fit or step by step over a schedule, keeps the
optimizer, LR scheduler and DDP wrapper consistent after each step, and records
every step in the checkpoint so that resuming and :func:`load_compressed` rebuild
the pruned shapes before the weights load.

.. _torch-pruning: https://github.com/VainF/Torch-Pruning
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._model import find_attention_blocks, get_submodule, set_submodule
from lightning_vitcompress._structure import record_edit
from lightning_vitcompress._training_state import check_strategy_supported, refresh_after_structural_change
from lightning_vitcompress.functional.measure import count_macs, count_parameters
from lightning_vitcompress.functional.prune import (
    ImportanceName,
    _gradient_kind,
    _make_importance,
    _mlp_input_layers,
    _residual_layers,
    _timm_style_attention,
    prunable_widths,
    prune_vit,
    widths_after,
)

__all__ = ["PruningSchedule"]

ScheduleName = Literal["linear", "cubic"]


def _schedule_fraction(schedule: Union[str, Callable[[float], float]], progress: float) -> float:
    """Fraction of the final pruning ratio reached at ``progress`` in (0, 1]."""
    if callable(schedule):
        return float(schedule(progress))
    if schedule == "linear":
        return progress
    return 1.0 - (1.0 - progress) ** 3  # cubic (Zhu & Gupta 2017): prune fast early, slow late



# ---------------------------------------------------------------------------- callback
class PruningSchedule(CompressionCallback):
    r"""Structured pruning of a ViT inside ``fit``: the model really gets smaller and faster.

    Removes the least important embedding channels, attention head dimensions
    (or whole heads) and MLP hidden channels with torch-pruning; classifier
    heads keep their outputs. With the default ``start_epoch=0`` and
    ``num_steps=1`` it prunes once at ``setup`` (before the optimizer exists)
    and the rest of fit fine-tunes; otherwise it prunes ``num_steps`` times from
    ``start_epoch`` to ``end_epoch`` following ``schedule`` and fine-tunes in
    between, rebuilding optimizers, LR schedulers and the DDP wrapper each time.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[PruningSchedule(0.5, end_epoch=4, num_steps=5)])
        trainer.fit(model, datamodule)
        model = load_compressed(MyModule, "last.ckpt")  # pruned shapes rebuilt, weights loaded

    Args:
        pruning_ratio: final fraction to remove, in (0, 1): of each layer's channels
            (``target="channels"``), or of the parameters / MACs (``target="params"``/``"macs"``).
        start_epoch: epoch of the first pruning step.
        end_epoch: epoch of the last one (default ``start_epoch``): steps are spread
            evenly over epochs ``start_epoch..end_epoch`` (``interval="epoch"``) or over
            their training steps (``interval="step"``).
        num_steps: number of pruning steps (default: one per epoch from start to end,
            or 1 with ``interval="step"``).
        schedule: ``"linear"``, ``"cubic"`` or ``f(progress) -> fraction of the final
            ratio`` with ``progress = k / num_steps`` for step ``k = 1..num_steps``.
        interval: prune at ``"epoch"`` starts or at training-batch (``"step"``) boundaries.
        importance: ``"l2"``, ``"l1"``, ``"taylor"``, ``"hessian"``, ``"random"`` or a
            ``torch_pruning`` importance object. Taylor/Hessian average the gradients of
            the ``gradient_batches`` training batches after a step falls due, then prune.
        global_pruning: rank channels across all layers (widths then differ per layer)
            instead of removing the same fraction in every layer.
        round_to: keep widths multiples of this (e.g. 8 for fast kernels).
        target: what ``pruning_ratio`` measures (``"channels"``, ``"params"``, ``"macs"``).
        prune_embed_dim / prune_attention / prune_heads / prune_mlp: what may be pruned;
            ``prune_heads=True`` removes whole heads instead of head dimensions.
        ignored_layers: attribute paths (inside the ViT) of layers whose outputs stay.
        gradient_batches: training batches whose gradients Taylor/Hessian importance averages.
        seed: seed of ``importance="random"`` (all ranks draw the same channels).
        example_input: one input batch to trace the model with; needed for models without
            a timm ``patch_embed`` (e.g. ``nn.TransformerEncoder`` ones).
        model_attribute: attribute of the LightningModule holding the ViT (default: found).
    """

    order = 20

    def __init__(
        self,
        pruning_ratio: float = 0.5,
        *,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        num_steps: Optional[int] = None,
        schedule: Union[ScheduleName, Callable[[float], float]] = "linear",
        interval: Literal["epoch", "step"] = "epoch",
        importance: Union[ImportanceName, tp.importance.Importance] = "l2",
        global_pruning: bool = False,
        round_to: Optional[int] = None,
        target: Literal["channels", "params", "macs"] = "channels",
        prune_embed_dim: bool = True,
        prune_attention: bool = True,
        prune_heads: bool = False,
        prune_mlp: bool = True,
        ignored_layers: Sequence[str] = (),
        gradient_batches: int = 4,
        seed: int = 0,
        example_input: Optional[torch.Tensor] = None,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        if not isinstance(pruning_ratio, (int, float)) or not 0.0 < pruning_ratio < 1.0:
            raise ValueError(f"pruning_ratio={pruning_ratio!r}: must be in (0, 1), e.g. 0.5 to remove half.")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch={start_epoch!r}: must be an epoch index >= 0.")
        end_epoch = start_epoch if end_epoch is None else end_epoch
        if not isinstance(end_epoch, int) or end_epoch < start_epoch:
            raise ValueError(
                f"end_epoch={end_epoch!r} is before start_epoch={start_epoch}: pass end_epoch >= start_epoch."
            )
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval={interval!r}: use 'epoch' or 'step'.")
        if num_steps is None:
            num_steps = end_epoch - start_epoch + 1 if interval == "epoch" else 1
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r}: must be a positive number of pruning steps.")
        if interval == "epoch" and num_steps > end_epoch - start_epoch + 1:
            raise ValueError(
                f"num_steps={num_steps} does not fit into epochs {start_epoch}..{end_epoch} at one step per epoch; "
                f"use num_steps <= {end_epoch - start_epoch + 1}, a later end_epoch, or interval='step'."
            )
        if not callable(schedule) and schedule not in ("linear", "cubic"):
            raise ValueError(f"schedule={schedule!r}: use 'linear', 'cubic' or a callable progress -> fraction.")
        if target not in ("channels", "params", "macs"):
            raise ValueError(f"target={target!r}: use 'channels', 'params' or 'macs'.")
        if not (prune_embed_dim or prune_attention or prune_mlp):
            raise ValueError("prune_embed_dim, prune_attention and prune_mlp are all False: nothing would be pruned.")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to={round_to!r}: must be a positive channel multiple, e.g. 8, or None.")
        self.importance = _make_importance(importance)  # validates the name early
        self.importance_name = importance if isinstance(importance, str) else type(importance).__name__
        self.pruning_ratio = float(pruning_ratio)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.num_steps = num_steps
        self.schedule = schedule
        self.interval = interval
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.target_metric = target
        self.prune_embed_dim = prune_embed_dim
        self.prune_attention = prune_attention
        self.prune_heads = prune_heads
        self.prune_mlp = prune_mlp
        self.ignored_layers = list(ignored_layers)
        self.gradient_batches = gradient_batches
        self.seed = seed
        self.user_example_input = example_input
        self.steps_done = 0
        self._channel_ratio: Optional[float] = None  # pruning_ratio translated to channels
        self._example_input: Optional[torch.Tensor] = None
        self._original_widths: Optional[dict[str, list[int]]] = None
        self._original_params = 0
        self._grad_sums: dict[int, torch.Tensor] = {}
        self._grad_batches = 0
        self._gathering = False

    # ----------------------------------------------------------------- schedule
    def ratio_after_step(self, step: int) -> float:
        """Channel ratio reached after pruning step ``step`` (1-based)."""
        assert self._channel_ratio is not None
        fraction = _schedule_fraction(self.schedule, step / self.num_steps)
        return min(max(fraction, 0.0), 1.0) * self._channel_ratio

    def _step_offsets(self, units: int) -> list[int]:
        return [math.floor(k * units / self.num_steps) for k in range(self.num_steps)]

    def _steps_due(self, trainer: "pl.Trainer", position_in_epoch: int = 0) -> int:
        """How many pruning steps should have run at this epoch / batch boundary."""
        if self.interval == "epoch":
            offsets = self._step_offsets(self.end_epoch - self.start_epoch + 1)
            position = trainer.current_epoch - self.start_epoch
        else:
            per_epoch = max(1, int(trainer.num_training_batches)) if math.isfinite(trainer.num_training_batches) else 1
            offsets = self._step_offsets((self.end_epoch - self.start_epoch + 1) * per_epoch)
            position = (trainer.current_epoch - self.start_epoch) * per_epoch + position_in_epoch
        return sum(1 for offset in offsets if offset <= position) if position >= 0 else 0

    @property
    def _needs_gradients(self) -> bool:
        return _gradient_kind(self.importance) is not None

    # ------------------------------------------------------------------- setup
    def _example(self, model: nn.Module) -> torch.Tensor:
        if self.user_example_input is not None:
            device = next(model.parameters()).device
            return self.user_example_input[:1].to(device)
        patch_embed = getattr(model, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        conv = getattr(patch_embed, "proj", None)
        if img_size is not None and isinstance(conv, nn.Conv2d):
            device = next(model.parameters()).device
            return torch.randn(1, conv.in_channels, *img_size, device=device)
        raise ValueError(
            f"Cannot build an example input for {type(model).__name__} (no timm patch_embed): pass "
            "example_input=<one input batch> so that torch-pruning can trace the model."
        )

    def _check_prunable(self, model: nn.Module) -> None:
        mha = [name for name, m in find_attention_blocks(model) if isinstance(m, nn.MultiheadAttention)]
        if mha and (self.prune_attention or self.prune_embed_dim):
            raise ValueError(
                f"{mha[0]} is an nn.MultiheadAttention, whose head width is tied to embed_dim: torch-pruning "
                "cannot narrow its heads without the residual stream. Pass prune_attention=False and "
                "prune_embed_dim=False to prune only the MLP channels of this model."
            )
        qk_norm = [
            a for a in _timm_style_attention(model) if not isinstance(getattr(a, "q_norm", nn.Identity()), nn.Identity)
        ]
        if qk_norm and self.prune_attention and not self.prune_heads:
            raise ValueError(
                "The attention blocks use qk_norm (normalised per head dimension), so head dimensions cannot be "
                "pruned: pass prune_heads=True (whole heads) or prune_attention=False."
            )
        for name in self.ignored_layers:
            get_submodule(model, name)  # raises, naming the attribute
        prunable = []
        if self.prune_mlp:
            prunable += _mlp_input_layers(model)
        if self.prune_attention:
            prunable += _timm_style_attention(model)
        if self.prune_embed_dim:
            prunable += _residual_layers(model)
        if not prunable:
            raise ValueError(
                f"Nothing prunable in {type(model).__name__} with prune_embed_dim={self.prune_embed_dim}, "
                f"prune_attention={self.prune_attention}, prune_mlp={self.prune_mlp}: PruningSchedule prunes timm "
                "ViT/DeiT blocks (attn.qkv/proj, mlp.fc1/fc2) and nn.TransformerEncoderLayer MLPs."
            )

    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy_supported(trainer, type(self).__name__)
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.end_epoch >= max_epochs:
            raise ValueError(
                f"end_epoch={self.end_epoch} is past the last epoch of this fit (max_epochs={max_epochs} runs epochs "
                f"0..{max_epochs - 1}): pass end_epoch <= {max_epochs - 1} or raise max_epochs."
            )
        model = self.target(pl_module)
        self._check_prunable(model)
        self._example_input = self._example(model)
        replayed = self.replayed_records(trainer, "prune")
        self.steps_done = len(replayed)
        self._original_widths = None
        if replayed and "channel_ratio_final" not in replayed[-1]:
            raise RuntimeError(
                "PruningSchedule: the checkpoint being resumed holds a pruned model but no record of the pruning "
                "steps (its shapes were read from the weights), so the schedule cannot tell how far it got. Resume "
                "from a checkpoint saved with this package's records (a full ModelCheckpoint), or fine-tune the "
                "pruned model without PruningSchedule."
            )
        if replayed:
            self._channel_ratio = replayed[-1]["channel_ratio_final"]
            self._original_widths = replayed[-1]["original_widths"]
            self._original_params = replayed[-1]["original_params"]
        elif self._channel_ratio is None:
            self._channel_ratio = self._resolve_channel_ratio(model)
        self._reset_gradients()
        # steps due before any training (epoch 0 start) are free at setup, unless they need gradients
        if not self._needs_gradients and self.steps_done == 0 and self.start_epoch == 0:
            due = self._steps_due_at_start() if self.interval == "epoch" else int(self.num_steps == 1)
            if due:
                self._prune_to(trainer, pl_module, due)

    def _steps_due_at_start(self) -> int:
        units = self.end_epoch - self.start_epoch + 1
        return sum(1 for offset in self._step_offsets(units) if offset <= 0)

    def _resolve_channel_ratio(self, model: nn.Module) -> float:
        """Translate a params/MACs target into a channel ratio by bisection on a copy."""
        if self.target_metric == "channels":
            return self.pruning_ratio
        example = self._example_input
        measure = (lambda m: count_parameters(m)) if self.target_metric == "params" else (
            lambda m: count_macs(m, example) or 0
        )
        base = measure(model)
        low, high = 0.0, 0.99
        for _ in range(12):
            mid = (low + high) / 2
            trial = copy.deepcopy(model)
            self._prune_model(trial, mid, importance="l2")
            if 1.0 - measure(trial) / base < self.pruning_ratio:
                low = mid
            else:
                high = mid
        rank_zero_info(
            f"PruningSchedule: removing {self.pruning_ratio:.0%} of the {self.target_metric} needs a channel ratio "
            f"of {high:.3f}."
        )
        return high

    # ---------------------------------------------------------------- pruning
    def _prune_model(
        self, model: nn.Module, ratio: float, importance: Any = None, keep: Optional[dict[str, list[int]]] = None
    ) -> dict[str, Any]:
        assert self._example_input is not None
        return prune_vit(
            model,
            ratio,
            self._example_input,
            importance=self.importance if importance is None else importance,
            global_pruning=self.global_pruning,
            round_to=self.round_to,
            prune_embed_dim=self.prune_embed_dim,
            prune_attention=self.prune_attention,
            prune_heads=self.prune_heads,
            prune_mlp=self.prune_mlp,
            ignored_layers=[get_submodule(model, name) for name in self.ignored_layers],
            keep=keep,
        )

    def _prune_to(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int) -> None:
        """Prune from the ratio of step ``self.steps_done`` to that of ``step``, on a copy."""
        model = self.target(pl_module)
        previous = self.ratio_after_step(self.steps_done) if self.steps_done else 0.0
        reached = self.ratio_after_step(step)
        # the fraction of the *current* channels to remove; a hair less guards int() flooring
        relative = max(0.0, 1.0 - (1.0 - reached) / (1.0 - previous) - 1e-6)
        if relative <= 0.0:
            self.steps_done = step
            return
        if self._original_widths is None:
            self._original_widths = prunable_widths(model)
            self._original_params = count_parameters(model)
        keep = widths_after(self._original_widths, reached, self.prune_heads)
        params_before = count_parameters(model)
        # work on a copy so a failure leaves the model as it was; a LightningModule that is itself the
        # ViT cannot be copied (it references the trainer) and is pruned in place
        candidate = copy.deepcopy(model) if self.target_path else model
        gradient_kind = _gradient_kind(self.importance)
        if gradient_kind is not None:
            self._load_gradients(model, candidate)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + step)  # random importance: the same draw on every rank
                changes = self._prune_model(candidate, relative, keep=keep)
        except Exception as err:
            state = "was left as it was" if candidate is not model else "may be partly pruned"
            raise RuntimeError(
                f"PruningSchedule step {step}/{self.num_steps} (to channel ratio {reached:.3f}) failed; the model "
                f"{state}. Cause: {type(err).__name__}: {err}"
            ) from err
        for param in candidate.parameters():
            param.grad = None
        if candidate is not model:
            set_submodule(pl_module, self.target_path, candidate)
        self._reset_gradients()
        params = count_parameters(candidate)
        assert self._example_input is not None
        macs = count_macs(candidate, self._example_input)
        record_edit(
            pl_module,
            {
                "kind": "prune",
                "target": self.target_path or "",
                "step": step,
                "num_steps": self.num_steps,
                "channel_ratio": reached,
                "channel_ratio_final": self._channel_ratio,
                "original_widths": self._original_widths,
                "original_params": self._original_params,
                "params": params,
                "macs": macs,
                "modules": changes,
            },
        )
        self.steps_done = step
        self._last_metrics = {
            "prune/params": float(params),
            "prune/params_ratio": params / max(1, self._original_params),
            "prune/ratio": reached,
            "prune/step": float(step),
        }
        if macs is not None:
            self._last_metrics["prune/macs"] = float(macs)
        rank_zero_info(
            f"PruningSchedule step {step}/{self.num_steps}: channel ratio {reached:.3f}, "
            f"params {params_before:,} -> {params:,}" + (f", MACs/image {macs:,}" if macs is not None else "")
        )

    def _maybe_prune(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", position_in_epoch: int) -> None:
        due = self._steps_due(trainer, position_in_epoch)
        if due <= self.steps_done:
            return
        if self._needs_gradients and self._grad_batches < self.gradient_batches:
            self._gathering = True  # gather gradients of the next batches, then prune (checked at each batch start)
            return
        self._prune_to(trainer, pl_module, due)
        refresh_after_structural_change(trainer)

    def ordered_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.interval == "epoch" and not self._needs_gradients:
            self._maybe_prune(trainer, pl_module, 0)

    def ordered_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step" or self._needs_gradients:
            self._maybe_prune(trainer, pl_module, batch_idx if self.interval == "step" else 0)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        metrics = getattr(self, "_last_metrics", None)
        if metrics:
            for name, value in metrics.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
            self._last_metrics = {}

    # --------------------------------------------------------------- gradients
    def _reset_gradients(self) -> None:
        self._grad_sums = {}
        self._grad_batches = 0
        self._gathering = False

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._gathering:
            return
        square = _gradient_kind(self.importance) == "hessian"
        with torch.no_grad():
            for param in self.target(pl_module).parameters():
                if param.grad is None:
                    continue
                grad = param.grad.detach()
                grad = grad * grad if square else grad
                total = self._grad_sums.get(id(param))
                if total is not None and total.shape == grad.shape:
                    total += grad
                else:
                    self._grad_sums[id(param)] = grad.clone()
        self._grad_batches += 1

    def _load_gradients(self, model: nn.Module, candidate: nn.Module) -> None:
        """Put the mean accumulated gradient of each parameter of ``model`` on ``candidate``."""
        count = max(1, self._grad_batches)
        for param, copy_param in zip(model.parameters(), candidate.parameters()):
            total = self._grad_sums.get(id(param))
            copy_param.grad = None if total is None else total / count

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "channel_ratio": self._channel_ratio}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the replayed records are authoritative for the structure; this keeps the resolved ratio
        self._channel_ratio = state_dict.get("channel_ratio", self._channel_ratio)
