"""Argument checks shared by the callbacks: one message style, bools never pass as numbers.

Every error names the argument and its value and says what would work, in the
house style ``f"{argument}={value!r}: what would work."``. The constructor
checks what the value alone decides; ``setup`` checks what needs the model,
the Trainer or the file system (:func:`check_output_file`, :func:`check_output_dir`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, Optional, Union


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(value: Any, argument: str, example: str, *, integer: bool = False) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a finite number ``> 0`` (an ``int`` if asked)."""
    if integer:
        check_int(value, argument, minimum=1, example=example)
    elif not _is_number(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{argument}={value!r}: must be a positive finite number, e.g. {example}.")


def check_int(value: Any, argument: str, *, minimum: int, example: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is an ``int`` (not a bool) ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise ValueError(f"{argument}={value!r}: must be {what}, e.g. {example}.")


def check_fraction(value: Any, argument: str, hint: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a number in ``[0, 1]``."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument}={value!r}: must be a number in [0, 1] ({hint}).")


def check_bool(value: Any, argument: str, meaning: str = "") -> None:
    """Raise ``TypeError`` naming ``argument`` unless ``value`` is ``True`` or ``False`` (``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{argument}={value!r}: pass True or False{f' ({meaning})' if meaning else ''}.")


def check_choice(value: Any, argument: str, choices: Collection[str]) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argument}={value!r}: use one of {list(choices)}.")


def check_path(value: Any, argument: str) -> Optional[Path]:
    """``Path(value)`` for a non-empty ``str``/``os.PathLike``; ``None`` stays ``None``; anything else raises."""
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
