"""Reading Nyström-swapped blocks back from a state dict that came without structure records.

A :class:`~lightning_vitcompress.NystromAttention` has the parameter keys of the
attention it replaced, plus ``<block>._extra_state`` with its settings (landmarks,
prefix tokens, head layout, scale). :func:`find_nystrom_blocks` finds those
blocks (the pruning reader needs their head layout) and :func:`read_nystrom`
turns them into the records that :mod:`~lightning_vitcompress.functional.nystrom`'s
replay rebuilds, one per set of settings. ``nystrom.py`` registers both.

Example (weights saved with block 0 swapped, read into a freshly built ViT)::

    >>> import timm, torch
    >>> from lightning_vitcompress._registry import SavedModel
    >>> from lightning_vitcompress.functional.nystrom import swap_attention
    >>> from lightning_vitcompress.functional.nystrom_structure import find_nystrom_blocks, read_nystrom
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> _ = swap_attention(vit, 16, blocks=[0])
    >>> torch.save(vit.state_dict(), "weights.pt")
    >>> fresh = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> saved = SavedModel(fresh, torch.load("weights.pt", weights_only=True), target="")
    >>> find_nystrom_blocks(saved)
    >>> read_nystrom(saved)
    [{'blocks': ['blocks.0.attn'], 'num_landmarks': 16, 'num_prefix_tokens': 1, 'pinv_iterations': 6, 'conv_kernel_size': None}]
"""

from __future__ import annotations

from typing import Any

from lightning_vitcompress._model import is_attention_block
from lightning_vitcompress._registry import Record, SavedModel
from lightning_vitcompress.functional.nystrom_attention import NystromAttention, nystrom_settings

__all__ = ["find_nystrom_blocks", "read_nystrom"]

_EXTRA_STATE = "_extra_state"
#: the settings a record holds (the rest of the extra state follows from the weights)
_OPTIONS = ("num_landmarks", "num_prefix_tokens", "pinv_iterations", "conv_kernel_size")


def find_nystrom_blocks(saved: SavedModel) -> None:
    """Store ``{attention block name: Nyström settings}`` of the blocks saved as ``NystromAttention`` in ``found``."""
    blocks: dict[str, dict[str, Any]] = {}
    for key, value in saved.state_dict.items():
        name, _, leaf = key.rpartition(".")
        if leaf != _EXTRA_STATE or not name:
            continue
        try:
            block = saved.model.get_submodule(name)
        except AttributeError:
            continue  # not in this architecture: check_structure names it
        if is_attention_block(block) and not isinstance(block, NystromAttention):
            blocks[name] = nystrom_settings(value)
    saved.found["nystrom"] = blocks


def read_nystrom(saved: SavedModel) -> list[Record]:
    """One record body per set of settings, naming the blocks saved with it."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, settings in saved.found.get("nystrom", {}).items():
        groups.setdefault(tuple(settings[option] for option in _OPTIONS), []).append(name)
    return [{"blocks": blocks, **dict(zip(_OPTIONS, settings))} for settings, blocks in groups.items()]
