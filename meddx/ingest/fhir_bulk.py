"""A per-patient line index of a Bulk FHIR (NDJSON) export.

A Bulk export holds a whole population, one resource type per ``*.ndjson`` file, one
resource per line. Reading it once per patient would be quadratic, so the folder is
scanned once per process: for every line of the resource types meddx uses, the index
keeps the patient it belongs to and the line's byte offset. Reading a patient then
seeks to those offsets and reads only that patient's lines.

The scan is cheap on purpose: each line goes through ``json.loads`` only to find its
``resourceType`` and its patient (``Patient.id``, or the ``subject`` / ``patient``
reference); validation with ``fhir.resources`` happens later, for the lines of the
patient being read. A file whose first line is of a type meddx does not use (Claim,
Practitioner...) is skipped whole, as the Bulk Data spec puts one type in each file.
Lines that are not valid JSON are remembered with their line numbers; when a patient
is read, those whose bytes mention the patient's id are reported as skipped resources.

Example:
    >>> index = BulkIndex.build(Path("tests/data/synthea-bulk"), {"Patient", "Condition"})
    >>> lines = list(index.lines("3af3708d-41f1-cd80-f3dd-ec5ac76072bf"))  # the patient's resources
    >>> len(lines), lines[0].file.name, lines[0].number, lines[0].resource_type
    (7, 'Condition.000.ndjson', 9, 'Condition')
"""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

# where the FHIR version of a whole export may be declared (the server's /metadata)
CAPABILITY_FILES = ("CapabilityStatement.json", "metadata.json")
LOGGED_BROKEN_LINES = 5  # per file; every one is still reported in the records of its patient


def patient_of(resource: dict[str, Any]) -> str | None:
    """The id of the patient a resource belongs to (its own id for a Patient).

    Accepts ``Patient/<id>``, absolute ``.../Patient/<id>[/_history/n]`` and
    ``urn:uuid:<id>`` references in ``subject`` or ``patient``.

    Example:
        >>> patient_of({"resourceType": "Condition", "subject": {"reference": "urn:uuid:p1"}})
        'p1'
    """
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            return patient_reference_id(ref["reference"])
    return None


def patient_reference_id(reference: str) -> str | None:
    """The patient id in a reference string, or None when it is not a Patient reference.

    Example:
        >>> patient_reference_id("https://ehr.example/fhir/Patient/p7/_history/2")
        'p7'
    """
    if reference.startswith("urn:uuid:"):
        return reference[len("urn:uuid:") :] or None
    parts = reference.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "Patient" and parts[i + 1]:
            return parts[i + 1]
    return None


@dataclass(frozen=True)
class BulkLine:
    """One line of one patient, read back from its file."""

    file: Path
    number: int  # 1-based line number in the file
    resource_type: str | None  # the file's type; None for a line that is not valid JSON
    raw: bytes


@dataclass
class _FileIndex:
    path: Path
    resource_type: str
    offsets: dict[str, array] = field(default_factory=dict)  # patient id -> byte offsets
    numbers: dict[str, array] = field(default_factory=dict)  # patient id -> line numbers
    broken: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, line number, reason)
    n_lines: int = 0


@dataclass
class BulkIndex:
    """Byte offsets of every line of every patient in a Bulk export folder.

    Attributes:
        root: the folder (or single ``.ndjson`` file) indexed.
        key: what the index was built from (file names, sizes, mtimes); a change rebuilds it.
        files: one index per resource file meddx uses.
        declared_version: ``fhirVersion`` of a CapabilityStatement in the folder, if any.
        skipped_files: files not indexed and why (other resource types, logs).
        max_line_bytes: longer lines were skipped as broken without being read whole (None: no limit).
    """

    root: Path
    key: tuple
    files: list[_FileIndex]
    declared_version: str | None = None
    skipped_files: dict[str, str] = field(default_factory=dict)
    max_line_bytes: int | None = None

    @staticmethod
    def source_files(root: Path) -> list[Path]:
        """The NDJSON files of an export (a folder), or the file itself."""
        if root.is_file():
            return [root]
        return sorted(p for p in root.glob("*.ndjson") if p.is_file() and not p.name.startswith("."))

    @staticmethod
    def key_of(root: Path) -> tuple:
        """Names, sizes and modification times of the files the index depends on."""
        paths = BulkIndex.source_files(root)
        if root.is_dir():
            paths += [root / name for name in CAPABILITY_FILES if (root / name).is_file()]
        entries = []
        for p in paths:
            st = os.stat(p)
            entries.append((p.name, st.st_size, st.st_mtime_ns))
        return (str(root),) + tuple(entries)

    @classmethod
    def build(cls, root: Path, resource_types: set[str], max_line_bytes: int | None = None) -> BulkIndex:
        """Scan ``root`` once, indexing lines whose type is in ``resource_types``.

        A line longer than ``max_line_bytes`` (one resource, parsed whole like a Bundle) is skipped
        as broken and never held in memory whole.

        Raises:
            OSError: a file cannot be read.
        """
        key = cls.key_of(root)
        files: list[_FileIndex] = []
        skipped: dict[str, str] = {}
        declared: str | None = _capability_version(root) if root.is_dir() else None
        for path in cls.source_files(root):
            first_type = _first_resource_type(path, max_line_bytes)
            if first_type == "CapabilityStatement":
                declared = declared or _capability_version(path)
                continue
            if first_type is None:
                skipped[path.name] = "no FHIR resource among its first lines (not a resource file)"
                logger.info("%s skipped: %s", path.name, skipped[path.name])  # e.g. the export's log.ndjson
                continue
            if first_type not in resource_types:
                skipped[path.name] = f"{first_type} resources are not used"
                continue
            files.append(_index_file(path, first_type, resource_types, max_line_bytes))
        for f in files:
            for _, number, reason in f.broken[:LOGGED_BROKEN_LINES]:
                logger.warning("%s line %d skipped: %s", f.path.name, number, reason)
            if len(f.broken) > LOGGED_BROKEN_LINES:
                logger.warning("%s: %d more lines skipped", f.path.name, len(f.broken) - LOGGED_BROKEN_LINES)
        return cls(root, key, files, declared, skipped, max_line_bytes)

    def has_patient(self, patient_id: str) -> bool:
        return any(patient_id in f.offsets for f in self.files)

    @property
    def n_lines(self) -> int:
        return sum(f.n_lines for f in self.files)

    @property
    def n_patients(self) -> int:
        return len({pid for f in self.files for pid in f.offsets})

    def lines(self, patient_id: str, resource_types: set[str] | None = None) -> Iterator[BulkLine]:
        """Read back the lines of one patient (and unparseable lines mentioning its id)."""
        needle = patient_id.encode("utf-8")
        for f in self.files:
            if resource_types is not None and f.resource_type not in resource_types:
                continue
            offsets = f.offsets.get(patient_id)
            suspects = [(off, num) for off, num, _ in f.broken]
            if offsets is None and not suspects:
                continue
            with open(f.path, "rb") as handle:
                if offsets is not None:
                    for offset, number in zip(offsets, f.numbers[patient_id], strict=True):
                        handle.seek(offset)
                        yield BulkLine(f.path, number, f.resource_type, handle.readline())
                for offset, number in suspects:
                    handle.seek(offset)
                    raw = handle.readline(-1 if self.max_line_bytes is None else self.max_line_bytes)
                    if needle in raw:
                        yield BulkLine(f.path, number, None, raw)


def _first_resource_type(path: Path, max_line_bytes: int | None = None, max_lines: int = 1000) -> str | None:
    """``resourceType`` of the first line that is a JSON object; None when none of the first lines is.

    A truncated or garbled first line does not hide the file (its other lines are read, the broken
    one is reported by the index); a file with no JSON among its first ``max_lines`` is no resource file.
    """
    with open(path, "rb") as handle:
        for number, (raw, _) in enumerate(_lines(handle, max_line_bytes)):
            if number >= max_lines:
                break
            if raw is None or not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
                continue
            kind = value.get("resourceType") if isinstance(value, dict) else None
            return kind if isinstance(kind, str) else None
    return None


def _capability_version(path: Path) -> str | None:
    """``fhirVersion`` of a CapabilityStatement file (JSON or NDJSON), or in a folder's /metadata file."""
    candidates = [path / name for name in CAPABILITY_FILES] if path.is_dir() else [path]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            with open(candidate, "rb") as handle:
                text = handle.read().strip()
            value = json.loads(text.splitlines()[0] if candidate.suffix == ".ndjson" else text)
        except (OSError, ValueError, IndexError, RecursionError):
            continue
        if isinstance(value, dict) and value.get("resourceType") == "CapabilityStatement":
            version = value.get("fhirVersion")
            if isinstance(version, str):
                return version
    return None


def _lines(handle: BinaryIO, max_line_bytes: int | None) -> Iterator[tuple[bytes | None, int]]:
    """``(line, its length in bytes)`` of each line; a line over ``max_line_bytes`` comes as ``(None,
    length)``, read past in pieces, never whole."""
    limit = -1 if max_line_bytes is None else max_line_bytes + 1  # + 1: room for the newline
    while raw := handle.readline(limit):
        if limit < 0 or len(raw) < limit or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        length = len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(1 << 20)
            length += len(raw)
        yield None, length


def _index_file(path: Path, first_type: str, resource_types: set[str], max_line_bytes: int | None) -> _FileIndex:
    index = _FileIndex(path=path, resource_type=first_type)
    offset = 0
    with open(path, "rb") as handle:
        for number, (raw, length) in enumerate(_lines(handle, max_line_bytes), start=1):
            start, offset = offset, offset + length
            index.n_lines = number
            if raw is None:
                reason = f"longer than ehr.max_file_mb ({(max_line_bytes or 0) / 2**20:g} MB): not read"
                index.broken.append((start, number, reason))
                continue
            if not raw.strip():
                continue
            try:
                resource = json.loads(raw)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError; messages hold no content
                index.broken.append((start, number, f"not valid JSON ({exc})"))
                continue
            except RecursionError:
                index.broken.append((start, number, "JSON nested too deeply"))
                continue
            if not isinstance(resource, dict):
                index.broken.append((start, number, "not a JSON object"))
                continue
            if resource.get("resourceType") not in resource_types:
                continue
            patient = patient_of(resource)
            if patient is None:
                continue
            index.offsets.setdefault(patient, array("q")).append(start)
            index.numbers.setdefault(patient, array("q")).append(number)
    return index
