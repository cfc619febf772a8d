"""A fine-tuned model folder, checked whole before any patient is read, and its fingerprint.

:func:`check_model_folder` reads every file of a folder written by
``DiagnosisModel.save_pretrained`` without building the network (no torch import):

* ``config.json``: the backbone schema with bounded sizes, the tensorizers' state, the tasks and
  heads (``diagnosis``), and the bundled frozen text model, compared by hash with the installed one;
* ``model.safetensors`` and ``adapter.safetensors``: safetensors headers parsed, pickle refused;
* ``calibration.json``: every field (temperatures, knots, thresholds, alpha), and its tasks and
  classes against the heads';
* ``metrics.json``: a JSON object;
* ``ood.json`` and ``ood.safetensors`` (optional: older folders have neither): the OOD method,
  thresholds, rate and dimensions, and every tensor's shape against them (:func:`meddx.models.ood.load_ood`);
* ``training_summary.json`` (optional: what the model was trained on, for its card ``README.md``):
  its format, row counts and sections (:func:`check_training_summary`).

Any problem is a :class:`~meddx.errors.ModelError` naming the file and the field. The
fingerprint is one SHA-256 over every file that changes the outputs (config with tensorizers,
weights, adapter, calibration, OOD scorers and thresholds; the bundled text model enters through
its hash in ``config.json``; ``training_summary.json`` and the card ``README.md`` describe the
model and change no output, so they stay out of it: ``meddx evaluate --model-card`` may rewrite
the card without breaking a resume):
``meddx diagnose --resume`` compares it with the one its run plan recorded.

Example:
    >>> folder = check_model_folder("runs/model", fingerprint=True)  # doctest: +SKIP
    >>> folder.fingerprint, folder.tasks  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.calibration import CALIBRATION_FILE
from meddx.errors import ConfigError, ModelError
from meddx.models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    BackboneCheckpoint,
    check_bundled_text_model,
    check_safetensors,
    read_checkpoint,
)
from meddx.models.ood import OOD_JSON, OOD_TENSORS, load_ood

if TYPE_CHECKING:
    from meddx.calibration import TaskCalibration
    from meddx.models.ood import OodModel

DIAGNOSIS_FORMAT = "meddx.diagnosis-model/1"
ADAPTER_FILE = "adapter.safetensors"
METRICS_FILE = "metrics.json"
TRAINING_SUMMARY_FILE = "training_summary.json"
TRAINING_SUMMARY_FORMAT = "meddx-training-summary/1"
MAX_SUMMARY_BYTES = 4 << 20
FINGERPRINT_FORMAT = "meddx-model-fingerprint/1"
# What changes a model's outputs, in the order the fingerprint reads them.
OUTPUT_FILES = (CONFIG_FILE, WEIGHTS_FILE, ADAPTER_FILE, CALIBRATION_FILE, OOD_JSON, OOD_TENSORS)
TASK_KINDS = ("binary", "multiclass")
MAX_LORA_RANK = 1024


@dataclass
class ModelFolder:
    """What :func:`check_model_folder` found.

    Attributes:
        path: the folder.
        checkpoint: the validated ``config.json``.
        tasks: task -> (kind, classes), from the heads.
        calibration: task -> its checked calibration (a task left out is uncalibrated).
        sha256: file name -> SHA-256, for the files that change outputs (with ``fingerprint=True``).
        fingerprint: one SHA-256 over them (with ``fingerprint=True``; else empty).
        ood: the checked OOD scorers, or None (a folder written before them, or too few rows).
        training_summary: the checked ``training_summary.json``; None when the folder has none.
    """

    path: Path
    checkpoint: BackboneCheckpoint
    tasks: dict[str, tuple[str, tuple[str, ...]]]
    calibration: dict[str, TaskCalibration]
    sha256: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    ood: OodModel | None = None
    training_summary: dict[str, Any] | None = None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def diagnosis_tasks(diagnosis: Any, path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The ``diagnosis`` section of ``config.json`` checked; returns task -> (kind, classes)."""
    where = f"{path}: diagnosis"
    if not isinstance(diagnosis, dict):
        raise ModelError(
            f"{path} holds a backbone without diagnostic heads; fine-tune it first "
            "(meddx finetune MANIFEST --backbone FOLDER) or load it with FoundationBackbone.from_pretrained"
        )
    if diagnosis.get("format") != DIAGNOSIS_FORMAT:
        raise ModelError(
            f"{where}.format is {diagnosis.get('format')!r}; this meddx reads {DIAGNOSIS_FORMAT!r}: install the "
            "meddx that wrote it, or fine-tune again"
        )
    dropout = diagnosis.get("head_dropout", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ModelError(f"{where}.head_dropout must be a number in [0, 1); got {dropout!r}")
    _check_adapter(diagnosis.get("adapter"), f"{where}.adapter")
    tasks = diagnosis.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ModelError(f"{where}.tasks must map at least one task name to its kind and classes")
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, task in tasks.items():
        kind = task.get("kind") if isinstance(task, dict) else None
        classes = task.get("classes") if isinstance(task, dict) else None
        if kind not in TASK_KINDS:
            raise ModelError(f"{where}.tasks.{name}.kind must be one of {', '.join(TASK_KINDS)}; got {kind!r}")
        if (
            not isinstance(classes, list)
            or not 2 <= len(classes) <= 10_000
            or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)
            or (kind == "binary" and classes != ["0", "1"])
        ):
            raise ModelError(
                f"{where}.tasks.{name}.classes must be 2 to 10000 distinct names (a binary task's are "
                f'["0", "1"]); got {classes!r}'
            )
        found[name] = (kind, tuple(classes))
    return found


def _check_adapter(adapter: Any, where: str) -> None:
    """The LoRA settings (``meddx.models.adapters``), bounded before peft builds anything from them."""
    if adapter is None:
        return
    if not isinstance(adapter, dict):
        raise ModelError(f"{where} must be a mapping of LoRA settings or null")
    rank, alpha, dropout = adapter.get("r", 8), adapter.get("alpha", 16), adapter.get("dropout", 0.05)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise ModelError(f"{where}.r must be an integer from 1 to {MAX_LORA_RANK}; got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1e6:
        raise ModelError(f"{where}.alpha must be a number in (0, 1e6]; got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ModelError(f"{where}.dropout must be a number in [0, 1); got {dropout!r}")


def _metrics(path: Path) -> None:
    if not path.is_file():
        return
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON ({exc}); copy the model folder again") from None
    if not isinstance(metrics, dict):
        raise ModelError(f"{path} must hold a JSON object of validation figures")


def check_training_summary(path: Path) -> dict[str, Any] | None:
    """``training_summary.json`` checked (None when absent): a bounded JSON object of the known format.

    Its sections (``meddx.data.summary``) are checked for their types, ``rows`` for counts; the
    card writer reads the rest defensively.
    """
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_SUMMARY_BYTES:
        raise ModelError(f"{path} is over {MAX_SUMMARY_BYTES >> 20} MiB; it is not a meddx training summary")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path} is not readable JSON ({exc}); copy the model folder again") from None
    if not isinstance(summary, dict) or summary.get("format") != TRAINING_SUMMARY_FORMAT:
        found = summary.get("format") if isinstance(summary, dict) else type(summary).__name__
        raise ModelError(
            f"{path}: format is {found!r}; this meddx reads {TRAINING_SUMMARY_FORMAT!r} "
            "(delete the file to load the model without it)"
        )
    rows = summary.get("rows")
    if (
        not isinstance(rows, dict)
        or not rows
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 10**9 for n in rows.values())
    ):
        raise ModelError(f"{path}: rows must map each split to a count of rows; got {rows!r}")
    for name in ("modalities", "labels", "subgroups", "inputs"):
        if not isinstance(summary.get(name), dict):
            raise ModelError(f"{path}: {name} must be a JSON object; got {type(summary.get(name)).__name__}")
    return summary


def check_model_folder(folder: str | Path, *, fingerprint: bool = False) -> ModelFolder:
    """Check every file of a fine-tuned model folder without building the network.

    Args:
        folder: a folder written by ``meddx finetune`` / ``DiagnosisModel.save_pretrained``.
        fingerprint: also hash the files that change outputs (reads them whole).

    Raises:
        ModelError: naming the file and the field that is wrong, and what to do.
    """
    from meddx.align import Aligner
    from meddx.calibration import load_calibration

    path = Path(folder)
    checkpoint = read_checkpoint(path)  # config.json's schema and model.safetensors' header
    check_bundled_text_model(checkpoint, path)
    tasks = diagnosis_tasks(checkpoint.diagnosis, path / CONFIG_FILE)
    if checkpoint.aligner is None:
        raise ModelError(f"{path / CONFIG_FILE}: aligner is missing; the folder was not written by meddx finetune")
    try:
        Aligner.from_state_dict(checkpoint.aligner)
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path / CONFIG_FILE}: aligner (the fitted tensorizers) is not usable: {exc}") from None
    adapter = (checkpoint.diagnosis or {}).get("adapter")
    if adapter:
        if not (path / ADAPTER_FILE).is_file():
            raise ModelError(f"{path} was fine-tuned with LoRA but has no {ADAPTER_FILE}; copy the whole folder")
        check_safetensors(path / ADAPTER_FILE)
    calibration = load_calibration(path, tasks={name: classes for name, (_, classes) in tasks.items()})
    _metrics(path / METRICS_FILE)
    found = ModelFolder(path, checkpoint, tasks, calibration, ood=load_ood(path))
    found.training_summary = check_training_summary(path / TRAINING_SUMMARY_FILE)
    if fingerprint:
        names = [n for n in OUTPUT_FILES if (path / n).is_file() and (n != ADAPTER_FILE or adapter)]
        found.sha256 = {n: file_sha256(path / n) for n in names}
        digest = hashlib.sha256(f"{FINGERPRINT_FORMAT}\n".encode())
        for name in names:
            digest.update(f"{name} {found.sha256[name]}\n".encode())
        found.fingerprint = digest.hexdigest()
    return found
