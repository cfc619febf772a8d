"""The predictions table's reader (``predictions.parquet`` / ``.csv``): what evaluation reads from it.

One row per (patient_id, index_time, task); the columns are defined in the README
("Predictions") and in ``schemas/prediction_row.schema.json``. :func:`load_task_rows` joins a
predictions file with its manifest's labels and extra columns and returns, per task, the arrays
the metrics need (:class:`TaskRows`).

Error messages name files, tasks, columns and 1-based row numbers, never patient identifiers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import ConfigError, PredictionsError
from meddx.predictions.columns import (
    ABLATION_PREFIX,
    ABSTAIN,
    CLASS_PROBABILITY_PREFIX,
    INDEX_TIME,
    MODALITIES_COLUMN,
    OK,
    PATIENT_ID,
    PREDICTION_SET,
    PROBABILITY,
    RAW_CLASS_PROBABILITY_PREFIX,
    RAW_PROBABILITY,
    REQUIRED_COLUMNS,
    SET_SEPARATOR,
    STATUS,
    STATUSES,
    TASK,
)

logger = logging.getLogger(__name__)


@dataclass
class TaskRows:
    """The evaluable rows of one task: status ``ok``, a known label, a probability.

    Attributes:
        name, kind, classes: the task (binary classes are ``("0", "1")``).
        labels: ``(N,)`` class indices.
        probabilities: calibrated, ``(N,)`` positive class (binary) or ``(N, C)``.
        raw_probabilities: uncalibrated, same shape, or ``None`` when the file has none.
        sets: ``(N, C)`` bool conformal sets, or ``None`` when the task has none.
        n_missing: ``(N,)`` modalities missing per row (against every modality the task's rows
            use), or ``None`` without a ``modalities`` column.
        modalities: the modalities the task's rows use, in the order first seen.
        subgroups: column -> ``(N,)`` values, for each ``--by`` column.
        ablation: modality -> ``(N,)`` or ``(N, C)`` probabilities with that modality withheld
            (``nan`` rows: the modality was absent, nothing to withhold).
        counts: rows in the file for this task, with status error, without a label, evaluated.
    """

    name: str
    kind: str
    classes: tuple[str, ...]
    labels: np.ndarray
    probabilities: np.ndarray
    raw_probabilities: np.ndarray | None
    sets: np.ndarray | None
    n_missing: np.ndarray | None
    modalities: list[str]
    subgroups: dict[str, np.ndarray] = field(default_factory=dict)
    ablation: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def read_predictions(path: str | Path):
    """Read a predictions table (Parquet or CSV) into a pandas DataFrame with empty cells as NaN/"".

    Raises:
        PredictionsError: the file is missing, unreadable, or lacks a required column.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"predictions file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise PredictionsError(f"predictions file {path} must be .parquet or .csv")
    except PredictionsError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for a malformed table
        raise PredictionsError(f"cannot read predictions file {path}: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise PredictionsError(
            f"predictions file {path} lacks the column(s) {', '.join(missing)}; "
            "see the README's Predictions section for the columns"
        )
    for column in (PATIENT_ID, TASK, STATUS, PREDICTION_SET, MODALITIES_COLUMN):
        if column in frame.columns:
            frame[column] = frame[column].map(lambda v: "" if _is_empty(v) else str(v).strip())
    return frame


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return True
    except ImportError:  # pandas is a dependency; this only guards the helper
        pass
    return isinstance(value, str) and not value.strip()


def _numbers(frame, column: str, path: Path) -> np.ndarray:
    """A probability column as floats (empty -> nan); values outside [0, 1] are refused."""
    import pandas as pd

    values = pd.to_numeric(frame[column].map(lambda v: np.nan if _is_empty(v) else v), errors="coerce")
    raw = frame[column].map(lambda v: not _is_empty(v)).to_numpy()
    array = values.to_numpy(dtype=np.float64)
    bad = np.flatnonzero(raw & (np.isnan(array) | (array < 0) | (array > 1)))
    if len(bad):
        rows = ", ".join(str(int(frame.index[i]) + 1) for i in bad[:5])
        raise PredictionsError(f"{path}: column {column!r} needs probabilities in [0, 1]; rows {rows} are not")
    return array


def load_task_rows(predictions: str | Path, manifest: str | Path, by: Sequence[str] = ()) -> list[TaskRows]:
    """Join a predictions file with its manifest; one :class:`TaskRows` per task.

    Args:
        predictions: a predictions ``.parquet`` or ``.csv`` file.
        manifest: the cohort manifest the predictions were made on (labels ``label:<task>``
            and subgroup columns come from it, joined on patient_id and index_time).
        by: subgroup columns (the manifest's extra columns, else the predictions' own).

    Raises:
        PredictionsError: the predictions file is unusable (the message names rows, not patients).
        ManifestError: the manifest is.
        ConfigError: a ``--by`` column exists in neither file.

    Example:
        >>> tasks = load_task_rows(  # doctest: +SKIP
        ...     "runs/demo/predictions.csv", "sample_data/manifest.csv", by=["sex"]
        ... )
        >>> tasks[0].name, tasks[0].labels.shape  # doctest: +SKIP
    """
    import pandas as pd

    from meddx.cohort import load_cohort

    path = Path(predictions)
    frame = read_predictions(path)
    cohort = load_cohort(manifest)

    times = pd.to_datetime(
        frame[INDEX_TIME].map(lambda v: None if _is_empty(v) else v), utc=True, format="ISO8601", errors="coerce"
    )
    _refuse(path, np.flatnonzero(times.isna().to_numpy()), "index_time is not an ISO 8601 time with a time zone")
    keys = list(zip(frame[PATIENT_ID], (t.isoformat() for t in times), strict=True))
    by_key = {(row.patient_id, pd.Timestamp(row.index_time).isoformat()): row for row in cohort}
    unmatched = np.flatnonzero([key not in by_key for key in keys])
    _refuse(path, unmatched, f"no manifest row in {cohort.path} has this patient_id and index_time")
    keyed_tasks = pd.Series([(*k, t) for k, t in zip(keys, frame[TASK], strict=True)])
    duplicated = np.flatnonzero(keyed_tasks.duplicated().to_numpy())
    _refuse(path, duplicated, "a second row for the same patient_id, index_time and task")
    bad_status = np.flatnonzero(~frame[STATUS].isin(STATUSES).to_numpy())
    _refuse(path, bad_status, f"status must be one of {', '.join(STATUSES)}")
    manifest_rows = [by_key[key] for key in keys]

    for column in by:
        if column not in cohort.extra_columns and column not in frame.columns:
            raise ConfigError(
                f"subgroup column {column!r} is in neither {cohort.path} nor {path}; "
                f"columns you can name: {', '.join(cohort.extra_columns) or 'none'}"
            )

    results = []
    for task in dict.fromkeys(frame[TASK]):
        if task not in cohort.tasks:
            raise PredictionsError(
                f"{path}: task {task!r} has no label:{task} column in {cohort.path}; add its labels to the manifest"
            )
        rows = np.flatnonzero((frame[TASK] == task).to_numpy())
        results.append(_task_rows(path, frame, rows, cohort.tasks[task], [manifest_rows[i] for i in rows], by))
    if not results:
        raise PredictionsError(f"{path} has no rows")
    return results


def _refuse(path: Path, bad_rows: np.ndarray, reason: str) -> None:
    if len(bad_rows):
        listed = ", ".join(str(int(i) + 1) for i in bad_rows[:5])
        more = f" and {len(bad_rows) - 5} more" if len(bad_rows) > 5 else ""
        raise PredictionsError(f"{path}: data row(s) {listed}{more}: {reason}")


def _class_columns(frame, rows: np.ndarray, prefix: str) -> list[str]:
    """Per-class columns that hold a value for this task's rows (other tasks may share the file)."""
    return [
        c[len(prefix) :]
        for c in frame.columns
        if c.startswith(prefix) and frame[c].iloc[rows].map(lambda v: not _is_empty(v)).any()
    ]


def _task_rows(path: Path, frame, rows: np.ndarray, spec, manifest_rows: list, by: Sequence[str]) -> TaskRows:
    task = spec.name
    sub = frame.iloc[rows]
    ok = sub[STATUS].isin((OK, ABSTAIN)).to_numpy()  # an abstained row still holds its prediction
    labels_text = [row.labels.get(task) for row in manifest_rows]
    labelled = np.asarray([text is not None for text in labels_text])

    if spec.kind == "binary":
        classes: tuple[str, ...] = ("0", "1")
        if PROBABILITY not in frame.columns:
            raise PredictionsError(f"{path}: binary task {task!r} needs a {PROBABILITY!r} column")
        probabilities = _numbers(sub, PROBABILITY, path)
        raw = _numbers(sub, RAW_PROBABILITY, path) if RAW_PROBABILITY in frame.columns else None
    else:
        classes = tuple(_class_columns(frame, rows, CLASS_PROBABILITY_PREFIX))
        if len(classes) < 2:
            raise PredictionsError(
                f"{path}: multiclass task {task!r} needs one {CLASS_PROBABILITY_PREFIX}<class> column per class"
            )
        probabilities = np.stack([_numbers(sub, CLASS_PROBABILITY_PREFIX + c, path) for c in classes], axis=1)
        raw_classes = _class_columns(frame, rows, RAW_CLASS_PROBABILITY_PREFIX)
        raw = (
            np.stack([_numbers(sub, RAW_CLASS_PROBABILITY_PREFIX + c, path) for c in classes], axis=1)
            if set(classes) <= set(raw_classes)
            else None
        )
        unknown = sorted({t for t, keep in zip(labels_text, labelled & ok, strict=True) if keep and t not in classes})
        if unknown:
            raise PredictionsError(
                f"{path}: task {task!r} has manifest labels {unknown} "
                f"without a {CLASS_PROBABILITY_PREFIX}<class> column"
            )

    has_probability = ~np.isnan(probabilities.reshape(len(rows), -1)).any(axis=1)
    keep = ok & labelled & has_probability
    index = np.flatnonzero(keep)
    labels = np.asarray([classes.index(labels_text[i]) for i in index], dtype=np.int64)

    sets = _parse_sets(path, sub, classes, task, ok, index)
    modalities, n_missing = _availability(sub, ok, index)
    subgroups = {
        column: np.asarray(
            [
                manifest_rows[i].extras.get(column) if column in manifest_rows[i].extras else sub[column].iloc[i]
                for i in index
            ],
            dtype=object,
        )
        for column in by
    }
    ablation = {}
    named = _class_columns(frame, rows, ABLATION_PREFIX)  # "imaging" (binary) or "imaging:<class>"
    if spec.kind == "binary":
        for modality in (n for n in named if ":" not in n):
            ablation[modality] = _numbers(sub, ABLATION_PREFIX + modality, path)[index]
    else:
        for modality in dict.fromkeys(n.rsplit(":", 1)[0] for n in named if ":" in n):
            columns = [f"{ABLATION_PREFIX}{modality}:{c}" for c in classes]
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise PredictionsError(f"{path}: task {task!r} lacks ablation column(s) {', '.join(missing)}")
            ablation[modality] = np.stack([_numbers(sub, c, path)[index] for c in columns], axis=1)

    counts = {
        "rows": len(rows),
        "status_error": int((~ok).sum()),
        "unlabelled": int((ok & ~labelled).sum()),
        "without_probability": int((ok & labelled & ~has_probability).sum()),
        "evaluated": len(index),
    }
    logger.info("task %s: %d of %d rows evaluated", task, len(index), len(rows))
    return TaskRows(
        name=task,
        kind=spec.kind,
        classes=classes,
        labels=labels,
        probabilities=probabilities[index],
        raw_probabilities=None if raw is None or np.isnan(raw[index]).any() else raw[index],
        sets=sets,
        n_missing=n_missing,
        modalities=modalities,
        subgroups=subgroups,
        ablation=ablation,
        counts=counts,
    )


def _parse_sets(path: Path, sub, classes: tuple[str, ...], task: str, ok: np.ndarray, index: np.ndarray):
    """``|``-joined class names -> (N, C) bool; ``None`` when no ``ok`` row of the task has a set.

    In CSV an empty set and no set look alike, so a task whose ``ok`` rows all have an empty
    ``prediction_set`` is taken to have no conformal sets; otherwise an empty cell is the empty set.
    """
    if PREDICTION_SET not in sub.columns or not (sub[PREDICTION_SET].to_numpy()[ok] != "").any():
        return None
    sets = np.zeros((len(index), len(classes)), dtype=bool)
    for out, i in enumerate(index):
        text = sub[PREDICTION_SET].iloc[i]
        for name in filter(None, (part.strip() for part in text.split(SET_SEPARATOR))):
            if name not in classes:
                raise PredictionsError(
                    f"{path}: data row {int(sub.index[i]) + 1}: prediction_set names {name!r}, "
                    f"not a class of task {task!r} ({', '.join(classes)})"
                )
            sets[out, classes.index(name)] = True
    return sets


def _availability(sub, ok: np.ndarray, index: np.ndarray) -> tuple[list[str], np.ndarray | None]:
    """Modalities missing per row, counted against every modality the task's ``ok`` rows use."""
    if MODALITIES_COLUMN not in sub.columns:
        return [], None
    used = [set(filter(None, text.split(SET_SEPARATOR))) for text in sub[MODALITIES_COLUMN]]
    from meddx.records import MODALITIES

    order = [m.value for m in MODALITIES]
    seen = set().union(*(present for present, keep in zip(used, ok, strict=True) if keep))
    every = sorted(seen, key=lambda m: (order.index(m) if m in order else len(order), m))
    return every, np.asarray([len(every) - len(used[i] & set(every)) for i in index], dtype=np.int64)
