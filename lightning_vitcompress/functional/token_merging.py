"""Token merging (ToMe, Bolya et al., ICLR 2023): fewer tokens in each block, no new weights.

In each selected block, after attention, *bipartite soft matching* pairs the
patch tokens: they are split alternately into two sets A and B, each A token
finds its most similar B token (cosine similarity of the attention keys,
averaged over heads), and the ``r`` most similar pairs are merged into one
token: the size-weighted average of the two. Each token carries its *size*
(how many input patches it stands for); with ``proportional_attention`` the
attention logits get ``+ log(size)`` of each key, so a merged token weighs as
much as the tokens it replaced. Class, distillation and register tokens
(the model's prefix tokens) are never merged and stay in front, so heads that
read ``x[:, 0]`` keep working. Gradients flow through the weighted averages,
so training continues through a merged model.

How it is applied: every transformer block of the model gets a forward that
runs its attention half with the size bias (one implementation per attention
structure: timm's fused ``qkv``, ``nn.MultiheadAttention``'s ``in_proj``,
transformers' separate q/k/v), merges, then runs its MLP half; the family
adapter (:mod:`lightning_vitcompress.models`) says where the norms and
residuals are. No parameter, buffer or state-dict key changes: a merged model
loads an unmerged model's weights and the other way round. The matching and
the size-weighted attention themselves are in
:mod:`~lightning_vitcompress.functional.token_matching`; this module patches blocks.

What to know:

* ``r`` is what a block *asks* to merge; one step of bipartite matching can
  merge at most half of the patch tokens, so late blocks of a deep model may
  merge fewer (ToMe does the same). :func:`token_schedule` gives the real counts.
* Blocks swapped to Nyström attention keep working with the shrinking token
  count (landmarks over the merged tokens); their attention takes no size
  bias, and their matching uses the block's normalized input (not the keys).
* Structured pruning of a merged model works (torch-pruning traces through
  the merge; checked on timm and transformers); :func:`token_merging_paused`
  runs the blocks' own forward for code that must trace the unmerged model.

Example (a tiny timm ViT: 65 tokens, 4 blocks; ``vit_base_patch16_224`` the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.token_merging import merge_tokens
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, num_classes=10)
    >>> merge_tokens(vit, 8)["tokens"]          # 65 tokens in, 33 out of the last block
    [57, 49, 41, 33]
    >>> vit(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_vitcompress._checks import check_block_selection, check_bool, check_choice
from lightning_vitcompress._model import shape_example_input
from lightning_vitcompress._registry import Record, register_replay
from lightning_vitcompress.functional._outcome import check_outcome, output_shape
from lightning_vitcompress.functional.token_matching import (  # re-exported: the math lives there
    _attend,
    _attention_problem,
    bipartite_soft_matching,
    merge_weighted_average,
    token_schedule,
)
from lightning_vitcompress.models import ModelAdapter, adapter_for

__all__ = [
    "TokenMergingConfig",
    "bipartite_soft_matching",
    "merge_tokens",
    "merge_weighted_average",
    "merged_token_counts",
    "remove_token_merging",
    "token_merging_paused",
    "token_schedule",
]

#: attribute on each block that merges (plain data + the shared per-model state)
MERGE_ATTRIBUTE = "_vitcompress_tome"
SCHEDULES = ("constant", "decreasing")
RSpec = Union[int, Sequence[int]]


def _check_r(r: Any) -> None:
    ok_int = isinstance(r, int) and not isinstance(r, bool) and r >= 0
    ok_list = (
        isinstance(r, (list, tuple))
        and len(r) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r)
    )
    if not (ok_int or ok_list):
        raise ValueError(
            f"r={r!r}: pass the tokens each block merges as an int >= 0 (e.g. 16 for ViT-B/16 at 224), "
            "or a list with one int >= 0 per selected block."
        )


@dataclass(frozen=True)
class TokenMergingConfig:
    """How many tokens merge where, validated once (the ``quantize_(model, config)`` of token merging).

    Args:
        r: tokens each selected block merges: an int (ViT-B/16 at 224: 8 to 16), or one int per selected
            block. Bipartite matching merges at most half the patch tokens of a block; ``r`` that would leave
            fewer tokens than the prefix tokens + 1 is refused (``TokenMerging``: at ``setup``).
        schedule: ``"constant"`` (every selected block asks ``r``) or
            ``"decreasing"`` (from ``2r`` in the first selected block down to 0 in
            the last, linearly: about the same total, more merged early, as ToMe's
            ``inflect=-1``). Only for an int ``r``.
        blocks: the transformer blocks that merge: indices (negative from the
            end) or block names (``"blocks.3"``); None: all.
        proportional_attention: attention weighs each merged token by its size: add ``log(size)`` of
            each key to the attention logits after merging (the paper's default; needed without retraining).

    Example::

        >>> import timm
        >>> from lightning_vitcompress.functional.token_merging import TokenMergingConfig, merge_tokens
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4)
        >>> merge_tokens(vit, TokenMergingConfig(r=8, schedule="decreasing"))["tokens"]  # more merged early
        [49, 38, 33, 33]
    """

    r: RSpec = 8
    schedule: str = "constant"
    blocks: Optional[Sequence[Union[int, str]]] = None
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        _check_r(self.r)
        check_choice(self.schedule, "schedule", SCHEDULES)
        if self.schedule != "constant" and not isinstance(self.r, int):
            raise ValueError(
                f"schedule={self.schedule!r} with r={self.r!r}: a schedule spreads an int r over the blocks; "
                "pass an int r, or schedule='constant' with one r per block."
            )
        check_block_selection(self.blocks, kind="transformer-block", example="[0, 1, 2] or ['blocks.0']")
        check_bool(self.proportional_attention, "proportional_attention", "weigh merged tokens by their size")
        if not isinstance(self.r, int):
            object.__setattr__(self, "r", tuple(self.r))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))

    def as_record(self) -> dict[str, Any]:
        """Every field as plain data (lists, not tuples): what records and resume checks compare."""
        fields = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

    def block_r(self, num_selected: int) -> list[int]:
        """What each of ``num_selected`` selected blocks asks to merge."""
        if not isinstance(self.r, int):
            if len(self.r) != num_selected:
                raise ValueError(
                    f"r={list(self.r)!r}: {len(self.r)} values for {num_selected} selected blocks; "
                    f"pass one per block (blocks={self.blocks!r}), or an int."
                )
            return list(self.r)
        if self.schedule == "constant" or num_selected == 1:
            return [self.r] * num_selected
        return [round(2 * self.r * (num_selected - 1 - i) / (num_selected - 1)) for i in range(num_selected)]


# ---------------------------------------------------------------------------- applying it to a model
class _MergeState:
    """Per model: the sizes passed from block to block within one forward, and the tokens each block left."""

    def __init__(self, num_blocks: int) -> None:
        self.size: Optional[torch.Tensor] = None
        self.tokens: list[Optional[int]] = [None] * num_blocks
        self.paused = False


@dataclass
class _BlockMerging:
    """What one block's merging forward needs; held on the block as plain data (copies with it)."""

    index: int
    r: int
    attention: str
    num_prefix_tokens: int
    proportional_attention: bool
    family: type[ModelAdapter]
    state: _MergeState


def _merging_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """A transformer block's forward with token merging (bound to each block by :func:`merge_tokens`)."""
    settings: _BlockMerging = self.__dict__[MERGE_ATTRIBUTE]
    state = settings.state
    size = state.size if settings.index > 0 else None  # the first block starts every forward afresh
    masks = [a for a in args if isinstance(a, torch.Tensor)] + [
        v for v in kwargs.values() if isinstance(v, torch.Tensor)
    ]
    if state.paused or (size is None and settings.r == 0):
        state.size = None
        out = type(self).forward(self, x, *args, **kwargs)
        state.tokens[settings.index] = (out if isinstance(out, torch.Tensor) else x).shape[1]
        return out
    if masks:
        raise ValueError(
            f"token merging: {type(self).__name__} was called with a mask {tuple(masks[0].shape)}; merged tokens "
            "cannot follow a mask of the original length. Merge only unmasked self-attention models."
        )
    batch_first = settings.family.tokens_batch_first(self)
    tokens = x if batch_first else x.transpose(0, 1)
    if size is not None and size.shape[:2] != tokens.shape[:2]:
        size = None  # not the sizes of these tokens (the model was entered another way)
    attention = getattr(self, settings.attention)
    found: list[torch.Tensor] = []

    def attend(h: torch.Tensor) -> torch.Tensor:
        out, metric = _attend(attention, h, size if settings.proportional_attention else None)
        found.append(metric)
        return out

    tokens = settings.family.attention_step(self, tokens, attend)
    if settings.r > 0:
        merge = bipartite_soft_matching(found[0], settings.r, settings.num_prefix_tokens)
        tokens, size = merge_weighted_average(merge, tokens, size)
    tokens = settings.family.mlp_step(self, tokens)
    state.size = size
    state.tokens[settings.index] = tokens.shape[1]
    return tokens if batch_first else tokens.transpose(0, 1)


def _merging_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if MERGE_ATTRIBUTE in m.__dict__]


def _select(names: list[str], blocks: Optional[Sequence[Union[int, str]]]) -> list[int]:
    if blocks is None:
        return list(range(len(names)))
    chosen = []
    for block in blocks:
        if isinstance(block, int):
            if not -len(names) <= block < len(names):
                raise ValueError(
                    f"blocks={list(blocks)!r}: index {block} is out of range; the model has {len(names)} "
                    f"transformer blocks (indices 0..{len(names) - 1})."
                )
            chosen.append(block % len(names))
        elif block in names:
            chosen.append(names.index(block))
        else:
            raise ValueError(f"blocks={list(blocks)!r}: {block!r} is not a transformer block; choose from {names}.")
    return sorted(set(chosen))


def input_token_count(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> Optional[int]:
    """Tokens entering the first transformer block for ``example_input`` (or the model's stated input size)."""
    adapter = adapter_for(model)
    if example_input is None:
        try:
            example_input = adapter.example_input(1)
        except ValueError:
            return None
    blocks = adapter.token_blocks()
    if not blocks:
        return None
    first = blocks[0][1]
    seen: list[int] = []
    batch_first = adapter.tokens_batch_first(first)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        seen.append(int(x.shape[1] if batch_first else x.shape[0]))
        raise _Seen

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), token_merging_paused(model):
            model(example_input[:1].to(next(model.parameters()).device))
    except _Seen:
        pass
    finally:
        handle.remove()
        model.train(training)
    return seen[0] if seen else None


class _Seen(Exception):
    pass


def plan_token_merging(
    model: nn.Module, config: TokenMergingConfig, example_input: Optional[torch.Tensor] = None
) -> dict[str, Any]:
    """Check ``config`` against ``model`` and return the plan (a record without kind/target); changes nothing.

    Raises:
        TypeError: a block or attention token merging cannot run (names the block, the family and why).
        ValueError: unknown blocks, a wrong number of per-block ``r``, or ``r`` that would leave fewer
            tokens than the prefix tokens + 1.
    """
    adapter = adapter_for(model)
    if getattr(model, "grad_checkpointing", False) or getattr(model, "is_gradient_checkpointing", False):
        raise TypeError(
            f"Token merging cannot run in this {type(model).__name__} with gradient checkpointing on: the recomputed "
            "blocks would see the token sizes of the last block. Turn it off (timm: set_grad_checkpointing(False); "
            "transformers: gradient_checkpointing_disable())."
        )
    found = adapter.token_blocks()
    names = [name for name, _, _ in found]
    chosen = _select(names, config.blocks)
    per_selected = config.block_r(len(chosen))
    block_r = [0] * len(names)
    for index, r in zip(chosen, per_selected):
        block_r[index] = r
    for name, block, attention in found:
        why = adapter.merge_problem(block) or _attention_problem(getattr(block, attention))
        if why:
            raise TypeError(
                f"Token merging cannot run block {name!r} of this {adapter.family} {type(model).__name__}: {why}. "
                "Supported: timm Block, torchvision EncoderBlock, transformers >= 5 ViT/DeiT layers and "
                "nn.TransformerEncoderLayer, without position biases inside the blocks."
            )
    prefix = adapter.prefix_tokens().count
    tokens_in = input_token_count(model, example_input)
    tokens = token_schedule(tokens_in, prefix, block_r) if tokens_in is not None else None
    if tokens_in is not None and tokens_in - sum(block_r) < prefix + 1:
        most = (tokens_in - prefix - 1) // max(1, len(chosen))
        raise ValueError(
            f"r={config.r!r}: {len(chosen)} blocks would merge {sum(block_r)} tokens, but only {tokens_in} enter "
            f"({prefix} prefix tokens that never merge), which would leave fewer than {prefix + 1}. "
            f"Pass r <= {most}, or fewer blocks."
        )
    return {
        "blocks": names,
        "block_r": block_r,
        "num_prefix_tokens": prefix,
        "proportional_attention": config.proportional_attention,
        "tokens_in": tokens_in,
        "tokens": tokens,
        "config": config.as_record(),
    }


def apply_merge_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    """Give ``model``'s blocks the merging forward ``plan`` describes (see :func:`plan_token_merging`)."""
    remove_token_merging(model)
    adapter = adapter_for(model)
    found = adapter.token_blocks()
    names = [name for name, _, _ in found]
    if names != list(plan["blocks"]):
        raise ValueError(f"The token-merging record names blocks {plan['blocks']}, but the model has {names}.")
    state = _MergeState(len(found))
    for index, ((_, block, attention), r) in enumerate(zip(found, plan["block_r"])):
        block.__dict__[MERGE_ATTRIBUTE] = _BlockMerging(
            index,
            int(r),
            attention,
            int(plan["num_prefix_tokens"]),
            bool(plan["proportional_attention"]),
            type(adapter),
            state,
        )
        block.forward = types.MethodType(_merging_forward, block)


def merge_tokens(
    model: nn.Module,
    config: Union[TokenMergingConfig, RSpec] = 8,
    *,
    example_input: Optional[torch.Tensor] = None,
    **options: Any,
) -> dict[str, Any]:
    """Make ``model`` merge tokens in its blocks (no weights change); return the plan (what a record holds).

    ``config`` is a :class:`TokenMergingConfig` or ``r`` (then ``options`` are its
    other fields). ``example_input`` (one batch) tells the token count where the
    model does not state its input size. Calling it again replaces the settings;
    ``r=0`` keeps the output as it was.

    Example::

        >>> import timm
        >>> from lightning_vitcompress.functional.token_merging import merge_tokens
        >>> vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=4)
        >>> plan = merge_tokens(vit, 12)
        >>> plan["tokens"][-1]  # tokens left after the last block, of 65
        17
    """
    if not isinstance(config, TokenMergingConfig):
        config = TokenMergingConfig(r=config, **options)
    elif options:
        raise ValueError(
            f"merge_tokens: pass the options in the TokenMergingConfig, not also as keywords ({sorted(options)})."
        )
    plan = plan_token_merging(model, config, example_input)
    example = example_input[:1] if example_input is not None else shape_example_input(model)
    before = output_shape(model, example)
    apply_merge_plan(model, plan)
    try:
        check_outcome(model, example, before, "merge_tokens")
    except TypeError:
        remove_token_merging(model)
        raise
    return plan


def remove_token_merging(model: nn.Module) -> None:
    """Give every merging block of ``model`` its own forward back."""
    for _, block in _merging_blocks(model):
        del block.__dict__[MERGE_ATTRIBUTE]
        block.__dict__.pop("forward", None)


@contextlib.contextmanager
def token_merging_paused(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s blocks run their own forward (for tracing, e.g. torch-pruning)."""
    states = {
        id(block.__dict__[MERGE_ATTRIBUTE].state): block.__dict__[MERGE_ATTRIBUTE].state
        for _, block in _merging_blocks(model)
    }
    before = {key: state.paused for key, state in states.items()}
    for state in states.values():
        state.paused = True
    try:
        yield model
    finally:
        for key, state in states.items():
            state.paused = before[key]


def merged_token_counts(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> Optional[list[int]]:
    """Tokens after each transformer block of a merging ``model`` (None for a model that does not merge).

    With ``example_input`` (or when the model has not run yet: its stated input
    size) one forward measures them; else they are those of its last forward,
    so a compiled or quantized model need not run again.
    """
    blocks = _merging_blocks(model)
    if not blocks:
        return None
    state = blocks[0][1].__dict__[MERGE_ATTRIBUTE].state
    if example_input is None and all(t is not None for t in state.tokens):
        return [int(t) for t in state.tokens]
    if example_input is None:
        example_input = adapter_for(model).example_input(1)
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input[:1].to(next(model.parameters()).device))
    finally:
        model.train(training)
    return [int(t) for t in state.tokens if t is not None]


@register_replay("tome")
def _replay_token_merging(model: nn.Module, record: Record) -> None:
    apply_merge_plan(model, record)
