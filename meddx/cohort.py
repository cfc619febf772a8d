"""The cohort manifest: one row per prediction instance (a patient at an index time).

:func:`load_cohort` reads a CSV or Parquet manifest, validates every row, and either
returns a :class:`Cohort` or raises one :class:`~meddx.errors.ManifestError` listing
every problem (row, column, reason) before any work starts.

Strict where a silent guess would be wrong, lenient where the meaning is plain:

* ``index_time`` is an ISO 8601 string with a time zone (or a zone-aware Parquet
  timestamp). An epoch number is refused: it hides its unit and its zone. A time pandas
  cannot hold (before 1677-09-21 or after 2262-04-11) is refused here, not in ingest.
* ``patient_id`` integers (a Parquet int column, or floats when it has gaps) are read as
  their digits: ``12``, never ``12.0``.
* A ``label:<task>`` column is binary when its values are exactly a subset of {0, 1};
  other integer codes (grades 0-4) or class names make it multiclass.
* An ``imaging`` cell may name a study or series on the configured DICOMweb server
  (``dicomweb:studies/<uid>[/series/<uid>]``): it is parsed (UIDs checked) into
  :attr:`CohortRow.remote`, not checked as a path; the server itself comes from the ingest
  config, never from the manifest. Likewise an ``ehr`` cell may name a patient on the
  configured FHIR server (``fhir:Patient/<id>``).
* A patient in two splits is a warning (:attr:`Cohort.warnings`, also logged); in both
  ``train`` and ``test`` it is an error, since test figures would be optimistic.
* A column whose name looks like a modality or ``split`` without being it (``image``,
  ``ehr_path``, ``Imaging``, ``Split``) is an error naming the column it resembles: left as an
  extra column, a model would silently train without that modality. Other extra columns
  (``sex``, ``site``, ``age``) are kept. A ``label_<task>`` column is a warning (it is kept as
  an extra column, not a task).
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from meddx.dicomweb.ref import DicomWebRef, is_dicomweb_ref, parse_dicomweb_ref
from meddx.errors import ManifestError, ManifestProblem
from meddx.fhirclient.ref import FhirRef, is_fhir_ref, parse_fhir_ref
from meddx.records import MODALITIES, Modality

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("patient_id", "index_time")
SPLITS = ("train", "val", "test")
LABEL_PREFIX = "label:"
MODALITY_COLUMNS = tuple(m.value for m in MODALITIES)
# Split pairs that make a patient's rows an error rather than a warning.
FORBIDDEN_SPLIT_PAIRS = frozenset({frozenset({"train", "test"})})
# datetime64[ns] bounds (pd.Timestamp.min / max), to the second inside them.
PANDAS_TIME_RANGE = (
    datetime(1677, 9, 21, 0, 12, 44, tzinfo=timezone.utc),
    datetime(2262, 4, 11, 23, 47, 16, tzinfo=timezone.utc),
)
# Names people give a modality's column, normalised (see _normalised_name), besides the modality's own.
COLUMN_ALIASES = {
    "imaging": ("image", "images", "img", "imgs", "dicom", "scan", "scans", "imagingstudy"),
    "ehr": ("emr", "fhir", "fhirbundle", "bundle", "ehrs"),
    "notes": ("note", "clinicalnote", "clinicalnotes", "notesfolder"),
    "device_logs": ("devicelog", "devicelogfile", "monitorlog", "monitorlogs"),
    "audio": ("audios", "sound", "sounds", "wav"),
    "video": ("videos", "cine", "mp4"),
    "split": ("splits",),
}
# Trailing words that say "a path to" (ehr_path, imaging_file, notes_dir): dropped before comparing.
PATH_WORDS = ("path", "paths", "file", "files", "filename", "dir", "folder", "uri", "url", "location")
TYPO_CUTOFF = 0.85  # difflib ratio above which a name is a misspelling ("imagng", "vidoe"), not another column
EPOCH_HINT = "an epoch number hides its unit and zone; write ISO 8601 with a zone, like 2024-03-05T14:00:00Z"


class ManifestRow(BaseModel):
    """One manifest row as written in the file (the JSON Schema of the manifest).

    Columns named ``label:<task>`` hold targets (0/1 for binary tasks, an integer class
    code or a class name for multiclass tasks, empty for unknown); any other column is
    kept and copied to the predictions.
    """

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "patternProperties": {
                "^label:.+$": {
                    "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}],
                    "description": "target of task <task>: 0/1 (binary), an integer class code or a class name"
                    " (multiclass); empty = unknown",
                }
            }
        },
    )

    patient_id: str = Field(min_length=1, description="patient identifier (the FHIR Patient id for Bulk FHIR)")
    index_time: AwareDatetime = Field(
        description="ISO 8601 with time zone: the moment of prediction (epoch numbers are refused)"
    )
    split: Literal["train", "val", "test"] | None = None
    imaging: str | None = Field(
        None,
        description="DICOM file, DICOM series folder, NIfTI file, or dicomweb:studies/<StudyInstanceUID>"
        "[/series/<SeriesInstanceUID>] on the configured DICOMweb server (PACS)",
    )
    ehr: str | None = Field(
        None,
        description="FHIR Bundle JSON file, Bulk FHIR NDJSON folder,"
        " or fhir:Patient/<id> on the configured FHIR server",
    )
    notes: str | None = Field(None, description="text file or folder of text files")
    device_logs: str | None = Field(None, description="CSV or JSONL monitor/device log")
    audio: str | None = Field(None, description="WAV or FLAC file")
    video: str | None = Field(None, description="MP4/AVI file or multi-frame DICOM")

    @field_validator("split", "imaging", "ehr", "notes", "device_logs", "audio", "video", mode="before")
    @classmethod
    def _empty_is_missing(cls, value: Any) -> Any:
        return None if _is_empty(value) else value

    @field_validator("index_time", mode="before")
    @classmethod
    def _no_epoch_numbers(cls, value: Any) -> Any:
        # pydantic would read 1709647200 (or "1709647200") as epoch seconds in UTC
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_empty(value):
            raise ValueError(EPOCH_HINT)
        if isinstance(value, str) and _is_number(value):
            raise ValueError(EPOCH_HINT)
        return value


@dataclass(frozen=True)
class TaskSpec:
    """A prediction task found in the manifest's ``label:<task>`` columns."""

    name: str
    kind: Literal["binary", "multiclass"]
    classes: tuple[str, ...]  # ("0", "1") for binary tasks; integer codes in numeric order


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
    remote: dict[Modality, DicomWebRef | FhirRef] = field(default_factory=dict)  # dicomweb: / fhir: sources


@dataclass
class Cohort:
    """Validated rows of a manifest, with the tasks its label columns define.

    ``warnings`` lists what is allowed but suspicious (a patient in two splits); they are
    also logged when the manifest is loaded.

    Example:
        >>> cohort = load_cohort("sample_data/manifest.csv")
        >>> len(cohort), cohort.tasks["disease"].kind
        (60, 'binary')
    """

    path: Path
    rows: list[CohortRow]
    tasks: dict[str, TaskSpec]
    extra_columns: list[str]
    warnings: list[ManifestProblem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[CohortRow]:
        return iter(self.rows)

    def split(self, name: str) -> list[CohortRow]:
        """Rows of one split (``train``, ``val`` or ``test``)."""
        return [r for r in self.rows if r.split == name]

    def coverage(self) -> dict[Modality, int]:
        """How many rows name a source (a file, or a DICOMweb study or series) for each modality."""
        return {m: sum(m in r.paths or m in r.remote for r in self.rows) for m in MODALITIES}


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _id_text(value: Any) -> Any:
    """A patient id as text: Parquet int columns (floats when they have gaps) give their digits."""
    if isinstance(value, bool) or _is_empty(value):
        return value
    if isinstance(value, numbers.Integral):  # exact, also past 2**53
        return str(int(value))
    if isinstance(value, numbers.Real) and float(value).is_integer():  # an int column with gaps reads as floats
        return str(int(float(value)))
    return value


def _pandas_can_hold(when: datetime) -> bool:
    """Whether pandas' nanosecond timestamps (every table and time grid meddx makes) can hold ``when``."""
    return PANDAS_TIME_RANGE[0] <= when <= PANDAS_TIME_RANGE[1]


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
    return [{str(k): v for k, v in record.items()} for record in frame.to_dict(orient="records")]


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
    """A label as text; integer-valued numbers (``1.0`` from a Parquet float column) as digits."""
    if _is_empty(value):
        return None
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return str(int(float(value)))
    text = str(value).strip()
    if _is_number(text) and float(text).is_integer():
        return str(int(float(text)))
    return text


def _infer_task(name: str, values: list[tuple[int, str]], problems: list[ManifestProblem]) -> TaskSpec:
    """Binary when the values are a subset of {0, 1}; integer codes or class names are multiclass."""
    column = LABEL_PREFIX + name
    numeric = [(row, v) for row, v in values if _is_number(v)]
    if numeric:
        found = len(problems)
        for row, v in values:
            if not _is_number(v):
                problems.append(
                    ManifestProblem(row, column, f"{v!r} is a class name in a column of integer codes; use one kind")
                )
            elif not float(v).is_integer():
                problems.append(
                    ManifestProblem(row, column, f"{v!r} is not a class; write 0/1, an integer code or a class name")
                )
        if len(problems) > found:  # the classes are unclear until those are fixed
            return TaskSpec(name, "multiclass", tuple(sorted({v for _, v in values})))
        codes = {v for _, v in numeric if float(v).is_integer()}
        if codes <= {"0", "1"}:
            return TaskSpec(name, "binary", ("0", "1"))
        classes = tuple(sorted(codes, key=int))
    else:
        classes = tuple(sorted({v for _, v in values}))
    if len(classes) == 1:
        problems.append(ManifestProblem(None, column, f"only one class ({classes[0]!r}); a task needs at least two"))
    return TaskSpec(name, "multiclass", classes)


def _split_problems(rows: list[CohortRow]) -> tuple[list[ManifestProblem], list[ManifestProblem]]:
    """(errors, warnings) for patients whose rows are in more than one split.

    Each is reported on the first row of the later split; messages name rows, never the
    patient id (an identifier).
    """
    first_row: dict[str, dict[str, int]] = {}  # patient -> split -> its first row in that split
    for row in rows:
        if row.split is not None:
            first_row.setdefault(row.patient_id, {}).setdefault(row.split, row.row)
    errors, warnings = [], []
    for splits in first_row.values():
        if len(splits) < 2:
            continue
        (first, at), *later = sorted(splits.items(), key=lambda item: item[1])
        forbidden = set().union(*(pair for pair in FORBIDDEN_SPLIT_PAIRS if pair <= splits.keys()))
        for split, number in later:
            where = f"the same patient_id is in {first!r} at row {at} and in {split!r} here"
            if split in forbidden:
                errors.append(
                    ManifestProblem(
                        number,
                        "split",
                        f"{where}; a patient in both train and test makes the test figures"
                        " optimistic: put all of a patient's rows in one split",
                    )
                )
            else:
                warnings.append(ManifestProblem(number, "split", f"{where}; a patient's rows usually share one split"))
    return errors, warnings


def load_cohort(path: str | Path) -> Cohort:
    """Read and validate a cohort manifest.

    Args:
        path: a ``.csv`` or ``.parquet`` manifest (columns: see docs/manifest.md).

    Returns:
        The validated :class:`Cohort`; its ``warnings`` (also logged) list what is allowed
        but suspicious.

    Raises:
        ManifestError: listing every problem found (row, column, reason).

    Example:
        >>> cohort = load_cohort("sample_data/manifest.csv")
        >>> cohort.rows[0].patient_id, cohort.rows[0].split, cohort.warnings
        ('P0001', 'test', [])
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
        near = [c for c in columns if _normalised_name(c) == _normalised_name(column)]
        hint = f" (column {near[0]!r} looks like it: rename it {column!r})" if near else ""
        problems.append(ManifestProblem(None, column, f"required column is missing{hint}"))
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
    problems += _lookalike_problems(extra_columns, columns)

    rows: list[CohortRow] = []
    seen: dict[tuple[str, datetime], int] = {}
    label_values: dict[str, list[tuple[int, str]]] = {c[len(LABEL_PREFIX) :]: [] for c in label_columns}
    for number, raw in enumerate(table, start=1):
        fixed = {k: raw.get(k) for k in ("patient_id", "index_time", "split", *MODALITY_COLUMNS)}
        fixed["patient_id"] = _id_text(fixed["patient_id"])
        if isinstance(fixed["index_time"], str):
            fixed["index_time"] = fixed["index_time"].strip()
        try:
            parsed = ManifestRow.model_validate(fixed)
        except ValidationError as exc:
            for err in exc.errors():
                where = str(err["loc"][0]) if err["loc"] else None
                problems.append(ManifestProblem(number, where, _explain(where, raw.get(where or ""), err)))
            continue
        paths: dict[Modality, Path] = {}
        remote: dict[Modality, DicomWebRef | FhirRef] = {}
        for modality in MODALITIES:
            value = getattr(parsed, modality.value)
            if value is not None and is_fhir_ref(value):
                if modality != Modality.EHR:
                    problems.append(ManifestProblem(number, modality.value, "fhir: references are read for ehr only"))
                    continue
                try:
                    remote[modality] = parse_fhir_ref(value)
                except ValueError as exc:
                    problems.append(ManifestProblem(number, modality.value, str(exc)))
            elif value is not None and is_dicomweb_ref(value):
                if modality != Modality.IMAGING:
                    problems.append(
                        ManifestProblem(number, modality.value, "dicomweb: references are read for imaging only")
                    )
                    continue
                try:
                    remote[modality] = parse_dicomweb_ref(value)
                except ValueError as exc:
                    problems.append(ManifestProblem(number, modality.value, str(exc)))
            elif value is not None:
                resolved = _check_path(value, base, number, modality.value, problems)
                if resolved is not None:
                    paths[modality] = resolved
        try:
            index_time = parsed.index_time.astimezone(timezone.utc)  # overflows near year 1 and 9999
        except OverflowError:
            index_time = None
        if index_time is None or not _pandas_can_hold(index_time):
            problems.append(
                ManifestProblem(
                    number,
                    "index_time",
                    f"{raw.get('index_time')!r} is outside the times pandas can hold"
                    " (1677-09-21 to 2262-04-11); write the real moment of prediction",
                )
            )
            continue
        key = (parsed.patient_id, index_time)
        if key in seen:
            problems.append(
                ManifestProblem(number, "index_time", f"duplicate of row {seen[key]} (same patient_id and index_time)")
            )
        seen.setdefault(key, number)
        labels: dict[str, str | None] = {}
        for column in label_columns:
            task = column[len(LABEL_PREFIX) :]
            label = labels[task] = _label_text(raw.get(column))
            if label is not None:
                label_values[task].append((number, label))
        rows.append(
            CohortRow(
                row=number,
                patient_id=parsed.patient_id,
                index_time=index_time,
                split=parsed.split,
                paths=paths,
                labels=labels,
                extras={c: raw.get(c) for c in extra_columns},
                remote=remote,
            )
        )
    tasks = {name: _infer_task(name, values, problems) for name, values in label_values.items() if name.strip()}
    split_errors, warnings = _split_problems(rows)
    problems += split_errors
    warnings = _label_lookalikes(extra_columns) + warnings
    if problems:
        raise ManifestError(path, sorted(problems, key=lambda p: p.row or 0))
    for warning in warnings:
        logger.warning("manifest %s: %s", path, warning)
    return Cohort(path=path, rows=rows, tasks=tasks, extra_columns=extra_columns, warnings=warnings)


def _normalised_name(column: str) -> str:
    """A column name without case, separators and a trailing path word: ``EHR_Path`` -> ``ehr``."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", column).lower()) if w]
    while len(words) > 1 and words[-1] in PATH_WORDS:
        words.pop()
    return "".join(words)


def resembled_column(column: str) -> str | None:
    """The modality (or ``split``) column that ``column`` looks like, or None.

    Example:
        >>> resembled_column("ehr_path"), resembled_column("Image"), resembled_column("site")
        ('ehr', 'imaging', None)
    """
    name = _normalised_name(column)
    if not name:
        return None
    canonical = {_normalised_name(c): c for c in (*MODALITY_COLUMNS, "split")}
    for target, aliases in COLUMN_ALIASES.items():
        if name == _normalised_name(target) or name in aliases:
            return target
    close = difflib.get_close_matches(name, list(canonical), n=1, cutoff=TYPO_CUTOFF)
    return canonical[close[0]] if close and len(name) >= 4 else None


def _lookalike_problems(extra_columns: list[str], columns: list[str]) -> list[ManifestProblem]:
    """An error for each extra column that looks like a modality or ``split`` column.

    Left as an extra column, its files would be ignored without a word (a model trained
    without images); messages name the column it resembles.
    """
    problems = []
    for column in extra_columns:
        target = resembled_column(column)
        if target is None:
            continue
        what = "the split column" if target == "split" else f"the {target!r} modality column"
        fix = (
            f"rename it {target!r}"
            if target not in columns
            else f"the manifest also has {target!r}: drop this column or give it a name that is not a modality's"
        )
        reason = f"looks like {what} but is not named {target!r}, so it would be ignored; {fix}"
        problems.append(ManifestProblem(None, column, reason))
    return problems


def _label_lookalikes(extra_columns: list[str]) -> list[ManifestProblem]:
    """Warnings for extra columns written like a label column (``label_disease``, ``Label:disease``)."""
    warnings = []
    for column in extra_columns:
        found = re.fullmatch(r"\s*labels?\s*[_:\-. ]\s*(.+)", column, flags=re.IGNORECASE)
        if found:
            warnings.append(
                ManifestProblem(
                    None,
                    column,
                    "kept as an extra column, not a task; a task's labels go in a column named "
                    f"'label:{found.group(1)}'",
                )
            )
    return warnings


def _explain(column: str | None, value: Any, err: Any) -> str:
    """Turn a pydantic error into a sentence that says how to fix the cell."""
    shown = "empty" if _is_empty(value) else repr(value)
    if column == "index_time":
        if err["type"] == "timezone_aware":
            return f"{shown} has no time zone; write it like 2024-03-05T14:00:00Z"
        if err["type"] == "value_error" and str(err.get("ctx", {}).get("error")) == EPOCH_HINT:
            return f"{shown} is a number: {EPOCH_HINT}"
        return f"{shown} is not an ISO 8601 time; write it like 2024-03-05T14:00:00Z"
    if column == "split":
        return f"{shown} is not a split; use one of {', '.join(SPLITS)} or leave it empty"
    if column == "patient_id":
        return "patient_id is empty" if _is_empty(value) else f"{shown} is not a valid patient_id"
    return f"{shown}: {err['msg']}"
