"""Nyström attention as a technique: its config, which blocks to swap, the swap, and its replay.

The attention module itself (and the math) is in
:mod:`lightning_vitcompress.functional.nystrom_attention`;
:class:`~lightning_vitcompress.NystromSwap` calls :func:`swap_attention` inside ``fit``.

Example (a tiny timm ViT with 64 patch tokens; ``vit_small_patch16_384`` the same way)::

    >>> import timm, torch
    >>> from lightning_vitcompress.functional.nystrom import NystromConfig, swap_attention
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, num_classes=10)
    >>> sorted(swap_attention(vit, NystromConfig(num_landmarks=16)))  # the softmax attentions replaced
    ['blocks.0.attn', 'blocks.1.attn']
    >>> type(vit.blocks[0].attn).__name__, vit(torch.randn(2, 3, 64, 64)).shape
    ('NystromAttention', torch.Size([2, 10]))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_vitcompress._model import (
    get_submodule,
    set_submodule,
    supported_attention_blocks,
)
from lightning_vitcompress._registry import Record, register_reader, register_replay
from lightning_vitcompress.functional._outcome import check_outcome, output_shape
from lightning_vitcompress.functional.measure import eval_mode, images_and_labels
from lightning_vitcompress.functional.nystrom_attention import (
    REPLACED_ATTRIBUTE,
    AttentionMaskError,
    NystromAttention,
    _check_landmarks,
    _check_options,
    iterative_pinv,
    nystrom_settings,
    segment_means,
    swap_problem,
)
from lightning_vitcompress.functional.nystrom_structure import find_nystrom_blocks, read_nystrom
from lightning_vitcompress.functional.nystrom_timing import attention_token_counts, nystrom_break_even
from lightning_vitcompress.models import adapter_for

__all__ = [
    "AttentionMaskError",
    "NystromAttention",
    "NystromConfig",
    "attention_token_counts",
    "exact_attention",
    "iterative_pinv",
    "nystrom_break_even",
    "nystrom_settings",
    "segment_means",
    "select_attention_blocks",
    "swap_attention",
    "swap_back",
    "swap_back_gains",
]


@dataclass(frozen=True)
class NystromConfig:
    """How attention is approximated, validated once (the ``quantize_(model, config)`` of Nyström).

    Args:
        num_landmarks: ``m``, the segment-mean landmarks of the patch tokens. Speed-up needs many
            tokens (>= ~1000 on CPU); at 197 tokens Nyström is slower than exact attention.
        pinv_iterations: iterations of the iterative pseudo-inverse (6 is usual).
        conv_kernel_size: odd kernel of an optional depthwise convolution residual on V (new parameters,
            zero-initialized), or None.
        num_prefix_tokens: tokens kept exact in front of the patches; None reads the model's
            ``num_prefix_tokens`` (timm), else 0.

    Example::

        >>> import timm
        >>> from lightning_vitcompress import NystromSwap
        >>> from lightning_vitcompress.functional.nystrom import NystromConfig, swap_attention
        >>> config = NystromConfig(num_landmarks=16)
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2)
        >>> len(swap_attention(vit, config))  # the same config now, or in a callback during fit
        2
        >>> callback = NystromSwap(config=config, swap_epoch=2)
    """

    num_landmarks: int = 64
    pinv_iterations: int = 6
    conv_kernel_size: Optional[int] = None
    num_prefix_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        _check_landmarks(self.num_landmarks)
        _check_options(self.pinv_iterations, self.conv_kernel_size, self.num_prefix_tokens)

    def prefix_tokens(self, model: nn.Module) -> int:
        """The prefix tokens of ``model`` kept exact: the configured count, else the model's own (its
        ``num_prefix_tokens``, else what its model adapter finds: class, distillation, register tokens)."""
        if self.num_prefix_tokens is not None:
            return self.num_prefix_tokens
        stated = getattr(model, "num_prefix_tokens", None)
        if isinstance(stated, int):
            return stated
        from lightning_vitcompress.models import adapter_for

        try:  # the model's adapter finds class/distillation/register tokens (e.g. a ViT written inline)
            return int(adapter_for(model).prefix_tokens().count)
        except (TypeError, ValueError):  # no adapter reads this model: no prefix known
            return 0


BlockSelection = Optional[Sequence[Union[int, str]]]


def select_attention_blocks(
    model: nn.Module, blocks: BlockSelection = None, owner: str = "swap_attention"
) -> list[str]:
    """Qualified names of the attention blocks ``blocks`` selects (indices, negative from the end, or names).

    Raises a ``ValueError`` naming ``blocks`` for an unknown block and for blocks that cannot be swapped.
    """
    found = supported_attention_blocks(model, owner)
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
    family_problem = adapter_for(model).nystrom_problem()
    if family_problem:
        raise TypeError(
            f"{owner}: Nyström attention does not apply to {type(model).__name__}: {family_problem}. Supported: "
            "timm's Attention (ViT, DeiT, DINOv2, CLIP, SigLIP...), nn.MultiheadAttention and transformers' ViT/DeiT."
        )
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

        >>> import timm
        >>> from lightning_vitcompress.functional.nystrom import NystromConfig, swap_attention
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=6)
        >>> list(swap_attention(vit, NystromConfig(num_landmarks=16), blocks=[-2, -1]))  # the last two blocks
        ['blocks.4.attn', 'blocks.5.attn']
    """
    if not isinstance(config, NystromConfig):
        config = NystromConfig(num_landmarks=config, **options)
    elif options:
        raise ValueError(
            f"swap_attention: pass the options in the NystromConfig, not also as keywords ({sorted(options)})."
        )
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
    example = _stated_example(model)
    before = output_shape(model, example)
    try:
        for name, module in replacements.items():
            set_submodule(model, name, module)
        check_outcome(model, example, before, "swap_attention")
    except Exception:
        for name, module in originals.items():
            set_submodule(model, name, module)
        raise
    return originals


def _stated_example(model: nn.Module) -> Optional[torch.Tensor]:
    """One random image of the size ``model`` states (to check the swap), else None."""
    from lightning_vitcompress._model import shape_example_input

    return shape_example_input(model)


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


# a state dict without records: the blocks saved as NystromAttention, after pruning's record (see _registry)
register_reader("nystrom", read_nystrom, survey=find_nystrom_blocks, order=20)


# ---------------------------------------------------------------------------- swapping back
def exact_attention(module: NystromAttention) -> nn.Module:
    """The exact attention module ``module`` replaced, holding ``module``'s current (fine-tuned) weights.

    timm's ``Attention`` and ``nn.MultiheadAttention`` share their parameters with
    the Nyström module, so they hold the fine-tuned weights already (their head
    layout is brought up to date); a transformers attention gets the fused
    ``qkv`` rows copied back into its q/k/v projections. A depthwise convolution
    residual (``conv_kernel_size``) has no exact counterpart and is dropped.

    Raises:
        ValueError: ``module`` was not built by :meth:`NystromAttention.from_attention` (nothing to go back to).
    """
    original = module.__dict__.get(REPLACED_ATTRIBUTE)
    if original is None:
        raise ValueError(
            "This NystromAttention was not built from an exact attention module (NystromAttention.from_attention, "
            "swap_attention or a replayed record), so there is no exact module to swap back to."
        )
    weight = module.qkv.weight
    if isinstance(original, nn.MultiheadAttention):
        original.num_heads, original.head_dim = module.num_heads, module.head_dim
        original.embed_dim = original.kdim = original.vdim = module.attn_dim
        if original.out_proj is not module.proj:  # a plain Linear around the same or copied weights
            original.out_proj.weight = module.proj.weight
            original.out_proj.bias = module.proj.bias
    elif module.interface == "transformers":
        layout = _separate_projections(original)
        original.to(device=weight.device)
        with torch.no_grad():
            for part, rows in zip(layout, module.qkv.weight.detach().split(module.attn_dim)):
                part.weight = nn.Parameter(rows.clone(), requires_grad=weight.requires_grad)
                part.out_features = rows.shape[0]
            if module.qkv.bias is not None:
                for part, rows in zip(layout, module.qkv.bias.detach().split(module.attn_dim)):
                    part.bias = nn.Parameter(rows.clone(), requires_grad=weight.requires_grad)
    else:  # timm: qkv, norms and proj are the same modules
        original.num_heads, original.head_dim = module.num_heads, module.head_dim
        if hasattr(original, "attn_dim"):
            original.attn_dim = module.attn_dim
        original.scale = module.scale
        if not torch.isclose(torch.tensor(module.scale), torch.tensor(module.head_dim**-0.5)):
            original.fused_attn = False  # timm's fused path would use 1/sqrt(head_dim), not the trained scale
    return original


def _separate_projections(attention: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    from lightning_vitcompress.models.base import read_layout

    layout = read_layout("", attention)
    assert layout.query is not None and layout.key is not None and layout.value is not None
    return layout.query, layout.key, layout.value


def swap_back(model: nn.Module, names: Iterable[str]) -> dict[str, NystromAttention]:
    """Put the exact attention back in place of the named Nyström blocks (see :func:`exact_attention`).

    All or nothing: on any error the model keeps its Nyström blocks. Returns
    ``{name: the Nyström module removed}`` (to undo it with ``set_submodule``).

    Example::

        >>> import timm
        >>> from lightning_vitcompress.functional.nystrom import NystromConfig, swap_attention, swap_back
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2)
        >>> _ = swap_attention(vit, NystromConfig(num_landmarks=16))
        >>> # ...fine-tune...
        >>> list(swap_back(vit, ["blocks.0.attn"]))  # block 0 computes exact softmax attention again
        ['blocks.0.attn']
        >>> type(vit.blocks[0].attn).__name__, type(vit.blocks[1].attn).__name__
        ('Attention', 'NystromAttention')
    """
    removed = {name: get_submodule(model, name) for name in names}
    wrong = [name for name, module in removed.items() if not isinstance(module, NystromAttention)]
    if wrong:
        raise ValueError(f"swap_back: {wrong} are not Nyström attention blocks.")
    exact = {name: exact_attention(module) for name, module in removed.items()}  # type: ignore[arg-type]
    done: list[str] = []
    try:
        for name, module in exact.items():
            set_submodule(model, name, module)
            done.append(name)
    except Exception:
        for name in done:
            set_submodule(model, name, removed[name])
        raise
    return removed  # type: ignore[return-value]


def swap_back_gains(model: nn.Module, names: Sequence[str], batches: Iterable[Any]) -> dict[str, dict[str, float]]:
    """What swapping each Nyström block back alone (the others staying Nyström) gains, measured on ``batches``.

    For each block: ``accuracy_gain`` (points of top-1, ``(images, labels)``
    batches) and ``logit_change`` (mean absolute change of the logits), against
    the model as it is. Each batch runs once as is and once per block; the model
    is left as it came.

    Example::

        >>> import timm, torch
        >>> from lightning_vitcompress.functional.nystrom import NystromConfig, swap_attention, swap_back_gains
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, num_classes=10)
        >>> _ = swap_attention(vit, NystromConfig(num_landmarks=16))
        >>> val_loader = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))) for _ in range(2)]
        >>> gains = swap_back_gains(vit.eval(), ["blocks.0.attn", "blocks.1.attn"], val_loader)
        >>> most_costly = max(gains, key=lambda n: (gains[n]["accuracy_gain"], gains[n]["logit_change"]))
        >>> sorted(gains["blocks.0.attn"]), most_costly in gains
        (['accuracy_gain', 'logit_change'], True)
    """
    from lightning_vitcompress.models.base import logits_of

    correct = dict.fromkeys((None, *names), 0)
    change = dict.fromkeys(names, 0.0)
    seen = 0
    with eval_mode(model), torch.inference_mode():
        device = next(model.parameters()).device
        for batch in batches:
            images, labels = (t.to(device) for t in images_and_labels(batch))
            reference = logits_of(model(images)).float()
            correct[None] += int((reference.argmax(-1) == labels).sum())
            for name in names:
                removed = swap_back(model, [name])
                try:
                    logits = logits_of(model(images)).float()
                finally:
                    set_submodule(model, name, removed[name])
                correct[name] += int((logits.argmax(-1) == labels).sum())
                change[name] += float((logits - reference).abs().mean()) * labels.shape[0]
            seen += labels.shape[0]
    seen = max(1, seen)
    return {
        name: {"accuracy_gain": (correct[name] - correct[None]) * 100.0 / seen, "logit_change": change[name] / seen}
        for name in names
    }
