"""Finding the Vision Transformer inside a LightningModule, and its attention blocks.

Every callback acts on one ``nn.Module`` (the *target*): by default the
LightningModule itself or its single child that holds attention blocks; the
user may name the attribute instead (``model_attribute="net"``, dotted paths
work too).
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers.attention import Attention as TimmAttention
from torch import nn

#: A module class that sets this class attribute to ``True`` counts as an
#: attention block (our ``NystromAttention`` does), without this module
#: importing it.
ATTENTION_MARKER = "is_vitcompress_attention"


def is_attention_block(module: nn.Module) -> bool:
    """True for timm ``Attention``, ``nn.MultiheadAttention`` and marked modules."""
    return isinstance(module, (TimmAttention, nn.MultiheadAttention)) or bool(
        getattr(type(module), ATTENTION_MARKER, False)
    )


def find_attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every attention block in ``model``, in order.

    Example::

        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        >>> [name for name, _ in find_attention_blocks(vit)][:2]
        ['blocks.0.attn', 'blocks.1.attn']
    """
    return [(name, module) for name, module in model.named_modules() if is_attention_block(module)]


def _get_attribute(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            children = [name for name, _ in root.named_children()]
            raise AttributeError(
                f"model_attribute={path!r}: {type(root).__name__} has no attribute {part!r}. "
                f"Its child modules are {children}; pass one of them, or None to search automatically."
            )
        module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"model_attribute={path!r} is a {type(module).__name__}, not an nn.Module. "
            "Name the attribute that holds the Vision Transformer."
        )
    return module


def resolve_target_path(root: nn.Module, model_attribute: Optional[str] = None) -> str:
    """The attribute path (``""`` for ``root`` itself) of the model to compress.

    Raises:
        AttributeError: ``model_attribute`` names nothing on ``root``.
        ValueError: no attention blocks were found, with what was looked at.
    """
    if model_attribute:
        target = _get_attribute(root, model_attribute)
        if not find_attention_blocks(target):
            raise ValueError(
                f"model_attribute={model_attribute!r} ({type(target).__name__}) has no attention blocks "
                "(timm Attention or nn.MultiheadAttention). Name the attribute holding the Vision Transformer."
            )
        return model_attribute
    holders = [name for name, child in root.named_children() if find_attention_blocks(child)]
    if len(holders) == 1:
        return holders[0]
    if find_attention_blocks(root):
        return ""
    children = [f"{name} ({type(child).__name__})" for name, child in root.named_children()]
    raise ValueError(
        f"No attention blocks (timm Attention or nn.MultiheadAttention) found in {type(root).__name__} "
        f"or its children {children}. Build the model from timm's VisionTransformer family or "
        "nn.MultiheadAttention, or pass model_attribute='<attribute holding the ViT>'."
    )


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root`` itself for ``""``, else the module at the dotted ``path``."""
    return root if not path else _get_attribute(root, path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at the dotted ``path`` (not ``""``) of ``root``."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


def resolve_target_model(root: nn.Module, model_attribute: Optional[str] = None) -> nn.Module:
    """The Vision Transformer inside ``root`` (see :func:`resolve_target_path`).

    Example::

        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        >>> resolve_target_model(Classifier()) is Classifier().net  # doctest: +SKIP
    """
    return get_submodule(root, resolve_target_path(root, model_attribute))


def stated_input_shape(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(channels, height, width)`` of one image where the model states it (timm ``patch_embed``), else None."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    conv = getattr(patch_embed, "proj", None)
    if img_size is None or not isinstance(conv, nn.Conv2d):
        return None
    return (conv.in_channels, int(img_size[0]), int(img_size[1]))


def shape_example_input(model: nn.Module) -> Optional[torch.Tensor]:
    """A random batch of one image for a model that states its input shape, else None.

    Drawn from its own generator: building it does not move the global random stream.
    """
    shape = stated_input_shape(model)
    if shape is None:
        return None
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randn(1, *shape, generator=generator).to(device)
