"""TokenMerging: ToMe's token merging in a Vision Transformer, trained through in the same fit.

See :mod:`lightning_vitcompress.functional.token_merging` for the matching, the
merge and how each model family is run.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_vitcompress._base import CompressionCallback
from lightning_vitcompress._checks import check_example_input, check_int
from lightning_vitcompress._options import passed_config, takes_config
from lightning_vitcompress._plan import PlanRow, epochs_phrase
from lightning_vitcompress._structure import edits_of
from lightning_vitcompress.functional.token_merging import (
    TokenMergingConfig,
    apply_merge_plan,
    merged_token_counts,
    plan_token_merging,
)

__all__ = ["TokenMerging"]


@takes_config(
    TokenMergingConfig, positional=("r", "start_epoch", "blocks", "proportional_attention", "schedule", "example_input")
)
class TokenMerging(CompressionCallback):
    """Merge ``r`` tokens in each block (bipartite soft matching), then keep training the merged model.

    No weight changes: the checkpoint records the merge settings, and resume and
    :func:`~lightning_vitcompress.load_compressed` rebuild the merging from them.
    A resumed fit from a checkpoint without records (``save_weights_only=True``)
    merges again from this callback's own arguments; ``load_compressed`` of such
    a file gives the unmerged model (call
    :func:`~lightning_vitcompress.functional.merge_tokens` on it). The optimizer
    needs no rebuild when merging starts mid-fit: the parameters stay the same.

    Args:
        start_epoch: the epoch at whose start merging begins; 0 merges at ``setup``.
        example_input: one input batch, for models that do not state their input
            size (the token count checks ``r`` at ``setup``).
        config: a :class:`~lightning_vitcompress.functional.TokenMergingConfig` instead of its options
            (passing both is an error).
        model_attribute: attribute holding the ViT (None finds it).

    Logs ``tome/r`` (mean over the selected blocks) and ``tome/tokens_out``
    (tokens after the last block) at each epoch start once merging.

    Example (a tiny ViT on scikit-learn's digits)::

        >>> import lightning as L
        >>> from lightning_vitcompress import TokenMerging
        >>> from lightning_vitcompress.digits import DigitsClassifier, DigitsDataModule
        >>> model = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[merging := TokenMerging(r=4, start_epoch=0)])
        >>> trainer.fit(model, DigitsDataModule())
        >>> merging.plan["tokens_in"], merging.plan["tokens"]  # tokens leaving each block: 4 fewer per block
        (65, [61, 57])
    """

    order = 35
    KIND = "tome"
    EDITS_STRUCTURE = True
    LOG_PREFIX = "tome"

    def __init__(
        self,
        *args: Any,
        start_epoch: int = 0,
        example_input: Optional[torch.Tensor] = None,
        config: Optional[TokenMergingConfig] = None,
        model_attribute: Optional[str] = None,
        **options: Any,
    ) -> None:
        super().__init__(model_attribute)
        #: how many tokens merge where (validated once); ``config=`` or the same keyword arguments
        self.config = passed_config(config, args, options)
        check_int(start_epoch, "start_epoch", example="0 (merges at setup, before training)")
        check_example_input(example_input)
        self.start_epoch = start_epoch
        self.example_input = example_input
        #: the plan in force (what the record holds), once merging
        self.plan: Optional[dict[str, Any]] = None

    # ----------------------------------------------------- hooks, in the order Lightning calls them
    def ordered_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.plan = None
        done = edits_of(pl_module, self.KIND, self.target_path)
        if done:  # replayed from the checkpoint, or merged by an earlier fit of this module
            self.check_same_config(done[-1].get("config"), "the merging an earlier fit applied to this model")
            self.plan = done[-1]
            return
        plan = plan_token_merging(self.target(pl_module), self.config, self.example_input)  # fail fast
        if self.start_epoch == 0:
            self._merge(pl_module, plan)

    def ordered_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan is None and trainer.current_epoch >= self.start_epoch:
            self._merge(pl_module, plan_token_merging(self.target(pl_module), self.config, self.example_input))
        if self.plan is not None:
            selected = [r for r in self.plan["block_r"] if r > 0] or [0]
            tokens = self.plan.get("tokens") or merged_token_counts(self.target(pl_module), self.example_input)
            self.log_metrics(
                trainer, {"r": sum(selected) / len(selected), "tokens_out": tokens[-1] if tokens else None}
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.resume_config()}

    # ----------------------------------------------------------------------- what the pipeline asks
    def resume_config(self) -> dict[str, Any]:
        return {**self.config.as_record(), "start_epoch": self.start_epoch}

    def fit_plan(self, trainer: pl.Trainer) -> list[PlanRow]:
        c = self.config
        return [
            PlanRow(
                "TokenMerging",
                f"token merging (ToMe), r={c.r} per block ({c.schedule})",
                epochs_phrase(self.start_epoch, self.start_epoch),
                f"blocks={'all' if c.blocks is None else list(c.blocks)}, no weights change",
            )
        ]

    def scheduled_epochs(self) -> dict[str, int]:
        return {"start_epoch": self.start_epoch} if self.start_epoch > 0 else {}

    # -------------------------------------------------------------------------------------- helpers
    def _merge(self, pl_module: pl.LightningModule, plan: dict[str, Any]) -> None:
        plan = {**plan, "config": self.resume_config()}
        apply_merge_plan(self.target(pl_module), plan)
        self.record(pl_module, **plan)
        self.plan = plan
        tokens = plan["tokens"]
        rank_zero_info(
            f"TokenMerging: {sum(r > 0 for r in plan['block_r'])} blocks merge (r per block {plan['block_r']}); "
            + (f"{plan['tokens_in']} tokens in, {tokens[-1]} after the last block." if tokens else "")
        )
