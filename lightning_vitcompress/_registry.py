"""What each structural technique registers so a saved model can be rebuilt: its replay and its state-dict reader.

A structural edit (prune, Nyström swap, quantization, token merging) is saved
as a plain-data *record* (see :mod:`lightning_vitcompress._structure`). Each
technique registers, when its module is imported:

* a **replay** (:func:`register_replay`): ``fn(target_module, record)`` gives a
  freshly built model the structure the edit left;
* optionally a **reader** (:func:`register_reader`): how to read that structure
  back from a state dict that came without records (a bare ``torch.save`` or
  ``.safetensors`` file), as the bodies of the records to replay.

This module imports no technique: the techniques import it. The package's
``__init__`` imports every technique (through ``lightning_vitcompress.functional``),
so all have registered before any checkpoint loads. Readers run in ``order``,
which is the order the callbacks act in: prune (10), Nyström (20), quantize (30).

Example (a toy edit that narrows a layer)::

    >>> from torch import nn
    >>> from lightning_vitcompress._registry import known_kinds, register_reader, register_replay, replay_for
    >>> def shrink(model: nn.Module, ratio: float) -> None:
    ...     model.fc = nn.Linear(8, int(8 * ratio))
    >>> @register_replay("my_edit")
    ... def _replay_my_edit(model: nn.Module, record: dict) -> None:
    ...     shrink(model, record["ratio"])          # same shapes as when recorded
    >>> register_reader("my_edit", lambda saved: [{"ratio": 0.5}] if "shrunk" in saved.state_dict else [], order=40)
    >>> model = nn.Module()
    >>> model.fc = nn.Linear(8, 8)
    >>> replay_for("my_edit")(model, {"kind": "my_edit", "ratio": 0.5})
    >>> model.fc.out_features, "my_edit" in known_kinds()
    (4, True)
    >>> from lightning_vitcompress._registry import _READERS, _REPLAYS
    >>> _ = _REPLAYS.pop("my_edit"), _READERS.pop("my_edit")   # this example's cleanup: the registry is global
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

__all__ = [
    "Record",
    "ReplayFn",
    "SavedModel",
    "StructureReader",
    "known_kinds",
    "readers",
    "register_reader",
    "register_replay",
    "replay_for",
]

Record = dict[str, Any]
ReplayFn = Callable[[nn.Module, Record], None]

_REPLAYS: dict[str, ReplayFn] = {}
_READERS: dict[str, StructureReader] = {}


@dataclass
class SavedModel:
    """A state dict being read back into records: what every reader sees, and what the earlier ones found.

    ``state_dict`` has keys relative to ``model`` (the ViT, freshly built);
    ``target`` is the ViT's attribute path in the LightningModule (``""``: the
    module itself). A reader's ``survey`` may rename keys in ``state_dict`` to
    the form the later readers expect, and leaves what it found under its kind
    in ``found`` (e.g. ``found["nystrom"]``: the blocks saved as Nyström attention).
    """

    model: nn.Module
    state_dict: dict[str, Any]
    target: str
    found: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """``"<target>."``, or ``""`` for the module itself: what error messages put in front of a key."""
        return f"{self.target}." if self.target else ""


@dataclass(frozen=True)
class StructureReader:
    """How one technique reads its structure back from a :class:`SavedModel`.

    All ``survey`` functions run first (in ``order``), then all ``read``
    functions (in ``order``): a reader can use what a later technique's survey
    found (pruning reads the head layout of blocks saved as Nyström attention).
    ``read`` returns the bodies of the records to replay; ``kind``, ``target``
    and ``"inferred": True`` are added to each.
    """

    kind: str
    read: Callable[[SavedModel], list[Record]]
    order: int
    survey: Optional[Callable[[SavedModel], None]] = None


def register_replay(kind: str) -> Callable[[ReplayFn], ReplayFn]:
    """Decorator: ``fn(target_module, record)`` rebuilds the structure of a ``kind`` edit."""

    def decorator(fn: ReplayFn) -> ReplayFn:
        _REPLAYS[kind] = fn
        return fn

    return decorator


def register_reader(
    kind: str,
    read: Callable[[SavedModel], list[Record]],
    *,
    order: int,
    survey: Optional[Callable[[SavedModel], None]] = None,
) -> None:
    """Register how a ``kind`` edit is read back from a state dict without records (see :class:`StructureReader`)."""
    _READERS[kind] = StructureReader(kind, read, order, survey)


def replay_for(kind: Any) -> Optional[ReplayFn]:
    """The replay registered for ``kind``, or None."""
    return _REPLAYS.get(kind)


def known_kinds() -> list[str]:
    """The edit kinds that have a replay, sorted (for error messages)."""
    return sorted(_REPLAYS)


def readers() -> list[StructureReader]:
    """The registered readers, in the order their records are replayed."""
    return sorted(_READERS.values(), key=lambda reader: reader.order)
