"""Finding the Vision Transformer inside a LightningModule, and its attention blocks.

Every callback acts on one ``nn.Module`` (the *target*); the user may name
its attribute (``model_attribute="net"``, dotted paths work too). Otherwise
:func:`resolve_target_path` looks at the children that hold attention blocks:

* one child that is a model (``self.model = timm.create_model(...)``): that child;
* only bare containers (``nn.ModuleList``/``nn.Sequential``/``nn.ModuleDict``)
  or attention modules (a ViT written inline: ``self.patch_embed``,
  ``self.blocks = nn.ModuleList([...])``, ``self.head``): the module itself;
* two or more models (a ViT and its EMA copy, a teacher stored on the module),
  or a model next to inline blocks: :class:`AmbiguousTargetError` naming them,
  never a silent choice.

:func:`check_supported_attention` (run by the callbacks at setup) turns an
attention module of a type no adapter reads (timm Swin's ``WindowAttention``)
into a ``TypeError`` from :func:`lightning_vitcompress.models.adapter_for`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from lightning_vitcompress.models import ADAPTERS, adapter_for
from lightning_vitcompress.models.base import ATTENTION_MARKER, is_attention_module

__all__ = [
    "ATTENTION_MARKER",
    "find_attention_blocks",
    "is_attention_block",
    "resolve_target_model",
    "supported_attention_blocks",
]


def is_attention_block(module: nn.Module) -> bool:
    """True for an attention module the adapters read (timm ``Attention``, ``nn.MultiheadAttention``,
    transformers' q/k/v attention, marked modules such as our ``NystromAttention``)."""
    return is_attention_module(module)


def find_attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every attention block in ``model``, in order.

    The model's family adapter says where its blocks are (transformers < 5 keeps
    the output projection outside the attention module); any other model is
    searched for attention modules of a structure the adapters read.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        >>> [name for name, _ in find_attention_blocks(vit)][:2]
        ['blocks.0.attn', 'blocks.1.attn']
    """
    for adapter in ADAPTERS:
        if adapter.matches(model):
            try:
                return adapter(model).attention_blocks()
            except TypeError:  # an unsupported attention in it: list the ones we can read
                break
    return [(name, module) for name, module in model.named_modules() if is_attention_block(module)]


def supported_attention_blocks(model: nn.Module, technique: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every attention block of ``model`` as its family adapter reads them, for ``technique``.

    Raises:
        TypeError: an attention module no adapter supports (names its class, where it is, what is supported).
        ValueError: no attention block at all: ``technique`` would change nothing, which is an error, not a no-op.
    """
    blocks = adapter_for(model).attention_blocks()
    if not blocks:
        from lightning_vitcompress.models import supported_families

        raise ValueError(
            f"{technique}: {type(model).__name__} has no attention block, so nothing would change. "
            f"Supported families: {supported_families()}."
        )
    return blocks


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


class AmbiguousTargetError(ValueError):
    """Two or more children of the module could be the ViT (the message names them)."""


#: containers that hold blocks but are no model of their own: holding attention, they make an inline ViT
_BARE_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def resolve_target_path(root: nn.Module, model_attribute: Optional[str] = None) -> str:
    """The attribute path (``""`` for ``root`` itself) of the model to compress.

    The rule is in this module's docstring: the single child model holding
    attention blocks, else ``root`` itself when its attention sits in bare
    containers or attention modules of its own (a ViT written inline).

    Raises:
        AttributeError: ``model_attribute`` names nothing on ``root``.
        AmbiguousTargetError: (a ``ValueError``) two or more candidates; names each with its class.
        TypeError: no attention blocks, but an attention module of an unsupported type (names it).
        ValueError: no attention blocks were found, with what was looked at.
    """
    if model_attribute:
        target = _get_attribute(root, model_attribute)
        if not _holds_attention(target):
            raise ValueError(
                f"model_attribute={model_attribute!r} ({type(target).__name__}) has no attention blocks "
                "(timm Attention or nn.MultiheadAttention). Name the attribute holding the Vision Transformer."
            )
        return model_attribute
    holders = [(name, child) for name, child in root.named_children() if _holds_attention(child)]
    models = [(name, child) for name, child in holders if not _is_part(child)]
    if len(models) == 1 and len(holders) == 1:
        return models[0][0]
    if models:
        listed = ", ".join(f"{name!r} ({type(child).__name__})" for name, child in models)
        inline = [name for name, child in holders if _is_part(child)]
        also = f", and attention blocks of its own in {inline}" if inline else ""
        raise AmbiguousTargetError(
            f"{type(root).__name__} holds more than one model with attention blocks: {listed}{also}. "
            f"Pass model_attribute='<one of them>' (e.g. model_attribute={models[0][0]!r}) to say which one "
            "the callbacks compress"
            + ("; to compress the module's own blocks, put its ViT in one attribute." if inline else ".")
        )
    if holders or is_attention_block(root):
        return ""  # a ViT written inline: the module itself
    check_supported_attention(root)  # attention of a type nobody reads: say so rather than "none found"
    children = [f"{name} ({type(child).__name__})" for name, child in root.named_children()]
    raise ValueError(
        f"No attention blocks (timm Attention or nn.MultiheadAttention) found in {type(root).__name__} "
        f"or its children {children}. Build the model from timm's VisionTransformer family or "
        "nn.MultiheadAttention, or pass model_attribute='<attribute holding the ViT>'."
    )


def _holds_attention(module: nn.Module) -> bool:
    """Attention blocks the callbacks act on, or a model of a family an adapter reads (transformers ViT)."""
    return bool(find_attention_blocks(module)) or any(adapter.matches(module) for adapter in ADAPTERS)


def _is_part(child: nn.Module) -> bool:
    """A piece of a ViT written inline (its blocks' container, or an attention module), not a model of its own."""
    return isinstance(child, _BARE_CONTAINERS) or is_attention_block(child)


def check_supported_attention(model: nn.Module) -> None:
    """``TypeError`` when ``model`` has an attention module that neither the callbacks nor any adapter read.

    An unsupported attention is a module whose class name contains "attention"
    that is no attention block (:func:`is_attention_block`), holds none and sits
    in none (a wrapper or a piece of one). Only then is
    :func:`lightning_vitcompress.models.adapter_for` asked: a family it reads
    (transformers ViT, a timm ViT with an attention pool) passes, anything else
    gets its ``TypeError`` naming the class, where it is and the supported families.
    """
    blocks = [name for name, _ in find_attention_blocks(model)]
    unsupported = [
        name
        for name, module in model.named_modules()
        if "attention" in type(module).__name__.lower()
        and not is_attention_block(module)
        and not any(_nested(name, block) or _nested(block, name) for block in blocks)
    ]
    if not unsupported:
        return
    with contextlib.suppress(ValueError):  # no attention at all by the adapters' reading: resolution said so
        adapter_for(model).attention_blocks()


def _nested(inner: str, outer: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


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

        >>> import lightning as L, timm
        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> classifier = Classifier()
        >>> resolve_target_model(classifier) is classifier.net
        True
    """
    return get_submodule(root, resolve_target_path(root, model_attribute))


def stated_input_shape(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(channels, height, width)`` of one image where the model states it, else None.

    Asked of the model's family adapter (timm ``patch_embed``, torchvision
    ``image_size``, transformers ``config.image_size``); a model no adapter reads
    may still carry a timm-style ``patch_embed``.
    """
    try:
        shape = adapter_for(model).input_shape()
    except (TypeError, ValueError):  # no adapter reads it
        shape = None
    if shape is not None:
        return shape
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
