"""Isotonic regression of the label on the model's probability."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np

from meddx.calibration.checks import (
    CALIBRATION_FORMAT,
    check_format,
    check_labels,
    check_logits,
    count_field,
    required_field,
    stable_sigmoid,
    stable_softmax,
    within_field,
)
from meddx.errors import ConfigError, NotFittedError


class IsotonicCalibrator:
    """Isotonic regression (scikit-learn) of the label on the model's probability.

    Binary: one ``IsotonicRegression`` on ``sigmoid(logit)``. Multiclass: one per class on the
    softmax probability of that class against the rest, then each row renormalised to sum to 1
    (a row where every class maps to 0 keeps the uncalibrated softmax). Takes logits like
    :class:`TemperatureScaler` so the two are interchangeable. Unlike temperature scaling it can
    change the ranking (ties), and it needs more validation rows to be stable.

    Attributes:
        thresholds_: per class (one for binary), the ``(x, y)`` knots of the fitted step-linear map.
        n_fitted_: number of rows it was fitted on.

    Example:
        >>> import numpy as np
        >>> val_logits = np.array([2.0, 1.5, -1.0, -2.5, 0.5, -0.5, 3.0, -3.0])
        >>> val_labels = np.array([1, 1, 0, 0, 0, 1, 1, 0])
        >>> calibrator = IsotonicCalibrator().fit(val_logits, val_labels)
        >>> calibrator.transform(np.array([2.0, -2.0])).round(2)
        array([1., 0.])
    """

    kind = "isotonic"

    def fit(self, logits: Any, labels: Any) -> IsotonicCalibrator:
        """Fit on validation logits ``(N,)`` or ``(N, C)`` and class indices ``(N,)``; returns self."""
        from sklearn.isotonic import IsotonicRegression

        logits = check_logits(logits)
        n_classes = 2 if logits.ndim == 1 else logits.shape[1]
        labels = check_labels(labels, len(logits), n_classes)
        columns = [stable_sigmoid(logits)] if logits.ndim == 1 else list(stable_softmax(logits).T)
        targets = [labels == 1] if logits.ndim == 1 else [labels == c for c in range(n_classes)]
        self.thresholds_: list[tuple[np.ndarray, np.ndarray]] = []
        for x, y in zip(columns, targets, strict=True):
            fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y.astype(np.float64))
            self.thresholds_.append((fitted.X_thresholds_.copy(), fitted.y_thresholds_.copy()))
        self.n_fitted_ = len(labels)
        self.n_classes_ = int(n_classes)
        return self

    @staticmethod
    def _apply(x: np.ndarray, knots: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        # What IsotonicRegression.predict does with out_of_bounds="clip": linear between knots.
        return np.interp(x, knots[0], knots[1])

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities: ``(N,)`` positive class (binary) or ``(N, C)``."""
        if not hasattr(self, "thresholds_"):
            raise NotFittedError("IsotonicCalibrator is not fitted; call fit(val_logits, val_labels) first")
        logits = check_logits(logits)
        if logits.ndim == 1:
            return self._apply(stable_sigmoid(logits), self.thresholds_[0])
        if logits.shape[1] != self.n_classes_:
            raise ConfigError(f"fitted on {self.n_classes_} classes, got logits for {logits.shape[1]}")
        softmax = stable_softmax(logits)
        mapped = np.stack([self._apply(softmax[:, c], k) for c, k in enumerate(self.thresholds_)], axis=1)
        totals = mapped.sum(axis=1, keepdims=True)
        return np.where(totals > 0, mapped / np.where(totals > 0, totals, 1.0), softmax)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (for ``calibration.json``)."""
        if not hasattr(self, "thresholds_"):
            raise NotFittedError("IsotonicCalibrator is not fitted; nothing to save")
        return {
            "type": self.kind,
            "format": CALIBRATION_FORMAT,
            "n_fitted": self.n_fitted_,
            "n_classes": self.n_classes_,
            "knots": [{"x": x.tolist(), "y": y.tolist()} for x, y in self.thresholds_],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IsotonicCalibrator:
        """Rebuild a fitted calibrator from :meth:`to_dict` output."""
        check_format(data, cls.kind)
        calibrator = cls()
        calibrator.n_fitted_ = count_field(data, "n_fitted", 1)
        calibrator.n_classes_ = count_field(data, "n_classes", 2)
        knots = required_field(data, "knots")
        expected = 1 if calibrator.n_classes_ == 2 else calibrator.n_classes_
        if not isinstance(knots, list) or len(knots) != expected:
            raise ConfigError(f"knots must be a list of {expected} maps (one per class; one for a binary task)")
        calibrator.thresholds_ = [within_field(f"knots[{i}]", partial(_knots, k)) for i, k in enumerate(knots)]
        return calibrator


def _knots(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """One isotonic map's knots: as many ``x`` as ``y``, all in [0, 1], ``x`` increasing, ``y`` never decreasing."""
    if not isinstance(data, Mapping):
        raise ConfigError("must be a mapping with x and y lists")
    try:
        x = np.asarray(required_field(data, "x"), dtype=np.float64)
        y = np.asarray(required_field(data, "y"), dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError("x and y must be lists of numbers") from None
    if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
        raise ConfigError(f"x and y must be lists of as many numbers (at least one); got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ConfigError("x and y must be finite")
    if x.min() < 0 or x.max() > 1 or np.any(np.diff(x) < 0):
        raise ConfigError("x must be probabilities in [0, 1] in increasing order")
    if y.min() < 0 or y.max() > 1 or np.any(np.diff(y) < 0):
        raise ConfigError("y must be probabilities in [0, 1] that never decrease")
    return x, y
