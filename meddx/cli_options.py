"""Click options made from the arguments models of :mod:`meddx.arguments`.

:func:`arguments` adds one option (or argument) per field of a model to a command and hands
the command one validated model instead of the loose values; :func:`option` makes the option
of one field, for commands that share a single option (``--workers``, ``--quiet``).

Example:
    >>> import click
    >>> from meddx.arguments import EvaluateArgs
    >>> @click.command()
    ... @arguments(EvaluateArgs)
    ... def show(args):
    ...     click.echo(f"{args.n_bins} bins, by {args.by}")
    >>> from click.testing import CliRunner
    >>> given = ["p.csv", "--manifest", "m.csv", "--out", "e", "--bins", "5", "--by", "sex,site"]
    >>> CliRunner().invoke(show, given).output
    "5 bins, by ['sex', 'site']\\n"
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import annotated_types
import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from meddx.arguments import Arguments, cli_of, option_name

F = TypeVar("F", bound=Callable[..., Any])


def _plain(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _bounds(info: FieldInfo) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["min"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            bounds.update(min=item.gt, min_open=True)
        elif isinstance(item, annotated_types.Le):
            bounds["max"] = item.le
        elif isinstance(item, annotated_types.Lt):
            bounds.update(max=item.lt, max_open=True)
    return bounds


def _click_type(info: FieldInfo) -> Any:
    kind = _plain(info.annotation)
    cli = cli_of(info)
    if typing.get_origin(kind) is Literal:
        return click.Choice([str(c) for c in typing.get_args(kind)])
    if kind is Path:
        return click.Path(file_okay=cli.folder is not True, dir_okay=cli.folder is not False, path_type=Path)
    bounds = _bounds(info)
    if kind is int:
        if bounds.pop("min_open", False):
            bounds["min"] += 1
        if bounds.pop("max_open", False):
            bounds["max"] -= 1
        return click.IntRange(**bounds) if bounds else int
    if kind is float:
        return click.FloatRange(**bounds) if bounds else float
    return str


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]


def _turned_off(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    return not value


def option(model: type[Arguments], name: str, **overrides: Any) -> Callable[[F], F]:
    """The click option (or argument) of ``model``'s field ``name``; ``overrides`` replace click settings (help)."""
    info = model.model_fields[name]
    cli = cli_of(info)
    flag = option_name(name, info)
    if cli.argument:
        return click.argument(name, type=_click_type(info), **overrides)
    settings: dict[str, Any] = {"help": cli.help or info.description}
    kind = _plain(info.annotation)
    if kind is bool:
        settings.update(is_flag=True, default=False)
        if cli.turns_off:
            settings["callback"] = _turned_off
    elif typing.get_origin(kind) is list:
        settings.update(default=None, callback=_comma_list)
    else:
        default = None if info.is_required() else info.default
        settings.update(type=_click_type(info), default=default, required=info.is_required())
        if default is not None:
            settings["show_default"] = True
    settings.update(overrides)
    return click.option(flag, name, **settings)


def arguments(model: type[Arguments]) -> Callable[[F], F]:
    """Add an option per field of ``model`` (hidden ones aside); the command gets the model as its first argument.

    The values are validated by the model (ValidationError: a usage error, exit status 2); options
    not given keep the model's defaults. Other parameters of the command (options it declares
    itself) are passed on by name.
    """
    fields = {n: f for n, f in model.model_fields.items() if not cli_of(f).hidden}

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in fields if name in kwargs}
            try:
                parsed = model.model_validate({k: v for k, v in given.items() if v is not None})
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise click.UsageError(problems) from None
            return command(parsed, *args, **kwargs)

        decorated: Any = wrapper
        for name in reversed(fields):  # click lists options in the order the decorators are written
            decorated = option(model, name)(decorated)
        return decorated

    return decorate
