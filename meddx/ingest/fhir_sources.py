"""A patient's FHIR resources in a source, as plain JSON with the release that validates each.

The sources are a Bundle JSON file, the answers of a FHIR server's searches (read as a
Bundle's entries) and a Bulk export's line index (:class:`~meddx.ingest.fhir_bulk.BulkIndex`).
The version of each resource is the nearest declaration (:mod:`meddx.ingest.fhir_versions`);
a source of another patient, of no resources of the patient, or of an unsupported version is
an :class:`~meddx.errors.IngestError`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meddx.errors import IngestError
from meddx.ingest.fhir_bulk import BulkIndex, patient_reference_id
from meddx.ingest.fhir_versions import (
    DEFAULT_VERSION,
    RawResource,
    UnsupportedFhirVersion,
    declared_version,
    release_of,
    resource_label,
)
from meddx.records import Modality


def bulk_raws(
    index: BulkIndex,
    root: Path,
    patient_id: str,
    types: set[str],
    modality: Modality,
    counts: Counter,
    warnings: list[str],
) -> list[RawResource]:
    """The patient's resources of ``types`` in a Bulk export (``root``, read through ``index``).

    Lines that are not valid JSON, or of an unsupported version, are counted in
    ``counts["skipped_resources"]`` and reported in ``warnings``.
    """
    if not index.files:
        raise IngestError(
            root, str(modality), "holds no NDJSON resource files meddx uses (Patient, Observation, Condition, ...)"
        )
    folder_version = index.declared_version
    if folder_version is not None:
        try:
            release_of(folder_version)
        except UnsupportedFhirVersion as exc:
            raise IngestError(root, str(modality), str(exc)) from None
    raws: list[RawResource] = []
    try:
        for line in index.lines(patient_id, types):
            where = f"{line.file.name} line {line.number}"
            if line.resource_type is None:
                counts["skipped_resources"] += 1
                warnings.append(f"skipped {where}: not valid JSON")
                continue
            data = json.loads(line.raw)
            try:
                release = release_of(declared_version(data) or folder_version or DEFAULT_VERSION)
            except UnsupportedFhirVersion as exc:
                counts["skipped_resources"] += 1
                warnings.append(f"skipped {resource_label(data, where)}: {exc}")
                continue
            raws.append(RawResource(data, where, release))
    except (OSError, ValueError) as exc:  # the files changed under us
        raise IngestError(root, str(modality), f"the export changed while it was read ({exc}); run again") from None
    if not raws and not counts["skipped_resources"] and not index.has_patient(patient_id):
        raise IngestError(
            root,
            str(modality),
            "holds no resources of the row's patient_id (no Patient with that id and no subject/patient "
            "reference to it); check the manifest's patient_id",
        )
    return raws


def bundle_raws(path: Path, patient_id: str, types: set[str], modality: Modality) -> list[RawResource]:
    """The patient's resources of ``types`` in a Bundle JSON file."""
    return entries_raws(_load_bundle(path, modality), path, patient_id, types, modality)


def _load_bundle(path: Path, modality: Modality) -> dict[str, Any]:
    mod = str(modality)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise IngestError(path, mod, f"cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise IngestError(path, mod, f"not valid JSON ({exc}); a FHIR Bundle is one JSON object") from None
    except RecursionError:
        raise IngestError(path, mod, "JSON nested too deeply to be a FHIR Bundle") from None
    kind = data.get("resourceType") if isinstance(data, dict) else None
    if kind != "Bundle":
        raise IngestError(
            path,
            mod,
            f"holds {kind or 'no FHIR resource'}, not a Bundle; give a Bundle JSON file or a Bulk export folder",
        )
    return data


def entries_raws(
    data: dict[str, Any], path: str | Path, patient_id: str, types: set[str], modality: Modality
) -> list[RawResource]:
    """The patient's resources of ``types`` among a Bundle's entries (a file's, or the server's answers)."""
    mod = str(modality)
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise IngestError(path, mod, "Bundle.entry is not a list")
    resources = []
    for number, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            resources.append((number, entry.get("fullUrl"), resource))
    container_version = declared_version(data) or next(
        (r.get("fhirVersion") for _, _, r in resources if r.get("resourceType") == "CapabilityStatement"), None
    )
    try:
        release_of(container_version or DEFAULT_VERSION)  # refuse an unsupported Bundle before anything else
    except UnsupportedFhirVersion as exc:
        raise IngestError(path, mod, str(exc)) from None

    patients = [(url, r) for _, url, r in resources if r.get("resourceType") == "Patient"]
    mine = [(url, r) for url, r in patients if r.get("id") == patient_id]
    if patients and not mine:
        raise IngestError(
            path,
            mod,
            "this Bundle belongs to another patient: its Patient.id is not the row's patient_id; "
            "check the manifest row's ehr path",
        )
    aliases = {url for url, _ in mine if isinstance(url, str)}
    raws = []
    found = False
    for number, _, resource in resources:
        kind = resource.get("resourceType")
        if kind == "Patient":
            if resource.get("id") != patient_id:
                continue
        elif not _refers_to(resource, patient_id, aliases):
            continue
        found = True
        if kind not in types:
            continue
        try:
            release = release_of(declared_version(resource) or container_version or DEFAULT_VERSION)
        except UnsupportedFhirVersion as exc:
            raise IngestError(path, mod, f"{resource_label(resource, f'entry {number}')}: {exc}") from None
        raws.append(RawResource(resource, f"entry {number}", release))
    if not found:
        raise IngestError(
            path,
            mod,
            "holds no resources of the row's patient_id (no Patient with that id and no subject/patient "
            "reference to it); check the manifest row",
        )
    return raws


def _refers_to(resource: Mapping[str, Any], patient_id: str, aliases: set[str]) -> bool:
    """Whether a resource's subject/patient reference points at the patient (by id or fullUrl)."""
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            return ref["reference"] in aliases or patient_reference_id(ref["reference"]) == patient_id
    return False
