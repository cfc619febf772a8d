"""Reading a user's config file (ingest config, backbone config, pipeline) with bounds.

A config file comes from outside, so it is read with limits before any of it is trusted:

* at most :data:`MAX_CONFIG_BYTES` bytes (a config is a few kilobytes);
* UTF-8 text (a byte-order mark is allowed), else the message names the file and the byte;
* nested at most :data:`MAX_DEPTH` mappings/lists deep: a YAML file is scanned event by event
  first and refused as soon as it goes deeper, so 100,000 nested ``[`` cost microseconds, not a
  ``RecursionError``; a JSON file's depth is checked the same way on what was read;
* at most :data:`MAX_NODES` values once YAML aliases are expanded (a "billion laughs" file is
  refused, not walked by the validators).

``.json`` files are read as JSON, anything else as YAML (``yaml.safe_load``: no Python objects).
Every problem is a :class:`~meddx.errors.ConfigError` naming the file.

Example:
    >>> from meddx.config_files import read_config_data
    >>> read_config_data("pipelines/demo.yaml", "pipeline")["version"]
    1
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meddx.errors import ConfigError, short_reason

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 32
MAX_NODES = 100_000


def _decode(path: Path, what: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{what} {path}: {size} bytes is more than a config file holds "
                f"(at most {MAX_CONFIG_BYTES} bytes); name the config file, not a data file"
            )
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({short_reason(exc)})") from None
    if len(data) > MAX_CONFIG_BYTES:  # grew while being read, or a special file
        raise ConfigError(f"{what} {path}: more than {MAX_CONFIG_BYTES} bytes; a config file is a few kilobytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None


def _too_deep(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{what} {path}: nested more than {MAX_DEPTH} levels deep; a config is a few levels deep")


def _check_yaml_depth(text: str, path: Path, what: str) -> None:
    """Walk the YAML events (no recursion) and stop at the first one nested too deep."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_deep(path, what)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_shape(data: Any, path: Path, what: str) -> None:
    """Depth and number of values of loaded data, walked without recursion (aliases counted each time)."""
    stack = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigError(
                f"{what} {path}: more than {MAX_NODES} values (YAML aliases counted each time they are used); "
                "a config holds a few dozen"
            )
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise _too_deep(path, what)
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children)


def read_config_data(path: str | Path, what: str) -> Any:
    """The data of a YAML or JSON config file (``None`` for an empty YAML file), within the bounds above.

    Args:
        path: the file; ``.json`` is read as JSON, anything else as YAML.
        what: how messages name it ("ingest config", "pipeline", ...).

    Raises:
        ConfigError: the file is missing, too large, not UTF-8, not valid YAML/JSON, nested too
            deep or too large once expanded; the message names the file.
    """
    import yaml

    path = Path(path)
    text = _decode(path, what)
    as_json = path.suffix.lower() == ".json"
    try:
        if as_json:
            data = json.loads(text)
        else:
            _check_yaml_depth(text, path, what)
            data = yaml.safe_load(text)
    except RecursionError:
        raise _too_deep(path, what) from None
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} {path}: not valid {'JSON' if as_json else 'YAML'} ({short_reason(exc)})") from None
    _check_shape(data, path, what)
    return data
