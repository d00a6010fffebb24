"""Argument checks shared by every callback and config: one message style, bools never pass as numbers.

Every error names the argument and its value and says what would work, in the
house style ``f"{argument}={value!r}: what would work."``. A value of the wrong
kind (a string where a flag or a path is expected) is a ``TypeError``; a value
of the right kind outside what works is a ``ValueError``. The constructor
checks what the value alone decides; ``setup`` checks what needs the model,
the Trainer or the file system (:func:`check_output_file`, :func:`check_output_dir`).

Example::

    >>> from lightning_vitcompress._checks import check_fraction, check_int
    >>> check_int(3, "num_steps", minimum=1, example="3 pruning steps")
    >>> check_fraction(1.5, "pruning_ratio", "0.5 to remove half")
    Traceback (most recent call last):
    ValueError: pruning_ratio=1.5: must be a number in (0, 1), e.g. 0.5 to remove half.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = [
    "check_block_selection",
    "check_bool",
    "check_choice",
    "check_example_input",
    "check_fraction",
    "check_int",
    "check_max_accuracy_drop",
    "check_names",
    "check_output_dir",
    "check_output_file",
    "check_path",
    "check_positive",
    "config_or_options",
    "example_input_error",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_positive(value: Any, argument: str, example: str, *, integer: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number ``> 0`` (an ``int`` when ``integer``)."""
    if integer:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{argument}={value!r}: must be a positive whole number, e.g. {example}.")
    elif not _is_number(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{argument}={value!r}: must be a positive finite number, e.g. {example}.")


def check_int(value: Any, argument: str, *, minimum: int = 0, example: str, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) ``>= minimum`` (or None when ``allow_none``)."""
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(f"{argument}={value!r}: pass an int >= {minimum}{none}, e.g. {example}.")


def check_fraction(value: Any, argument: str, example: str, *, closed: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in (0, 1), or in [0, 1] when ``closed``."""
    inside = _is_number(value) and (0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0)
    if not inside:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{argument}={value!r}: must be a number in {interval}, e.g. {example}.")


def check_max_accuracy_drop(value: Any, argument: str = "max_accuracy_drop") -> None:
    """Raise unless ``value`` is None or a number of points of top-1 in [0, 100) (``1.0`` = one point)."""
    if value is None:
        return
    if not _is_number(value) or not 0.0 <= value < 100.0:
        raise ValueError(
            f"{argument}={value!r}: pass the validation top-1 points the model may lose against the model as it "
            "entered fit, a number in [0, 100) (e.g. 1.0 for one point), or None for no budget."
        )


def check_bool(value: Any, argument: str, meaning: str = "") -> None:
    """Raise ``TypeError`` unless ``value`` is ``True`` or ``False`` (``"no"`` and ``1`` are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{argument}={value!r}: pass True or False{f' ({meaning})' if meaning else ''}.")


def check_choice(value: Any, argument: str, choices: Sequence[str], hint: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (``hint`` adds other accepted forms)."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{argument}={value!r}: use one of {options}{hint}.")


def check_names(value: Any, argument: str, example: str) -> list[str]:
    """A list of non-empty attribute names; a lone string is refused (it would be read per character)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{argument}={value!r}: pass a list of attribute names, e.g. {example}.")
    names = list(value)
    if not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{argument}={value!r}: every entry must be a non-empty attribute name, e.g. {example}.")
    return names


def check_block_selection(
    blocks: Any, *, kind: str = "attention-block", example: str = "[0, 1] or ['blocks.0.attn']"
) -> Optional[list[Union[int, str]]]:
    """``blocks`` as a list of block indices or names (None stays None, for all), or a ``ValueError`` naming it.

    ``kind`` and ``example`` name what the technique selects (``"transformer-block"`` for token merging).
    """
    if blocks is not None and (
        isinstance(blocks, (str, int))
        or not isinstance(blocks, Sequence)
        or not blocks
        or not all(isinstance(b, (int, str)) and not isinstance(b, bool) for b in blocks)
    ):
        raise ValueError(
            f"blocks={blocks!r}: pass a non-empty list of {kind} indices or names (e.g. {example}), or None for all."
        )
    return list(blocks) if blocks is not None else None


def check_example_input(value: Any, argument: str = "example_input") -> None:
    """Raise ``ValueError`` unless ``value`` is None or one input batch: a tensor with a non-empty batch dimension."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] > 0:
            return
        shown = f"<tensor of shape {tuple(value.shape)}>"
    else:
        shown = repr(value) if len(repr(value)) < 60 else f"<{type(value).__name__}>"
    raise ValueError(
        f"{argument}={shown}: pass one input batch of the model as a tensor (e.g. torch.randn(1, 3, 224, 224)), "
        "or None."
    )


def example_input_error(example: torch.Tensor, model: Any, err: BaseException) -> ValueError:
    """The error for a user's ``example_input`` that ``model`` cannot run (raise it ``from err``)."""
    return ValueError(
        f"example_input=<tensor of shape {tuple(example.shape)}> does not run through {type(model).__name__}: "
        f"pass one input batch the model takes. It said: {type(err).__name__}: {err}"
    )


def check_path(value: Any, argument: str) -> Optional[Path]:
    """``Path(value)`` for a non-empty ``str``/``os.PathLike`` (``None`` stays ``None``)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{argument}={value!r} ({type(value).__name__}): pass a file path (str or pathlib.Path), or None."
        )
    if not os.fspath(value):
        raise ValueError(f"{argument}={value!r}: pass a file path, or None for no file.")
    return Path(value)


def _writable_ancestor(path: Path, argument: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory we may write in (missing ones get created)."""
    parent = path.parent if path.parent != Path("") else Path(".")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{argument}={str(path)!r}: {str(parent)!r} is a file, not a directory. Pass another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{argument}={str(path)!r}: the directory {str(parent)!r} is not writable. Pass a path you can write to."
        )


def check_output_file(path: Union[str, Path], argument: str) -> None:
    """At ``setup``: a file can be written at ``path`` (not a directory; its directory exists or can be created)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{argument}={str(path)!r} is a directory; pass a file path in it, e.g. {str(path / 'model.ckpt')!r}."
        )
    _writable_ancestor(path, argument)


def check_output_dir(path: Union[str, Path], argument: str) -> None:
    """At ``setup``: ``path`` is a writable directory, or can be created."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"{argument}={str(path)!r} is a file; pass a directory (it is created if missing)."
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(
                f"{argument}={str(path)!r}: the directory is not writable. Pass one you can write to."
            )
        return
    _writable_ancestor(path, argument)


def config_or_options(config: Any, config_class: type, options: dict[str, Any], owner: str) -> Any:
    """A technique's frozen config: ``config`` when given (``options`` then stay at their defaults), else built
    from the keyword ``options`` (which validates them).

    Example::

        >>> from lightning_vitcompress._checks import config_or_options
        >>> from lightning_vitcompress.functional import PruneConfig
        >>> config_or_options(None, PruneConfig, dict(pruning_ratio=0.3), "PruningSchedule").pruning_ratio
        0.3
        >>> config_or_options(PruneConfig(0.3), PruneConfig, dict(pruning_ratio=0.7), "PruningSchedule")
        Traceback (most recent call last):
        ValueError: PruningSchedule(config=..., pruning_ratio=0.7): pass the options either in config or as keyword
        arguments, not both (e.g. dataclasses.replace(config, pruning_ratio=0.7)).
    """
    if config is None:
        return config_class(**options)
    if not isinstance(config, config_class):
        raise TypeError(f"config={config!r}: pass a {config_class.__name__}, or None to use the keyword arguments.")
    defaults = {field.name: field.default for field in dataclasses.fields(config_class)}
    changed = [f"{name}={value!r}" for name, value in options.items() if name in defaults and value != defaults[name]]
    if changed:
        raise ValueError(
            f"{owner}(config=..., {', '.join(changed)}): pass the options either in config or as keyword "
            f"arguments, not both (e.g. dataclasses.replace(config, {changed[0]}))."
        )
    return config
