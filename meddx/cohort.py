"""The cohort manifest: one row per prediction instance (a patient at an index time).

:func:`load_cohort` reads a CSV or Parquet manifest, validates every row, and either
returns a :class:`Cohort` or raises one :class:`~meddx.errors.ManifestError` listing
every problem (row, column, reason) before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from meddx.errors import ManifestError, ManifestProblem
from meddx.records import MODALITIES, Modality

REQUIRED_COLUMNS = ("patient_id", "index_time")
SPLITS = ("train", "val", "test")
LABEL_PREFIX = "label:"
MODALITY_COLUMNS = tuple(m.value for m in MODALITIES)


class ManifestRow(BaseModel):
    """One manifest row as written in the file (the JSON Schema of the manifest).

    Columns named ``label:<task>`` hold targets (0/1 for binary tasks, a class name for
    multiclass tasks, empty for unknown); any other column is kept and copied to the
    predictions.
    """

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "patternProperties": {
                "^label:.+$": {
                    "anyOf": [{"type": "string"}, {"type": "integer", "enum": [0, 1]}, {"type": "null"}],
                    "description": "target of task <task>: 0/1 (binary) or a class name; empty = unknown",
                }
            }
        },
    )

    patient_id: str = Field(min_length=1, description="patient identifier (the FHIR Patient id for Bulk FHIR)")
    index_time: AwareDatetime = Field(description="ISO 8601 with time zone: the moment of prediction")
    split: Optional[Literal["train", "val", "test"]] = None
    imaging: Optional[str] = Field(None, description="DICOM file, DICOM series folder, or NIfTI file")
    ehr: Optional[str] = Field(None, description="FHIR Bundle JSON file or Bulk FHIR NDJSON folder")
    notes: Optional[str] = Field(None, description="text file or folder of text files")
    device_logs: Optional[str] = Field(None, description="CSV or JSONL monitor/device log")
    audio: Optional[str] = Field(None, description="WAV or FLAC file")
    video: Optional[str] = Field(None, description="MP4/AVI file or multi-frame DICOM")

    @field_validator("split", "imaging", "ehr", "notes", "device_logs", "audio", "video", mode="before")
    @classmethod
    def _empty_is_missing(cls, value: Any) -> Any:
        return None if _is_empty(value) else value


@dataclass(frozen=True)
class TaskSpec:
    """A prediction task found in the manifest's ``label:<task>`` columns."""

    name: str
    kind: Literal["binary", "multiclass"]
    classes: tuple[str, ...]  # ("0", "1") for binary tasks


@dataclass(frozen=True)
class CohortRow:
    """A validated manifest row with resolved, absolute paths."""

    row: int  # 1-based data row in the manifest
    patient_id: str
    index_time: datetime  # aware, UTC
    split: str | None
    paths: dict[Modality, Path]  # present modalities only
    labels: dict[str, str | None]  # task -> "0"/"1" or class name; None = unknown
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cohort:
    """Validated rows of a manifest, with the tasks its label columns define.

    Example:
        >>> cohort = load_cohort("sample_data/manifest.csv")  # doctest: +SKIP
        >>> len(cohort), cohort.tasks["disease"].kind  # doctest: +SKIP
        (60, 'binary')
    """

    path: Path
    rows: list[CohortRow]
    tasks: dict[str, TaskSpec]
    extra_columns: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[CohortRow]:
        return iter(self.rows)

    def split(self, name: str) -> list[CohortRow]:
        """Rows of one split (``train``, ``val`` or ``test``)."""
        return [r for r in self.rows if r.split == name]

    def coverage(self) -> dict[Modality, int]:
        """How many rows name a file for each modality."""
        return {m: sum(m in r.paths for r in self.rows) for m in MODALITIES}


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _read_table(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    if not path.is_file():
        raise ManifestError(path, [ManifestProblem(None, None, "file not found")])
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(
                path, dtype=str, keep_default_na=False, sep="\t" if path.suffix.lower() == ".tsv" else ","
            )
        else:
            raise ManifestError(path, [ManifestProblem(None, None, "a manifest must be .csv or .parquet")])
    except ManifestError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for a malformed table
        raise ManifestError(path, [ManifestProblem(None, None, f"cannot read the table: {exc}")]) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.to_dict(orient="records")


def _check_path(value: str, base: Path, row: int, column: str, problems: list[ManifestProblem]) -> Path | None:
    given = Path(value.strip())
    if given.is_absolute():
        resolved = given
    else:
        resolved = (base / given).resolve()
        if not resolved.is_relative_to(base):
            problems.append(
                ManifestProblem(row, column, f"path {value!r} climbs out of the manifest folder; use an absolute path")
            )
            return None
    if not resolved.exists():
        problems.append(ManifestProblem(row, column, f"path {value!r} does not exist (looked for {resolved})"))
        return None
    return resolved


def _label_text(value: Any) -> str | None:
    if _is_empty(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _infer_task(name: str, values: list[tuple[int, str]], problems: list[ManifestProblem]) -> TaskSpec:
    """Binary when any value is numeric (then every value must be 0 or 1), else multiclass."""
    column = LABEL_PREFIX + name

    def numeric(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    if any(numeric(v) for _, v in values):
        for row, v in values:
            if not numeric(v) or float(v) not in (0.0, 1.0):
                problems.append(
                    ManifestProblem(row, column, f"{v!r} is not a binary label; write 0, 1 or leave it empty")
                )
        return TaskSpec(name, "binary", ("0", "1"))
    classes = tuple(sorted({v for _, v in values}))
    if len(classes) == 1:
        problems.append(
            ManifestProblem(None, column, f"only one class ({classes[0]!r}); a task needs at least two")
        )
    return TaskSpec(name, "multiclass", classes)


def load_cohort(path: str | Path) -> Cohort:
    """Read and validate a cohort manifest.

    Args:
        path: a ``.csv`` or ``.parquet`` manifest (columns: see DESIGN.md / README).

    Returns:
        The validated :class:`Cohort`.

    Raises:
        ManifestError: listing every problem found (row, column, reason).

    Example:
        >>> cohort = load_cohort("sample_data/manifest.csv")  # doctest: +SKIP
    """
    path = Path(path).resolve()
    base = path.parent
    table = _read_table(path)
    problems: list[ManifestProblem] = []
    columns = list(table[0].keys()) if table else []
    if not table:
        import pandas as pd

        columns = list(pd.read_csv(path, nrows=0).columns) if path.suffix.lower() == ".csv" else []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    for column in missing:
        problems.append(ManifestProblem(None, column, "required column is missing"))
    if not table:
        problems.append(ManifestProblem(None, None, "the manifest has no rows"))
    if problems:
        raise ManifestError(path, problems)

    label_columns = [c for c in columns if c.startswith(LABEL_PREFIX)]
    for column in label_columns:
        if not column[len(LABEL_PREFIX) :].strip():
            problems.append(ManifestProblem(None, column, "a label column needs a task name: label:<task>"))
    known = {*REQUIRED_COLUMNS, "split", *MODALITY_COLUMNS, *label_columns}
    extra_columns = [c for c in columns if c not in known]

    rows: list[CohortRow] = []
    seen: dict[tuple[str, datetime], int] = {}
    label_values: dict[str, list[tuple[int, str]]] = {c[len(LABEL_PREFIX) :]: [] for c in label_columns}
    for number, raw in enumerate(table, start=1):
        fixed = {k: raw.get(k) for k in ("patient_id", "index_time", "split", *MODALITY_COLUMNS)}
        if isinstance(fixed["index_time"], str):
            fixed["index_time"] = fixed["index_time"].strip()
        try:
            parsed = ManifestRow.model_validate(fixed)
        except ValidationError as exc:
            for err in exc.errors():
                column = str(err["loc"][0]) if err["loc"] else None
                problems.append(ManifestProblem(number, column, _explain(column, raw.get(column or ""), err)))
            continue
        paths: dict[Modality, Path] = {}
        for modality in MODALITIES:
            value = getattr(parsed, modality.value)
            if value is not None:
                resolved = _check_path(value, base, number, modality.value, problems)
                if resolved is not None:
                    paths[modality] = resolved
        index_time = parsed.index_time.astimezone(timezone.utc)
        key = (parsed.patient_id, index_time)
        if key in seen:
            problems.append(
                ManifestProblem(number, "index_time", f"duplicate of row {seen[key]} (same patient_id and index_time)")
            )
        seen.setdefault(key, number)
        labels: dict[str, str | None] = {}
        for column in label_columns:
            task = column[len(LABEL_PREFIX) :]
            labels[task] = _label_text(raw.get(column))
            if labels[task] is not None:
                label_values[task].append((number, labels[task]))
        rows.append(
            CohortRow(
                row=number,
                patient_id=parsed.patient_id,
                index_time=index_time,
                split=parsed.split,
                paths=paths,
                labels=labels,
                extras={c: raw.get(c) for c in extra_columns},
            )
        )
    tasks = {
        name: _infer_task(name, values, problems) for name, values in label_values.items() if name.strip()
    }
    if problems:
        raise ManifestError(path, problems)
    return Cohort(path=path, rows=rows, tasks=tasks, extra_columns=extra_columns)


def _explain(column: str | None, value: Any, err: dict[str, Any]) -> str:
    """Turn a pydantic error into a sentence that says how to fix the cell."""
    shown = "empty" if _is_empty(value) else repr(value)
    if column == "index_time":
        if err["type"] == "timezone_aware":
            return f"{shown} has no time zone; write it like 2024-03-05T14:00:00Z"
        return f"{shown} is not an ISO 8601 time; write it like 2024-03-05T14:00:00Z"
    if column == "split":
        return f"{shown} is not a split; use one of {', '.join(SPLITS)} or leave it empty"
    if column == "patient_id":
        return "patient_id is empty" if _is_empty(value) else f"{shown} is not a valid patient_id"
    return f"{shown}: {err['msg']}"
