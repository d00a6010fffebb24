"""NystromSwap: Nyström attention swapped into a trained Vision Transformer, fine-tuned in the same fit.

See :mod:`lightning_vitcompress.functional.nystrom` for the approximation itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._model import find_attention_blocks, get_submodule, set_submodule
from lightning_vitcompress._structure import record_edit
from lightning_vitcompress._training_state import check_strategy_supported, refresh_after_structural_change
from lightning_vitcompress.functional.nystrom import NystromAttention, _check_landmarks, _check_options, swap_problem

__all__ = ["NystromSwap"]

BlockSelection = Optional[Sequence[Union[int, str]]]


class NystromSwap(CompressionCallback):
    """Swap softmax attention for Nyström attention (m landmarks), then keep training.

    Reuses every trained weight (q/k/v, projection, norms, head layout). With
    ``swap_epoch=0`` the swap happens at ``setup`` (before the optimizer exists);
    with ``swap_epoch=k`` at the start of epoch ``k``, after which the optimizer,
    LR scheduler and DDP wrapper are rebuilt around the parameters. Checkpoints
    record the swap: resume and :func:`~lightning_vitcompress.load_compressed`
    rebuild the Nyström modules before the weights load.

    Args:
        num_landmarks: ``m``. Speed-up needs many tokens (>= ~1000 on CPU); at
            197 tokens Nyström is slower than exact attention.
        swap_epoch: the epoch at whose start to swap; 0 swaps at ``setup``.
        blocks: which attention blocks to swap: indices into the model's
            attention blocks (``[0, 1]``, negative from the end) or their
            qualified names (``["blocks.0.attn"]``); None swaps all.
        pinv_iterations: iterations of the iterative pseudo-inverse.
        conv_kernel_size: odd kernel of the optional depthwise convolution
            residual on V (new parameters, zero-initialized), or None.
        num_prefix_tokens: tokens kept exact in front of the patches; None
            reads the model's ``num_prefix_tokens`` (timm), else 0.
        model_attribute: attribute holding the ViT (None finds it).

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[NystromSwap(num_landmarks=64, swap_epoch=0)])
        trainer.fit(LitViT(), datamodule)
    """

    order = 30
    KIND = "nystrom"

    def __init__(
        self,
        num_landmarks: int = 64,
        swap_epoch: int = 0,
        blocks: BlockSelection = None,
        pinv_iterations: int = 6,
        conv_kernel_size: Optional[int] = None,
        num_prefix_tokens: Optional[int] = None,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        _check_landmarks(num_landmarks)
        _check_options(pinv_iterations, conv_kernel_size, num_prefix_tokens)
        if isinstance(swap_epoch, bool) or not isinstance(swap_epoch, int) or swap_epoch < 0:
            raise ValueError(
                f"swap_epoch={swap_epoch!r}: pass an epoch index >= 0 (0 swaps at setup, before training)."
            )
        if blocks is not None and (
            isinstance(blocks, (str, int)) or not all(isinstance(b, (int, str)) for b in blocks) or not blocks
        ):
            raise ValueError(
                f"blocks={blocks!r}: pass a non-empty list of attention-block indices or names "
                "(e.g. [0, 1] or ['blocks.0.attn']), or None for all."
            )
        self.num_landmarks = num_landmarks
        self.swap_epoch = swap_epoch
        self.blocks = list(blocks) if blocks is not None else None
        self.pinv_iterations = pinv_iterations
        self.conv_kernel_size = conv_kernel_size
        self.num_prefix_tokens = num_prefix_tokens
        self.swapped_blocks: list[str] = []

    # ------------------------------------------------------------- selection
    def _selected_blocks(self, model: nn.Module) -> list[str]:
        """Qualified names (relative to the ViT) of the blocks to swap; raises naming the problem."""
        found = find_attention_blocks(model)
        names = [name for name, _ in found]
        if self.blocks is None:
            chosen = names
        else:
            chosen = []
            for block in self.blocks:
                if isinstance(block, int):
                    if not -len(names) <= block < len(names):
                        raise ValueError(
                            f"blocks={self.blocks!r}: index {block} is out of range; the model has "
                            f"{len(names)} attention blocks (indices 0..{len(names) - 1}): {names}."
                        )
                    chosen.append(names[block])
                elif block not in names:
                    raise ValueError(f"blocks={self.blocks!r}: {block!r} is not an attention block; choose from {names}.")
                else:
                    chosen.append(block)
            chosen = list(dict.fromkeys(chosen))
        modules = dict(found)
        pending = [name for name in chosen if not isinstance(modules[name], NystromAttention)]
        problems = {name: swap_problem(modules[name]) for name in pending}
        problems = {name: why for name, why in problems.items() if why}
        if problems:
            details = "; ".join(f"{name}: {why}" for name, why in problems.items())
            raise ValueError(f"NystromSwap(blocks={self.blocks!r}) cannot swap these attention blocks: {details}")
        return chosen

    def _prefix_tokens(self, model: nn.Module) -> int:
        if self.num_prefix_tokens is not None:
            return self.num_prefix_tokens
        return int(getattr(model, "num_prefix_tokens", 0) or 0)

    # ------------------------------------------------------------------ hooks
    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self.swapped_blocks = []
        check_strategy_supported(trainer, type(self).__name__)
        max_epochs = trainer.max_epochs
        if self.swap_epoch > 0 and max_epochs is not None and max_epochs >= 0 and self.swap_epoch >= max_epochs:
            raise ValueError(
                f"NystromSwap(swap_epoch={self.swap_epoch}) would never swap: Trainer(max_epochs={max_epochs}) "
                f"runs epochs 0..{max_epochs - 1}. Use swap_epoch < max_epochs (0 swaps at setup)."
            )
        model = self.target(pl_module)
        chosen = self._selected_blocks(model)  # fail fast, also when the swap is epochs away
        if not chosen:
            raise ValueError("NystromSwap found no attention blocks to swap.")
        replayed = self.replayed_records(trainer, self.KIND)
        if replayed:  # resumed after the swap: the checkpoint's structure was rebuilt already
            self.swapped_blocks = list(replayed[-1]["blocks"])
            return
        if self.swap_epoch == 0:
            self._swap(pl_module, chosen)

    def ordered_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.swapped_blocks and trainer.current_epoch >= self.swap_epoch:
            model = self.target(pl_module)
            self._swap(pl_module, self._selected_blocks(model))
            refresh_after_structural_change(trainer)
        if self.swapped_blocks:
            # identical on every rank; sync_dist only keeps Lightning's distributed logging checks quiet
            log = dict(on_step=False, on_epoch=True, sync_dist=True)
            pl_module.log("nystrom/num_landmarks", float(self.num_landmarks), **log)
            pl_module.log("nystrom/swapped_blocks", float(len(self.swapped_blocks)), **log)

    # ------------------------------------------------------------------- swap
    def _swap(self, pl_module: "pl.LightningModule", names: list[str]) -> None:
        model = self.target(pl_module)
        prefix = self._prefix_tokens(model)
        # build every replacement first: a failure leaves the model untouched
        replacements = {}
        for name in names:
            module = get_submodule(model, name)
            if isinstance(module, NystromAttention):
                continue
            replacements[name] = NystromAttention.from_attention(
                module,
                num_landmarks=self.num_landmarks,
                num_prefix_tokens=prefix,
                pinv_iterations=self.pinv_iterations,
                conv_kernel_size=self.conv_kernel_size,
            )
        for name, module in replacements.items():
            set_submodule(model, name, module)
        self.swapped_blocks = list(names)
        if not replacements:  # already Nystrom (e.g. a second fit of the same module): nothing to record
            return
        record_edit(
            pl_module,
            {
                "kind": self.KIND,
                "target": self.target_path,
                "blocks": list(replacements),
                "num_landmarks": self.num_landmarks,
                "num_prefix_tokens": prefix,
                "pinv_iterations": self.pinv_iterations,
                "conv_kernel_size": self.conv_kernel_size,
            },
        )
        rank_zero_info(
            f"NystromSwap: {len(replacements)} attention blocks now use {self.num_landmarks} landmarks "
            f"({prefix} prefix tokens kept exact)."
        )
