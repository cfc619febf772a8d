"""Training state as safetensors + JSON: module weights, optimizer state, progress (for --resume).

``torch.save`` pickles; a checkpoint a user downloads or shares must not be able to run
code when loaded, so everything here is tensors in safetensors files and plain JSON.
An optimizer's state dict is split into its tensors (``<param index>.<name>``) and the
rest (hyper-parameters per group, non-tensor state) as JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from meddx.errors import ModelError
from meddx.files import apply_umask, temp_file


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        apply_umask(tmp)  # mkstemp and safetensors write 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = temp_file(path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Write an optimizer's state as ``path`` (safetensors) and ``path.json`` (the rest)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    atomic_save_tensors(tensors, path)
    atomic_write_text(json.dumps({"param_groups": state["param_groups"], "state": plain}), path.with_suffix(".json"))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore what :func:`save_optimizer` wrote into ``optimizer`` (built over the same parameters)."""
    try:
        tensors = load_file(str(path))
        saved = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read optimizer state {path}: {exc}; start without --resume") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in saved["state"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def save_module(module: torch.nn.Module, path: Path, leave_out: Collection[str] = ()) -> None:
    """A module's weights as safetensors (atomically), but for the keys in ``leave_out``."""
    atomic_save_tensors({k: v for k, v in module.state_dict().items() if k not in leave_out}, path)


def load_module(module: torch.nn.Module, path: Path, left_out: Collection[str] = ()) -> None:
    """Load weights written by :func:`save_module`; every key must match, but those left out, kept as they are."""
    from meddx.models.checkpoint import check_safetensors

    check_safetensors(path)
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read weights {path}: {exc}; start without --resume") from None
    expected = set(module.state_dict()) - set(left_out)
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ModelError(
            f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "start without --resume"
        )
    try:
        module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shapes
        raise ModelError(f"{path} does not fit this model: {exc}; start without --resume") from None


def write_progress(progress: dict[str, Any], path: Path) -> None:
    """The loop's own progress (epoch, losses, seed) as JSON, written atomically."""
    atomic_write_text(json.dumps(progress, indent=2, sort_keys=True), path)
