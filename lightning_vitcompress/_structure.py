"""Recording structural edits in checkpoints and replaying them on load.

A pruned, Nystrom-swapped or quantized model no longer matches the module its
``__init__`` builds, so its state dict cannot be loaded into a fresh instance.
Every structural callback therefore records each edit it makes as a small,
plain-data *record* (``weights_only``-safe: str/int/float/bool/None, lists,
tuples and dicts of them). The records travel in the checkpoint under
``"vitcompress_structure"``, in the order the edits were made, and are
replayed on a freshly built module before its weights are loaded:

* on resume (``trainer.fit(ckpt_path=...)``), by the callbacks at ``setup``;
* for inference, by :func:`load_compressed`.

A record is ``{"kind": <registered kind>, "target": <attribute path>, ...}``;
each structural module registers how to replay its kind with
:func:`register_replay`.

Example::

    @register_replay("my_edit")
    def _replay_my_edit(model: nn.Module, record: dict) -> None:
        shrink(model, record["ratio"])          # same shapes as when recorded

    record_edit(pl_module, {"kind": "my_edit", "target": "net", "ratio": 0.5})
"""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import torch
from torch import nn

from lightning_vitcompress._model import get_submodule

STRUCTURE_KEY = "vitcompress_structure"
_EDITS_ATTRIBUTE = "_vitcompress_edits"

Record = dict[str, Any]
ReplayFn = Callable[[nn.Module, Record], None]
_REPLAYS: dict[str, ReplayFn] = {}

#: the LightningModule class ``load_compressed`` builds (no Lightning import: any nn.Module class works)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def register_replay(kind: str) -> Callable[[ReplayFn], ReplayFn]:
    """Decorator: ``fn(target_module, record)`` rebuilds the structure of a ``kind`` edit."""

    def decorator(fn: ReplayFn) -> ReplayFn:
        _REPLAYS[kind] = fn
        return fn

    return decorator


def recorded_edits(pl_module: nn.Module) -> list[Record]:
    """The edits made to ``pl_module`` so far (the live list; append via :func:`record_edit`)."""
    edits = pl_module.__dict__.get(_EDITS_ATTRIBUTE)
    if edits is None:
        edits = []
        # stored in __dict__, not as a buffer: it is not part of the state dict
        pl_module.__dict__[_EDITS_ATTRIBUTE] = edits
    return edits


def record_edit(pl_module: nn.Module, record: Record) -> None:
    """Append ``record`` to the edits that will be saved with ``pl_module``'s checkpoints."""
    if record.get("kind") not in _REPLAYS:
        raise KeyError(f"No replay registered for edit kind {record.get('kind')!r}; known: {sorted(_REPLAYS)}")
    recorded_edits(pl_module).append(copy.deepcopy(record))


def save_edits(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Write the recorded edits into a checkpoint dict (idempotent)."""
    checkpoint[STRUCTURE_KEY] = copy.deepcopy(recorded_edits(pl_module))


def replay_edits(pl_module: nn.Module, records: list[Record]) -> None:
    """Re-apply ``records`` to a freshly built ``pl_module`` and record them again."""
    for record in records:
        kind = record.get("kind")
        if kind not in _REPLAYS:
            raise KeyError(f"Checkpoint holds an edit of unknown kind {kind!r}; known: {sorted(_REPLAYS)}")
        _REPLAYS[kind](get_submodule(pl_module, record.get("target", "")), record)
        recorded_edits(pl_module).append(copy.deepcopy(record))


def read_checkpoint(
    path: Union[str, Path],
    map_location: Any = "cpu",
    *,
    weights_only: bool = True,
    argument: str = "checkpoint_path",
) -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load(weights_only=True)``; never silently less safely.

    ``weights_only=True`` unpickles tensors and plain data only, so a crafted
    file cannot run code while it loads. A file holding other Python objects is
    refused with an error that names ``argument`` and the path; only the
    caller's explicit ``weights_only=False`` reads it (with a warning), for files
    you trust.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file needs ``weights_only=False`` (objects outside torch's allow-list).
        ValueError: the file is truncated, corrupted or not a ``torch.save`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r} does not exist or is not a file.")
    if not weights_only:
        warnings.warn(
            f"{argument}={str(path)!r} is loaded with weights_only=False: unpickling runs whatever code the file "
            "names. Only do this for files you created or trust.",
            stacklevel=2,
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if weights_only and "unsupported global" in reason.lower():
            raise UnsafeCheckpointError(
                f"{argument}={str(path)!r} holds Python objects that weights_only=True loading refuses (they could "
                "run code while unpickling). Load it with weights_only=False only if you trust the file, or save "
                f"plain data (tensors, numbers, strings, lists, dicts) instead. torch said: {reason}"
            ) from err
        raise ValueError(
            f"{argument}={str(path)!r} is not a readable torch checkpoint (corrupted, or another format): {reason}"
        ) from err
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails with KeyError, EOFError, RuntimeError...
        raise ValueError(
            f"{argument}={str(path)!r} is not a readable torch checkpoint (truncated, corrupted, or another "
            f"format): {type(err).__name__}: {_unpickler_reason(err)}"
        ) from err


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that only ``weights_only=False`` could read; refused unless the user asks for that."""


def _unpickler_reason(err: BaseException) -> str:
    """The line of a ``torch.load`` error that says what went wrong (torch wraps it in advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        _, marker, reason = line.partition("WeightsUnpickler error:")
        if marker:
            return reason.strip() or (lines[index + 1] if index + 1 < len(lines) else line)
    return lines[0] if lines else type(err).__name__


def load_compressed(
    module_class: type[ModuleT],
    checkpoint_path: Union[str, Path],
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    weights_only: bool = True,
    **init_kwargs: Any,
) -> ModuleT:
    """Build ``module_class``, replay the checkpoint's structural edits, load its weights.

    The one call that restores a pruned / Nystrom-swapped / quantized model for
    inference; returns it in ``eval()`` mode. ``init_kwargs`` go to
    ``module_class(...)``; when omitted, the hyper-parameters saved with
    ``self.save_hyperparameters()`` are used. The file is read with
    ``torch.load(weights_only=True)``; pass ``weights_only=False`` only for a
    file you trust that holds other Python objects (it warns).

    Example::

        model = load_compressed(LitClassifier, "checkpoints/last.ckpt")
        model(images).argmax(-1)
    """
    checkpoint = read_checkpoint(checkpoint_path, map_location, weights_only=weights_only)
    return build_from_checkpoint(module_class, checkpoint, strict=strict, **init_kwargs)


def build_from_checkpoint(
    module_class: type[ModuleT], checkpoint: dict[str, Any], *, strict: bool = True, **init_kwargs: Any
) -> ModuleT:
    """:func:`load_compressed` for a checkpoint dict already read with :func:`read_checkpoint`."""
    if not init_kwargs:
        init_kwargs = dict(checkpoint.get(getattr(module_class, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters"), {}) or {})
    pl_module = module_class(**init_kwargs)
    replay_edits(pl_module, checkpoint.get(STRUCTURE_KEY, []))
    # assign=True keeps tensor subclasses (torchao quantized weights) as saved
    pl_module.load_state_dict(checkpoint["state_dict"], strict=strict, assign=True)
    if callable(getattr(pl_module, "on_load_checkpoint", None)):  # a LightningModule's own hook
        pl_module.on_load_checkpoint(checkpoint)
    return pl_module.eval()


def replay_from_checkpoint(
    pl_module: nn.Module, checkpoint_path: Optional[Union[str, Path]], *, weights_only: bool = True
) -> list[Record]:
    """On resume: replay the edits saved in ``checkpoint_path`` onto ``pl_module``.

    Reads the file as ``trainer.fit(ckpt_path=..., weights_only=...)`` asked
    (safely unless the user passed ``weights_only=False``).

    Returns the replayed records (empty when there is no checkpoint, no edits,
    or they were already replayed), so callbacks can tell how far they got.
    """
    if not checkpoint_path or recorded_edits(pl_module) or not Path(checkpoint_path).is_file():
        return []
    records = read_checkpoint(checkpoint_path, weights_only=weights_only, argument="ckpt_path").get(STRUCTURE_KEY, [])
    replay_edits(pl_module, records)
    return records
