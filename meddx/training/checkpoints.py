"""Training state as safetensors + JSON: module weights, optimizer state, progress (for --resume).

:class:`CheckpointFolder` is the fine-tuning loop's checkpoint (``OUT/checkpoint/``): the trained
module's last and best weights, the optimizer, and the early-stopping progress; ``pretrain`` writes
its own from the same pieces.

``torch.save`` pickles; a checkpoint a user downloads or shares must not be able to run
code when loaded, so everything here is tensors in safetensors files and plain JSON.
An optimizer's state dict is split into its tensors (``<param index>.<name>``) and the
rest (hyper-parameters per group, non-tensor state) as JSON.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.errors import ModelError
from meddx.files import save_tensors_atomic, write_atomic

if TYPE_CHECKING:
    import torch

    from meddx.training.early_stopping import EarlyStopping

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"  # the checkpoint folder inside a run's output folder


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Write an optimizer's state as ``path`` (safetensors) and ``path.json`` (the rest)."""
    import torch

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    save_tensors_atomic(tensors, path)
    write_atomic(path.with_suffix(".json"), json.dumps({"param_groups": state["param_groups"], "state": plain}))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore what :func:`save_optimizer` wrote into ``optimizer`` (built over the same parameters)."""
    from safetensors.torch import load_file

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
    save_tensors_atomic({k: v for k, v in module.state_dict().items() if k not in leave_out}, path)


def load_module(module: torch.nn.Module, path: Path, left_out: Collection[str] = ()) -> None:
    """Load weights written by :func:`save_module`; every key must match, but those left out, kept as they are."""
    from safetensors.torch import load_file

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
    write_atomic(path, json.dumps(progress, indent=2, sort_keys=True))


class CheckpointFolder:
    """The fine-tuning checkpoint in ``folder``: written by the main process, read by every one on resume.

    A bundled frozen text model's weights are left out (the package ships them; ``progress.json``
    names them by hash and resuming checks it), so the checkpoint holds no copy of them.

    Args:
        folder: ``OUT/checkpoint``.
        writer: whether this process writes (rank 0); every rank reads when resuming.
    """

    def __init__(self, folder: str | Path, writer: bool = True):
        self.folder = Path(folder)
        self.writer = writer

    def save(self, module, optimizer, stopper: EarlyStopping, epoch: int) -> None:
        """Write what training needs to carry on after ``epoch`` (0-based): weights, best ones, optimizer, progress."""
        from meddx.models.checkpoint import reference_text_keys, reference_text_models

        if not self.writer:
            return
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        by_reference, left_out = reference_text_models(module), reference_text_keys(module)
        save_module(module, folder / "last.safetensors", leave_out=left_out)
        if stopper.best_state is not None:
            best = {k: v for k, v in stopper.best_state.items() if k not in left_out}
            save_tensors_atomic(best, folder / "best.safetensors")
        save_optimizer(optimizer, folder / "optimizer.safetensors")
        write_progress(
            {
                "epoch": epoch + 1,
                "history": stopper.history,
                "best_epoch": stopper.best_epoch,
                "best": stopper.best if math.isfinite(stopper.best) else None,
                "text_models_by_reference": by_reference,
            },
            folder / "progress.json",
        )

    def resume(self, module, optimizer, stopper: EarlyStopping) -> int:
        """Load the checkpoint into ``module``, ``optimizer`` and ``stopper``; returns the first epoch still to run.

        Raises:
            ModelError: no checkpoint, a damaged one, or one made with another frozen text model.
        """
        from safetensors.torch import load_file

        from meddx.models.checkpoint import check_safetensors, reference_text_keys, reference_text_models

        folder = self.folder
        path = folder / "progress.json"
        if not path.is_file():
            raise ModelError(f"--resume: no checkpoint in {folder}; run without --resume to start")
        by_reference = reference_text_models(module)
        try:
            progress = json.loads(path.read_text())
            history = [float(v) for v in progress["history"]]
            epoch, best_epoch = int(progress["epoch"]), int(progress["best_epoch"])
            best = -math.inf if progress["best"] is None else float(progress["best"])
            saved_reference = dict(progress.get("text_models_by_reference", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"--resume: {path} is damaged ({exc}); run without --resume to start over") from None
        if not best_epoch < epoch or epoch < 1:
            raise ModelError(f"--resume: {path} is damaged (epochs do not agree); run without --resume to start over")
        if saved_reference != by_reference:
            raise ModelError(
                f"--resume: {path} names the frozen text model {saved_reference or 'none'} (prefix: SHA-256) but "
                f"this model has {by_reference or 'none'}; install the text model it was trained with, or start over"
            )
        left_out = reference_text_keys(module)
        load_module(module, folder / "last.safetensors", left_out=left_out)
        load_optimizer(optimizer, folder / "optimizer.safetensors")
        stopper.history = history
        stopper.best_epoch = best_epoch
        stopper.last_epoch = epoch - 1
        stopper.best = best
        if (folder / "best.safetensors").is_file():
            check_safetensors(folder / "best.safetensors")
            stopper.best_state = load_file(str(folder / "best.safetensors"))
            stopper.best_state.update(  # the weights kept by reference are the ones just built
                {k: v.clone() for k, v in module.state_dict().items() if k in left_out}
            )
        logger.info("resuming at epoch %d", epoch + 1)
        return epoch
