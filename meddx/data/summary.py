"""What a cohort holds, in figures a model card can show and a later batch can be compared with.

:func:`cohort_summary` reads a prepared cohort's index (``prepare_cohort``) and the ingest
cache's records: rows per split, sites (a ``site`` column), the months of the index times,
modality availability, label prevalence, subgroup counts (the manifest's other columns) and
per-modality *input* summaries. :func:`input_summaries` makes the latter from any records: the
facts each reader puts in ``ModalityRecord.meta`` (and, for notes, their text and tokens):

* imaging: slice spacing and in-plane pixel spacing (mm), slices, the intensity window the
  reader applied (source units: HU for CT), the DICOM modality;
* ehr: age, sex, events;
* notes: notes, characters, tokens, whether they were cut;
* device_logs: channels, samples per channel and hour in the window, the grid step;
* audio: sample rate, channels, duration;
* video: frames per second (a file's announced rate, a DICOM cine's FrameTime), source frames, the
  intensity window.

A numeric fact is summarised as ``{"n", "min", "p05", "median", "p95", "max"}`` (ages and the
manifest's numeric columns without ``min`` and ``max``: one patient's own value); a categorical
one as ``{"n", "counts": {value: rows}}`` (the 20 most common values; a manifest column with more
distinct texts only as how many). Dates are kept to the month and nothing names a patient: the
summary is meant to be shared with the model.

Example:
    >>> from meddx.records import ModalityRecord
    >>> audio = ModalityRecord("audio", "a.wav", meta={"orig_sample_rate": 8000, "orig_channels": 1,
    ...                                                "orig_frames": 16000})
    >>> input_summaries([audio])["audio"]["sample_rate_hz"]["median"]
    8000.0
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddx.records import MODALITIES, Modality, ModalityRecord

if TYPE_CHECKING:
    from meddx.cache import RecordCache
    from meddx.cohort import Cohort
    from meddx.config import IngestConfig
    from meddx.data.index import CohortIndex

MAX_CATEGORIES = 20  # a column with more distinct values is not a subgroup column (or only its top ones are shown)
PERSONAL_FACTS = ("age_years",)  # summarised without their extremes (numeric_summary)
SPLITS = ("train", "val", "test")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _spacing(meta: dict[str, Any]) -> tuple[float | None, float | None]:
    spacing = meta.get("spacing_mm")
    if not isinstance(spacing, list) or len(spacing) != 3:
        return None, None
    values = [_number(v) for v in spacing]
    in_plane = [v for v in values[1:] if v is not None]
    return values[0], (sum(in_plane) / len(in_plane) if in_plane else None)


def _window(meta: dict[str, Any]) -> tuple[float | None, float | None]:
    window = meta.get("window")
    if not isinstance(window, list) or len(window) != 2:
        return None, None
    return _number(window[0]), _number(window[1])


def record_facts(record: ModalityRecord) -> dict[str, float | str | None]:
    """The facts of one record that :func:`input_summaries` summarises (None: the reader did not say)."""
    meta = record.meta
    modality = record.modality
    if modality == Modality.IMAGING:
        slice_mm, pixel_mm = _spacing(meta)
        low, high = _window(meta)
        return {
            "slice_spacing_mm": slice_mm,
            "pixel_spacing_mm": pixel_mm,
            "slices": _number(meta.get("n_slices")),
            "intensity_low": low,
            "intensity_high": high,
            "dicom_modality": str(meta["modality"]) if meta.get("modality") else None,
        }
    if modality == Modality.EHR:
        return {
            "age_years": _number(meta.get("age_years")),
            "events": _number(meta.get("n_events")),
            "sex": str(meta["sex"]) if meta.get("sex") else None,
        }
    if modality == Modality.NOTES:
        tokens = record.arrays.get("attention_mask")
        return {
            "notes": _number(meta.get("n_notes")),
            "characters": float(sum(len(e.text or "") for e in record.events)),
            "tokens": float(np.asarray(tokens).sum()) if tokens is not None else None,
            "truncated": str(bool(meta["truncated"])).lower() if "truncated" in meta else None,
        }
    if modality == Modality.DEVICE_LOGS:
        channels: list[Any] = meta["channels"] if isinstance(meta.get("channels"), list) else []
        samples, hours = _number(meta.get("n_samples")), _number(meta.get("window_hours"))
        rate = samples / len(channels) / hours if channels and samples is not None and hours else None
        return {
            "channels": float(len(channels)),
            "samples_per_channel_hour": rate,
            "grid_step_minutes": _number(meta.get("step_minutes")),
        }
    if modality == Modality.AUDIO:
        rate, frames = _number(meta.get("orig_sample_rate")), _number(meta.get("orig_frames"))
        return {
            "sample_rate_hz": rate,
            "channels": _number(meta.get("orig_channels")),
            "duration_s": frames / rate if rate and frames is not None else None,
        }
    if modality == Modality.VIDEO:
        frame_ms = _number(meta.get("frame_time_ms"))  # a DICOM cine's FrameTime; a video file's own rate: fps
        low, high = _window(meta)
        return {
            "fps": _number(meta.get("fps")) or (1000.0 / frame_ms if frame_ms else None),
            "source_frames": _number(meta.get("n_source_frames")),
            "intensity_low": low,
            "intensity_high": high,
        }
    return {}


# how each modality's input was acquired (not the patient's own values): what a row is checked
# against the training rows' ranges for (meddx.models.input_ranges)
ACQUISITION_FACTS: dict[str, tuple[str, ...]] = {
    Modality.IMAGING.value: ("slice_spacing_mm", "pixel_spacing_mm", "dicom_modality"),
    Modality.DEVICE_LOGS.value: ("channels", "samples_per_channel_hour"),
    Modality.AUDIO.value: ("sample_rate_hz", "channels"),
    Modality.VIDEO.value: ("fps",),
}


def acquisition_facts(record: ModalityRecord) -> dict[str, float | str | None]:
    """The facts of :data:`ACQUISITION_FACTS` of one record (its meta suffices: header reads).

    Example:
        >>> from meddx.records import ModalityRecord
        >>> acquisition_facts(ModalityRecord("audio", "a.wav", meta={"orig_sample_rate": 8000, "orig_channels": 1}))
        {'sample_rate_hz': 8000.0, 'channels': 1.0}
    """
    names = ACQUISITION_FACTS.get(record.modality.value, ())
    if not names:
        return {}
    facts = record_facts(record)
    return {name: facts.get(name) for name in names}


def numeric_summary(values: Iterable[float], extremes: bool = True) -> dict[str, float | int]:
    """``{"n", "min", "p05", "median", "p95", "max"}`` of finite values (``{"n": 0}`` when none).

    ``extremes=False`` leaves out ``min`` and ``max``: one row's own value (an age of 97, an
    identifier) is not for a shared summary.
    """
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not len(array):
        return {"n": 0}
    p05, median, p95 = np.percentile(array, [5, 50, 95])
    if not extremes:
        return {"n": len(array), "p05": float(p05), "median": float(median), "p95": float(p95)}
    return {
        "n": len(array),
        "min": float(array.min()),
        "p05": float(p05),
        "median": float(median),
        "p95": float(p95),
        "max": float(array.max()),
    }


def category_summary(values: Iterable[str]) -> dict[str, Any]:
    """``{"n", "counts"}``: rows per value, the :data:`MAX_CATEGORIES` most common."""
    counts = Counter(values)
    return {"n": sum(counts.values()), "counts": dict(counts.most_common(MAX_CATEGORIES))}


def _summarise(facts: list[dict[str, float | str | None]]) -> dict[str, Any]:
    names = list(dict.fromkeys(name for fact in facts for name in fact))
    summary: dict[str, Any] = {}
    for name in names:
        values = [fact.get(name) for fact in facts if fact.get(name) is not None]
        if values and all(isinstance(v, str) for v in values):
            summary[name] = category_summary(values)  # type: ignore[arg-type]
        else:
            numbers = (v for v in values if isinstance(v, float))
            summary[name] = numeric_summary(numbers, extremes=name not in PERSONAL_FACTS)
    return summary


def input_summaries(records: Iterable[ModalityRecord]) -> dict[str, dict[str, Any]]:
    """Per modality (``imaging``...), each fact of :func:`record_facts` summarised over the records."""
    facts: dict[str, list[dict[str, float | str | None]]] = {}
    for record in records:
        facts.setdefault(record.modality.value, []).append(record_facts(record))
    return {m.value: _summarise(facts[m.value]) for m in MODALITIES if m.value in facts}


def cached_records(cache: RecordCache, keys: Iterable[tuple[str, str]]) -> Iterable[ModalityRecord]:
    """The records of ``(modality, cache key)`` pairs: meta only (header reads) but for notes (their tokens).

    A key no longer in the cache is passed over.
    """
    for modality, key in keys:
        if modality == Modality.NOTES.value:
            record = cache.get(key)
        else:
            meta = cache.meta(key)
            record = ModalityRecord(Modality(modality), "", meta=meta) if meta else None
        if record is not None:
            yield record


def _column_summary(values: list[str]) -> dict[str, Any]:
    """A manifest column: percentiles when every filled cell is a number and there are many values,
    counts per value when there are few; a column of many distinct texts (names, free text) only
    says how many it has, never which (it would name patients)."""
    filled = [v for v in values if v not in ("", None)]
    missing = len(values) - len(filled)
    numbers = [_number(_float(v)) for v in filled]
    if len(set(filled)) <= MAX_CATEGORIES:
        return {**category_summary(str(v) for v in filled), "missing": missing}
    if all(n is not None for n in numbers):
        return {**numeric_summary(numbers, extremes=False), "missing": missing}  # type: ignore[arg-type]
    return {"n": len(filled), "distinct": len(set(filled)), "missing": missing}


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def cohort_summary(
    index: CohortIndex, cache: RecordCache, tasks: Iterable[str], input_splits: tuple[str, ...] = ("train", "val")
) -> dict[str, Any]:
    """The figures of a model folder's ``training_summary.json`` (the module docstring).

    Args:
        index: the prepared cohort's index (``CohortDataset.index``).
        cache: the ingest cache its records are in.
        tasks: the tasks trained (their label prevalence per split).
        input_splits: the splits whose records the input summaries describe (the rows the
            model was fitted and calibrated on).
    """
    rows = [r for r in index.rows if r.key is not None]  # rows with something a model could read
    split_of = {r.row: r.split or "none" for r in rows}
    splits = [s for s in (*SPLITS, "none") if s in split_of.values()]
    by_split = {s: [r for r in rows if split_of[r.row] == s] for s in splits}
    months = sorted(r.index_time[:7] for r in rows)
    labels: dict[str, Any] = {}
    for task in tasks:
        spec = index.tasks[task]
        labels[task] = {
            s: {
                "labelled": sum(r.labels.get(task, -1) >= 0 for r in part),
                "classes": {c: sum(r.labels.get(task, -1) == k for r in part) for k, c in enumerate(spec.classes)},
            }
            for s, part in by_split.items()
        }
    columns = [c for c in index.extra_columns if c != "site"]
    fitted = [r for r in rows if split_of[r.row] in input_splits]
    return {
        "rows": {s: len(part) for s, part in by_split.items()},
        "rows_without_inputs": len(index.rows) - len(rows),
        "sites": (
            {s: dict(Counter(str(r.extras.get("site", "")) or "(none)" for r in part)) for s, part in by_split.items()}
            if "site" in index.extra_columns
            else None
        ),
        "index_months": {"first": months[0], "last": months[-1]} if months else None,
        "modalities": {
            s: {m.value: sum(m.value in r.records for r in part) for m in MODALITIES} for s, part in by_split.items()
        },
        "labels": labels,
        "subgroups": {c: _column_summary([str(r.extras.get(c) or "") for r in rows]) for c in columns},
        "inputs_of": list(input_splits),
        "inputs": input_summaries(
            cached_records(cache, ((m, key) for r in fitted for m, key in sorted(r.records.items())))
        ),
    }


def batch_input_summaries(cohort: Cohort, config: IngestConfig, cache_root: str | Path) -> dict[str, dict[str, Any]]:
    """:func:`input_summaries` of a batch's rows, read with a model's ingest ``config``.

    The rows' records are looked up in the ingest cache (``meddx diagnose`` put them there, so this
    reads headers only); a record not cached yet is read here, in this process. Rows whose
    modality cannot be read are left out, as diagnose leaves them out.
    """
    from meddx.cache import RecordCache
    from meddx.ingest.runner import ingest_cohort

    report = ingest_cohort(cohort, cache_root, config, workers=0, progress=False)
    keys = ((str(o.modality), o.key) for o in report.outcomes if o.status == "ok" and o.key)
    return input_summaries(cached_records(RecordCache(cache_root), keys))
