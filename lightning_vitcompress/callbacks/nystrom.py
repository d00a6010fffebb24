"""NystromSwap: Nyström attention swapped into a trained Vision Transformer, fine-tuned in the same fit.

See :mod:`lightning_vitcompress.functional.nystrom` for the approximation itself.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback, example_from_data
from lightning_vitcompress._checks import (
    check_example_input,
    check_int,
    config_or_options,
    example_input_error,
)
from lightning_vitcompress._model import (
    find_attention_blocks,
    set_submodule,
    shape_example_input,
)
from lightning_vitcompress._structure import recorded_edits
from lightning_vitcompress._training_state import refresh_after_structural_change
from lightning_vitcompress.functional.measure import eval_mode
from lightning_vitcompress.functional.nystrom import (
    AttentionMaskError,
    BlockSelection,
    NystromAttention,
    NystromConfig,
    check_block_selection,
    select_attention_blocks,
    swap_attention,
)

__all__ = ["NystromSwap"]



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
        example_input: one input batch of the ViT. At ``setup`` it runs through
            the model once to check that no chosen block gets an attention mask
            (Nyström attention cannot apply one), before anything is swapped.
            Models with a timm ``patch_embed`` need none; for others without it
            a masked block fails at its first forward and the swap is undone.
        model_attribute: attribute holding the ViT (None finds it).

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[NystromSwap(num_landmarks=64, swap_epoch=0)])
        trainer.fit(LitViT(), datamodule)
    """

    order = 30
    KIND = "nystrom"
    EDITS_STRUCTURE = True
    LOG_PREFIX = "nystrom"

    def __init__(
        self,
        num_landmarks: int = 64,
        swap_epoch: int = 0,
        blocks: BlockSelection = None,
        pinv_iterations: int = 6,
        conv_kernel_size: Optional[int] = None,
        num_prefix_tokens: Optional[int] = None,
        example_input: Optional[torch.Tensor] = None,
        config: Optional[NystromConfig] = None,
        model_attribute: Optional[str] = None,
    ) -> None:
        super().__init__(model_attribute)
        options = dict(num_landmarks=num_landmarks, pinv_iterations=pinv_iterations,
                       conv_kernel_size=conv_kernel_size, num_prefix_tokens=num_prefix_tokens)
        #: how attention is approximated (validated once); ``config=`` or the same keyword arguments
        self.config = config_or_options(config, NystromConfig, options, "NystromSwap")
        check_int(swap_epoch, "swap_epoch", example="0 (swaps at setup, before training)")
        self.blocks = check_block_selection(blocks)
        check_example_input(example_input)
        self.swap_epoch = swap_epoch
        self.example_input = example_input
        self.swapped_blocks: list[str] = []
        #: the attention modules this fit's swap replaced, to undo it (see :meth:`on_exception`)
        self._originals: dict[str, nn.Module] = {}

    def resume_config(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.config), "swap_epoch": self.swap_epoch, "blocks": self.blocks}

    @override
    def state_dict(self) -> dict[str, Any]:
        # lets a resumed fit refuse changed arguments also when the checkpoint predates the swap
        return {"config": self.resume_config()}

    def _selected_blocks(self, model: nn.Module) -> list[str]:
        return select_attention_blocks(model, self.blocks, owner="NystromSwap")

    def _check_no_masks(self, model: nn.Module, names: list[str], trainer: "pl.Trainer") -> None:
        """Run one example through ``model`` and refuse blocks that get a mask or other keys than queries."""
        example = self.example_input[:1] if self.example_input is not None else shape_example_input(model)
        if example is None:
            example = example_from_data(trainer)
        if example is None:
            return  # no input known: a masked call fails at the first forward and on_exception undoes the swap
        found: dict[str, str] = {}

        def spy(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                try:
                    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
                except TypeError:
                    return
                query = next(iter(bound.values()), None)
                passed = [key for key in ("attn_mask", "key_padding_mask", "mask") if bound.get(key) is not None]
                passed += ["is_causal=True"] if bound.get("is_causal") else []
                passed += [key for key in ("key", "value") if bound.get(key) is not None and bound[key] is not query]
                if passed:
                    found.setdefault(name, ", ".join(passed))

            return hook

        modules = dict(find_attention_blocks(model))
        handles = [
            modules[name].register_forward_pre_hook(spy(name), with_kwargs=True)
            for name in names
            if not isinstance(modules[name], NystromAttention)
        ]
        try:
            # eval mode with gradients on: nn.TransformerEncoderLayer's fused path would skip self_attn otherwise
            with eval_mode(model), torch.enable_grad():
                model(example.to(next(model.parameters()).device))
        except Exception as err:
            if self.example_input is None:
                return  # the model does not take this shape: nothing to learn from it
            raise example_input_error(self.example_input, model, err) from err
        finally:
            for handle in handles:
                handle.remove()
        if found:
            details = "; ".join(f"{name} gets {what}" for name, what in found.items())
            keep = [name for name in names if name not in found]
            advice = f"keep them exact: pass blocks={keep!r}" if keep else "no chosen block can be swapped"
            raise ValueError(
                f"NystromSwap(blocks={self.blocks!r}): {details}. Nyström attention is self-attention without masks "
                f"(landmarks average over all tokens), so {advice}."
            )

    # ------------------------------------------------------------------ hooks
    def scheduled_epochs(self) -> dict[str, int]:
        return {"swap_epoch": self.swap_epoch} if self.swap_epoch > 0 else {}  # 0 swaps at setup

    def ordered_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.swapped_blocks = []
        self._originals = {}
        model = self.target(pl_module)
        chosen = self._selected_blocks(model)  # fail fast, also when the swap is epochs away
        if not chosen:
            raise ValueError("NystromSwap found no attention blocks to swap.")
        # swapped already: replayed from the checkpoint, or by an earlier fit of this module
        done = [
            r for r in recorded_edits(pl_module) if r.get("kind") == self.KIND and r.get("target") == self.target_path
        ]
        if done:
            self.check_same_config(done[-1].get("config"), "the swap an earlier fit applied to this model")
            self.swapped_blocks = [name for record in done for name in record["blocks"]]
            return
        self._check_no_masks(model, chosen, trainer)
        if self.swap_epoch == 0 and not self.resumed(trainer):
            self._swap(pl_module, chosen)
        # resuming a checkpoint from before the swap: its weights load after setup, the swap follows at epoch start

    def ordered_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.swapped_blocks and trainer.current_epoch >= self.swap_epoch:
            model = self.target(pl_module)
            self._swap(pl_module, self._selected_blocks(model))
            refresh_after_structural_change(trainer)
        if self.swapped_blocks:
            model = self.target(pl_module)
            swapped = [m for _, m in find_attention_blocks(model) if isinstance(m, NystromAttention)]
            landmarks = sum(m.num_landmarks for m in swapped) / max(1, len(swapped))
            self.log_metrics(trainer, {"num_landmarks": landmarks, "swapped_blocks": len(swapped)})  # what it has

    @override
    def on_exception(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException
    ) -> None:
        """A swapped block called with a mask (unseen at setup): put this fit's swap back, so the model works."""
        if not isinstance(exception, AttentionMaskError) or not self._originals:
            return
        model = self.target(pl_module)
        for name, original in self._originals.items():
            set_submodule(model, name, original)
        edits = recorded_edits(pl_module)
        edits[:] = [r for r in edits if not (r.get("kind") == self.KIND and r.get("target") == self.target_path)]
        exception.add_note(
            f"NystromSwap undid its swap of {list(self._originals)}: the model has its softmax attention back. "
            "Pass example_input=<one input batch> to have such blocks refused at setup, or keep them exact with "
            "blocks=[...]."
        )
        self._originals, self.swapped_blocks = {}, []

    # ------------------------------------------------------------------- swap
    def _swap(self, pl_module: "pl.LightningModule", names: list[str]) -> None:
        model = self.target(pl_module)
        originals: dict[str, nn.Module] = {}
        try:
            originals = swap_attention(model, self.config, blocks=names)  # all or nothing
            if originals:
                self.record(
                    pl_module,
                    blocks=list(originals),
                    num_landmarks=self.config.num_landmarks,
                    num_prefix_tokens=self.config.prefix_tokens(model),
                    pinv_iterations=self.config.pinv_iterations,
                    conv_kernel_size=self.config.conv_kernel_size,
                    config=self.resume_config(),
                )
        except Exception as err:
            for name, module in originals.items():
                set_submodule(model, name, module)
            raise RuntimeError(
                f"NystromSwap could not swap {names}; the model keeps its softmax attention. "
                f"Cause: {type(err).__name__}: {err}"
            ) from err
        self._originals = originals
        self.swapped_blocks = list(names)
        if originals:
            rank_zero_info(
                f"NystromSwap: {len(originals)} attention blocks now use {self.config.num_landmarks} landmarks "
                f"({self.config.prefix_tokens(model)} prefix tokens kept exact)."
            )
