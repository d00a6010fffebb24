"""Nyström attention as a technique: its config, which blocks to swap, the swap, and its replay.

The attention module itself (and the math) is in
:mod:`lightning_vitcompress.functional.nystrom_attention`;
:class:`~lightning_vitcompress.NystromSwap` calls :func:`swap_attention` inside ``fit``.

Example::

    vit = timm.create_model("vit_small_patch16_384", pretrained=False)
    swap_attention(vit, NystromConfig(num_landmarks=64))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import nn

from lightning_vitcompress._model import find_attention_blocks, get_submodule, set_submodule
from lightning_vitcompress._structure import Record, register_replay
from lightning_vitcompress.functional.nystrom_attention import (
    AttentionMaskError,
    NystromAttention,
    _check_landmarks,
    _check_options,
    iterative_pinv,
    nystrom_settings,
    segment_means,
    swap_problem,
)

__all__ = [
    "AttentionMaskError",
    "NystromAttention",
    "NystromConfig",
    "iterative_pinv",
    "nystrom_settings",
    "segment_means",
    "select_attention_blocks",
    "swap_attention",
]


@dataclass(frozen=True)
class NystromConfig:
    """How attention is approximated, validated once (the ``quantize_(model, config)`` of Nyström).

    Args:
        num_landmarks: ``m``, the segment-mean landmarks of the patch tokens.
        pinv_iterations: iterations of the iterative pseudo-inverse (6 is usual).
        conv_kernel_size: odd kernel of an optional depthwise convolution residual on V, or None.
        num_prefix_tokens: tokens kept exact in front of the patches; None reads the model's
            ``num_prefix_tokens`` (timm), else 0.

    Example::

        swap_attention(vit, NystromConfig(num_landmarks=64))
        NystromSwap(config=NystromConfig(num_landmarks=64), swap_epoch=2)
    """

    num_landmarks: int = 64
    pinv_iterations: int = 6
    conv_kernel_size: Optional[int] = None
    num_prefix_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        _check_landmarks(self.num_landmarks)
        _check_options(self.pinv_iterations, self.conv_kernel_size, self.num_prefix_tokens)

    def prefix_tokens(self, model: nn.Module) -> int:
        """The prefix tokens of ``model`` kept exact: the configured count, else the model's own."""
        if self.num_prefix_tokens is not None:
            return self.num_prefix_tokens
        return int(getattr(model, "num_prefix_tokens", 0) or 0)


BlockSelection = Optional[Sequence[Union[int, str]]]


def check_block_selection(blocks: Any) -> Optional[list[Union[int, str]]]:
    """``blocks`` as a list (None stays None), or a ``ValueError`` naming it."""
    if blocks is not None and (
        isinstance(blocks, (str, int))
        or not isinstance(blocks, Sequence)
        or not blocks
        or not all(isinstance(b, (int, str)) and not isinstance(b, bool) for b in blocks)
    ):
        raise ValueError(
            f"blocks={blocks!r}: pass a non-empty list of attention-block indices or names "
            "(e.g. [0, 1] or ['blocks.0.attn']), or None for all."
        )
    return list(blocks) if blocks is not None else None


def select_attention_blocks(model: nn.Module, blocks: BlockSelection = None, owner: str = "swap_attention") -> list[str]:
    """Qualified names of the attention blocks ``blocks`` selects (indices, negative from the end, or names).

    Raises a ``ValueError`` naming ``blocks`` for an unknown block and for blocks that cannot be swapped.
    """
    found = find_attention_blocks(model)
    names = [name for name, _ in found]
    if blocks is None:
        chosen = names
    else:
        chosen = []
        for block in blocks:
            if isinstance(block, int):
                if not -len(names) <= block < len(names):
                    raise ValueError(
                        f"blocks={blocks!r}: index {block} is out of range; the model has "
                        f"{len(names)} attention blocks (indices 0..{len(names) - 1}): {names}."
                    )
                chosen.append(names[block])
            elif block not in names:
                raise ValueError(f"blocks={blocks!r}: {block!r} is not an attention block; choose from {names}.")
            else:
                chosen.append(block)
        chosen = list(dict.fromkeys(chosen))
    modules = dict(found)
    problems = {name: swap_problem(modules[name]) for name in chosen if not isinstance(modules[name], NystromAttention)}
    problems = {name: why for name, why in problems.items() if why}
    if problems:
        details = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise ValueError(f"{owner}(blocks={blocks!r}) cannot swap these attention blocks: {details}")
    return chosen


def swap_attention(
    model: nn.Module, config: Union[NystromConfig, int] = 64, *, blocks: BlockSelection = None, **options: Any
) -> dict[str, nn.Module]:
    """Swap ``model``'s selected softmax attention blocks for :class:`NystromAttention`, reusing their weights.

    All replacements are built first and swapped in together: on any error the
    model keeps its softmax attention. Blocks that are Nyström already are left
    alone. Returns ``{name: original module}`` of what was replaced (to undo it).

    Example::

        vit = timm.create_model("vit_small_patch16_384", pretrained=False)
        swap_attention(vit, NystromConfig(num_landmarks=64), blocks=[-4, -3, -2, -1])
    """
    if not isinstance(config, NystromConfig):
        config = NystromConfig(num_landmarks=config, **options)
    elif options:
        raise ValueError(f"swap_attention: pass the options in the NystromConfig, not also as keywords ({sorted(options)}).")
    prefix = config.prefix_tokens(model)
    replacements: dict[str, NystromAttention] = {}
    for name in select_attention_blocks(model, blocks):
        module = get_submodule(model, name)
        if not isinstance(module, NystromAttention):
            replacements[name] = NystromAttention.from_attention(
                module,
                num_landmarks=config.num_landmarks,
                num_prefix_tokens=prefix,
                pinv_iterations=config.pinv_iterations,
                conv_kernel_size=config.conv_kernel_size,
            )
    originals = {name: get_submodule(model, name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_submodule(model, name, module)
    except Exception:
        for name, module in originals.items():
            set_submodule(model, name, module)
        raise
    return originals


@register_replay("nystrom")
def _replay_nystrom(model: nn.Module, record: Record) -> None:
    for name in record["blocks"]:
        module = get_submodule(model, name)
        if isinstance(module, NystromAttention):
            continue
        set_submodule(
            model,
            name,
            NystromAttention.from_attention(
                module,
                num_landmarks=record["num_landmarks"],
                num_prefix_tokens=record["num_prefix_tokens"],
                pinv_iterations=record["pinv_iterations"],
                conv_kernel_size=record["conv_kernel_size"],
            ),
        )
