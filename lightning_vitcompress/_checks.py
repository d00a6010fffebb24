"""Argument checks shared by the callbacks: one message style, ``name=value: what would work.``

Each check raises ``ValueError`` (``TypeError`` never: a user reading the
message wants to know the value that works, not the type theory) naming the
argument and its value. ``bool`` is refused where a number is expected, since
``True`` is an ``int`` to Python but never what the user meant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_vitcompress.functional.measure import check_positive

__all__ = [
    "check_bool",
    "check_choice",
    "check_example_input",
    "check_fraction",
    "check_int",
    "check_names",
    "check_positive",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_int(value: Any, argument: str, *, minimum: int = 0, example: str, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an int (not a bool) ``>= minimum`` (or None when ``allow_none``)."""
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(f"{argument}={value!r}: pass an int >= {minimum}{none}, e.g. {example}.")


def check_fraction(value: Any, argument: str, example: str) -> None:
    """Raise unless ``value`` is a real number strictly between 0 and 1."""
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{argument}={value!r}: must be a number in (0, 1), e.g. {example}.")


def check_bool(value: Any, argument: str) -> None:
    """Raise unless ``value`` is True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{argument}={value!r}: pass True or False.")


def check_choice(value: Any, argument: str, choices: Sequence[str], hint: str = "") -> None:
    """Raise unless ``value`` is one of ``choices`` (``hint`` adds other accepted forms)."""
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


def check_example_input(value: Any, argument: str = "example_input") -> None:
    """Raise unless ``value`` is None or one input batch: a tensor with a non-empty batch dimension."""
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
