"""Calibrated probabilities and conformal prediction sets, fitted on validation rows only.

Three scikit-learn-style estimators, each ``fit(...) -> self`` with fitted attributes ending
in ``_`` and a JSON form (``to_dict`` / ``from_dict``) for ``calibration.json``:

- :class:`TemperatureScaler`: one temperature that divides the logits, chosen to minimise the
  negative log-likelihood (Guo et al. 2017). Keeps the ranking, so AUROC is unchanged.
- :class:`IsotonicCalibrator`: scikit-learn's ``IsotonicRegression`` on the model's probability
  (binary), one-vs-rest and renormalised (multiclass).
- :class:`ConformalClassifier`: split-conformal prediction sets ("LAC": score = 1 - p(true class))
  with the finite-sample quantile, and Mondrian thresholds per modality-availability group,
  because a prediction made with a modality missing is less reliable than one made with all.

:class:`TaskCalibration` bundles a task's calibrator and conformal classifier;
:func:`save_calibration` / :func:`load_calibration` write and read a model folder's
``calibration.json``.

Shapes: a binary task gives one logit per row ``(N,)`` and a multiclass task ``(N, C)``; labels
are class indices ``(N,)`` (0/1 for binary tasks). Rows with an unknown label must be dropped by
the caller before ``fit``.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> logits = rng.normal(0, 3, 500)
    >>> labels = (rng.random(500) < 1 / (1 + np.exp(-logits / 2))).astype(int)
    >>> scaler = TemperatureScaler().fit(logits, labels)
    >>> probabilities = scaler.transform(logits)                       # (N,) positive class
    >>> conformal = ConformalClassifier(alpha=0.1).fit(probabilities, labels, availability=np.zeros(500, int))
    >>> conformal.predict_set(probabilities[:3], availability=np.zeros(3, int)).shape
    (3, 2)
"""

from meddx.calibration.checks import CALIBRATION_FORMAT
from meddx.calibration.conformal import (
    ALL_PRESENT,
    DEFAULT_GROUPS,
    ONE_MISSING,
    TWO_OR_MORE_MISSING,
    Availability,
    ConformalClassifier,
    GroupSpec,
    availability_groups,
    conformal_threshold,
)
from meddx.calibration.files import (
    CALIBRATION_FILE,
    TaskCalibration,
    calibrator_from_dict,
    load_calibration,
    save_calibration,
)
from meddx.calibration.isotonic import IsotonicCalibrator
from meddx.calibration.temperature import TemperatureScaler

__all__ = [
    "ALL_PRESENT",
    "CALIBRATION_FILE",
    "CALIBRATION_FORMAT",
    "DEFAULT_GROUPS",
    "ONE_MISSING",
    "TWO_OR_MORE_MISSING",
    "Availability",
    "ConformalClassifier",
    "GroupSpec",
    "IsotonicCalibrator",
    "TaskCalibration",
    "TemperatureScaler",
    "availability_groups",
    "calibrator_from_dict",
    "conformal_threshold",
    "load_calibration",
    "save_calibration",
]
