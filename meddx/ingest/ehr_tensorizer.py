"""The EHR tensorizer: dated EHR events into fixed-shape lab, code and demographic tensors.

The events come from :class:`~meddx.ingest.fhir.FhirIngestor`. The tensorizer is fitted
on the training records (which labs, which codes, their statistics) and saved with the
model (``state_dict``), so that inference transforms exactly as training did; see
:class:`EhrTensorizer` for the arrays.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from meddx.errors import ConfigError, ModelError, NotFittedError
from meddx.ingest.base import Tensorizer
from meddx.ingest.units import convert, is_plausible
from meddx.records import Event, Modality, ModalityRecord, parse_time
from meddx.specs import ArrayField, ArraySpec

# resource type -> event kind of its code token. FhirIngestor names code events by it and the
# tensorizer treats these kinds as codes; it lives here so that fhir.py can import the tensorizer.
CODE_KINDS: dict[str, str] = {
    "Condition": "condition",
    "MedicationRequest": "medication",
    "MedicationStatement": "medication",
    "Procedure": "procedure",
    "Encounter": "encounter",
}


def _code_key(event: Event) -> str:
    return f"{event.kind}:{event.code}"


class EhrTensorizer(Tensorizer):
    """EHR events → binned lab features, recent code tokens and demographics.

    Fitted on training records: the ``n_lab_features`` LOINC codes found in the most
    records (ties: more values, then code), each with its unit (the most common one) and
    a robust centre and scale (``lab_mean_`` holds the median, ``lab_std_`` the
    interquartile range / 1.349, which equals the standard deviation for normal data;
    the scaled median absolute deviation, then the standard deviation, when the IQR is 0),
    so that one absurd value cannot shift every patient's features; a vocabulary of the
    ``code_vocab_size`` code tokens (``kind:system|code``) found in the most records; the
    mean/std of age. Lab values that are not finite or not plausible for their code
    (:func:`meddx.ingest.units.is_plausible`) are masked in ``fit`` and ``transform``
    alike (the EHR reader already leaves them out and counts them).

    Arrays (F = ``n_lab_features``, B = ``n_bins``, C = ``max_codes``):

    * ``lab_values`` (F, B) float32: the last value in each bin, standardised; bins split
      the ``lookback_days`` before the index time, bin B-1 the most recent.
    * ``lab_counts`` (F, B) float32 and ``lab_mask`` (F, B) bool: values per bin, any.
    * ``lab_age_hours`` (B,) float32: hours before the index time of each bin's centre.
    * ``code_ids`` (C,) int64: the most recent distinct codes, newest first (0 = padding,
      1 = not in the vocabulary, 2.. = vocabulary); all history counts, not just the
      look-back window. ``code_age_hours`` (C,) float32: hours before the index time.
      ``code_mask`` (C,) bool.
    * ``demographics`` (4,) float32: standardised age (0 when unknown), then sex one-hot
      as female, male, other/unknown.

    Example:
        >>> from pathlib import Path
        >>> from meddx.config import IngestConfig
        >>> from meddx.ingest.base import IngestRequest
        >>> from meddx.ingest.fhir import FhirIngestor
        >>> record = FhirIngestor().read(IngestRequest("P0001", parse_time("2024-12-03T08:27:00Z"),
        ...     {Modality.EHR: Path("sample_data/patients/P0001/ehr.json")}))
        >>> tensorizer = EhrTensorizer(IngestConfig()).fit([record])  # the training rows' records
        >>> arrays = tensorizer.transform(record)
        >>> arrays["lab_values"].shape, arrays["code_ids"].shape, arrays["demographics"].shape
        ((16, 8), (64,), (4,))
    """

    modality = Modality.EHR
    state_version = 1
    SEXES = ("female", "male")

    @property
    def n_code_ids(self) -> int:
        """Rows an embedding of ``code_ids`` needs: the vocabulary plus padding and OOV."""
        return self.config.ehr.code_vocab_size + 2

    def spec(self) -> ArraySpec:
        cfg = self.config.ehr
        f, b, c = cfg.n_lab_features, cfg.n_bins, cfg.max_codes
        return {
            "lab_values": ArrayField((f, b), "float32", "values"),
            "lab_counts": ArrayField((f, b), "float32", "values"),
            "lab_mask": ArrayField((f, b), "bool", "mask", of=("lab_values", "lab_counts")),
            "lab_age_hours": ArrayField((b,), "float32", "age_hours", of=("lab_values",)),
            "code_ids": ArrayField((c,), "int64", "ids", vocab_size=self.n_code_ids),
            "code_age_hours": ArrayField((c,), "float32", "age_hours", of=("code_ids",)),
            "code_mask": ArrayField((c,), "bool", "token_mask", of=("code_ids",)),
            "demographics": ArrayField((4,), "float32", "values"),
        }

    def fit(self, records: Iterable[ModalityRecord]) -> EhrTensorizer:
        records = list(records)
        cfg = self.config.ehr
        lab_records: Counter = Counter()
        lab_values: Counter = Counter()
        units: dict[str, Counter] = {}
        code_records: Counter = Counter()
        ages = []
        for record in records:
            labs, codes = set(), set()
            for event in record.events:
                if event.kind == "observation" and event.value is not None:
                    labs.add(event.code)
                    lab_values[event.code] += 1
                    units.setdefault(event.code, Counter())[event.unit or ""] += 1
                elif event.kind in CODE_KINDS.values():
                    codes.add(_code_key(event))
            lab_records.update(labs)
            code_records.update(codes)
            if record.meta.get("age_years") is not None:
                ages.append(float(record.meta["age_years"]))
        self.lab_codes_ = sorted(lab_records, key=lambda c: (-lab_records[c], -lab_values[c], c))[: cfg.n_lab_features]
        self.lab_units_ = [min(units[c], key=lambda u: (-units[c][u], u)) for c in self.lab_codes_]
        unit_of = dict(zip(self.lab_codes_, self.lab_units_, strict=True))
        values: dict[str, list[float]] = {c: [] for c in self.lab_codes_}
        for record in records:
            for event in record.events:
                if event.code in unit_of and event.kind == "observation" and event.value is not None:
                    value = self._in_unit(event, unit_of[event.code])
                    if value is not None and _plausible(event, value, unit_of[event.code]):
                        values[event.code].append(value)
        centres_scales = [robust_centre_scale(values[c]) for c in self.lab_codes_]
        self.lab_mean_ = [centre for centre, _ in centres_scales]
        self.lab_std_ = [scale for _, scale in centres_scales]
        self.code_vocab_ = sorted(code_records, key=lambda k: (-code_records[k], k))[: cfg.code_vocab_size]
        self.age_mean_ = float(np.mean(ages)) if ages else 0.0
        self.age_std_ = _safe_std(ages)
        self._index()
        return self

    @staticmethod
    def _in_unit(event: Event, unit: str) -> float | None:
        value = float(event.value)  # type: ignore[arg-type]  # callers pass observations with a value
        if not math.isfinite(value):
            return None
        if (event.unit or "") == unit:
            return value
        return convert(value, event.unit or "", unit, loinc=event.code.rpartition("|")[2])

    def _index(self) -> None:
        self._lab_pos = {code: i for i, code in enumerate(self.lab_codes_)}
        self._code_ids = {key: i + 2 for i, key in enumerate(self.code_vocab_)}

    def _check_fitted(self) -> None:
        if not hasattr(self, "lab_codes_"):
            raise NotFittedError(
                "EhrTensorizer is not fitted: call fit(train_records) or load_state_dict(saved_state) before transform"
            )

    def transform(self, record: ModalityRecord) -> dict[str, np.ndarray]:
        self._check_fitted()
        cfg = self.config.ehr
        if "index_time" not in record.meta:
            raise ValueError(f"EHR record from {record.source} has no meta['index_time']; read it with FhirIngestor")
        index_time = parse_time(record.meta["index_time"])
        f, b, c = cfg.n_lab_features, cfg.n_bins, cfg.max_codes
        values = np.zeros((f, b), np.float32)
        counts = np.zeros((f, b), np.float32)
        width = cfg.lookback_days / b
        code_events = []
        dated = sorted(((e.time, e) for e in record.events if e.time is not None), key=lambda pair: pair[0])
        for when, event in dated:
            age_days = (index_time - when).total_seconds() / 86400.0
            if age_days < 0:
                continue  # never happens for records from an ingestor; guards hand-made ones
            if event.kind in CODE_KINDS.values():
                code_events.append((age_days, _code_key(event)))
                continue
            pos = self._lab_pos.get(event.code)
            if event.kind != "observation" or pos is None or event.value is None or age_days > cfg.lookback_days:
                continue
            value = self._in_unit(event, self.lab_units_[pos])
            if value is None or not _plausible(event, value, self.lab_units_[pos]):
                continue
            bin_ = b - 1 - min(int(age_days // width), b - 1)
            values[pos, bin_] = (value - self.lab_mean_[pos]) / self.lab_std_[pos]  # later events overwrite
            counts[pos, bin_] += 1
        code_ids = np.zeros(c, np.int64)
        code_age = np.zeros(c, np.float32)
        seen: set[str] = set()
        n = 0
        for age_days, key in sorted(code_events):  # newest first
            if n == c:
                break
            if key in seen:
                continue
            seen.add(key)
            code_ids[n] = self._code_ids.get(key, 1)
            code_age[n] = age_days
            n += 1
        demographics = np.zeros(4, np.float32)
        age = record.meta.get("age_years")
        if age is not None:
            demographics[0] = (float(age) - self.age_mean_) / self.age_std_
        sex = record.meta.get("sex")
        demographics[1 + (self.SEXES.index(sex) if sex in self.SEXES else 2)] = 1.0
        return {
            "lab_values": values,
            "lab_counts": counts,
            "lab_mask": counts > 0,
            "lab_age_hours": self._lab_bin_age_hours(),
            "code_ids": code_ids,
            "code_age_hours": code_age * np.float32(24.0),
            "code_mask": code_ids > 0,
            "demographics": demographics,
        }

    def _lab_bin_age_hours(self) -> np.ndarray:
        """Hours before the index time of each lab bin's centre (bin B-1 is the most recent)."""
        cfg = self.config.ehr
        width_hours = cfg.lookback_days * 24.0 / cfg.n_bins
        return ((cfg.n_bins - 1 - np.arange(cfg.n_bins) + 0.5) * width_hours).astype(np.float32)

    def _shape_state(self) -> dict[str, Any]:
        cfg = self.config.ehr
        return {
            "lookback_days": cfg.lookback_days,
            "n_bins": cfg.n_bins,
            "n_lab_features": cfg.n_lab_features,
            "max_codes": cfg.max_codes,
            "code_vocab_size": cfg.code_vocab_size,
        }

    def state_dict(self) -> dict[str, Any]:
        if not hasattr(self, "lab_codes_"):
            return {}
        return {
            "version": self.state_version,
            "config": self._shape_state(),
            "lab_codes_": list(self.lab_codes_),
            "lab_units_": list(self.lab_units_),
            "lab_mean_": list(self.lab_mean_),
            "lab_std_": list(self.lab_std_),
            "code_vocab_": list(self.code_vocab_),
            "age_mean_": self.age_mean_,
            "age_std_": self.age_std_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> EhrTensorizer:
        if not state:
            return self  # an unfitted tensorizer was saved
        if state.get("version") != self.state_version:
            raise ModelError(f"EHR tensorizer state version {state.get('version')!r} is not {self.state_version}")
        saved = state.get("config", {})
        if saved != self._shape_state():
            raise ConfigError(
                f"EHR tensorizer state was fitted with {saved}, but the config says {self._shape_state()}; "
                "use the config the model was trained with"
            )
        for name in ("lab_codes_", "lab_units_", "lab_mean_", "lab_std_", "code_vocab_", "age_mean_", "age_std_"):
            setattr(self, name, state[name])
        self._index()
        return self


def _plausible(event: Event, value: float, unit: str) -> bool:
    return is_plausible(event.code.rpartition("|")[2], value, unit)


def robust_centre_scale(values: list[float]) -> tuple[float, float]:
    """Median and a robust scale of lab values; ``(0, 1)`` without values.

    The scale is the interquartile range / 1.349 (the standard deviation of normal data),
    else 1.4826 x the median absolute deviation, else the standard deviation, else 1.

    Example:
        >>> robust_centre_scale([1.0, 2.0, 3.0, 4.0, 1e300])
        (3.0, 1.4825796886582654)
    """
    if not values:
        return 0.0, 1.0
    array = np.asarray(values, dtype=np.float64)
    centre = float(np.median(array))
    q1, q3 = np.percentile(array, [25, 75])
    for scale in ((q3 - q1) / 1.349, 1.4826 * float(np.median(np.abs(array - centre)))):
        if np.isfinite(scale) and scale > 1e-6:
            return centre, float(scale)
    return centre, _safe_std(values)


def _safe_std(values: list[float]) -> float:
    std = float(np.std(values)) if len(values) > 1 else 1.0
    return std if np.isfinite(std) and std > 1e-6 else 1.0
