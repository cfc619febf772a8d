"""Temperature scaling: one temperature that divides the logits."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from meddx.calibration.checks import (
    CALIBRATION_FORMAT,
    check_format,
    check_labels,
    check_logits,
    count_field,
    real_field,
    stable_sigmoid,
    stable_softmax,
)
from meddx.errors import ConfigError, NotFittedError


class TemperatureScaler:
    """Temperature scaling: ``p = softmax(logits / T)`` (binary: ``sigmoid(logit / T)``).

    ``T`` minimises the negative log-likelihood on validation rows. The search runs on
    ``log T`` (bounded to ``[1/max_temperature, max_temperature]``); the NLL is convex in ``1/T``,
    so the bounded scalar search finds the optimum.

    Args:
        max_temperature: upper bound of ``T`` (and ``1/max_temperature`` the lower one).

    Attributes:
        temperature_: the fitted temperature.
        n_fitted_: number of rows it was fitted on.
        nll_before_, nll_after_: mean NLL at ``T = 1`` and at ``temperature_``.

    Example:
        >>> import numpy as np
        >>> val_logits = np.array([2.0, 1.5, -1.0, -2.5, 0.5, -0.5, 3.0, -3.0])
        >>> val_labels = np.array([1, 1, 0, 0, 0, 1, 1, 0])
        >>> scaler = TemperatureScaler().fit(val_logits, val_labels)
        >>> round(scaler.temperature_, 2)
        0.73
        >>> scaler.transform(np.array([2.0, -2.0])).round(2)  # probabilities of class 1
        array([0.94, 0.06])
    """

    kind = "temperature"

    def __init__(self, max_temperature: float = 100.0):
        self.max_temperature = max_temperature

    @staticmethod
    def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
        scaled = logits / temperature
        if scaled.ndim == 1:  # binary: -log sigmoid(z) for y=1, -log sigmoid(-z) for y=0
            signed = np.where(labels == 1, scaled, -scaled)
            return float(np.mean(np.logaddexp(0.0, -signed)))
        log_norm = np.logaddexp.reduce(scaled, axis=1)
        return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))

    def fit(self, logits: Any, labels: Any) -> TemperatureScaler:
        """Fit the temperature on validation logits (never training rows).

        Args:
            logits: ``(N,)`` binary logits or ``(N, C)`` multiclass logits.
            labels: ``(N,)`` class indices.

        Returns:
            self
        """
        from scipy.optimize import minimize_scalar

        if not self.max_temperature > 1:
            raise ConfigError(f"max_temperature must be > 1; got {self.max_temperature}")
        logits = check_logits(logits)
        labels = check_labels(labels, len(logits), 2 if logits.ndim == 1 else logits.shape[1])
        bound = math.log(self.max_temperature)
        result = minimize_scalar(
            lambda log_t: self._nll(logits, labels, math.exp(log_t)),
            bounds=(-bound, bound),
            method="bounded",
            options={"xatol": 1e-7},
        )
        self.temperature_ = float(math.exp(result.x))
        self.n_fitted_ = len(labels)
        self.n_classes_ = 2 if logits.ndim == 1 else int(logits.shape[1])
        self.nll_before_ = self._nll(logits, labels, 1.0)
        self.nll_after_ = self._nll(logits, labels, self.temperature_)
        return self

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities: ``(N,)`` positive class (binary) or ``(N, C)``."""
        if not hasattr(self, "temperature_"):
            raise NotFittedError("TemperatureScaler is not fitted; call fit(val_logits, val_labels) first")
        logits = check_logits(logits)
        scaled = logits / self.temperature_
        return stable_sigmoid(scaled) if scaled.ndim == 1 else stable_softmax(scaled)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (for ``calibration.json``)."""
        if not hasattr(self, "temperature_"):
            raise NotFittedError("TemperatureScaler is not fitted; nothing to save")
        return {
            "type": self.kind,
            "format": CALIBRATION_FORMAT,
            "temperature": self.temperature_,
            "n_fitted": self.n_fitted_,
            "n_classes": self.n_classes_,
            "nll_before": self.nll_before_,
            "nll_after": self.nll_after_,
            "max_temperature": self.max_temperature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TemperatureScaler:
        """Rebuild a fitted scaler from :meth:`to_dict` output."""
        check_format(data, cls.kind)
        scaler = cls(max_temperature=real_field(data, "max_temperature", "a finite number > 1", lambda v: v > 1))
        scaler.temperature_ = real_field(data, "temperature", "a finite number > 0", lambda v: v > 0)
        scaler.n_fitted_ = count_field(data, "n_fitted", 1)
        scaler.n_classes_ = count_field(data, "n_classes", 2)
        scaler.nll_before_ = real_field(data, "nll_before", "a finite number >= 0", lambda v: v >= 0)
        scaler.nll_after_ = real_field(data, "nll_after", "a finite number >= 0", lambda v: v >= 0)
        return scaler


# --------------------------------------------------------------------------- isotonic
