"""One source for every option: a callback takes its config dataclass's fields as keywords without restating them.

A technique's options live once, in its frozen config dataclass (``PruneConfig``,
``NystromConfig``...): field, default, annotation and the ``Args:`` text of its
docstring. :func:`takes_config` gives a callback those fields as constructor
keywords: it builds the public signature (``__signature__`` and resolved
``__annotations__``, which ``inspect.signature``, ``help()``, notebooks and
LightningCLI / jsonargparse read; static type checkers see only the body's
own keywords), merges the config's ``Args:`` entries into the callback's
docstring, and calls the callback's own ``__init__`` with one validated config
(:func:`~lightning_vitcompress._checks.config_or_options`: ``config=`` or the
keywords, never both). Like :func:`dataclasses.dataclass`, the generated
signature is the truth; the body only declares the callback's own keywords.

What static type checkers see: they read the source ``__init__``, not the
generated signature. So the body is written to accept every call the generated
signature accepts: ``*args: Any`` (the positional options), the callback's own
keywords, ``config: Optional[X] = None`` and ``**options: Any`` (the config's
fields). ``PruningSchedule(0.5, prune_heads=True)`` and ``PruningSchedule()``
type-check (``tests/typing_usage.py`` is in mypy's files); the field keywords
are not checked statically, but at construction, against the config. At run
time the body always gets one validated config, every other argument by name,
and empty ``args`` / ``options``: :func:`passed_config` says so to the checker.

Example (the callbacks are declared this way; a toy one here):

    >>> import dataclasses, inspect
    >>> from typing import Any, Optional
    >>> from lightning_vitcompress._options import passed_config, takes_config
    >>> @dataclasses.dataclass(frozen=True)
    ... class ShrinkConfig:
    ...     ratio: float = 0.5
    ...     heads: bool = False
    >>> @takes_config(ShrinkConfig, positional=("ratio", "start_epoch"))
    ... class Shrink:
    ...     def __init__(self, *args: Any, start_epoch: int = 0, config: Optional[ShrinkConfig] = None,
    ...                  **options: Any) -> None:
    ...         self.config = passed_config(config, args, options)  # validated: Shrink(0.3) put ratio=0.3 in it
    ...         self.start_epoch = start_epoch
    >>> print(inspect.signature(Shrink))
    (ratio: float = 0.5, start_epoch: int = 0, *, heads: bool = False, config: Optional[...ShrinkConfig] = None) -> None
    >>> Shrink(0.3, 2, heads=True).config
    ShrinkConfig(ratio=0.3, heads=True)
    >>> Shrink(config=ShrinkConfig(0.3)).config.ratio
    0.3
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, TypeVar

from lightning_vitcompress._checks import config_or_options

__all__ = ["takes_config"]

_Class = TypeVar("_Class")
_Config = TypeVar("_Config")
_P = inspect.Parameter
#: an ``Args:`` entry: ``name: text`` or several names, ``a / b / c:`` or ``a, b, c:``
_ENTRY = re.compile(r"^(?P<names>\w+(?:\s*[/,]\s*\w+)*)\s*:")


def takes_config(
    config_class: type,
    *,
    positional: Sequence[str] = (),
    exclude: Sequence[str] = (),
    defaults: Optional[Mapping[str, Any]] = None,
    prepare: Optional[Callable[[dict[str, Any]], None]] = None,
) -> Callable[[type[_Class]], type[_Class]]:
    """Class decorator: the callback's constructor also takes ``config_class``'s fields, once validated.

    Args:
        config_class: the technique's frozen dataclass; its fields become keywords (its ``Args:`` text, docs).
        positional: the constructor's leading parameters, in order, that may be passed by position (the
            callback's own and the config's); the other config fields are keyword-only, just before ``config``.
        exclude: config fields the callback does not offer (they stay at their defaults, or come with ``config=``).
        defaults: the callback's default for a field where it differs from the config's (``None`` makes the
            annotation ``Optional``); ``prepare`` must then turn it into a value the config takes.
        prepare: called with every argument by name (mutable) before the config is built: resolve callback
            defaults, or check an argument whose error must come first.
    """
    defaults = dict(defaults or {})

    def decorate(cls: type[_Class]) -> type[_Class]:
        body = cls.__init__
        owner = cls.__name__
        signature, annotations = _merged_signature(body, config_class, positional, exclude, defaults)
        fields = [name for name in signature.parameters if name in _field_names(config_class)]

        @functools.wraps(body)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                arguments = signature.bind(self, *args, **kwargs)
            except TypeError as err:  # worded as Python's own: "PruningSchedule.__init__() got an unexpected ..."
                raise TypeError(f"{cls.__qualname__}.__init__() {err}") from None
            arguments.apply_defaults()
            values = dict(arguments.arguments)
            if prepare is not None:
                prepare(values)
            options = {name: values.pop(name) for name in fields}
            values["config"] = config_or_options(values.get("config"), config_class, options, owner)
            body(**values)

        __init__.__signature__ = signature  # type: ignore[attr-defined]
        __init__.__annotations__ = annotations
        del __init__.__wrapped__  # the merged signature is the truth, not the body's
        cls.__init__ = __init__  # type: ignore[method-assign]  # replacing the class's __init__ is this decorator's job
        cls.__doc__ = _merged_doc(cls.__doc__, config_class.__doc__, list(signature.parameters))
        return cls

    return decorate


def passed_config(config: Optional[_Config], args: tuple[Any, ...], options: Mapping[str, Any]) -> _Config:
    """The validated config a :func:`takes_config` body receives, typed non-``None``.

    The body declares ``config: Optional[X] = None``, ``*args`` and ``**options`` so that static checkers accept
    every call the generated signature accepts; at run time the decorator always passes one config and every
    other argument by name, so ``config`` is never ``None`` and ``args`` / ``options`` are empty here.
    """
    if config is None or args or options:
        raise TypeError("a takes_config body was called directly: call the decorated class")
    return config


def _field_names(config_class: type) -> list[str]:
    return [field.name for field in dataclasses.fields(config_class) if field.init]


def _merged_signature(
    body: Callable[..., None],
    config_class: type,
    positional: Sequence[str],
    exclude: Sequence[str],
    defaults: Mapping[str, Any],
) -> tuple[inspect.Signature, dict[str, Any]]:
    """The public ``__init__`` signature (``self`` first) and its resolved annotations."""
    own_hints = typing.get_type_hints(body)
    config_hints = typing.get_type_hints(config_class)
    # the body's *args / **options only let static checkers accept the generated signature's calls (module docstring)
    variadic = (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
    own = {name: p for name, p in inspect.signature(body).parameters.items() if p.kind not in variadic}
    if "config" not in own:
        raise TypeError(f"{body.__qualname__} must take the validated config as its `config` parameter.")
    fields: dict[str, _P] = {}
    for field in dataclasses.fields(config_class):
        if not field.init or field.name in exclude:
            continue
        annotation = config_hints[field.name]
        default: Any = field.default
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        elif default is dataclasses.MISSING:
            default = _P.empty
        if field.name in defaults:
            default = defaults[field.name]
            annotation = Optional[annotation] if default is None else annotation
        fields[field.name] = _P(field.name, _P.KEYWORD_ONLY, default=default, annotation=annotation)
    clash = sorted(set(fields) & set(own))
    if clash:
        raise TypeError(f"{body.__qualname__} restates config fields {clash}: leave them to the config.")

    def resolved(parameter: _P) -> _P:
        return parameter.replace(annotation=own_hints.get(parameter.name, parameter.annotation))

    lead = [(fields.get(name) or resolved(own[name])).replace(kind=_P.POSITIONAL_OR_KEYWORD) for name in positional]
    rest: list[_P] = []
    for name, parameter in own.items():
        if name == "self" or name in positional:
            continue
        if name == "config":
            if parameter.kind is not _P.KEYWORD_ONLY and any(n not in positional for n in fields):
                raise TypeError(f"{body.__qualname__}: `config` is positional, so every config field must be too.")
            rest += [p for n, p in fields.items() if n not in positional]
            parameter = parameter.replace(annotation=Optional[config_class], default=None)
            rest.append(parameter)
            continue
        rest.append(resolved(parameter))
    self_parameter = _P("self", _P.POSITIONAL_OR_KEYWORD)
    signature = inspect.Signature([self_parameter, *lead, *rest], return_annotation=None)
    annotations = {p.name: p.annotation for p in signature.parameters.values() if p.annotation is not _P.empty}
    return signature, {**annotations, "return": None}


def _args_section(doc: str) -> tuple[list[str], list[list[str]], list[str]]:
    """``doc`` (cleaned) split into the lines before ``Args:`` (inclusive), its entries, and the lines after."""
    lines = inspect.cleandoc(doc).splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return lines, [], []
    indent = len(lines[start]) - len(lines[start].lstrip()) + 4
    entries: list[list[str]] = []
    end = start + 1
    while end < len(lines):
        line = lines[end]
        depth = len(line) - len(line.lstrip())
        if line.strip() and depth < indent:
            break
        if line.strip() and depth == indent and _ENTRY.match(line.strip()):
            entries.append([line])
        elif entries and line.strip():
            entries[-1].append(line)
        elif not line.strip():
            break
        end += 1
    return lines[: start + 1], entries, lines[end:]


def _entry_names(entry: list[str]) -> list[str]:
    match = _ENTRY.match(entry[0].strip())
    return re.split(r"\s*[/,]\s*", match.group("names")) if match else []


def _merged_doc(doc: Optional[str], config_doc: Optional[str], order: list[str]) -> Optional[str]:
    """``doc`` with the config's ``Args:`` entries it does not document itself, all in signature order."""
    if not doc or not config_doc:
        return doc
    head, entries, tail = _args_section(doc)
    documented = {name for entry in entries for name in _entry_names(entry)}
    _, config_entries, _ = _args_section(config_doc)
    indent = len(entries[0][0]) - len(entries[0][0].lstrip()) if entries else 4
    for entry in config_entries:
        names = [name for name in _entry_names(entry) if name in order]
        if names and not documented.intersection(names):
            shift = indent - (len(entry[0]) - len(entry[0].lstrip()))
            entries.append([" " * shift + line if shift > 0 else line[-shift:] for line in entry])

    def position(entry: list[str]) -> int:
        found = [order.index(name) for name in _entry_names(entry) if name in order]
        return min(found) if found else len(order)

    entries.sort(key=position)  # stable: entries naming no parameter stay in their place among themselves
    return "\n".join([*head, *(line for entry in entries for line in entry), *tail])
