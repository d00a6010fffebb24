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

Files without records (``ModelCheckpoint(save_weights_only=True)``, a bare
``torch.save(model.state_dict())``, ``.safetensors``) still hold the structure
in their tensors: then it is read from them
(:mod:`lightning_vitcompress._state_dict_structure`). This module is the one
place that decides: records where the file has them, else the tensors; either
way the rebuilt module is checked against the saved shapes before loading.

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
import hashlib
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

import torch
from torch import nn

from lightning_vitcompress._model import get_submodule

STRUCTURE_KEY = "vitcompress_structure"
#: where checkpoints carry the SHA-256 digest of their tensors (see :func:`checkpoint_digest`)
DIGEST_KEY = "vitcompress_digest"
_EDITS_ATTRIBUTE = "_vitcompress_edits"

Record = dict[str, Any]
ReplayFn = Callable[[nn.Module, Record], None]
_REPLAYS: dict[str, ReplayFn] = {}

#: the LightningModule class ``load_compressed`` builds (no Lightning import: any nn.Module class works)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


# ------------------------------------------------------------------ shapes of a model
#: integer/float attributes that describe a module's shapes; replayed from the record
SHAPE_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "normalized_shape",
    "num_features",
    "embedding_dim",
    "embed_dim",
    "head_hidden_size",
    "num_heads",
    "head_dim",
    "attn_dim",
    "scale",
    "kdim",
    "vdim",
    # transformers attention and torchvision's VisionTransformer keep their widths under these names
    "num_attention_heads",
    "attention_head_size",
    "all_head_size",
    "hidden_dim",
)


def shape_snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's tensor shapes and shape attributes (:data:`SHAPE_ATTRIBUTES`), as plain data."""
    snapshot: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        tensors = {n: list(t.shape) for n, t in module.named_parameters(recurse=False)}
        tensors.update({n: list(t.shape) for n, t in module.named_buffers(recurse=False) if t is not None})
        attrs = {}
        for attr in SHAPE_ATTRIBUTES:
            value = module.__dict__.get(attr)
            if isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
                continue
            attrs[attr] = list(value) if isinstance(value, (tuple, list)) else value
        snapshot[name] = {"tensors": tensors, "attrs": attrs}
    return snapshot


def shape_changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What differs between two :func:`shape_snapshot` s: the ``modules`` part of a structural record."""
    changes: dict[str, Any] = {}
    for name, now in after.items():
        old = before.get(name, {"tensors": {}, "attrs": {}})
        tensors = {n: s for n, s in now["tensors"].items() if old["tensors"].get(n) != s}
        attrs = {a: v for a, v in now["attrs"].items() if old["attrs"].get(a) != v}
        if tensors or attrs:
            changes[name] = {"tensors": tensors, "attrs": attrs}
    return changes


class ModelSnapshot:
    """What pruning may change in ``model``: each module's attributes, its tensors' objects, values and grads.

    ``restore()`` puts all of it back in place, so a failed or trial prune leaves
    the very same objects (the optimizer keeps pointing at the right tensors). It
    hands out copies, so training or pruning after a restore leaves the snapshot
    as it was: a second ``restore()`` goes back to the same state.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(module, _shallow_copies(vars(module))) for module in model.modules()]
        tensors = [*model.parameters(), *model.buffers()]
        self.tensors = [(tensor, tensor.data.clone(), tensor.grad) for tensor in tensors]

    def restore(self) -> None:
        for module, attributes in self.modules:
            vars(module).clear()
            vars(module).update(_shallow_copies(attributes))
        for tensor, data, grad in self.tensors:
            tensor.data = data.clone()
            tensor.grad = grad


def _shallow_copies(attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` with its dicts (``_parameters``, ``_modules``...) copied, so edits to them stay out."""
    return {key: copy.copy(value) if isinstance(value, dict) else value for key, value in attributes.items()}


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

    A ``.safetensors`` file (recognised by its header, whatever its name) is
    read with ``safetensors.torch.load_file``, which runs no code at all, and
    gives a bare state dict. ``weights_only=True`` unpickles tensors and plain data only, so a crafted
    file cannot run code while it loads. A file holding other Python objects is
    refused with an error that names ``argument`` and the path; only the
    caller's explicit ``weights_only=False`` reads it (with a warning), for files
    you trust.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file needs ``weights_only=False`` (objects outside torch's allow-list).
        ValueError: the file is truncated, corrupted or not a ``torch.save`` file.
        CheckpointIntegrityError: its tensors differ from the digest saved with them (see :func:`verify_digest`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r} does not exist or is not a file.")
    if _is_safetensors(path):
        return _read_safetensors(path, map_location, argument)
    if not weights_only:
        warnings.warn(
            f"{argument}={str(path)!r} is loaded with weights_only=False: unpickling runs whatever code the file "
            "names. Only do this for files you created or trust.",
            stacklevel=2,
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
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
    if isinstance(checkpoint, Mapping):
        verify_digest(checkpoint, path, argument)
    return checkpoint


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little endian), then ``{``."""
    with path.open("rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def _read_safetensors(path: Path, map_location: Any, argument: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    device = map_location if isinstance(map_location, (str, int, torch.device)) else "cpu"
    try:
        return load_file(path, device=str(device))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"{argument}={str(path)!r} is not a readable safetensors file: {err}") from err


def save_safetensors(state: Union[nn.Module, Mapping[str, Any]], path: Union[str, Path]) -> None:
    """Write a module's (or a state dict's) tensors to a ``.safetensors`` file that :func:`load_compressed` reads.

    safetensors holds plain tensors only; torchao's quantized weights (tensor
    subclasses) and non-tensor extra state (``X86Int8StaticLinear``'s
    calibrated input range) cannot go there: they are refused with an error
    naming the key, instead of safetensors' own "invalid python storage".

    Example::

        save_safetensors(lit_module, "pruned.safetensors")  # or lit_module.model
        model = load_compressed(LitClassifier, "pruned.safetensors", **init_kwargs)
    """
    from safetensors.torch import save_file

    state_dict = state.state_dict() if isinstance(state, nn.Module) else state
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or type(value) not in (torch.Tensor, nn.Parameter):
            raise TypeError(
                f"{key} is a {type(value).__name__}, which safetensors cannot hold (plain tensors only; torchao "
                "quantized weights are tensor subclasses). Save it with torch.save(model.state_dict(), path): "
                "load_compressed reads that file with weights_only=True."
            )
    save_file({key: value.detach().contiguous() for key, value in state_dict.items()}, str(path))


# ------------------------------------------------------------------ integrity digest
class CheckpointIntegrityError(ValueError):
    """A checkpoint whose tensors differ from the digest saved with them: damaged, truncated or altered."""


def _plain_parts(value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The plain tensors holding ``value``'s data: itself, or a tensor subclass's inner tensors (torchao)."""
    if type(value) in (torch.Tensor, nn.Parameter) or not hasattr(value, "__tensor_flatten__"):
        return [("", value)]
    names, _ = value.__tensor_flatten__()
    return [(f".{name}{sub}", part) for name in names for sub, part in _plain_parts(getattr(value, name))]


def _tensor_digest(value: torch.Tensor) -> str:
    hasher = hashlib.sha256(type(value).__name__.encode())
    for name, part in _plain_parts(value.detach()):
        hasher.update(f"{name}|{part.dtype}|{tuple(part.shape)}|{part.stride()}|{part.storage_offset()}|".encode())
        storage = part.untyped_storage()
        if storage.device.type != "cpu":
            storage = storage.cpu()
        if storage.nbytes():  # a zero-copy byte view of the whole storage the tensor views
            hasher.update(torch.empty(0, dtype=torch.uint8).set_(storage).numpy().data)
    return hasher.hexdigest()


def _tensors_of(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` of every tensor inside nested dicts / lists / tuples (``"state_dict/head.weight"``)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if path or key != DIGEST_KEY:
                yield from _tensors_of(item, f"{path}/{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors_of(item, f"{path}/{index}")


def checkpoint_digest(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """SHA-256 of each tensor in ``checkpoint`` as ``torch.save`` writes it: ``{path: hex digest}``.

    Covers the model's weights and every other tensor the file holds (optimizer
    and scheduler state, callback state). Each digest covers the tensor's dtype,
    shape, strides, offset and the whole storage it views (what the file holds,
    to the byte); tensor subclasses (torchao quantized weights) are digested
    through their inner tensors. About as costly as reading the bytes once
    (ViT-B/16 weights: 0.28 s against 0.89 s for ``torch.save``, one run on an AMD EPYC).
    """
    return {path: _tensor_digest(tensor) for path, tensor in _tensors_of(checkpoint)}


def add_digest(checkpoint: dict[str, Any]) -> None:
    """Store the digest of every tensor of ``checkpoint`` in it, under :data:`DIGEST_KEY`."""
    checkpoint.pop(DIGEST_KEY, None)
    checkpoint[DIGEST_KEY] = {"algorithm": "sha256", "tensors": checkpoint_digest(checkpoint)}


def verify_digest(checkpoint: Mapping[str, Any], path: Union[str, Path], argument: str) -> None:
    """Refuse a checkpoint whose tensors do not match the digest saved with them (none saved: nothing to check).

    Every tensor the digest names must be present and equal; tensors added
    after the digest was taken (e.g. by a ``LightningModule.on_save_checkpoint``)
    are not checked.

    Raises:
        CheckpointIntegrityError: names ``argument``, the file, the first differing tensors and what to do.
    """
    saved = checkpoint.get(DIGEST_KEY)
    if saved is None:
        return
    expected = saved.get("tensors") if isinstance(saved, Mapping) else None
    if not isinstance(expected, Mapping) or saved.get("algorithm") != "sha256":
        bad = ["the digest entry itself"]
    else:
        actual = checkpoint_digest(checkpoint)
        bad = [key for key, digest in expected.items() if actual.get(key) != digest]
    if bad:
        shown = ", ".join(repr(key) for key in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointIntegrityError(
            f"{argument}={str(path)!r} is damaged: {shown} no longer match the SHA-256 digest saved with the "
            "checkpoint (a disk error, an interrupted or truncated copy, or an edit), so it is not loaded. Use "
            "another copy or an earlier checkpoint. If you changed the tensors on purpose, delete its "
            f"{DIGEST_KEY!r} entry (torch.load, del, torch.save) to load it unverified."
        )


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
    """Build ``module_class``, rebuild the saved model's structure, load its weights.

    The one call that restores a pruned / Nystrom-swapped / quantized model for
    inference; returns it in ``eval()`` mode. ``checkpoint_path`` may be

    * a Lightning checkpoint, full or ``ModelCheckpoint(save_weights_only=True)``;
    * a bare state dict saved with ``torch.save``, of the LightningModule
      (``lit.state_dict()``) or of the ViT inside it (``lit.model.state_dict()``);
    * a ``.safetensors`` file of either.

    The structure comes from the edit records the callbacks saved in full
    checkpoints; where a file has none, it is read from the tensors themselves
    (shapes, keys, tensor types). Either way the rebuilt module is checked
    against the saved shapes, and a disagreement is an error naming the module.

    ``init_kwargs`` go to ``module_class(...)``; when omitted, the
    hyper-parameters saved with ``self.save_hyperparameters()`` are used. A bare
    state dict holds no hyper-parameters: pass ``init_kwargs`` unless the
    module's defaults build the architecture that was saved. Files are read
    with ``torch.load(weights_only=True)`` (safetensors without unpickling);
    pass ``weights_only=False`` only for a file you trust that holds other
    Python objects (it warns).

    Example::

        model = load_compressed(LitClassifier, "checkpoints/last.ckpt")
        model = load_compressed(LitClassifier, "vit.safetensors", embed_dim=192, depth=12)
        model(images).argmax(-1)

    Raises:
        StructureMismatchError: the saved tensors do not fit the rebuilt module
            (another architecture, other ``init_kwargs``, records that disagree
            with the weights); the message names the module and both shapes.
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(
            f"module_class={module_class!r}: pass the LightningModule class that saved the checkpoint (the class, "
            "not an instance), e.g. load_compressed(LitClassifier, 'last.ckpt')."
        )
    for name, flag in (("weights_only", weights_only), ("strict", strict)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}={flag!r}: pass True or False.")
    if not isinstance(checkpoint_path, (str, Path)):
        raise TypeError(f"checkpoint_path={checkpoint_path!r}: pass the path of a checkpoint or state-dict file.")
    checkpoint = read_checkpoint(checkpoint_path, map_location, weights_only=weights_only)
    return build_from_checkpoint(module_class, checkpoint, strict=strict, **init_kwargs)


def build_from_checkpoint(
    module_class: type[ModuleT], checkpoint: dict[str, Any], *, strict: bool = True, **init_kwargs: Any
) -> ModuleT:
    """:func:`load_compressed` for a checkpoint (or bare state dict) already read with :func:`read_checkpoint`."""
    from lightning_vitcompress._state_dict_structure import (
        StructureMismatchError,
        align_state_dict,
        check_structure,
        infer_records,
    )

    lightning = isinstance(checkpoint.get("state_dict"), Mapping)
    pl_module = _construct(module_class, checkpoint if lightning else None, init_kwargs)
    state_dict, added_prefix = align_state_dict(pl_module, checkpoint["state_dict"] if lightning else checkpoint)
    records = checkpoint.get(STRUCTURE_KEY) if lightning else None
    source = "The checkpoint's structure records" if records else "The structure read from the saved tensors"
    try:
        replay_edits(pl_module, records or infer_records(pl_module, state_dict))
        check_structure(pl_module, state_dict, strict=strict, within=added_prefix, source=source)
    except StructureMismatchError as err:
        if lightning or init_kwargs:
            raise
        raise StructureMismatchError(
            f"{err} The file is a bare state dict, which holds no hyper-parameters, so {module_class.__name__}() was "
            f"built with its defaults: pass the constructor arguments, load_compressed({module_class.__name__}, "
            "path, **init_kwargs)."
        ) from err
    # assign=True keeps tensor subclasses (torchao quantized weights) as saved
    if added_prefix:  # a state dict of the ViT alone
        vit = get_submodule(pl_module, added_prefix[:-1])
        vit.load_state_dict({k[len(added_prefix) :]: v for k, v in state_dict.items()}, strict=strict, assign=True)
    else:
        pl_module.load_state_dict(state_dict, strict=strict, assign=True)
    if lightning and callable(getattr(pl_module, "on_load_checkpoint", None)):  # a LightningModule's own hook
        pl_module.on_load_checkpoint(checkpoint)
    return pl_module.eval()


def _construct(
    module_class: type[ModuleT], checkpoint: Optional[Mapping[str, Any]], init_kwargs: dict[str, Any]
) -> ModuleT:
    """``module_class(**init_kwargs)``, or with the checkpoint's hyper-parameters when none are given."""
    if init_kwargs or checkpoint is None:
        try:
            return module_class(**init_kwargs)
        except Exception as err:
            if checkpoint is not None:
                raise
            raise TypeError(
                f"{module_class.__name__}(**{init_kwargs}) failed ({type(err).__name__}: {err}). The file is a bare "
                "state dict, which holds no hyper-parameters: pass the constructor arguments, "
                f"load_compressed({module_class.__name__}, path, **init_kwargs)."
            ) from err
    key = getattr(module_class, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")  # Lightning's, without importing it
    return module_class(**dict(checkpoint.get(key, {}) or {}))


def replay_checkpoint_structure(pl_module: nn.Module, checkpoint: Mapping[str, Any]) -> list[Record]:
    """On resume: rebuild the structure of the model saved in ``checkpoint`` on a freshly built ``pl_module``.

    Replays the saved edit records; a checkpoint without records (written by a
    fit without these callbacks, or by an older version) whose shapes differ
    from ``pl_module``'s gets its structure read from the tensors instead
    (records marked ``"inferred": True``). The result is checked against the
    saved shapes. Returns the replayed records, so callbacks can tell how far
    they got.
    """
    from lightning_vitcompress._state_dict_structure import check_structure, infer_records

    state_dict = checkpoint.get("state_dict")
    records = list(checkpoint.get(STRUCTURE_KEY) or [])
    source = "The checkpoint's structure records"
    if not records and isinstance(state_dict, Mapping):
        records = infer_records(pl_module, state_dict)
        source = "The structure read from the saved tensors"
    replay_edits(pl_module, records)
    if records and isinstance(state_dict, Mapping):
        # Lightning compares the key sets itself (as strict as the module's strict_loading)
        check_structure(pl_module, state_dict, strict=False, source=source)
    return records
