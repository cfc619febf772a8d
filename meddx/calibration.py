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

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import ConfigError, ModelError, NotFittedError

CALIBRATION_FORMAT = 1  # version of the JSON written by to_dict; from_dict refuses others

ALL_PRESENT = "all present"
ONE_MISSING = "one missing"
TWO_OR_MORE_MISSING = "two or more missing"
DEFAULT_GROUPS: dict[int, str] = {0: ALL_PRESENT, 1: ONE_MISSING, 2: TWO_OR_MORE_MISSING}

# What identifies a row's availability group: a presence mask (N, M) bool, a number of missing
# modalities (N,) int, or group names (N,) str.
Availability = np.ndarray
GroupSpec = Mapping[int, str] | Callable[[np.ndarray], Any] | None


# --------------------------------------------------------------------------- helpers


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # stable for large |logits|


def _check_logits(logits: Any, name: str = "logits") -> np.ndarray:
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim not in (1, 2) or array.shape[0] == 0:
        raise ConfigError(
            f"{name} must be (N,) for a binary task or (N, C) for a multiclass one with N > 0; got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"{name} hold NaN or infinite values; drop those rows first")
    return array


def _check_labels(labels: Any, n_rows: int, n_classes: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != (n_rows,):
        raise ConfigError(f"labels must be (N,) = ({n_rows},) class indices; got shape {array.shape}")
    if array.dtype.kind == "f":
        if np.isnan(array).any():
            raise ConfigError("labels hold NaN (unknown labels); drop those rows before fitting")
        if not np.all(array == np.round(array)):
            raise ConfigError("labels must be integer class indices (0/1 for a binary task)")
    array = array.astype(np.int64)
    if array.min() < 0 or array.max() >= n_classes:
        raise ConfigError(f"labels must lie in 0..{n_classes - 1}; got {array.min()}..{array.max()}")
    return array


def _as_class_probabilities(probabilities: Any) -> np.ndarray:
    """(N,) positive-class probabilities or (N, C) class probabilities -> (N, C)."""
    array = np.asarray(probabilities, dtype=np.float64)
    if array.ndim == 1:
        array = np.stack([1.0 - array, array], axis=1)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < 2:
        raise ConfigError(
            f"probabilities must be (N,) positive-class or (N, C) class probabilities; got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise ConfigError("probabilities must lie in [0, 1] and be finite")
    return array


def _check_format(data: Mapping[str, Any], kind: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"must be a mapping with type {kind!r}; got {type(data).__name__}")
    if data.get("type") != kind:
        raise ConfigError(f"type must be {kind!r}; got {data.get('type')!r}")
    if data.get("format") != CALIBRATION_FORMAT:
        raise ConfigError(
            f"format {data.get('format')!r} is not supported "
            f"(this meddx reads format {CALIBRATION_FORMAT}); refit the calibration with this version"
        )


# What ``from_dict`` checks a saved entry against: a file read from outside can hold anything.


def _field(data: Mapping[str, Any], key: str) -> Any:
    if key not in data:
        raise ConfigError(f"{key} is missing")
    return data[key]


def _real(data: Mapping[str, Any], key: str, rule: str, check: Callable[[float], bool]) -> float:
    """``data[key]`` as a float: a finite JSON number for which ``check`` holds, else ConfigError citing ``rule``."""
    value = _field(data, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not check(value):
        raise ConfigError(f"{key} must be {rule}; got {value!r}")
    return float(value)


def _count(data: Mapping[str, Any], key: str, minimum: int) -> int:
    value = _field(data, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}; got {value!r}")
    return value


def _threshold(data: Mapping[str, Any], key: str) -> float:
    """A conformal threshold: a score in [0, 1], or null for infinity (every class in every set)."""
    if _field(data, key) is None:
        return math.inf
    return _real(data, key, "a finite score in [0, 1], or null (every class in every set)", lambda v: 0 <= v <= 1)


def _within(prefix: str, build: Callable[[], Any]) -> Any:
    """``build()``, its ConfigError's message prefixed with the field it was reading."""
    try:
        return build()
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc}") from None


# --------------------------------------------------------------------------- temperature


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
        logits = _check_logits(logits)
        labels = _check_labels(labels, len(logits), 2 if logits.ndim == 1 else logits.shape[1])
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
        logits = _check_logits(logits)
        scaled = logits / self.temperature_
        return _sigmoid(scaled) if scaled.ndim == 1 else _softmax(scaled)

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
        _check_format(data, cls.kind)
        scaler = cls(max_temperature=_real(data, "max_temperature", "a finite number > 1", lambda v: v > 1))
        scaler.temperature_ = _real(data, "temperature", "a finite number > 0", lambda v: v > 0)
        scaler.n_fitted_ = _count(data, "n_fitted", 1)
        scaler.n_classes_ = _count(data, "n_classes", 2)
        scaler.nll_before_ = _real(data, "nll_before", "a finite number >= 0", lambda v: v >= 0)
        scaler.nll_after_ = _real(data, "nll_after", "a finite number >= 0", lambda v: v >= 0)
        return scaler


# --------------------------------------------------------------------------- isotonic


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

        logits = _check_logits(logits)
        n_classes = 2 if logits.ndim == 1 else logits.shape[1]
        labels = _check_labels(labels, len(logits), n_classes)
        columns = [_sigmoid(logits)] if logits.ndim == 1 else list(_softmax(logits).T)
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
        logits = _check_logits(logits)
        if logits.ndim == 1:
            return self._apply(_sigmoid(logits), self.thresholds_[0])
        if logits.shape[1] != self.n_classes_:
            raise ConfigError(f"fitted on {self.n_classes_} classes, got logits for {logits.shape[1]}")
        softmax = _softmax(logits)
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
        _check_format(data, cls.kind)
        calibrator = cls()
        calibrator.n_fitted_ = _count(data, "n_fitted", 1)
        calibrator.n_classes_ = _count(data, "n_classes", 2)
        knots = _field(data, "knots")
        expected = 1 if calibrator.n_classes_ == 2 else calibrator.n_classes_
        if not isinstance(knots, list) or len(knots) != expected:
            raise ConfigError(f"knots must be a list of {expected} maps (one per class; one for a binary task)")
        calibrator.thresholds_ = [_within(f"knots[{i}]", partial(_knots, k)) for i, k in enumerate(knots)]
        return calibrator


def _knots(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """One isotonic map's knots: as many ``x`` as ``y``, all in [0, 1], ``x`` increasing, ``y`` never decreasing."""
    if not isinstance(data, Mapping):
        raise ConfigError("must be a mapping with x and y lists")
    try:
        x = np.asarray(_field(data, "x"), dtype=np.float64)
        y = np.asarray(_field(data, "y"), dtype=np.float64)
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


# --------------------------------------------------------------------------- availability groups


def availability_groups(availability: Any, groups: GroupSpec = None) -> np.ndarray:
    """One availability-group name per row.

    Args:
        availability: a presence mask ``(N, M)`` bool (True = modality present), a number of
            missing modalities ``(N,)`` int, or group names ``(N,)`` str (used as they are).
        groups: ``None`` for the default ("all present", "one missing", "two or more missing");
            a mapping from number missing to group name, where a number above the largest key
            belongs to the largest key's group ("or more"); or a function called with
            ``availability`` as given that returns one name per row.

    Returns:
        ``(N,)`` array of group names (str).

    Example:
        >>> availability_groups(np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1]], bool)).tolist()
        ['all present', 'one missing', 'two or more missing']
    """
    array = np.asarray(availability)
    if callable(groups):
        names = np.asarray(groups(availability)).astype(str)
        if names.shape != (array.shape[0],):
            raise ConfigError(f"the groups function must return one name per row ({array.shape[0]}); got {names.shape}")
        return names
    if array.ndim == 1 and array.dtype.kind in "USO":
        return array.astype(str)
    if array.ndim == 2:
        n_missing = (~array.astype(bool)).sum(axis=1)
    elif array.ndim == 1 and array.dtype.kind in "iub":
        n_missing = array.astype(np.int64)
    else:
        raise ConfigError(
            "availability must be a presence mask (N, M) bool, a number missing (N,) int or group names (N,) str; "
            f"got shape {array.shape} dtype {array.dtype}"
        )
    if n_missing.size and n_missing.min() < 0:
        raise ConfigError("a number of missing modalities cannot be negative")
    mapping = dict(DEFAULT_GROUPS if groups is None else groups)
    if not mapping or any(not isinstance(k, (int, np.integer)) or k < 0 for k in mapping):
        raise ConfigError(f"groups must map numbers missing (int >= 0) to names; got {mapping!r}")
    keys = sorted(mapping)
    if keys[0] != 0:
        raise ConfigError(f"groups must name the group of rows with nothing missing (key 0); got keys {keys}")
    # Each count goes to the largest key not above it: {0: a, 1: b, 2: c} puts 5 missing in c.
    index = np.searchsorted(np.asarray(keys), n_missing, side="right") - 1
    names = np.asarray([mapping[k] for k in keys], dtype=object)
    return names[index].astype(str)


# --------------------------------------------------------------------------- conformal


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """Split-conformal threshold: the ``ceil((n+1)(1-alpha))``-th smallest score.

    Returns ``inf`` when ``n`` is too small for that rank to exist (then every class is in
    every set, which is the only way to guarantee ``1 - alpha`` coverage).
    """
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return math.inf
    return float(np.sort(scores)[rank - 1])


class ConformalClassifier:
    """Split-conformal prediction sets with Mondrian thresholds per availability group.

    Score of a class: ``1 - p(class)``; a class is in the set when its score is at most the
    threshold. Fitted on validation rows (calibrated probabilities and true labels), the
    pooled threshold gives coverage >= ``1 - alpha`` over exchangeable rows; the per-group
    thresholds give it within each availability group. A group with fewer than
    ``min_group_size`` validation rows, or one not seen in fitting, uses the pooled threshold.

    Args:
        alpha: miscoverage rate (0.1 -> sets hold the true class at least 90% of the time).
        groups: how availability becomes a group, see :func:`availability_groups`.
        min_group_size: fewest validation rows for a group to get its own threshold.

    Attributes:
        threshold_: pooled threshold (``inf``: every class is always in the set).
        group_thresholds_: group name -> threshold used for that group.
        group_sizes_: group name -> validation rows seen in it.
        n_fitted_, n_classes_: validation rows and classes fitted on.

    Example:
        >>> import numpy as np
        >>> val_probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
        >>> val_labels = np.array([0, 0, 1, 1, 1, 1])
        >>> conformal = ConformalClassifier(alpha=0.2).fit(val_probs, val_labels)  # availability=(N, M) mask
        >>> round(conformal.threshold_, 2)  # the pooled threshold on 1 - p(class)
        0.6
        >>> conformal.predict_set(np.array([[0.95, 0.05], [0.5, 0.5]]))  # (N, C) bool
        array([[ True, False],
               [ True,  True]])
    """

    kind = "conformal"

    def __init__(self, alpha: float = 0.1, groups: GroupSpec = None, min_group_size: int = 50):
        self.alpha = alpha
        self.groups = groups
        self.min_group_size = min_group_size

    def fit(self, probabilities: Any, labels: Any, availability: Any = None) -> ConformalClassifier:
        """Fit thresholds on validation rows.

        Args:
            probabilities: ``(N,)`` positive-class or ``(N, C)`` calibrated probabilities.
            labels: ``(N,)`` class indices.
            availability: per row, see :func:`availability_groups`; ``None`` fits the pooled
                threshold only.

        Returns:
            self
        """
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must lie in (0, 1); got {self.alpha}")
        if self.min_group_size < 1:
            raise ConfigError(f"min_group_size must be >= 1; got {self.min_group_size}")
        probabilities = _as_class_probabilities(probabilities)
        labels = _check_labels(labels, len(probabilities), probabilities.shape[1])
        scores = 1.0 - probabilities[np.arange(len(labels)), labels]  # (N,)
        self.n_fitted_ = len(labels)
        self.n_classes_ = int(probabilities.shape[1])
        self.threshold_ = conformal_threshold(scores, self.alpha)
        self.group_thresholds_: dict[str, float] = {}
        self.group_sizes_: dict[str, int] = {}
        self.group_pooled_: dict[str, bool] = {}  # True where the group fell back to the pooled threshold
        if availability is not None:
            names = self._group_names(availability, len(labels))
            for name in sorted(set(names.tolist())):
                members = scores[names == name]
                self.group_sizes_[name] = len(members)
                pooled = len(members) < self.min_group_size
                self.group_pooled_[name] = pooled
                self.group_thresholds_[name] = self.threshold_ if pooled else conformal_threshold(members, self.alpha)
        return self

    def _group_names(self, availability: Any, n_rows: int) -> np.ndarray:
        names = availability_groups(availability, self.groups)
        if len(names) != n_rows:
            raise ConfigError(f"availability has {len(names)} rows but the probabilities have {n_rows}")
        return names

    def thresholds_for(self, availability: Any = None, n_rows: int | None = None) -> np.ndarray:
        """The threshold each row gets: its group's, else the pooled one. ``(N,)``."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError("ConformalClassifier is not fitted; call fit(val_probs, val_labels) first")
        if availability is None:
            if n_rows is None:
                raise ConfigError("give availability or n_rows")
            return np.full(n_rows, self.threshold_)
        names = availability_groups(availability, self.groups)
        return np.asarray([self.group_thresholds_.get(name, self.threshold_) for name in names], dtype=np.float64)

    def predict_set(self, probabilities: Any, availability: Any = None) -> np.ndarray:
        """Prediction sets ``(N, C)`` bool: class ``c`` is in row ``i``'s set when ``1 - p[i, c] <= q_i``.

        A set can be empty (no class is probable enough) or hold every class.
        """
        probabilities = _as_class_probabilities(probabilities)
        if probabilities.shape[1] != getattr(self, "n_classes_", probabilities.shape[1]):
            raise ConfigError(f"fitted on {self.n_classes_} classes, got probabilities for {probabilities.shape[1]}")
        thresholds = self.thresholds_for(availability, len(probabilities))
        if len(thresholds) != len(probabilities):
            raise ConfigError(
                f"availability has {len(thresholds)} rows but the probabilities have {len(probabilities)}"
            )
        return (1.0 - probabilities) <= thresholds[:, None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state; an infinite threshold is written as ``null`` (every class in the set)."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError("ConformalClassifier is not fitted; nothing to save")

        def finite(value: float) -> float | None:
            return None if math.isinf(value) else value

        if self.groups is None or isinstance(self.groups, Mapping):
            mapping = DEFAULT_GROUPS if self.groups is None else self.groups
            grouping: Any = {"by": "number_missing", "names": {str(k): v for k, v in mapping.items()}}
        else:
            grouping = {"by": "custom", "function": getattr(self.groups, "__qualname__", repr(self.groups))}
        return {
            "type": self.kind,
            "format": CALIBRATION_FORMAT,
            "score": "1 - p(class)",
            "alpha": self.alpha,
            "n_fitted": self.n_fitted_,
            "n_classes": self.n_classes_,
            "threshold": finite(self.threshold_),
            "min_group_size": self.min_group_size,
            "grouping": grouping,
            "groups": {
                name: {
                    "threshold": finite(self.group_thresholds_[name]),
                    "n_fitted": self.group_sizes_[name],
                    "pooled": self.group_pooled_[name],
                }
                for name in self.group_thresholds_
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], groups: GroupSpec = None) -> ConformalClassifier:
        """Rebuild from :meth:`to_dict` output.

        Args:
            data: the saved dictionary.
            groups: the grouping function again when it was a custom one (functions are not
                saved); without it, pass group names as ``availability`` when predicting.
        """
        _check_format(data, cls.kind)
        grouping = data.get("grouping", {})
        if not isinstance(grouping, Mapping):
            raise ConfigError("grouping must be a mapping")
        if groups is None and grouping.get("by") == "number_missing":
            groups = _within("grouping", lambda: _group_names(grouping))
        conformal = cls(
            alpha=_real(data, "alpha", "a number strictly between 0 and 1", lambda v: 0 < v < 1),
            groups=groups,
            min_group_size=_count(data, "min_group_size", 1),
        )
        conformal.threshold_ = _threshold(data, "threshold")
        conformal.n_fitted_ = _count(data, "n_fitted", 0)
        conformal.n_classes_ = _count(data, "n_classes", 2)
        saved = _field(data, "groups")
        if not isinstance(saved, Mapping):
            raise ConfigError("groups must map group names to their threshold, n_fitted and pooled")
        conformal.group_thresholds_, conformal.group_sizes_, conformal.group_pooled_ = {}, {}, {}
        for name, group in saved.items():
            if not isinstance(group, Mapping) or not isinstance(group.get("pooled"), bool):
                raise ConfigError(f"groups.{name} must be a mapping with threshold, n_fitted and pooled (true/false)")
            conformal.group_thresholds_[name] = _within(f"groups.{name}", partial(_threshold, group, "threshold"))
            conformal.group_sizes_[name] = _within(f"groups.{name}", partial(_count, group, "n_fitted", 0))
            conformal.group_pooled_[name] = group["pooled"]
        return conformal


def _group_names(grouping: Mapping[str, Any]) -> dict[int, str]:
    names = _field(grouping, "names")
    if not isinstance(names, Mapping) or not all(isinstance(k, str) and k.isdigit() for k in names):
        raise ConfigError('names must map numbers of missing modalities ("0", "1"...) to group names')
    if not all(isinstance(v, str) for v in names.values()) or "0" not in names:
        raise ConfigError('names must give a group name (a string) to each number missing, from "0"')
    return {int(k): v for k, v in names.items()}


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
        classes = _field(data, "classes")
        if (
            not isinstance(classes, list)
            or len(classes) < 2
            or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise ConfigError(f"classes must be a list of at least two distinct class names; got {classes!r}")
        calibrator = _within("calibrator", lambda: calibrator_from_dict(_field(data, "calibrator")))
        saved = data.get("conformal")
        conformal = (
            None if saved is None else _within("conformal", lambda: ConformalClassifier.from_dict(saved, groups))
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
