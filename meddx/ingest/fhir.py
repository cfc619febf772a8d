"""The EHR ingestor: FHIR Bundles and Bulk FHIR exports → dated events → fixed tensors.

**What is read.** A Bundle JSON file, or a Bulk FHIR export (a folder of ``*.ndjson``
files, one resource type per file; a single ``.ndjson`` file works too). In a Bulk
export the resources of the row's patient are those whose ``subject`` / ``patient``
reference points at ``Patient/<patient_id>`` (absolute URLs and ``urn:uuid:<id>`` too),
plus the Patient whose ``id`` is ``patient_id``; a per-process index of the folder
(:mod:`meddx.ingest.fhir_bulk`) finds their lines without re-reading the population.
Every resource of the patient is validated with ``fhir.resources`` before use.

The rules of the reading are in sibling modules, each documented there:

* :mod:`meddx.ingest.fhir_versions`: which FHIR version a resource is (R4/R4B or R5; others
  are refused), and its validation with ``fhir.resources``;
* :mod:`meddx.ingest.fhir_sources`: the patient's resources in a Bundle, a FHIR server's
  answers or a Bulk export (:mod:`meddx.ingest.fhir_bulk` indexes the export);
* :mod:`meddx.ingest.fhir_times`: when a resource became known (periods from their end,
  dates at the end of their day);
* :mod:`meddx.ingest.fhir_status`: retracted, never-happened, stopped and amended resources;
* :mod:`meddx.ingest.fhir_events`: what is kept (observations in canonical units, code
  tokens, notes, the patient's sex and age).

Resources dated after the index time are dropped with :func:`meddx.records.keep_available`;
undated clinical resources are dropped too (nothing says they were known at the index
time). Both are counted in meta.

**Invalid resources.** A resource that fails validation (in a Bundle or a Bulk export) is
skipped and reported as a record warning (``meta["skipped_resources"]``); the rest of the
patient's EHR is read. Only when every resource of the patient fails is the read an error.

The events become fixed tensors in :class:`~meddx.ingest.ehr_tensorizer.EhrTensorizer`.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from meddx.errors import IngestError, MeddxError
from meddx.fhirclient.ref import FhirRef
from meddx.ingest.base import Ingestor, IngestRequest, register_ingestor
from meddx.ingest.ehr_tensorizer import CODE_KINDS, EhrTensorizer
from meddx.ingest.fhir_bulk import BulkIndex
from meddx.ingest.fhir_events import (
    Demographics,
    code_of,
    event_order,
    note_events,
    observation_events,
    patient_demographics,
)
from meddx.ingest.fhir_sources import bulk_raws, bundle_raws, entries_raws
from meddx.ingest.fhir_status import is_amended, status_verdict
from meddx.ingest.fhir_times import resource_time, version_time
from meddx.ingest.fhir_versions import BadResource, RawResource, validate_resource
from meddx.ingest.file_checks import check_source
from meddx.records import Event, Modality, ModalityRecord, keep_available

logger = logging.getLogger(__name__)

USED_TYPES: frozenset[str] = frozenset({"Patient", "Observation", "DocumentReference", *CODE_KINDS})

# count names kept in record.meta (always present, so tables of records line up)
COUNT_KEYS: tuple[str, ...] = (
    "skipped_resources",
    "dropped_by_status",
    "dropped_undated",
    "observations_without_value",
    "unconvertible_units",
    "uncoded_resources",
    "url_only_attachments",
    "non_text_attachments",
    "undecodable_attachments",
    "implausible_values",
)


@dataclass
class _Parsed:
    resource_type: str
    model: Any
    time: datetime | None
    where: str


# Bulk folder indexes of this process, newest last; an index depends only on the files.
MAX_BULK_INDEXES = 4
_BULK_INDEXES: OrderedDict[str, BulkIndex] = OrderedDict()


@register_ingestor
class FhirIngestor(Ingestor):
    """Reads a patient's FHIR resources (Bundle or Bulk export) available at the index time.

    The record's events are observations (canonical units), code tokens and notes, in
    time order; ``meta`` holds ``sex``, ``age_years``, ``index_time``, the kept resources
    per type and the counts of what was dropped or skipped.

    Example:
        >>> from meddx.records import parse_time
        >>> reader = FhirIngestor()
        >>> request = IngestRequest("P0001", parse_time("2024-12-03T08:27:00Z"),
        ...                         {Modality.EHR: Path("sample_data/patients/P0001/ehr.json")})
        >>> record = reader.read(request)
        >>> record.meta["resources"]["Observation"], record.meta["sex"], record.meta["age_years"]
        (12, 'female', 80)
    """

    modality = Modality.EHR
    tensorizer_class = EhrTensorizer
    version = 2  # 2: events of the same time in a fixed order; fhir:Patient/<id> sources

    def wants(self, request: IngestRequest) -> bool:
        return Modality.EHR in request.paths or isinstance(request.remote.get(Modality.EHR), FhirRef)

    def sources(self, request: IngestRequest) -> Sequence[Path | FhirRef]:
        remote = request.remote.get(Modality.EHR)
        if isinstance(remote, FhirRef):
            return [remote]
        return [request.paths[Modality.EHR]] if Modality.EHR in request.paths else []

    def read(self, request: IngestRequest) -> ModalityRecord | None:
        remote = request.remote.get(Modality.EHR)
        source = remote if isinstance(remote, FhirRef) else request.paths[Modality.EHR]
        return self.read_patient(source, request.patient_id, request.index_time)

    def read_patient(
        self,
        path: str | Path | FhirRef,
        patient_id: str,
        index_time: datetime,
        *,
        resource_types: Iterable[str] | None = None,
        modality: Modality = Modality.EHR,
    ) -> ModalityRecord:
        """Read one patient's resources from a Bundle, a Bulk export or the FHIR server.

        Args:
            path: a Bundle JSON file, a Bulk export folder, one ``.ndjson`` file, or a
                :class:`~meddx.fhirclient.ref.FhirRef` (``fhir:Patient/<id>`` on the configured server).
            patient_id: the FHIR Patient id (for a ``FhirRef``, the reference's id is used).
            index_time: nothing dated after it is kept.
            resource_types: read only these types (Patient is always read); default all used.
            modality: the modality named in errors (the notes ingestor reads through this one).

        Raises:
            IngestError: unreadable or invalid file, another patient's Bundle, unsupported version,
                a failed request to the server.
        """
        types = set(USED_TYPES if resource_types is None else resource_types) | {"Patient"}
        warnings: list[str] = []
        counts: Counter = Counter({key: 0 for key in COUNT_KEYS})
        if isinstance(path, FhirRef):
            source_kind = "fhir"
            patient_id = path.patient_id
            raws = self._server_raws(path, index_time, types, modality)
            shown: str | Path = str(path)
        else:
            path = shown = Path(path)
            # A Bundle is parsed whole, so its size is limited; Bulk NDJSON is streamed line by line, each
            # line held to the same limit (BulkIndex.build).
            limit = None if path.suffix == ".ndjson" else self.config.ehr.max_file_mb
            check_source(
                path,
                str(modality),
                max_file_mb=limit,
                folder_ok=True,
                expected="a FHIR Bundle JSON file or a Bulk export folder",
            )
            if path.is_dir() or path.suffix == ".ndjson":
                source_kind = "bulk"
                raws = self._bulk_raws(path, patient_id, types, modality, counts, warnings)
            else:
                source_kind = "bundle"
                raws = bundle_raws(path, patient_id, types, modality)
        zone = self.config.site_zone()
        parsed: list[_Parsed] = []
        invalid: list[str] = []
        for raw in raws:
            try:
                model = validate_resource(raw)
            except BadResource as bad:  # one bad resource does not fail the patient's EHR
                counts["skipped_resources"] += 1
                invalid.append(str(bad))
                warnings.append(f"skipped {bad}")
                continue
            kind = raw.data["resourceType"]
            when = resource_time(model, kind, zone)
            if when is not None and is_amended(model, kind):
                known = version_time(model, kind, zone)
                when = max(when, known) if known is not None else when
            parsed.append(_Parsed(kind, model, when, raw.where))
        if invalid and not parsed:
            more = f" (and {len(invalid) - 1} more)" if len(invalid) > 1 else ""
            raise IngestError(shown, str(modality), f"no resource of the patient is valid FHIR: {invalid[0]}{more}")
        origin = _Origin(shown, modality, source_kind)
        return _build_record(origin, patient_id, index_time, parsed, counts, warnings, zone)

    # ------------------------------------------------------------------ FHIR server

    def _server_raws(
        self, ref: FhirRef, index_time: datetime, types: set[str], modality: Modality
    ) -> list[RawResource]:
        """The patient's resources from the server's searches, through the same entry rules as a Bundle's."""
        from meddx.fhirclient.search import patient_resources

        try:
            answer = patient_resources(self.config.fhir, ref, index_time, types)
        except MeddxError as exc:  # FhirRequestError, FhirAuthError, ConfigError
            raise IngestError(str(ref), str(modality), str(exc)) from None
        bundle: dict[str, Any] = {"resourceType": "Bundle", "entry": [{"resource": r} for r in answer.resources]}
        if answer.fhir_version:
            bundle["fhirVersion"] = answer.fhir_version  # the server's CapabilityStatement, as a container's
        if not answer.resources:
            raise IngestError(
                str(ref),
                str(modality),
                "the FHIR server holds no Patient with that id and no resources of it; check the manifest's ehr cell",
            )
        return entries_raws(bundle, str(ref), ref.patient_id, types, modality)

    # ------------------------------------------------------------------ Bulk

    def bulk_index(self, root: Path) -> BulkIndex:
        """The line index of a Bulk export, built once and rebuilt when its files change.

        The index covers every resource type meddx uses and is shared by all readers in
        the process, so the EHR and notes readers of a worker scan a folder only once.
        """
        name = str(root.resolve())
        key = BulkIndex.key_of(root)
        max_line_bytes = int(self.config.ehr.max_file_mb * 2**20)  # a line is parsed whole, like a Bundle
        index = _BULK_INDEXES.get(name)
        if index is None or index.key != key or index.max_line_bytes != max_line_bytes:
            index = BulkIndex.build(root, set(USED_TYPES), max_line_bytes)
            _BULK_INDEXES[name] = index
            while len(_BULK_INDEXES) > MAX_BULK_INDEXES:
                _BULK_INDEXES.popitem(last=False)
        _BULK_INDEXES.move_to_end(name)
        return index

    def _bulk_raws(
        self, root: Path, patient_id: str, types: set[str], modality: Modality, counts: Counter, warnings: list[str]
    ) -> list[RawResource]:
        try:
            index = self.bulk_index(root)
        except OSError as exc:
            raise IngestError(root, str(modality), f"cannot read the export: {exc.strerror or exc}") from None
        return bulk_raws(index, root, patient_id, types, modality, counts, warnings)


@dataclass(frozen=True)
class _Origin:
    """Where a record's resources came from: the file or reference shown in messages, and its kind."""

    path: str | Path
    modality: Modality
    source_kind: str  # "bundle", "bulk" or "fhir" (a server)


def _build_record(
    origin: _Origin,
    patient_id: str,
    index_time: datetime,
    parsed: list[_Parsed],
    counts: Counter,
    warnings: list[str],
    zone: tzinfo | None = None,
) -> ModalityRecord:
    path, modality, source_kind = origin.path, origin.modality, origin.source_kind
    demographics = Demographics()
    patient = next((p for p in parsed if p.resource_type == "Patient" and p.model.id == patient_id), None)
    if patient is not None:
        demographics = patient_demographics(patient.model, index_time, warnings, zone)
    else:
        warnings.append("no Patient resource for this patient: sex and age unknown")
    clinical = [p for p in parsed if p.resource_type != "Patient"]
    by_status: Counter = Counter()
    standing = []
    for p in clinical:
        verdict = status_verdict(p.model, p.resource_type, index_time, zone)
        if verdict is None:
            standing.append(p)
        else:
            by_status[verdict] += 1
    counts["dropped_by_status"] += sum(by_status.values())
    clinical = standing
    dated = [p for p in clinical if p.time is not None]
    counts["dropped_undated"] += len(clinical) - len(dated)
    kept, _ = keep_available(dated, index_time, time_of=lambda p: p.time)
    kept_ids = {id(p) for p in kept}
    dropped_by_type = Counter(p.resource_type for p in dated if id(p) not in kept_ids)

    events: list[Event] = []
    for item in kept:
        when: datetime = item.time  # type: ignore[assignment]  # undated ones were dropped above
        if item.resource_type == "Observation":
            events += observation_events(item.model, when, counts)
        elif item.resource_type == "DocumentReference":
            events += note_events(item.model, when, counts, item.where, warnings)
        else:
            code = code_of(item.model, item.resource_type)
            if code is None:
                counts["uncoded_resources"] += 1
            else:
                events.append(Event(when, CODE_KINDS[item.resource_type], code))
    # Time order; events of the same time in a fixed order, so the record does not depend on the order the
    # resources were listed in (a Bundle's entries, a Bulk export's files, a server's search pages).
    events.sort(key=event_order)
    resources = Counter(p.resource_type for p in kept)
    if patient is not None:
        resources["Patient"] += 1
    meta: dict[str, Any] = {
        "source_kind": source_kind,
        "index_time": index_time.isoformat(),
        "sex": demographics.sex,
        "age_years": demographics.age_years,
        "deceased_at_index": demographics.deceased_at_index,
        "resources": dict(sorted(resources.items())),
        "dropped_after_index": sum(dropped_by_type.values()),
        "dropped_after_index_by_type": dict(sorted(dropped_by_type.items())),
        "dropped_by_status_detail": dict(sorted(by_status.items())),
        **{key: int(counts[key]) for key in COUNT_KEYS},
        "n_events": len(events),
    }
    if counts["implausible_values"]:
        warnings.append(
            f"masked {counts['implausible_values']} lab value(s) that are not finite or outside the plausible range "
            "of their LOINC code (meddx.ingest.units.PLAUSIBLE)"
        )
    if counts["skipped_resources"]:
        logger.warning("%s: %d resource(s) skipped (see the record's warnings)", path, counts["skipped_resources"])
    return ModalityRecord(
        modality=modality,
        source=str(path),
        events=events,
        time=events[-1].time if events else None,
        meta=meta,
        warnings=warnings,
    )
