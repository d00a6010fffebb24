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
each structural module registers how to replay its kind, and how to read it
from a state dict, in :mod:`lightning_vitcompress._registry`: this module
imports no technique. Reading files safely is
:mod:`lightning_vitcompress._checkpoint_file`.

Example (a toy edit that narrows a layer, recorded and replayed on a fresh module)::

    >>> from torch import nn
    >>> from lightning_vitcompress._registry import register_replay
    >>> from lightning_vitcompress._structure import record_edit, recorded_edits, replay_edits
    >>> def shrink(model: nn.Module, ratio: float) -> None:
    ...     model.fc = nn.Linear(8, int(8 * ratio))
    >>> @register_replay("my_edit")
    ... def _replay_my_edit(model: nn.Module, record: dict) -> None:
    ...     shrink(model, record["ratio"])          # same shapes as when recorded
    >>> def build() -> nn.Module:
    ...     pl_module = nn.Module()
    ...     pl_module.net = nn.Module()
    ...     pl_module.net.fc = nn.Linear(8, 8)
    ...     return pl_module
    >>> pl_module = build()
    >>> shrink(pl_module.net, 0.5)
    >>> record_edit(pl_module, {"kind": "my_edit", "target": "net", "ratio": 0.5})
    >>> fresh = build()
    >>> replay_edits(fresh, recorded_edits(pl_module))   # what loading a checkpoint does
    >>> fresh.net.fc.out_features
    4
    >>> from lightning_vitcompress._registry import _REPLAYS
    >>> _ = _REPLAYS.pop("my_edit")   # this example's cleanup: the registry is global
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from torch import nn

from lightning_vitcompress._checkpoint_file import (
    DIGEST_KEY,
    CheckpointIntegrityError,
    UnsafeCheckpointError,
    add_digest,
    checkpoint_digest,
    read_checkpoint,
    save_safetensors,
    verify_digest,
)
from lightning_vitcompress._model import get_submodule
from lightning_vitcompress._registry import Record, ReplayFn, known_kinds, register_replay, replay_for
from lightning_vitcompress._state_dict_structure import (
    StructureMismatchError,
    align_state_dict,
    check_structure,
    infer_records,
)

__all__ = [  # the names other modules import from here (the file and registry names are re-exported)
    "DIGEST_KEY",
    "STRUCTURE_KEY",
    "CheckpointIntegrityError",
    "ModelSnapshot",
    "Record",
    "ReplayFn",
    "UnsafeCheckpointError",
    "add_digest",
    "build_from_checkpoint",
    "checkpoint_digest",
    "edits_of",
    "load_compressed",
    "read_checkpoint",
    "record_edit",
    "recorded_edits",
    "register_replay",
    "replay_checkpoint_structure",
    "replay_edits",
    "save_edits",
    "save_safetensors",
    "shape_changes",
    "shape_snapshot",
    "verify_digest",
]

STRUCTURE_KEY = "vitcompress_structure"
_EDITS_ATTRIBUTE = "_vitcompress_edits"

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


def recorded_edits(pl_module: nn.Module) -> list[Record]:
    """The edits made to ``pl_module`` so far (the live list; append via :func:`record_edit`)."""
    edits = pl_module.__dict__.get(_EDITS_ATTRIBUTE)
    if edits is None:
        edits = []
        # stored in __dict__, not as a buffer: it is not part of the state dict
        pl_module.__dict__[_EDITS_ATTRIBUTE] = edits
    return edits


def edits_of(pl_module: nn.Module, kind: str, target: Optional[str]) -> list[Record]:
    """The edits of ``kind`` made to the model at ``target`` (replayed from a checkpoint or made in this process)."""
    return [r for r in recorded_edits(pl_module) if r.get("kind") == kind and r.get("target") == target]


def record_edit(pl_module: nn.Module, record: Record) -> None:
    """Append ``record`` to the edits that will be saved with ``pl_module``'s checkpoints."""
    if replay_for(record.get("kind")) is None:
        raise KeyError(f"No replay registered for edit kind {record.get('kind')!r}; known: {known_kinds()}")
    recorded_edits(pl_module).append(copy.deepcopy(record))


def save_edits(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Write the recorded edits into a checkpoint dict (idempotent)."""
    checkpoint[STRUCTURE_KEY] = copy.deepcopy(recorded_edits(pl_module))


def replay_edits(pl_module: nn.Module, records: list[Record]) -> None:
    """Re-apply ``records`` to a freshly built ``pl_module`` and record them again."""
    for record in records:
        kind = record.get("kind")
        replay = replay_for(kind)
        if replay is None:
            raise KeyError(f"Checkpoint holds an edit of unknown kind {kind!r}; known: {known_kinds()}")
        replay(get_submodule(pl_module, record.get("target", "")), record)
        recorded_edits(pl_module).append(copy.deepcopy(record))


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

        >>> import lightning as L, torch
        >>> from lightning_vitcompress import PruningSchedule, load_compressed
        >>> from lightning_vitcompress._checkpoint_file import save_safetensors
        >>> from lightning_vitcompress.digits import DigitsClassifier as LitClassifier, DigitsDataModule
        >>> lit = LitClassifier(embed_dim=32, depth=2, num_heads=4)
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[PruningSchedule(0.5)],
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(lit, DigitsDataModule())
        >>> trainer.save_checkpoint("checkpoints/last.ckpt")
        >>> save_safetensors(lit, "vit.safetensors")
        >>> model = load_compressed(LitClassifier, "checkpoints/last.ckpt")   # records and hyper-parameters
        >>> model = load_compressed(LitClassifier, "vit.safetensors", embed_dim=32, depth=2, num_heads=4)  # tensors
        >>> model.model.embed_dim, model(torch.randn(2, 3, 32, 32)).argmax(-1).shape   # pruned from 32
        (16, torch.Size([2]))

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
    hook = getattr(pl_module, "on_load_checkpoint", None)
    if lightning and callable(hook):  # a LightningModule's own hook
        hook(checkpoint)
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
