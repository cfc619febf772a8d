"""The manifest index: one small JSON file per (manifest content, config, aligner state).

It holds, per manifest row, what training needs without the manifest or any source file:
patient id, index time, split, labels as class indices per task, the extra columns, the
ingest cache key of each present modality, the ingest error of each failed one, and the
:class:`~meddx.cache.TensorStore` key of the row's aligned tensors. Beside the rows it
keeps the tasks, the fitted aligner state, the array spec with roles, and a cheap signature
(sizes and modification times) of every source the manifest names, so that a reopened index
whose sources changed on disk is rebuilt, while one whose sources were moved away is still used.

Indexes live in ``<cache>/indexes/``; the store they point to in ``<cache>/aligned/`` (the
path is kept relative, so a cache folder can be moved as a whole).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meddx._version import __version__
from meddx.cohort import Cohort, TaskSpec
from meddx.config import IngestConfig
from meddx.errors import ModelError
from meddx.files import write_atomic
from meddx.records import UNKNOWN_LABEL, Modality
from meddx.specs import ArrayField, ArraySpec

INDEX_FORMAT = "meddx-cohort-index/1"


@dataclass
class IndexRow:
    """One manifest row as the index keeps it (JSON-able).

    Attributes:
        row: 1-based data row of the manifest.
        patient_id: the patient.
        index_time: ISO 8601 (UTC) moment of prediction.
        split: ``train``/``val``/``test`` or None.
        labels: task -> class index; :data:`~meddx.records.UNKNOWN_LABEL` where the cell is empty.
        extras: the manifest's other columns (``sex``, ``site``...).
        records: modality -> ingest cache key of each record read.
        errors: modality -> why it could not be read (that modality is missing for the row).
        key: the row's :class:`~meddx.cache.TensorStore` key; None when no modality was read.
    """

    row: int
    patient_id: str
    index_time: str
    split: str | None
    labels: dict[str, int]
    extras: dict[str, Any] = field(default_factory=dict)
    records: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    key: str | None = None


@dataclass
class CohortIndex:
    """Everything :class:`~meddx.data.dataset.CohortDataset` reads besides the tensors.

    Example:
        >>> index = CohortIndex.read(prepared.index_path)  # doctest: +SKIP
        >>> index.rows[0].labels  # doctest: +SKIP
        {'disease': 0}
    """

    manifest: str
    manifest_digest: str
    config: dict[str, Any]
    aligner: dict[str, Any]
    aligner_hash: str
    store: str  # the TensorStore folder, relative to the index file's folder
    tasks: dict[str, TaskSpec]
    extra_columns: list[str]
    array_spec: dict[Modality, ArraySpec]
    sources: dict[str, str]  # absolute source path -> signature when prepared
    rows: list[IndexRow]
    meddx: str = __version__

    # ---------------------------------------------------------------- persistence

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "meddx": self.meddx,
            "manifest": self.manifest,
            "manifest_digest": self.manifest_digest,
            "config": self.config,
            "aligner": self.aligner,
            "aligner_hash": self.aligner_hash,
            "store": self.store,
            "tasks": {name: {"kind": t.kind, "classes": list(t.classes)} for name, t in self.tasks.items()},
            "extra_columns": self.extra_columns,
            "array_spec": {
                m.value: {name: {**f._asdict(), "shape": list(f.shape), "of": list(f.of)} for name, f in spec.items()}
                for m, spec in self.array_spec.items()
            },
            "sources": self.sources,
            "rows": [asdict(r) for r in self.rows],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str | Path = "index") -> CohortIndex:
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ModelError(
                f"{path} is not a meddx cohort index of format {INDEX_FORMAT} (found {found!r}); "
                "run prepare_cohort again with this meddx version"
            )
        try:
            return cls(
                manifest=data["manifest"],
                manifest_digest=data["manifest_digest"],
                config=data["config"],
                aligner=data["aligner"],
                aligner_hash=data["aligner_hash"],
                store=data["store"],
                tasks={name: TaskSpec(name, t["kind"], tuple(t["classes"])) for name, t in data["tasks"].items()},
                extra_columns=list(data["extra_columns"]),
                array_spec={
                    Modality(m): {
                        name: ArrayField(**{**f, "shape": tuple(f["shape"]), "of": tuple(f["of"])})
                        for name, f in spec.items()
                    }
                    for m, spec in data["array_spec"].items()
                },
                sources=dict(data["sources"]),
                rows=[IndexRow(**r) for r in data["rows"]],
                meddx=data["meddx"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path} is a damaged cohort index ({exc}); run prepare_cohort again") from None

    def write(self, path: str | Path) -> Path:
        """Write atomically, so a reader never sees half an index."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.to_json(), separators=(",", ":")))
        return path

    @classmethod
    def read(cls, path: str | Path) -> CohortIndex:
        """Read an index file.

        Raises:
            ModelError: the file is missing, not JSON, or not an index of this format.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read the cohort index {path}: {exc}; run prepare_cohort to write it") from None
        return cls.from_json(data, path)

    def store_root(self, index_path: str | Path) -> Path:
        return Path(index_path).parent / self.store


# -------------------------------------------------------------------- identities


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def manifest_identity(cohort_or_path: Cohort | str | Path) -> tuple[str, str]:
    """``(manifest path, digest)`` of what a prepared index was made from.

    A manifest file is identified by its bytes and its folder (relative paths resolve
    there), so reopening it reads the manifest only, not the sources it names. An
    in-memory :class:`~meddx.cohort.Cohort` (perhaps a subset of rows) by its rows.
    """
    if isinstance(cohort_or_path, Cohort):
        cohort = cohort_or_path
        rows = [
            [
                r.row,
                r.patient_id,
                r.index_time.isoformat(),
                r.split,
                {m.value: str(p) for m, p in r.paths.items()},
                r.labels,
                json_safe(r.extras),
            ]
            for r in cohort
        ]
        return str(cohort.path), _digest({"cohort": rows, "tasks": {n: asdict(t) for n, t in cohort.tasks.items()}})
    path = Path(cohort_or_path).resolve()
    try:
        content = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        from meddx.errors import ManifestError, ManifestProblem

        raise ManifestError(path, [ManifestProblem(None, None, f"cannot read the manifest: {exc}")]) from None
    return str(path), _digest({"manifest": content, "folder": str(path.parent)})


def index_name(manifest_digest: str, config: IngestConfig, aligner_digest: str) -> str:
    """File stem of the index of (manifest content, config, aligner state)."""
    return _digest(
        {
            "format": INDEX_FORMAT,
            "manifest": manifest_digest,
            "config": config.model_dump(mode="json"),
            "aligner": aligner_digest,
        }
    )


def fit_pointer_name(manifest_digest: str, config: IngestConfig, fit_split: str | None) -> str:
    """File stem of the pointer from (manifest, config, fit split) to the index of the aligner fitted there.

    It lets a reopen without an aligner find its index without ingesting to refit one.
    """
    return "fit-" + _digest(
        {
            "format": INDEX_FORMAT,
            "meddx": __version__,
            "manifest": manifest_digest,
            "config": config.model_dump(mode="json"),
            "fit_split": fit_split,
        }
    )


def source_signature(path: str | Path) -> str | None:
    """Sizes and modification times of a file or of every file under a folder; None when absent.

    Cheap (no bytes read), and enough to notice that a file was rewritten since it was prepared.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not os.path.isdir(path):
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    entries: list[tuple[str, int, int]] = []
    try:
        _scan(str(path), "", entries)
    except OSError:
        return None
    return _digest(sorted(entries))


def _scan(folder: str, prefix: str, entries: list[tuple[str, int, int]]) -> None:
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.is_dir():
                _scan(entry.path, f"{prefix}{entry.name}/", entries)
            else:
                stat = entry.stat()
                entries.append((prefix + entry.name, stat.st_size, stat.st_mtime_ns))


def label_index(task: TaskSpec, value: str | None) -> int:
    """Class index of a manifest label cell; :data:`UNKNOWN_LABEL` when empty.

    Example:
        >>> task = TaskSpec("disease", "binary", ("0", "1"))
        >>> label_index(task, "1"), label_index(task, None)
        (1, -1)
    """
    if value is None:
        return UNKNOWN_LABEL
    if task.kind == "binary":
        return int(float(value))
    return task.classes.index(value)


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """Manifest extras as plain JSON values (NaN -> None, numpy scalars -> Python, else text)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            try:
                value = value.item()
            except (TypeError, ValueError):
                value = str(value)
        if isinstance(value, float) and math.isnan(value):
            value = None
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            value = str(value)
        out[name] = value
    return out
