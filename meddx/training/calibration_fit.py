"""Fitting each task's calibrator and conformal sets after training, on the validation rows only.

Example:
    >>> figures = calibrate(model, val, "temperature", alpha=0.1)  # doctest: +SKIP
    >>> sorted(figures["disease"])  # doctest: +SKIP
    ['auroc', 'ece_after', 'ece_before', 'val_rows']
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from meddx.errors import ConfigError
from meddx.training.validation import dataset_outputs

if TYPE_CHECKING:
    from meddx.data import CohortDataset
    from meddx.models.diagnosis import DiagnosisModel

logger = logging.getLogger(__name__)


def calibrate(
    model: DiagnosisModel,
    val: CohortDataset,
    method: str = "temperature",
    alpha: float = 0.1,
    min_group_size: int = 50,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Fit each task's calibrator and conformal sets on the validation rows; returns their figures."""
    from meddx.calibration import ConformalClassifier, IsotonicCalibrator, TaskCalibration, TemperatureScaler
    from meddx.metrics import auroc, ece
    from meddx.models.diagnosis import probabilities_from_logits

    if method not in ("temperature", "isotonic"):
        raise ConfigError(f"calibration must be 'temperature' or 'isotonic', got {method!r}")
    logits, labels, present = dataset_outputs(model, val, batch_size, device)
    figures: dict[str, Any] = {}
    for task, spec in model.tasks.items():
        known = labels[task] >= 0
        if known.sum() < 10 or len(np.unique(labels[task][known])) < 2:
            logger.warning(
                "task %s: %d validation labels; left uncalibrated and without conformal sets", task, int(known.sum())
            )
            continue
        x, y = logits[task][known], labels[task][known]
        calibrator = (TemperatureScaler() if method == "temperature" else IsotonicCalibrator()).fit(x, y)
        raw = probabilities_from_logits(x, spec.kind)
        calibrated = calibrator.transform(x)
        conformal = ConformalClassifier(alpha=alpha, min_group_size=min_group_size).fit(
            calibrated, y, availability=present[known]
        )
        model.calibration[task] = TaskCalibration(spec.classes, calibrator, conformal)
        figures[task] = {
            "val_rows": int(known.sum()),
            "auroc": float(auroc(y, raw)),
            "ece_before": float(ece(y, raw)),
            "ece_after": float(ece(y, calibrated)),
        }
    return figures
