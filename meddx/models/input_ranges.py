"""Acquisition checks: is a row's input acquired the way the training rows' were?

Some site differences never reach the model's embeddings, so no score on them can see it: the
imaging tensorizer resamples every series to one voxel grid, so a CT reconstructed with 10 mm
slices where the model saw 2.5 mm looks like any other. The readers record how each input was
acquired (:func:`meddx.data.summary.acquisition_facts`: slice and pixel spacing and the DICOM
modality; the monitor's channels and samples per channel-hour; the audio sample rate and
channels; the video frame rate). Fine-tuning keeps each fact's range over the training and
validation rows (numbers: lowest and highest; texts: the values seen), and a row whose fact
lies beyond it gets a ratio above 1:

* a number: ``(distance beyond the range) / tolerance``, the tolerance being 10% of the range's
  width plus 1% of its larger end (:data:`WIDTH_TOLERANCE`, :data:`SIZE_TOLERANCE`): a constant
  fact (every training scan at 2.5 mm) tolerates rounding, not another protocol;
* a text never seen in training (``MR`` for a model that saw only ``CT``): :data:`UNSEEN_RATIO`.

These are acquisition facts, not the patient's: ages, note lengths and event counts are left to
the embeddings' scores. A modality's ratio is its facts' largest; ``OodModel.score`` folds it into
``ood:<modality>`` and the fused ``ood``, and the facts beyond their range are named in the
predictions (``ood_inputs``). Kept in ``ood.json`` (``input_ranges``), checked when read.

Example:
    >>> ranges = InputRanges.fit({"imaging": [{"slice_spacing_mm": 2.5, "dicom_modality": "CT"}] * 20})
    >>> ratios, beyond = ranges.check({"imaging": {"slice_spacing_mm": 10.0, "dicom_modality": "CT"}})
    >>> round(ratios["imaging"], 1), beyond
    (300.0, ('imaging.slice_spacing_mm',))
    >>> ranges.check({"imaging": {"slice_spacing_mm": 2.5, "dicom_modality": "CT"}})
    ({'imaging': 0.0}, ())
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meddx.errors import ModelError

WIDTH_TOLERANCE = 0.10  # of the training range's width
SIZE_TOLERANCE = 0.01  # of the range's larger end, in magnitude
UNSEEN_RATIO = 10.0  # a text value no training row had
MIN_ROWS = 10  # a fact seen in fewer training rows is not checked
MAX_VALUES = 20  # texts kept per fact (more: the fact is not checked)
MAX_FACTS = 64
MAX_MAGNITUDE = 1e12


@dataclass
class InputRanges:
    """Per modality, per acquisition fact: ``{"low", "high"}`` (a number) or ``{"seen": [...]}`` (a text)."""

    ranges: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def fit(cls, facts: Mapping[str, Iterable[Mapping[str, float | str | None]]]) -> InputRanges:
        """The ranges of the training rows' facts (modality -> one dict of facts per record)."""
        ranges: dict[str, dict[str, dict[str, Any]]] = {}
        for modality, rows in facts.items():
            values: dict[str, list[float | str]] = {}
            for row in rows:
                for name, value in row.items():
                    if value is not None:
                        values.setdefault(name, []).append(value)
            for name, seen in sorted(values.items()):
                fitted = _fit_fact(seen)
                if fitted is not None:
                    ranges.setdefault(modality, {})[name] = fitted
        return cls(ranges)

    def check(self, row: Mapping[str, Mapping[str, float | str | None]]) -> tuple[dict[str, float], tuple[str, ...]]:
        """A row's ratio per checked modality it has, and the facts beyond their range (``modality.fact``)."""
        ratios: dict[str, float] = {}
        beyond: list[str] = []
        for modality, facts in row.items():
            fitted = self.ranges.get(modality)
            if not fitted:
                continue
            largest = 0.0
            for name, bounds in fitted.items():
                ratio = _ratio(facts.get(name), bounds)
                if ratio > 1:
                    beyond.append(f"{modality}.{name}")
                largest = max(largest, ratio)
            ratios[modality] = largest
        return ratios, tuple(beyond)

    def to_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self.ranges

    @classmethod
    def from_json(cls, data: Any, where: str) -> InputRanges:
        """The ``input_ranges`` of ``ood.json``, checked whole.

        Raises:
            ModelError: naming ``where`` and the field out of its bounds.
        """
        if not isinstance(data, dict) or len(data) > MAX_FACTS:
            raise ModelError(f"{where}: input_ranges must map modalities to their facts")
        ranges: dict[str, dict[str, dict[str, Any]]] = {}
        for modality, facts in data.items():
            if not isinstance(facts, dict) or len(facts) > MAX_FACTS:
                raise ModelError(f"{where}: input_ranges.{modality} must map fact names to ranges")
            for name, bounds in facts.items():
                ranges.setdefault(str(modality), {})[str(name)] = _checked(
                    bounds, f"{where}: input_ranges.{modality}.{name}"
                )
        return cls(ranges)


def _fit_fact(values: list[float | str]) -> dict[str, Any] | None:
    if len(values) < MIN_ROWS:
        return None
    if all(isinstance(v, str) for v in values):
        seen = sorted(set(values))
        return {"seen": seen} if len(seen) <= MAX_VALUES else None
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(numbers) < MIN_ROWS:
        return None
    return {"low": min(numbers), "high": max(numbers)}


def _ratio(value: float | str | None, bounds: dict[str, Any]) -> float:
    if value is None:
        return 0.0
    if "seen" in bounds:
        return 0.0 if str(value) in bounds["seen"] else UNSEEN_RATIO
    if isinstance(value, str) or not math.isfinite(value):
        return 0.0
    low, high = bounds["low"], bounds["high"]
    beyond = max(low - value, value - high, 0.0)
    tolerance = WIDTH_TOLERANCE * (high - low) + SIZE_TOLERANCE * max(abs(low), abs(high))
    if beyond == 0:
        return 0.0
    return beyond / tolerance if tolerance > 0 else UNSEEN_RATIO


def _checked(bounds: Any, where: str) -> dict[str, Any]:
    if isinstance(bounds, dict) and set(bounds) == {"seen"}:
        seen = bounds["seen"]
        if (
            isinstance(seen, list)
            and 0 < len(seen) <= MAX_VALUES
            and all(isinstance(v, str) and len(v) <= 64 for v in seen)
        ):
            return {"seen": list(seen)}
        raise ModelError(f"{where}.seen must be 1 to {MAX_VALUES} short texts")
    if isinstance(bounds, dict) and set(bounds) == {"low", "high"}:
        low, high = bounds["low"], bounds["high"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if numbers and all(math.isfinite(v) and abs(v) <= MAX_MAGNITUDE for v in (low, high)) and low <= high:
            return {"low": float(low), "high": float(high)}
        raise ModelError(f"{where}: low and high must be finite numbers with low <= high; got {low!r}, {high!r}")
    raise ModelError(f"{where} must be {{'low', 'high'}} or {{'seen'}}; fine-tune again with this meddx")
