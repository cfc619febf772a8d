"""The checks every calibration estimator shares: logits, labels and the fields of a saved entry."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from meddx.errors import ConfigError

CALIBRATION_FORMAT = 1  # version of the JSON written by to_dict; from_dict refuses others


# --------------------------------------------------------------------------- helpers


def stable_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def stable_sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # stable for large |logits|


def check_logits(logits: Any, name: str = "logits") -> np.ndarray:
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


def check_labels(labels: Any, n_rows: int, n_classes: int) -> np.ndarray:
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


def as_class_probabilities(probabilities: Any) -> np.ndarray:
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


def check_format(data: Mapping[str, Any], kind: str) -> None:
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


def required_field(data: Mapping[str, Any], key: str) -> Any:
    if key not in data:
        raise ConfigError(f"{key} is missing")
    return data[key]


def real_field(data: Mapping[str, Any], key: str, rule: str, check: Callable[[float], bool]) -> float:
    """``data[key]`` as a float: a finite JSON number for which ``check`` holds, else ConfigError citing ``rule``."""
    value = required_field(data, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not check(value):
        raise ConfigError(f"{key} must be {rule}; got {value!r}")
    return float(value)


def count_field(data: Mapping[str, Any], key: str, minimum: int) -> int:
    value = required_field(data, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}; got {value!r}")
    return value


def threshold_field(data: Mapping[str, Any], key: str) -> float:
    """A conformal threshold: a score in [0, 1], or null for infinity (every class in every set)."""
    if required_field(data, key) is None:
        return math.inf
    return real_field(data, key, "a finite score in [0, 1], or null (every class in every set)", lambda v: 0 <= v <= 1)


def within_field(prefix: str, build: Callable[[], Any]) -> Any:
    """``build()``, its ConfigError's message prefixed with the field it was reading."""
    try:
        return build()
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc}") from None


# --------------------------------------------------------------------------- temperature
