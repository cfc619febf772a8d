"""What every ``meddx`` command does with an error: the message on stderr and the documented exit status.

Exit status: 0 on success, 2 on bad input (manifest, config, arguments), 1 on other
failures. A failed run removes the output folders it created and left empty.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from meddx.errors import ConfigError, ManifestError, MeddxError, ModelError, NotFittedError, PredictionsError

BAD_INPUT = 2
FAILURE = 1


def handle_errors(command: Callable) -> Callable:
    """Turn meddx errors into a message on stderr and the documented exit status."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        # click passes the options by name: out/cache, or out_dir/cache_dir (meddx.arguments' names)
        out, cache = kwargs.get("out", kwargs.get("out_dir")), kwargs.get("cache", kwargs.get("cache_dir"))
        with removed_if_left_empty(out, cache):
            try:
                return command(*args, **kwargs)
            except NotFittedError as exc:  # a bug, not the user's input
                click.echo(f"error: {exc}", err=True)
                sys.exit(FAILURE)
            except (ManifestError, ConfigError, PredictionsError, ModelError) as exc:
                # a model folder that is missing, damaged or from another version is bad input too
                click.echo(f"error: {exc}", err=True)
                sys.exit(BAD_INPUT)
            except MeddxError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(FAILURE)

    return wrapper


@contextmanager
def removed_if_left_empty(*paths: Path | None) -> Iterator[None]:
    """On failure, remove the folders of ``paths`` that this run created and left empty.

    Only folders (and parent folders) that did not exist when the run started are candidates,
    and only empty ones go: a failed run leaves no empty ``--out`` behind, and never touches a
    folder the user made or one that holds anything (a killed run's parts for ``--resume``).
    """
    new: list[Path] = []
    for path in paths:
        folder = None if path is None else Path(path).absolute()
        while folder is not None and not folder.exists() and folder != folder.parent:
            new.append(folder)
            folder = folder.parent
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        if not succeeded:
            for folder in sorted(set(new), key=lambda f: len(f.parts), reverse=True):  # deepest first
                try:
                    folder.rmdir()  # refuses a folder that holds anything
                except OSError:
                    pass
