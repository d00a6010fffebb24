"""Where Nyström attention pays: the tokens entering each attention block, and the measured break-even.

:func:`attention_token_counts` says how long each attention block's sequence is
(token merging included); :func:`nystrom_break_even` times an exact attention
module against its Nyström swap at given token counts on this machine.
:class:`~lightning_vitcompress.NystromSwap`'s ``min_tokens="auto"`` uses both;
both are re-exported from :mod:`lightning_vitcompress.functional.nystrom`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from lightning_vitcompress._model import find_attention_blocks
from lightning_vitcompress.functional.measure import compare_throughput, eval_mode
from lightning_vitcompress.functional.nystrom_attention import NystromAttention

if TYPE_CHECKING:
    from lightning_vitcompress.functional.nystrom import NystromConfig

__all__ = ["attention_token_counts", "nystrom_break_even"]


def attention_token_counts(
    model: nn.Module, example_input: Optional[torch.Tensor] = None, merge_plan: Optional[dict[str, Any]] = None
) -> dict[str, int]:
    """Tokens entering each attention block (by qualified name) for one input, token merging included.

    ``merge_plan`` (see :func:`~lightning_vitcompress.functional.token_merging.plan_token_merging`)
    gives the counts of merging that is not applied yet; else one forward of
    ``example_input`` (or the model's stated input size) measures them, with
    whatever merging the model does.
    """
    from lightning_vitcompress.models import adapter_for

    attention_names = [name for name, _ in find_attention_blocks(model)]
    adapter = adapter_for(model)
    blocks = adapter.token_blocks()
    per_block: dict[str, int] = {}
    if merge_plan is not None and merge_plan.get("tokens"):
        entering = [merge_plan["tokens_in"], *merge_plan["tokens"][:-1]]
        per_block = {name: int(count) for name, count in zip(merge_plan["blocks"], entering)}
    else:
        if example_input is None:
            example_input = adapter.example_input(1)
        handles = []
        for name, block, _ in blocks:
            batch_first = adapter.tokens_batch_first(block)

            def hook(
                module: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                name: str = name,
                batch_first: bool = batch_first,
            ) -> None:
                x = args[0] if args else next(iter(kwargs.values()))
                per_block.setdefault(name, int(x.shape[1] if batch_first else x.shape[0]))

            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with eval_mode(model), torch.no_grad():
                model(example_input[:1].to(next(model.parameters()).device))
        finally:
            for handle in handles:
                handle.remove()
    counts: dict[str, int] = {}
    for attention in attention_names:
        owner = max((b for b in per_block if attention.startswith(f"{b}.") or not b), key=len, default=None)
        if owner is not None:
            counts[attention] = per_block[owner]
    return counts


class _SelfAttention(nn.Module):
    """``attention(x)`` on batch-first tokens for any supported attention module (timing only)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.attention
        tokens_first = not getattr(attention, "batch_first", True)
        if tokens_first:
            x = x.transpose(0, 1)
        if isinstance(attention, nn.MultiheadAttention):
            out = attention(x, x, x, need_weights=False)
        else:
            out = attention(x)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(0, 1) if tokens_first else out


def nystrom_break_even(
    attention: nn.Module,
    config: NystromConfig,
    num_prefix_tokens: int,
    token_counts: Iterable[int],
    *,
    batch_size: int = 4,
    num_threads: Optional[int] = None,
    min_run_time: float = 0.1,
    rounds: int = 2,
) -> dict[str, Any]:
    """Time an exact attention module against its Nyström swap at each token count, on this machine.

    ``attention`` is one of the model's attention blocks (a copy is timed, with
    random inputs of its width). Returns ``{"speedups": {tokens: Nyström / exact
    images per second}, "break_even": the smallest measured count from which
    Nyström is faster at every larger measured count (None: at none)}``. Counts
    where the landmarks cover the patch tokens run exact attention in both and
    are skipped.

    Example::

        >>> import timm
        >>> from lightning_vitcompress.functional.nystrom import NystromConfig, nystrom_break_even
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
        >>> timing = nystrom_break_even(vit.blocks[0].attn, NystromConfig(num_landmarks=16), 1, [65, 257],
        ...                             min_run_time=0.01, rounds=1)
        >>> sorted(timing["speedups"]), sorted(timing)  # its speed-up at each count (machine-dependent)
        ([65, 257], ['break_even', 'speedups'])
    """
    import copy

    exact = copy.deepcopy(attention)
    nystrom = NystromAttention.from_attention(
        exact,
        num_landmarks=config.num_landmarks,
        num_prefix_tokens=num_prefix_tokens,
        pinv_iterations=config.pinv_iterations,
        conv_kernel_size=config.conv_kernel_size,
    )
    weight = nystrom.qkv.weight
    width = weight.shape[1]
    generator = torch.Generator().manual_seed(0)
    speedups: dict[int, float] = {}
    for tokens in sorted({int(t) for t in token_counts}):
        if tokens - num_prefix_tokens <= config.num_landmarks:
            continue
        x = torch.randn(batch_size, tokens, width, generator=generator).to(device=weight.device, dtype=weight.dtype)
        ips = compare_throughput(
            {"exact": _SelfAttention(exact), "nystrom": _SelfAttention(nystrom)},
            x,
            num_threads=num_threads,
            rounds=rounds,
            min_run_time=min_run_time,
            warmup=1,
        )
        speedups[tokens] = ips["nystrom"] / ips["exact"]
    break_even: Optional[int] = None
    for tokens in sorted(speedups, reverse=True):
        if speedups[tokens] <= 1.0:
            break
        break_even = tokens
    return {"speedups": speedups, "break_even": break_even}
