"""A model folder's ``calibration.json``: each task's calibrator and conformal sets, written and read."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meddx.calibration.checks import CALIBRATION_FORMAT, required_field, within_field
from meddx.calibration.conformal import ConformalClassifier, GroupSpec
from meddx.calibration.isotonic import IsotonicCalibrator
from meddx.calibration.temperature import TemperatureScaler
from meddx.errors import ConfigError, ModelError


def calibrator_from_dict(data: Mapping[str, Any]) -> TemperatureScaler | IsotonicCalibrator:
    """Rebuild whichever calibrator ``data`` describes (its ``type`` field)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"must be a mapping with a type; got {type(data).__name__}")
    if data.get("type") == TemperatureScaler.kind:
        return TemperatureScaler.from_dict(data)
    if data.get("type") == IsotonicCalibrator.kind:
        return IsotonicCalibrator.from_dict(data)
    raise ConfigError(
        f"type {data.get('type')!r} is not a calibrator; "
        f"expected {TemperatureScaler.kind!r} or {IsotonicCalibrator.kind!r}"
    )


# --------------------------------------------------------------------------- calibration.json

CALIBRATION_FILE = "calibration.json"


@dataclass
class TaskCalibration:
    """What one task's probabilities go through: a calibrator, then (optionally) conformal sets.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> scaler = TemperatureScaler().fit(np.array([2.0, -1.0, 0.5, -2.0]), np.array([1, 0, 0, 1]))
        >>> with tempfile.TemporaryDirectory() as model_dir:
        ...     written = save_calibration(model_dir, {"disease": TaskCalibration(("0", "1"), scaler)})
        ...     loaded = load_calibration(model_dir)
        >>> written.name, loaded["disease"].classes, loaded["disease"].calibrator.kind
        ('calibration.json', ('0', '1'), 'temperature')
    """

    classes: tuple[str, ...]
    calibrator: TemperatureScaler | IsotonicCalibrator
    conformal: ConformalClassifier | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "calibrator": self.calibrator.to_dict(),
            "conformal": None if self.conformal is None else self.conformal.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], groups: GroupSpec = None) -> TaskCalibration:
        """Rebuild from :meth:`to_dict` output, checking every field; ConfigError names the field."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"must be a mapping with classes, calibrator and conformal; got {type(data).__name__}")
        classes = required_field(data, "classes")
        if (
            not isinstance(classes, list)
            or len(classes) < 2
            or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise ConfigError(f"classes must be a list of at least two distinct class names; got {classes!r}")
        calibrator = within_field("calibrator", lambda: calibrator_from_dict(required_field(data, "calibrator")))
        saved = data.get("conformal")
        conformal = (
            None if saved is None else within_field("conformal", lambda: ConformalClassifier.from_dict(saved, groups))
        )
        for part, fitted in (("calibrator", calibrator), ("conformal", conformal)):
            if fitted is not None and fitted.n_classes_ != len(classes):
                raise ConfigError(f"{part}.n_classes is {fitted.n_classes_} but classes names {len(classes)}")
        return cls(classes=tuple(classes), calibrator=calibrator, conformal=conformal)


def save_calibration(folder: str | Path, tasks: Mapping[str, TaskCalibration]) -> Path:
    """Write ``calibration.json`` (format, then one entry per task) into a model folder."""
    path = Path(folder) / CALIBRATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": CALIBRATION_FORMAT, "tasks": {name: entry.to_dict() for name, entry in tasks.items()}}
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path


def load_calibration(
    folder: str | Path, groups: GroupSpec = None, tasks: Mapping[str, Sequence[str]] | None = None
) -> dict[str, TaskCalibration]:
    """Read and check ``calibration.json`` from a model folder.

    Every field is checked (temperatures finite and > 0, thresholds finite scores or null, alpha in
    (0, 1), knots in order, class counts that agree), so a damaged file never gives wrong
    probabilities.

    Args:
        folder: the model folder.
        groups: a custom grouping function for conformal sets (see :meth:`ConformalClassifier.from_dict`).
        tasks: the model's task -> classes (its heads); each calibrated task must be one of them
            with the same classes. A task left out is uncalibrated (too few validation labels).

    Raises:
        ModelError: the file is missing, not JSON, of an unknown format, or a field is wrong (named).
    """
    path = Path(folder) / CALIBRATION_FILE
    fix = "refit it (meddx finetune) or copy the model folder again"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} not found; a model folder holds calibration.json next to config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != CALIBRATION_FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise ModelError(f"{path} has calibration format {found!r}; this meddx reads format {CALIBRATION_FORMAT}")
    entries = document.get("tasks")
    if not isinstance(entries, dict):
        raise ModelError(f"{path}: tasks must map task names to their calibration; {fix}")
    loaded: dict[str, TaskCalibration] = {}
    for name, entry in entries.items():
        try:
            loaded[name] = TaskCalibration.from_dict(entry, groups)
        except ConfigError as exc:
            raise ModelError(f"{path}: tasks.{name}.{exc}; {fix}") from None
    if tasks is not None:
        for name, entry in loaded.items():
            if name not in tasks:
                raise ModelError(
                    f"{path}: tasks.{name} is not a task of this model (its heads: {', '.join(tasks)}); "
                    f"the file belongs to another model: {fix}"
                )
            if tuple(entry.classes) != tuple(tasks[name]):
                raise ModelError(
                    f"{path}: tasks.{name}.classes {list(entry.classes)} differ from the head's {list(tasks[name])}; "
                    f"the file belongs to another model: {fix}"
                )
    return loaded
