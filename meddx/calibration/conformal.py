"""Availability groups and split-conformal prediction sets with Mondrian thresholds per group."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np

from meddx.calibration.checks import (
    CALIBRATION_FORMAT,
    as_class_probabilities,
    check_format,
    check_labels,
    count_field,
    real_field,
    required_field,
    threshold_field,
    within_field,
)
from meddx.errors import ConfigError, NotFittedError

ALL_PRESENT = "all present"
ONE_MISSING = "one missing"
TWO_OR_MORE_MISSING = "two or more missing"
DEFAULT_GROUPS: dict[int, str] = {0: ALL_PRESENT, 1: ONE_MISSING, 2: TWO_OR_MORE_MISSING}

# What identifies a row's availability group: a presence mask (N, M) bool, a number of missing
# modalities (N,) int, or group names (N,) str.
Availability = np.ndarray
GroupSpec = Mapping[int, str] | Callable[[np.ndarray], Any] | None


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
        probabilities = as_class_probabilities(probabilities)
        labels = check_labels(labels, len(probabilities), probabilities.shape[1])
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
        probabilities = as_class_probabilities(probabilities)
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
        check_format(data, cls.kind)
        grouping = data.get("grouping", {})
        if not isinstance(grouping, Mapping):
            raise ConfigError("grouping must be a mapping")
        if groups is None and grouping.get("by") == "number_missing":
            groups = within_field("grouping", lambda: _group_names(grouping))
        conformal = cls(
            alpha=real_field(data, "alpha", "a number strictly between 0 and 1", lambda v: 0 < v < 1),
            groups=groups,
            min_group_size=count_field(data, "min_group_size", 1),
        )
        conformal.threshold_ = threshold_field(data, "threshold")
        conformal.n_fitted_ = count_field(data, "n_fitted", 0)
        conformal.n_classes_ = count_field(data, "n_classes", 2)
        saved = required_field(data, "groups")
        if not isinstance(saved, Mapping):
            raise ConfigError("groups must map group names to their threshold, n_fitted and pooled")
        conformal.group_thresholds_, conformal.group_sizes_, conformal.group_pooled_ = {}, {}, {}
        for name, group in saved.items():
            if not isinstance(group, Mapping) or not isinstance(group.get("pooled"), bool):
                raise ConfigError(f"groups.{name} must be a mapping with threshold, n_fitted and pooled (true/false)")
            conformal.group_thresholds_[name] = within_field(
                f"groups.{name}", partial(threshold_field, group, "threshold")
            )
            conformal.group_sizes_[name] = within_field(f"groups.{name}", partial(count_field, group, "n_fitted", 0))
            conformal.group_pooled_[name] = group["pooled"]
        return conformal


def _group_names(grouping: Mapping[str, Any]) -> dict[int, str]:
    names = required_field(grouping, "names")
    if not isinstance(names, Mapping) or not all(isinstance(k, str) and k.isdigit() for k in names):
        raise ConfigError('names must map numbers of missing modalities ("0", "1"...) to group names')
    if not all(isinstance(v, str) for v in names.values()) or "0" not in names:
        raise ConfigError('names must give a group name (a string) to each number missing, from "0"')
    return {int(k): v for k, v in names.items()}
