"""Settings that make their own flags.

A settings class is a dataclass whose fields carry their help text (and, where
needed, the flag's name, choices or metavar) in ``field(metadata=flag(...))``.
:func:`add_flags` turns the fields into argparse options, with the defaults and
help texts of the class, and :func:`from_args` builds the settings back from
the parsed namespace, so a default or help text is written once, on the class.
Validation stays in the class's ``__post_init__``.

This is the same idea as llama-cpp-python's server, whose pydantic-settings
fields become its flags; a few dozen lines over :mod:`dataclasses` keep the
device install free of a settings library.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

_KEY = "edgeroute.flag"


def flag(
    help: str,
    *,
    name: str | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    metavar: str | None = None,
    type: Callable[[str], Any] | None = None,
    cli: bool = True,
    dest: str | None = None,
) -> dict[str, Any]:
    """Field metadata: the help text, and optionally the flag's ``name``
    (default ``--field-name``), ``choices`` (a sequence, or a callable such as
    a registry's ``names``, read when the parser is built), ``metavar``, a
    parsing ``type`` (default: from the annotation), ``cli=False`` for a
    field that has no flag, or the namespace attribute ``dest`` (default: the
    field name; for a flag whose parsed name predates the field's)."""
    return {
        _KEY: {"name": name, "choices": choices, "metavar": metavar, "type": type, "cli": cli,
               "dest": dest},
        "help": help,
    }


def help_texts(cls: type) -> dict[str, str]:
    """Field name → help text of a settings class."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def option_name(f: dataclasses.Field) -> str:
    spec = f.metadata.get(_KEY) or {}
    return spec.get("name") or "--" + f.name.replace("_", "-")


def dest_name(f: dataclasses.Field) -> str:
    """The attribute of the parsed namespace that holds ``f``."""
    spec = f.metadata.get(_KEY) or {}
    return spec.get("dest") or f.name


def _scalar_type(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    help_suffix: dict[str, str] | None = None,
) -> list[str]:
    """Add one option per field of ``cls``; returns the field names added.

    ``only``/``exclude`` pick fields, ``defaults`` overrides a field's default
    for this command, ``help_suffix`` appends to a help text.  A field
    without a default is a required option.
    """
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    added: list[str] = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_KEY)
        if spec is None or not spec["cli"] or f.name in exclude:
            continue
        if wanted is not None and f.name not in wanted:
            continue
        default = (defaults or {}).get(f.name, _default_of(f))
        help_text = f.metadata.get("help", "") + (help_suffix or {}).get(f.name, "")
        # An empty help text is argparse's None: the option is listed without one.
        kwargs: dict[str, Any] = {"dest": dest_name(f), "default": default, "help": help_text or None}
        if _required(f) and f.name not in (defaults or {}):
            kwargs["required"] = True  # a field without a default is a flag the user must give
        base, _ = _scalar_type(hints[f.name])
        if typing.get_origin(base) is tuple and spec["type"] is None:
            # ``tuple[str, ...]``: a repeatable flag; none given keeps the field's default.
            # (A tuple field with its own ``type``, e.g. ``--parts link,edge``, parses one value.)
            kwargs.update(action="append", default=None, type=spec["type"] or typing.get_args(base)[0])
            if spec["metavar"]:
                kwargs["metavar"] = spec["metavar"]
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            conv = spec["type"] or (str if base is Path else base)
            if conv not in (str, None):
                kwargs["type"] = conv
            choices = spec["choices"]
            if callable(choices):
                choices = choices()
            if choices is not None:
                kwargs["choices"] = list(choices)
            if spec["metavar"]:
                kwargs["metavar"] = spec["metavar"]
        parser.add_argument(option_name(f), **kwargs)
        added.append(f.name)
    if wanted is not None and wanted - set(added):
        raise ValueError(f"{cls.__name__} has no flag fields {sorted(wanted - set(added))}")
    return added


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from the options :func:`add_flags` added (fields without
    a parsed value keep their default); ``overrides`` win over both."""
    hints = typing.get_type_hints(cls)
    values = {
        f.name: tuple(value) if isinstance(value, list) else value
        for f in dataclasses.fields(cls)
        if f.init and dest_name(f) in vars(args)
        # A repeatable flag never given (None) keeps the field's default.
        and not ((value := getattr(args, dest_name(f))) is None
                 and typing.get_origin(_scalar_type(hints[f.name])[0]) is tuple)
    }
    values.update(overrides)
    return cls(**values)
