"""Reading a compressed model's structure from its state dict, when no records came with it.

``ModelCheckpoint(save_weights_only=True)`` checkpoints, a bare
``torch.save(model.state_dict())`` and ``.safetensors`` files hold no structure
records (see :mod:`lightning_vitcompress._structure`). The structure is still
in the tensors, and :func:`infer_records` reads it back as records that the
usual replays rebuild. Each technique knows how, and registers a reader
in :mod:`lightning_vitcompress._registry` (pruning: the narrower shapes;
Nyström: the blocks' ``_extra_state``; quantization: torchao's tensor
subclasses, the x86 int8 layers' extra keys), and the records come out in the
order the callbacks act (prune, Nyström, quantize). This module imports no
technique.

:func:`check_structure` compares a rebuilt module with the saved tensors and
names the first disagreements. :mod:`~lightning_vitcompress._structure` decides
when to use which (records first, inference when there are none).

Example (weights of a pruned Digits module saved without records)::

    >>> import torch
    >>> from lightning_vitcompress._state_dict_structure import check_structure, infer_records
    >>> from lightning_vitcompress._structure import replay_edits
    >>> from lightning_vitcompress.digits import DigitsClassifier
    >>> from lightning_vitcompress.functional import prune_vit
    >>> hparams = dict(embed_dim=32, depth=2, num_heads=4)
    >>> pruned = DigitsClassifier(**hparams)
    >>> _ = prune_vit(pruned.model, 0.5, torch.randn(1, 3, 32, 32))
    >>> torch.save(pruned.state_dict(), "weights.pt")
    >>> module = DigitsClassifier(**hparams)
    >>> state_dict = torch.load("weights.pt", weights_only=True)
    >>> replay_edits(module, infer_records(module, state_dict))
    >>> check_structure(module, state_dict)
    >>> module.load_state_dict(state_dict, assign=True)
    <All keys matched successfully>
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from lightning_vitcompress._model import AmbiguousTargetError, get_submodule, resolve_target_path
from lightning_vitcompress._registry import Record, SavedModel, readers

__all__ = ["StructureMismatchError", "align_state_dict", "check_structure", "infer_records"]

#: how many disagreeing keys an error lists
_SHOWN = 5


class StructureMismatchError(ValueError):
    """The saved tensors do not fit the module rebuilt for them (the message says where)."""


# ----------------------------------------------------------------------------- keys
def align_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``state_dict`` with keys relative to ``module``, and the prefix added (``""`` or ``"<target>."``).

    A state dict of the inner ViT (``lit.model.state_dict()``) gets the target
    path (:func:`~lightning_vitcompress._model.resolve_target_path`) put in
    front of its keys; one of the LightningModule stays as it is.

    Raises:
        StructureMismatchError: neither reading matches any key of ``module``.
    """
    expected = set(module.state_dict())
    target = _target_or_whole(module)
    as_is = sum(key in expected for key in state_dict)
    prefix = f"{target}." if target else ""
    prefixed = sum(prefix + key in expected for key in state_dict) if prefix else 0
    if not as_is and not prefixed:
        raise StructureMismatchError(
            f"The state dict does not fit {type(module).__name__}: none of its keys ({_first(state_dict)}) is a key "
            f"of the module ({_first(expected)})" + (f" or of its ViT {target!r}" if target else "") + ". It was "
            "saved from another architecture."
        )
    if prefixed > as_is:
        return {prefix + key: value for key, value in state_dict.items()}, prefix
    return dict(state_dict), ""


def _target_or_whole(module: nn.Module) -> str:
    """The ViT's path; the whole module (``""``) where several children could be it (a model and its EMA copy)."""
    try:
        return resolve_target_path(module)
    except AmbiguousTargetError:
        return ""  # loading reads the module's own keys: every candidate's structure is in them
    except (TypeError, ValueError):
        return ""  # no adapter reads its attention (only int8 applies): the module's own keys


def _first(keys: Any) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


# ----------------------------------------------------------------------------- inference
def infer_records(module: nn.Module, state_dict: Mapping[str, Any], target_path: Optional[str] = None) -> list[Record]:
    """The structure records that turn freshly built ``module`` into the model ``state_dict`` came from.

    ``state_dict`` has keys relative to ``module`` (see :func:`align_state_dict`);
    ``target_path`` is the ViT's attribute path (found when None). Returns an
    empty list when the saved model has the module's structure. Each record
    carries ``"inferred": True``.

    Raises:
        StructureMismatchError: a saved tensor is wider than the module's, or
            the head count of a pruned attention cannot be told from the shapes.

    Example::

        >>> import torch
        >>> from lightning_vitcompress._state_dict_structure import infer_records
        >>> from lightning_vitcompress.digits import DigitsClassifier
        >>> from lightning_vitcompress.functional import prune_vit
        >>> pruned = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
        >>> _ = prune_vit(pruned.model, 0.5, torch.randn(1, 3, 32, 32))
        >>> torch.save(pruned.state_dict(), "weights.pt")
        >>> module = DigitsClassifier(embed_dim=32, depth=2, num_heads=4)
        >>> records = infer_records(module, torch.load("weights.pt", weights_only=True))
        >>> [(record["kind"], record["target"], record["inferred"]) for record in records]
        [('prune', 'model', True)]
    """
    if target_path is None:
        target_path = _target_or_whole(module)
    prefix = f"{target_path}." if target_path else ""
    model = get_submodule(module, target_path)
    state = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    saved = SavedModel(model, state, target_path)
    for reader in readers():  # every survey first: a reader may use what a later one found
        if reader.survey is not None:
            reader.survey(saved)
    return [
        {"kind": reader.kind, "target": target_path, "inferred": True, **body}
        for reader in readers()
        for body in reader.read(saved)
    ]


# ----------------------------------------------------------------------------- checking
def check_structure(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    within: str = "",
    source: str = "The structure records",
) -> None:
    """Raise when ``module``'s tensors (after a replay) differ from ``state_dict``'s in shape or keys.

    ``within`` limits the comparison to keys under a prefix (a state dict of the
    inner ViT); ``strict`` also compares the key sets. ``source`` names what
    rebuilt the structure, for the message.

    Raises:
        StructureMismatchError: naming the module, the tensor, the rebuilt and the saved shape.
    """
    rebuilt = {key: value for key, value in module.state_dict().items() if key.startswith(within)}
    mismatched = []
    for key, value in state_dict.items():
        built = rebuilt.get(key)
        if isinstance(value, torch.Tensor) and isinstance(built, torch.Tensor) and built.shape != value.shape:
            owner, _, tensor = key.rpartition(".")
            mismatched.append(f"{owner or '(root)'} ({tensor}): rebuilt {list(built.shape)}, saved {list(value.shape)}")
    if mismatched:
        raise StructureMismatchError(
            f"{source} disagree with the saved weights: "
            + "; ".join(mismatched[:_SHOWN])
            + (f" and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else "")
        )
    if not strict:
        return
    missing = set(rebuilt) - set(state_dict)
    unexpected = set(state_dict) - set(rebuilt)
    if missing or unexpected:
        raise StructureMismatchError(
            f"The saved weights do not fit {type(module).__name__} as rebuilt: "
            + (f"missing {_first(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_first(unexpected)}" if unexpected else "")
            + ". They were saved from another architecture, or the module was built with other constructor "
            "arguments."
        )
