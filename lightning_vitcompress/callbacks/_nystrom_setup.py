"""What :class:`~lightning_vitcompress.NystromSwap` checks and measures at ``setup``, apart from its hooks.

``min_tokens`` is valid; no chosen block gets an attention mask (one example runs
through the model with spies on the blocks); no block sees only prefix tokens;
``min_tokens="auto"`` times exact against Nyström attention to find the
break-even token count on this machine, and blocks below the threshold stay exact.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_vitcompress._base import progress_line
from lightning_vitcompress._checks import example_input_error
from lightning_vitcompress._lightning import callbacks_of
from lightning_vitcompress._model import find_attention_blocks, resolve_target_path
from lightning_vitcompress._structure import edits_of
from lightning_vitcompress.callbacks.token_merging import TokenMerging
from lightning_vitcompress.functional.measure import eval_mode
from lightning_vitcompress.functional.nystrom import (
    NystromAttention,
    NystromConfig,
    attention_token_counts,
    nystrom_break_even,
)

__all__ = [
    "check_min_tokens",
    "check_no_masks",
    "check_prefix_tokens",
    "measure_break_even",
    "skip_short_blocks",
    "token_counts",
]

#: the longest sequence ``min_tokens="auto"`` times (the break-even is reported as not reached beyond it)
_AUTO_MAX_TOKENS = 4096
#: images per timed call of ``min_tokens="auto"`` without a BenchmarkCallback to take the batch size from
_AUTO_BATCH_SIZE = 4


def check_min_tokens(value: Any) -> None:
    """Raise ``ValueError`` naming ``min_tokens`` unless it is None, ``"auto"`` or an int >= 1."""
    if value is None or value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"min_tokens={value!r}: pass an int >= 1 (swap only blocks whose input has at least that many tokens, "
            "e.g. 1024), 'auto' (measure the break-even token count on this machine), or None to swap every "
            "selected block."
        )


def check_no_masks(
    model: nn.Module,
    names: list[str],
    example: Optional[torch.Tensor],
    example_input: Optional[torch.Tensor],
    blocks: Any,
) -> None:
    """Run ``example`` through ``model`` and refuse blocks that get a mask or other keys than queries
    (``example_input``: the user's, named in the error when the model cannot run it)."""
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
        # eval mode with gradients on: nn.TransformerEncoderLayer's fused path would skip self_attn otherwise;
        # then train mode (a mask passed only in training), its random draws and buffer updates undone
        with eval_mode(model), torch.enable_grad():
            model(example.to(next(model.parameters()).device))
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        training = {module: module.training for module in model.modules()}
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                model.train()
                model(example.to(next(model.parameters()).device))
        finally:
            for module, mode in training.items():
                module.training = mode
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in buffers:
                        buffer.copy_(buffers[name])
    except Exception as err:
        if example_input is None:
            return  # the model does not take this shape: nothing to learn from it
        raise example_input_error(example_input, model, err) from err
    finally:
        for handle in handles:
            handle.remove()
    if found:
        details = "; ".join(f"{name} gets {what}" for name, what in found.items())
        keep = [name for name in names if name not in found]
        advice = f"keep them exact: pass blocks={keep!r}" if keep else "no chosen block can be swapped"
        raise ValueError(
            f"NystromSwap(blocks={blocks!r}): {details}. Nyström attention is self-attention without masks "
            f"(landmarks average over all tokens), so {advice}."
        )


def measure_break_even(
    trainer: pl.Trainer, model: nn.Module, config: NystromConfig, names: list[str], counts: dict[str, int]
) -> dict[str, Any]:
    """``min_tokens="auto"``: time exact against Nyström attention at the model's token counts and a grid (rank
    zero; every rank gets the result): ``{"speedups": {tokens: ratio}, "break_even": tokens or None}``."""
    result: Optional[dict[str, Any]] = None
    if trainer.is_global_zero and names:
        prefix = config.prefix_tokens(model)
        seen = sorted({counts[name] for name in names if name in counts})
        grid, tokens = [], 2 * (config.num_landmarks + prefix)
        while tokens <= min(_AUTO_MAX_TOKENS, max(seen, default=tokens)):
            grid.append(tokens)
            tokens *= 2
        bench = next((cb for cb in callbacks_of(trainer) if type(cb).__name__ == "BenchmarkCallback"), None)
        progress_line(
            trainer,
            f"NystromSwap(min_tokens='auto'): timing exact against Nyström attention at "
            f"{sorted(set(grid + seen))} tokens",
        )
        attention = dict(find_attention_blocks(model))[names[0]]
        result = nystrom_break_even(
            attention,
            config,
            prefix,
            [*grid, *seen],
            batch_size=getattr(bench, "batch_size", _AUTO_BATCH_SIZE),
            num_threads=getattr(bench, "num_threads", None),
            min_run_time=min(0.5, getattr(bench, "min_run_time", 0.1)),
        )
        speedups = ", ".join(f"{t}: {r:.2f}x" for t, r in result["speedups"].items())
        rank_zero_info(
            f"NystromSwap(min_tokens='auto'): Nyström / exact speed by token count: {speedups or 'n/a'}; "
            f"break-even {result['break_even'] or 'not reached'}."
        )
    result = trainer.strategy.broadcast(result, src=0)
    return result or {"speedups": {}, "break_even": None}


def token_counts(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    model: nn.Module,
    example: Optional[torch.Tensor],
    target_path: Optional[str],
    min_tokens: Any,
) -> dict[str, int]:
    """Tokens entering each attention block of ``model``, with the token merging this fit will apply (if any)."""
    merging = next(  # its target path is resolved at its own setup, after NystromSwap's (order 35 > 30)
        (
            cb
            for cb in callbacks_of(trainer)
            if isinstance(cb, TokenMerging) and resolve_target_path(pl_module, cb.model_attribute) == target_path
        ),
        None,
    )
    already = bool(edits_of(pl_module, "tome", target_path))
    plan = None
    if merging is not None and not already:  # merging starts after the swap: count what the blocks will see
        from lightning_vitcompress.functional.token_merging import plan_token_merging

        plan = plan_token_merging(
            model, merging.config, merging.example_input if merging.example_input is not None else example
        )
    if plan is None and example is None:
        raise ValueError(
            f"NystromSwap(min_tokens={min_tokens!r}) needs the token count of each block, but "
            f"{type(model).__name__} states no input size and the Trainer has no data to take one batch from. "
            "Pass example_input=<one input batch>, or min_tokens=None."
        )
    return attention_token_counts(model, example, merge_plan=plan)


def check_prefix_tokens(config: NystromConfig, model: nn.Module, counts: dict[str, int], names: list[str]) -> None:
    """A block whose tokens are all prefix tokens would stay exact attention: raise naming it and the fix."""
    prefix = config.prefix_tokens(model)
    short = {name: counts[name] for name in names if name in counts and counts[name] <= prefix}
    if prefix == 0 or not short:
        return
    name, count = next(iter(short.items()))
    source = (
        f"num_prefix_tokens={config.num_prefix_tokens}"
        if config.num_prefix_tokens is not None
        else f"the {prefix} prefix tokens read from {type(model).__name__}"
    )
    raise ValueError(
        f"NystromSwap({source}): block {name!r} sees only {count} tokens, so every token would be a prefix "
        "token kept exact and Nyström attention would never run. Pass num_prefix_tokens= the model's "
        f"class/distillation/register tokens (fewer than {count}, e.g. 1), or None to read them from the model."
    )


def skip_short_blocks(
    names: list[str],
    counts: dict[str, int],
    min_tokens: Any,
    break_even: Optional[dict[str, Any]],
) -> tuple[list[str], dict[str, str]]:
    """``(kept, skipped)``: the blocks of ``names`` whose input holds at least ``min_tokens`` tokens (the measured
    ``break_even`` for ``"auto"``), and the others with the reason each stays exact."""
    threshold = (break_even or {}).get("break_even") if min_tokens == "auto" else int(min_tokens)
    keep: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        count = counts.get(name)
        if count is None or (threshold is not None and count >= threshold):
            keep.append(name)
        elif threshold is None:
            timed = max(break_even["speedups"], default=None) if break_even else None
            skipped[name] = (
                f"sees {count} tokens; min_tokens='auto' measured Nyström slower than exact attention at every "
                f"timed count{f' up to {timed}' if timed else ''}"
            )
        else:
            source = (
                f"min_tokens='auto' (measured break-even {threshold})"
                if min_tokens == "auto"
                else f"min_tokens={min_tokens}"
            )
            skipped[name] = f"sees {count} tokens < {source}"
    return keep, skipped
