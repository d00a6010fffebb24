"""NystromSwap: Nyström attention swapped into a trained Vision Transformer, fine-tuned in the same fit.

See :mod:`lightning_vitcompress.functional.nystrom` for the approximation itself. The recipe, in the hooks:
``setup`` checks the chosen blocks (no masks, enough tokens) and swaps at ``swap_epoch=0``, else the swap comes
at the start of ``swap_epoch``; with a budget, ``on_train_end`` swaps blocks back until the model is within it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback, example_from_data, progress_line, validation_data
from lightning_vitcompress._checks import check_block_selection, check_example_input, check_int, check_max_accuracy_drop
from lightning_vitcompress._model import find_attention_blocks, set_submodule, shape_example_input
from lightning_vitcompress._options import passed_config, takes_config
from lightning_vitcompress._plan import PlanRow, budget_phrase, epochs_phrase
from lightning_vitcompress._structure import edits_of, recorded_edits
from lightning_vitcompress._training_state import refresh_after_structural_change
from lightning_vitcompress.callbacks._budget import judge
from lightning_vitcompress.callbacks._nystrom_setup import (
    check_min_tokens,
    check_no_masks,
    check_prefix_tokens,
    measure_break_even,
    skip_short_blocks,
    token_counts,
)
from lightning_vitcompress.functional.budget import limit_batches
from lightning_vitcompress.functional.nystrom import (
    AttentionMaskError,
    BlockSelection,
    NystromAttention,
    NystromConfig,
    select_attention_blocks,
    swap_attention,
    swap_back,
    swap_back_gains,
)

__all__ = ["NystromSwap"]


@takes_config(
    NystromConfig,
    positional=(
        "num_landmarks",
        "swap_epoch",
        "blocks",
        "pinv_iterations",
        "conv_kernel_size",
        "num_prefix_tokens",
        "example_input",
        "min_tokens",
        "max_accuracy_drop",
    ),
)
class NystromSwap(CompressionCallback):
    """Swap softmax attention for Nyström attention (m landmarks), then keep training.

    Reuses every trained weight (q/k/v, projection, norms, head layout). With
    ``swap_epoch=0`` the swap happens at ``setup`` (before the optimizer exists);
    with ``swap_epoch=k`` at the start of epoch ``k``, after which the optimizer,
    LR scheduler and DDP wrapper are rebuilt around the parameters. Checkpoints
    record the swap: resume and :func:`~lightning_vitcompress.load_compressed`
    rebuild the Nyström modules before the weights load.

    Args:
        swap_epoch: the epoch at whose start to swap; 0 swaps at ``setup``.
        blocks: which attention blocks to swap: indices into the model's
            attention blocks (``[0, 1]``, negative from the end) or their
            qualified names (``["blocks.0.attn"]``); None swaps all.
        example_input: one input batch of the ViT. At ``setup`` it runs through
            the model once to check that no chosen block gets an attention mask
            (Nyström attention cannot apply one), before anything is swapped.
            Models with a timm ``patch_embed`` need none; for others without it
            a masked block fails at its first forward and the swap is undone.
        min_tokens: swap only the selected blocks whose input holds at least this
            many tokens (prefix tokens included). With token merging later blocks
            see fewer tokens; without it every block sees the same count. ``"auto"``
            times the exact and the Nyström module of the model's width at its
            token counts on this machine (rank zero) and uses the measured
            break-even (logged as ``nystrom/break_even_tokens``). Skipped blocks
            and why are in the record and :attr:`skipped_blocks`. None: all.
        max_accuracy_drop: points of validation top-1 the model may lose against
            the model as it entered fit (``1.0``: one point; needs validation data).
            When training ends, a model beyond it gets its Nyström blocks swapped
            back to exact attention (the fine-tuned weights kept), the most costly
            first (each block's cost measured on the validation data), until it is
            within budget. The record keeps only the blocks that stayed Nyström,
            so resume and ``load_compressed`` rebuild exactly those. None: no budget.
        config: a :class:`~lightning_vitcompress.functional.NystromConfig` instead of its options
            (passing both is an error).
        model_attribute: attribute holding the ViT (None finds it).

    Example (a tiny ViT on scikit-learn's digits)::

        >>> import lightning as L
        >>> from lightning_vitcompress import NystromSwap
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[NystromSwap(num_landmarks=8, swap_epoch=0)])
        >>> trainer.fit(model, DigitsDataModule())
        >>> type(model.model.blocks[0].attn).__name__
        'NystromAttention'
        >>> # only where the sequence is long enough to pay on this machine, and at most 1 point of top-1 lost
        >>> NystromSwap(num_landmarks=64, min_tokens="auto", max_accuracy_drop=1.0).min_tokens
        'auto'
    """

    order = 30
    KIND = "nystrom"
    EDITS_STRUCTURE = True
    LOG_PREFIX = "nystrom"

    def __init__(
        self,
        *args: Any,
        swap_epoch: int = 0,
        blocks: BlockSelection = None,
        example_input: Optional[torch.Tensor] = None,
        min_tokens: Union[int, Literal["auto"], None] = None,
        max_accuracy_drop: Optional[float] = None,
        config: Optional[NystromConfig] = None,
        model_attribute: Optional[str] = None,
        **options: Any,
    ) -> None:
        super().__init__(model_attribute)
        check_min_tokens(min_tokens)
        check_max_accuracy_drop(max_accuracy_drop)
        self.min_tokens = min_tokens
        self.max_accuracy_drop = max_accuracy_drop
        #: blocks ``min_tokens`` left exact: ``{name: why}``
        self.skipped_blocks: dict[str, str] = {}
        #: ``min_tokens="auto"``: what was timed (``{"speedups": {tokens: ratio}, "break_even": tokens or None}``)
        self.break_even: Optional[dict[str, Any]] = None
        #: blocks the budget swapped back to exact attention, most costly first, with what was measured
        self.swapped_back: list[dict[str, Any]] = []
        #: the budget's verdict at the end of the last fit (accuracy before / after swapping back)
        self.budget_result: Optional[dict[str, Any]] = None
        self._selection: Optional[list[str]] = None
        self._swap_done = False
        #: how attention is approximated (validated once); ``config=`` or the same keyword arguments
        self.config = passed_config(config, args, options)
        check_int(swap_epoch, "swap_epoch", example="0 (swaps at setup, before training)")
        self.blocks = check_block_selection(blocks)
        check_example_input(example_input)
        self.swap_epoch = swap_epoch
        self.example_input = example_input
        self.swapped_blocks: list[str] = []
        #: the attention modules this fit's swap replaced, to undo it (see :meth:`on_exception`)
        self._originals: dict[str, nn.Module] = {}

    # ----------------------------------------------------- hooks, in the order Lightning calls them
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.swapped_blocks = []
        self._originals = {}
        self._selection, self._swap_done, self.budget_result = None, False, None
        self.swapped_back, self.skipped_blocks, self.break_even = [], {}, None
        model = self.target(pl_module)
        chosen = self._selected_blocks(model)  # fail fast, also when the swap is epochs away
        if not chosen:
            raise ValueError("NystromSwap found no attention blocks to swap.")
        # swapped already: replayed from the checkpoint, or by an earlier fit of this module
        done = edits_of(pl_module, self.KIND, self.target_path)
        if done:
            self.check_same_config(done[-1].get("config"), "the swap an earlier fit applied to this model")
            self.swapped_blocks = [name for record in done for name in record["blocks"]]
            self.skipped_blocks = {k: v for record in done for k, v in (record.get("skipped") or {}).items()}
            self._swap_done = True
            return
        check_no_masks(model, chosen, self._example(trainer, model), self.example_input, self.blocks)
        chosen = self._long_enough(trainer, pl_module, model, chosen)
        self._selection = chosen
        if self.swap_epoch == 0 and not self.resumed(trainer):
            self._swap(pl_module, chosen)
        # resuming a checkpoint from before the swap: its weights load after setup, the swap follows at epoch start

    def ordered_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._swap_done and trainer.current_epoch >= self.swap_epoch:
            model = self.target(pl_module)
            self._swap(pl_module, self._selection if self._selection is not None else self._selected_blocks(model))
            refresh_after_structural_change(trainer)
        if self.swapped_blocks:
            model = self.target(pl_module)
            swapped = [m for _, m in find_attention_blocks(model) if isinstance(m, NystromAttention)]
            landmarks = sum(m.num_landmarks for m in swapped) / max(1, len(swapped))
            self.log_metrics(trainer, {"num_landmarks": landmarks, "swapped_blocks": len(swapped)})  # what it has

    def ordered_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With a budget: swap blocks back to exact attention, most costly first, until the model is within it."""
        metrics: dict[str, Optional[float]] = {}
        if self.break_even is not None:
            metrics["break_even_tokens"] = self.break_even["break_even"]
            metrics.update({f"auto/{t}_tokens/speedup": r for t, r in self.break_even["speedups"].items()})
        if self.skipped_blocks:
            metrics["skipped_blocks"] = len(self.skipped_blocks)
        model = self.target(pl_module)
        nystrom = [
            name
            for name, m in find_attention_blocks(model)
            if isinstance(m, NystromAttention) and name in self.swapped_blocks
        ]
        if self.budget is not None and nystrom:
            metrics.update(self._keep_within_budget(trainer, pl_module, nystrom))
        if metrics:  # nothing decided at the end: no empty row in the loggers
            self.log_metrics(trainer, metrics)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A swapped block called with a mask (unseen at setup): put this fit's swap back, so the model works."""
        if not isinstance(exception, AttentionMaskError) or not self._originals:
            return
        model = self.target(pl_module)
        for name, original in self._originals.items():
            set_submodule(model, name, original)
        edits = recorded_edits(pl_module)
        edits[:] = [r for r in edits if not (r.get("kind") == self.KIND and r.get("target") == self.target_path)]
        note = (
            f"NystromSwap undid its swap of {list(self._originals)}: the model has its softmax attention back. "
            "Pass example_input=<one input batch> to have such blocks refused at setup, or keep them exact with "
            "blocks=[...]."
        )
        if sys.version_info >= (3, 11):
            exception.add_note(note)
        else:  # Python 3.10 has no exception notes (add_note raised AttributeError here)
            rank_zero_warn(note)
        self._originals, self.swapped_blocks = {}, []

    @override
    def state_dict(self) -> dict[str, Any]:
        # lets a resumed fit refuse changed arguments also when the checkpoint predates the swap;
        # the budget's reference and decisions come back with a resume (the records say which blocks are Nyström)
        return {
            "config": self.resume_config(),
            **({"budget_reference": self.budget_reference} if self.max_accuracy_drop is not None else {}),
            "swapped_back": [dict(entry) for entry in self.swapped_back],
            "skipped_blocks": dict(self.skipped_blocks),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.swapped_back = [dict(entry) for entry in state_dict.get("swapped_back", [])]
        self.skipped_blocks = dict(state_dict.get("skipped_blocks", {}))

    # ----------------------------------------------------------------------- what the pipeline asks
    def resume_config(self) -> dict[str, Any]:
        config = {**dataclasses.asdict(self.config), "swap_epoch": self.swap_epoch, "blocks": self.blocks}
        if self.min_tokens is not None:  # absent otherwise: checkpoints from before min_tokens still compare equal
            config["min_tokens"] = self.min_tokens
        return config

    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        blocks = "all blocks" if self.blocks is None else f"blocks {list(self.blocks)}"
        tokens = f", only where >= {self.min_tokens} tokens" if self.min_tokens is not None else ""
        return [
            PlanRow(
                "NystromSwap",
                f"Nyström attention, m={self.config.num_landmarks} landmarks, {blocks}{tokens}",
                epochs_phrase(self.swap_epoch, self.swap_epoch),
                "then fine-tunes" + budget_phrase(self),
            )
        ]

    def scheduled_epochs(self) -> dict[str, int]:
        return {"swap_epoch": self.swap_epoch} if self.swap_epoch > 0 else {}  # 0 swaps at setup

    def train_end_action(self) -> Optional[tuple[str, str]]:
        if self.max_accuracy_drop is None:
            return None
        return (
            f"NystromSwap(max_accuracy_drop={self.max_accuracy_drop!r}) swaps blocks back to exact attention "
            "until the model is within budget",
            "or pass max_accuracy_drop=None",
        )

    def decisions(self) -> Optional[dict[str, Any]]:
        if self.max_accuracy_drop is None and self.min_tokens is None:
            return None
        decided: dict[str, Any] = {
            "max_accuracy_drop": self.max_accuracy_drop,
            "reference_accuracy": self.budget_reference,
            "nystrom_blocks": list(self.swapped_blocks),
            "swapped_back": [dict(entry) for entry in self.swapped_back],
            "skipped_blocks": dict(self.skipped_blocks),
        }
        if self.break_even is not None:
            decided["break_even_tokens"] = self.break_even["break_even"]
        return decided

    # -------------------------------------------------------------------------------------- helpers
    def _selected_blocks(self, model: nn.Module) -> list[str]:
        return select_attention_blocks(model, self.blocks, owner="NystromSwap")

    def _swap(self, pl_module: pl.LightningModule, names: list[str]) -> None:
        model = self.target(pl_module)
        originals: dict[str, nn.Module] = {}
        self._swap_done = True
        try:
            originals = swap_attention(model, self.config, blocks=names) if names else {}  # all or nothing
            if originals or self.skipped_blocks:  # a decision to keep: also "no block is long enough"
                self.record(
                    pl_module,
                    blocks=list(originals),
                    num_landmarks=self.config.num_landmarks,
                    num_prefix_tokens=self.config.prefix_tokens(model),
                    pinv_iterations=self.config.pinv_iterations,
                    conv_kernel_size=self.config.conv_kernel_size,
                    config=self.resume_config(),
                    skipped=dict(self.skipped_blocks),
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

    def _long_enough(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module, names: list[str]
    ) -> list[str]:
        """Refuse blocks of only prefix tokens; keep those of ``names`` with at least ``min_tokens`` tokens, the
        others go to :attr:`skipped_blocks` with the reason. ``"auto"`` measures the threshold first (rank zero)."""
        if self.min_tokens is None and self.config.prefix_tokens(model) == 0:
            return names
        example = self._example(trainer, model)
        try:
            counts = token_counts(trainer, pl_module, model, example, self.target_path, self.min_tokens)
        except ValueError:  # no input size known: the prefix check waits for the first forward, min_tokens cannot
            if self.min_tokens is not None:
                raise
            return names
        check_prefix_tokens(self.config, model, counts, names)
        if self.min_tokens is None:
            return names
        if self.min_tokens == "auto":
            self.break_even = measure_break_even(trainer, model, self.config, names, counts)
        keep, self.skipped_blocks = skip_short_blocks(names, counts, self.min_tokens, self.break_even)
        if self.skipped_blocks:
            rank_zero_info(
                f"NystromSwap: {len(self.skipped_blocks)} of {len(names)} blocks stay exact (too few tokens to pay): "
                + "; ".join(f"{name} {why}" for name, why in self.skipped_blocks.items())
            )
        return keep

    def _example(self, trainer: pl.Trainer, model: nn.Module) -> Optional[torch.Tensor]:
        """One input row: the user's ``example_input``, the model's stated input size, or the Trainer's data."""
        example = self.example_input[:1] if self.example_input is not None else shape_example_input(model)
        return example if example is not None else example_from_data(trainer)

    def _keep_within_budget(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, nystrom: list[str]
    ) -> dict[str, Optional[float]]:
        """Judge the model; beyond budget, swap ``nystrom`` blocks back (most costly first) until within."""
        budget = self.budget
        assert budget is not None
        label = f"NystromSwap(max_accuracy_drop={self.max_accuracy_drop!r})"
        model = self.target(pl_module)
        verdict = judge(trainer, budget, model)
        self.budget_result = {"accuracy_before": verdict.accuracy, "accuracy": verdict.accuracy}
        if verdict.within:
            rank_zero_info(f"{label}: all {len(nystrom)} Nyström blocks kept, within budget: {verdict.describe()}.")
        else:
            progress_line(
                trainer,
                f"{label}: beyond budget ({verdict.describe()}); measuring what swapping "
                f"each of {len(nystrom)} blocks back to exact attention gains",
            )
            gains: Optional[dict[str, dict[str, float]]] = None
            if trainer.is_global_zero:
                loader, limit = validation_data(trainer)
                assert loader is not None  # checked at setup
                gains = swap_back_gains(model, nystrom, limit_batches(loader, limit))
            gains = trainer.strategy.broadcast(gains, src=0)
            assert gains is not None
            order = sorted(nystrom, key=lambda n: (-gains[n]["accuracy_gain"], -gains[n]["logit_change"]))
            for name in order:
                swap_back(model, [name])
                self._originals.pop(name, None)
                verdict = judge(trainer, budget, model)
                self.swapped_back.append(
                    {"block": name, **gains[name], "accuracy_after": verdict.accuracy, "reference": budget.reference}
                )
                if verdict.within:
                    break
            self.budget_result["accuracy"] = verdict.accuracy
            undone = [entry["block"] for entry in self.swapped_back]
            self._forget(pl_module, undone)
            kept = [name for name in self.swapped_blocks if name not in undone]
            self.swapped_blocks = kept
            message = (
                f"{label}: swapped {len(undone)} of {len(nystrom)} blocks back to exact attention, most "
                f"costly first ({undone}); {len(kept)} stay Nyström; {verdict.describe()}."
            )
            if verdict.within:
                rank_zero_info(message)
            else:
                rank_zero_warn(
                    message + " Even exact attention everywhere is beyond the budget: the fine-tuning "
                    "after the swap cost the accuracy, not the approximation."
                )
        metrics: dict[str, Optional[float]] = {
            **verdict.metrics(),
            "swapped_back": len(self.swapped_back),
            "swapped_blocks": len(self.swapped_blocks),
        }
        for entry in self.swapped_back:
            metrics[f"swap_back/{entry['block']}/accuracy_gain"] = entry["accuracy_gain"]
        return metrics

    def _forget(self, pl_module: pl.LightningModule, names: list[str]) -> None:
        """Drop ``names`` from this target's records (new dicts: copies held elsewhere stay as they were), so that
        resume and ``load_compressed`` rebuild only the blocks that stayed Nyström."""
        edits = recorded_edits(pl_module)
        for index, record in enumerate(edits):
            if record.get("kind") == self.KIND and record.get("target") == self.target_path:
                reason = "swapped back to exact attention for the accuracy budget"
                edits[index] = {
                    **record,
                    "blocks": [name for name in record["blocks"] if name not in names],
                    "swapped_back": {
                        **record.get("swapped_back", {}),
                        **{n: reason for n in names if n in record["blocks"]},
                    },
                }
