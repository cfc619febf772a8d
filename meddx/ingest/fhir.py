"""The EHR ingestor: FHIR Bundles and Bulk FHIR exports → dated events → fixed tensors.

**What is read.** A Bundle JSON file, or a Bulk FHIR export (a folder of ``*.ndjson``
files, one resource type per file; a single ``.ndjson`` file works too). In a Bulk
export the resources of the row's patient are those whose ``subject`` / ``patient``
reference points at ``Patient/<patient_id>`` (absolute URLs and ``urn:uuid:<id>`` too),
plus the Patient whose ``id`` is ``patient_id``; a per-process index of the folder
(:mod:`meddx.ingest.fhir_bulk`) finds their lines without re-reading the population.
Every resource of the patient is validated with ``fhir.resources`` before use.

**Which FHIR version.** The nearest declaration wins: the resource's own, then its
container's (the Bundle, or the export folder's CapabilityStatement), else R4. A
declaration is a ``fhirVersion`` element (CapabilityStatement, or the key some exporters
add to a resource), or a versioned core profile in ``meta.profile``
(``http://hl7.org/fhir/4.0/StructureDefinition/...``, ``.../R5/...``). 4.0.x, 4.3.x,
R4 and R4B are validated with ``fhir.resources.R4B``; 5.0.x and R5 with the top-level
``fhir.resources`` models (R5). Any other version (DSTU2 ``1.0.2``, STU3 ``3.0.x``...)
is refused with an :class:`~meddx.errors.IngestError`.

**When a resource became known.** A resource counts from when it was complete and known.
The first of these that is set places it in time: ``effective[x]``, ``onset[x]``,
``performed[x]`` / ``occurrence[x]``, ``authoredOn``, ``period`` / ``actualPeriod``,
``issued``, ``recordedDate`` / ``recorded``, ``dateAsserted``, ``date``; but never before it
was recorded (``issued``, ``recordedDate``: a lab resulted after the index time was not
known at it). A DocumentReference is placed by its ``date`` only.

* **A period counts from its end** (``effectivePeriod``, ``Encounter.period``,
  ``Procedure.performedPeriod``, ``Condition.onsetPeriod``...): an encounter that ended
  after the index time, or a medication taken until after it, is not known as it is written
  at the index time (its end is future information). **An open period** (a start, no end:
  an encounter in progress, a medication still taken) counts from its start: what it says
  (its code, that it began) was known then, and it says nothing about its end.
* A date without a time counts as the end of that day, a partial date (``2020``,
  ``2020-05``) as the end of that year or month, so an item is never placed earlier than it
  could have happened. Those days end in ``IngestConfig.site_timezone`` when it is set,
  else in UTC (as do the rare dateTimes written without a zone).

Resources dated after the index time are dropped with :func:`meddx.records.keep_available`;
undated clinical resources are dropped too (nothing says they were known at the index
time). Both are counted in meta.

**Retracted and never-happened resources** do not become features; they are counted in
``meta["dropped_by_status"]`` (and per ``Type/status`` in ``meta["dropped_by_status_detail"]``).
The table (:data:`RETRACTED_STATUSES`, R4/R4B and R5 codes):

=================== ==================== =====================================================
resource            element              dropped values
=================== ==================== =====================================================
Observation         status               entered-in-error, cancelled
Condition           verificationStatus   entered-in-error, refuted
Procedure           status               entered-in-error, not-done, preparation
Encounter           status               entered-in-error, cancelled, planned
MedicationRequest   status               entered-in-error, cancelled, draft; stopped (see below)
MedicationStatement status               entered-in-error, not-taken, intended, draft; stopped
DocumentReference   status, docStatus    entered-in-error
=================== ==================== =====================================================

We hold only the current version of each resource, so a status that says it has not
happened yet (``planned``, ``preparation``, ``draft``, ``intended``) means it had not happened
at the index time either. ``stopped`` medications are dropped when the stop is dated at or
before the index time (R5 ``MedicationRequest.statusChanged``, or the end of
``MedicationStatement.effectivePeriod``): the patient was no longer on them. A stop dated
after the index time, or not dated, keeps the medication (it was prescribed at the index
time). ``unknown`` statuses are kept: in every type read here FHIR defines ``unknown`` as
"the source does not know which status applies", not as "did not happen".

**Amended and corrected values.** An ``amended`` or ``corrected`` Observation (or an
``amended`` DocumentReference ``docStatus``) holds the value as corrected, and the value
known at the index time is not recoverable from the current version. Such a resource is
used only when the time this version was made available is known and at or before the
index time: ``Observation.issued`` (FHIR: "the date and time this version was made
available"), else ``meta.lastUpdated``; it then counts from that time. Without either it
is dropped and counted (``Observation/amended`` in ``dropped_by_status_detail``): the
correction may have come after the index time.

**Invalid resources.** A resource that fails validation (in a Bundle or a Bulk export) is
skipped and reported as a record warning (``meta["skipped_resources"]``); the rest of the
patient's EHR is read. Only when every resource of the patient fails is the read an error.

**What is kept.** Observations: numeric LOINC-coded values (and each component of a
panel such as blood pressure) converted to a canonical unit (:mod:`meddx.ingest.units`);
values that are not finite or outside the plausible range of their code
(:func:`meddx.ingest.units.is_plausible`) are masked: left out, counted in
``meta["implausible_values"]`` and reported in the record's warnings.
Conditions, MedicationRequests/Statements, Procedures and Encounters: ``system|code``
tokens. DocumentReference: ``text/plain`` attachments with inline ``data`` as note events.
Patient: ``sex`` and ``age_years`` at the index time in ``meta`` (never the birth date).
The events become fixed tensors in :class:`~meddx.ingest.ehr_tensorizer.EhrTensorizer`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from meddx.errors import IngestError, MeddxError
from meddx.fhirclient.ref import FhirRef
from meddx.ingest.base import Ingestor, IngestRequest, register_ingestor
from meddx.ingest.ehr_tensorizer import CODE_KINDS, EhrTensorizer
from meddx.ingest.fhir_bulk import BulkIndex, patient_reference_id
from meddx.ingest.file_checks import check_source
from meddx.ingest.units import is_plausible, to_canonical
from meddx.records import Event, Modality, ModalityRecord, keep_available, wall_time_to_utc

if TYPE_CHECKING:
    from pydantic import BaseModel

logger = logging.getLogger(__name__)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DEFAULT_VERSION = "4.0.1"  # R4: what Synthea and most EHR exports write

USED_TYPES: frozenset[str] = frozenset({"Patient", "Observation", "DocumentReference", *CODE_KINDS})

# the order in which time elements place a resource (see the module docstring)
TIME_FIELDS: tuple[str, ...] = (
    "effectiveDateTime",
    "effectiveInstant",
    "effectivePeriod",
    "onsetDateTime",
    "onsetPeriod",
    "performedDateTime",
    "performedPeriod",
    "occurrenceDateTime",
    "occurrencePeriod",
    "authoredOn",
    "period",
    "actualPeriod",
    "issued",
    "recordedDate",
    "recorded",
    "dateAsserted",
    "date",
)
TIME_FIELDS_BY_TYPE: dict[str, tuple[str, ...]] = {"DocumentReference": ("date",)}
# when a result or diagnosis was recorded; a resource is known no earlier than this
RECORDED_FIELDS: tuple[str, ...] = ("issued", "recordedDate", "recorded")

# Status values that say a resource was retracted or never happened, per type and element
# (see the module docstring). Condition.verificationStatus is a CodeableConcept: its codes count.
RETRACTED_STATUSES: dict[str, dict[str, frozenset[str]]] = {
    "Observation": {"status": frozenset({"entered-in-error", "cancelled"})},
    "Condition": {"verificationStatus": frozenset({"entered-in-error", "refuted"})},
    "Procedure": {"status": frozenset({"entered-in-error", "not-done", "preparation"})},
    "Encounter": {"status": frozenset({"entered-in-error", "cancelled", "planned"})},
    "MedicationRequest": {"status": frozenset({"entered-in-error", "cancelled", "draft"})},
    "MedicationStatement": {"status": frozenset({"entered-in-error", "not-taken", "intended", "draft"})},
    "DocumentReference": {"status": frozenset({"entered-in-error"}), "docStatus": frozenset({"entered-in-error"})},
}
# Statuses under which the current version's value may differ from the one known at the index time.
AMENDED_STATUSES: dict[str, tuple[str, frozenset[str]]] = {
    "Observation": ("status", frozenset({"amended", "corrected"})),
    "DocumentReference": ("docStatus", frozenset({"amended"})),
}

_PROFILE_VERSION = re.compile(
    r"^https?://hl7\.org/fhir/(\d+\.\d+(?:\.\d+)?|R\d+B?|DSTU\d|STU\d)/StructureDefinition/", re.IGNORECASE
)

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


# ---------------------------------------------------------------------- versions


class UnsupportedFhirVersion(ValueError):
    """A FHIR version meddx has no models for."""


def declared_version(resource: Mapping[str, Any]) -> str | None:
    """The FHIR version a resource declares about itself, or None.

    Example:
        >>> declared_version({"meta": {"profile": ["http://hl7.org/fhir/R5/StructureDefinition/Bundle"]}})
        'R5'
        >>> declared_version({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})
        '4.0.1'
    """
    version = resource.get("fhirVersion")
    if isinstance(version, str) and version.strip():
        return version.strip()
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    for profile in profiles if isinstance(profiles, list) else []:
        match = _PROFILE_VERSION.match(profile) if isinstance(profile, str) else None
        if match:
            return match.group(1)
    return None


def release_of(version: str) -> str:
    """The ``fhir.resources`` release (``"R4B"`` or ``"R5"``) that validates ``version``.

    Raises:
        UnsupportedFhirVersion: DSTU2, STU3 and any other version.

    Example:
        >>> release_of("4.0.1"), release_of("R5")
        ('R4B', 'R5')
    """
    if not isinstance(version, str):
        raise UnsupportedFhirVersion(f'FHIR version {version!r} is not a string; write it like "4.0.1"')
    v = version.strip().upper()
    if v in ("R4", "R4B") or v.startswith(("4.0", "4.3")):
        return "R4B"
    if v == "R5" or v.startswith("5.0"):
        return "R5"
    raise UnsupportedFhirVersion(
        f"FHIR version {version!r} is not supported; meddx reads R4/R4B (4.0.x, 4.3.x) and R5 (5.0.x). "
        "Convert the data (e.g. with a FHIR converter) or correct the declared version"
    )


@cache
def _model_class(release: str, resource_type: str) -> type[BaseModel]:
    # imported here: fhir.resources costs a noticeable fraction of a second at CLI start
    if release == "R5":
        from fhir.resources import get_fhir_model_class
    else:
        from fhir.resources.R4B import get_fhir_model_class
    return get_fhir_model_class(resource_type)


# ---------------------------------------------------------------------- parsing


@dataclass
class _Raw:
    """One resource as plain JSON, with where it came from (for messages) and its release."""

    data: dict[str, Any]
    where: str
    release: str


@dataclass
class _Parsed:
    resource_type: str
    model: Any
    time: datetime | None
    where: str


class _BadResource(ValueError):
    pass


def _label(data: Mapping[str, Any], where: str) -> str:
    kind = data.get("resourceType", "resource")
    rid = data.get("id")
    # a Patient's id is the patient's identifier: never put it in a message
    if kind != "Patient" and isinstance(rid, str) and rid:
        return f"{kind}/{rid} ({where})"
    return f"{kind} ({where})"


def _validate(raw: _Raw) -> Any:
    """The validated ``fhir.resources`` model of one resource.

    Raises:
        _BadResource: unknown type or a validation failure (fields and reasons, never values).
    """
    from pydantic import ValidationError

    data = dict(raw.data)
    data.pop("fhirVersion", None)  # a version note some exporters add; not an element of these types
    kind = data.get("resourceType")
    try:
        cls = _model_class(raw.release, str(kind))
    except ValueError:
        raise _BadResource(f"{_label(data, raw.where)}: unknown resourceType {kind!r} in FHIR {raw.release}") from None
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(resource)'}: {err['msg']}" for err in exc.errors()[:3]
        )
        more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise _BadResource(f"{_label(data, raw.where)} fails FHIR {raw.release} validation: {problems}{more}") from None


def _as_utc(value: Any, zone: tzinfo | None = None) -> datetime | None:
    """An aware UTC datetime from a FHIR date/dateTime/instant (latest instant it can mean).

    Zone-less values (dates, partial dates, a dateTime without an offset) are read in
    ``zone`` (the site time zone), else UTC.
    """
    zone = zone or timezone.utc
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            return wall_time_to_utc(value, zone)
        return value.astimezone(timezone.utc)
    if isinstance(value, date):
        return wall_time_to_utc(datetime.combine(value, time.max), zone)
    if isinstance(value, str):  # partial dates: "2020" or "2020-05"
        parts = value.split("-")
        try:
            year = int(parts[0])
            if len(parts) == 1:
                return wall_time_to_utc(datetime(year, 12, 31, 23, 59, 59, 999999), zone)
            month = int(parts[1])
            first_of_next = date(year + (month == 12), month % 12 + 1, 1)
            return wall_time_to_utc(datetime.combine(first_of_next, time.min) - timedelta(microseconds=1), zone)
        except (ValueError, IndexError):
            return None
    return None


def _first_time(model: Any, names: tuple[str, ...], zone: tzinfo | None = None) -> datetime | None:
    for name in names:
        value = getattr(model, name, None)
        if value is None:
            continue
        if hasattr(value, "start") and hasattr(value, "end"):  # a Period: known when it ended
            value = value.end or value.start  # an open period: known at its start (module docstring)
        when = _as_utc(value, zone)
        if when is not None:
            return when
    return None


def resource_time(model: Any, resource_type: str, zone: tzinfo | None = None) -> datetime | None:
    """When a validated resource became known, by the documented order of time elements.

    A period counts from its end (from its start when it is open). A lab drawn before
    the index time but resulted after it, or a condition with an onset before the index
    time but recorded after it, was not known at the index time: the later of "happened"
    and "recorded" (``issued``, ``recordedDate``) counts.

    Args:
        model: a validated ``fhir.resources`` model.
        resource_type: its type.
        zone: the site time zone for zone-less dates; None reads them as UTC.

    Example:
        >>> from fhir.resources.R4B.encounter import Encounter
        >>> enc = Encounter.model_validate({"resourceType": "Encounter", "status": "finished",
        ...     "class": {"code": "IMP"}, "period": {"start": "2024-03-01T08:00:00Z", "end": "2024-03-04T10:00:00Z"}})
        >>> resource_time(enc, "Encounter").isoformat()
        '2024-03-04T10:00:00+00:00'
    """
    happened = _first_time(model, TIME_FIELDS_BY_TYPE.get(resource_type, TIME_FIELDS), zone)
    if happened is None or resource_type in TIME_FIELDS_BY_TYPE:
        return happened
    recorded = _first_time(model, RECORDED_FIELDS, zone)
    return max(happened, recorded) if recorded is not None else happened


def _status_codes(model: Any, element: str) -> set[str]:
    value = getattr(model, element, None)
    if isinstance(value, str):
        return {value}
    return {c.code for c in getattr(value, "coding", None) or [] if c.code}  # a CodeableConcept


def status_verdict(model: Any, resource_type: str, index_time: datetime, zone: tzinfo | None = None) -> str | None:
    """Why a resource must not become a feature at ``index_time`` (``"Type/status"``), or None.

    Applies :data:`RETRACTED_STATUSES`, the ``stopped`` rule for medications and the
    ``amended``/``corrected`` rule (see the module docstring).

    Example:
        >>> from fhir.resources.R4B.procedure import Procedure
        >>> proc = Procedure.model_validate({"resourceType": "Procedure", "status": "not-done",
        ...                                  "subject": {"reference": "Patient/p1"}})
        >>> status_verdict(proc, "Procedure", datetime(2024, 1, 1, tzinfo=timezone.utc))
        'Procedure/not-done'
    """
    for element, dropped in RETRACTED_STATUSES.get(resource_type, {}).items():
        hit = sorted(_status_codes(model, element) & dropped)
        if hit:
            return f"{resource_type}/{hit[0]}"
    if resource_type in ("MedicationRequest", "MedicationStatement") and getattr(model, "status", None) == "stopped":
        period = getattr(model, "effectivePeriod", None)
        stopped = _as_utc(getattr(model, "statusChanged", None), zone) or _as_utc(getattr(period, "end", None), zone)
        if stopped is not None and stopped <= index_time:
            return f"{resource_type}/stopped"
    if resource_type in AMENDED_STATUSES and version_time(model, resource_type, zone) is None:
        element, amended = AMENDED_STATUSES[resource_type]
        hit = sorted(_status_codes(model, element) & amended)
        if hit:
            return f"{resource_type}/{hit[0]}"
    return None


def version_time(model: Any, resource_type: str, zone: tzinfo | None = None) -> datetime | None:
    """When the current version of a resource was made available: ``issued``, else ``meta.lastUpdated``."""
    issued = _as_utc(getattr(model, "issued", None), zone) if resource_type == "Observation" else None
    meta = getattr(model, "meta", None)
    return issued or _as_utc(getattr(meta, "lastUpdated", None), zone)


def _is_amended(model: Any, resource_type: str) -> bool:
    if resource_type not in AMENDED_STATUSES:
        return False
    element, amended = AMENDED_STATUSES[resource_type]
    return bool(_status_codes(model, element) & amended)


def _token(concept: Any) -> str | None:
    """``system|code`` of the first coding with both, in a CodeableConcept."""
    for coding in getattr(concept, "coding", None) or []:
        if coding.system and coding.code:
            return f"{coding.system}|{coding.code}"
    return None


def _loinc_code(concept: Any) -> str | None:
    for coding in getattr(concept, "coding", None) or []:
        if coding.system == LOINC and coding.code:
            return coding.code
    return None


# ---------------------------------------------------------------------- extraction


@dataclass
class _Demographics:
    sex: str = "unknown"
    age_years: int | None = None
    deceased_at_index: bool = False


def _quantity_event(when: datetime, loinc: str, quantity: Any, integer: Any, counts: Counter) -> Event | None:
    if quantity is not None and quantity.value is not None:
        value = float(quantity.value)
        unit = quantity.code if quantity.system == UCUM and quantity.code else (quantity.unit or quantity.code)
    elif integer is not None:
        value, unit = float(integer), ""
    else:
        return None
    if not math.isfinite(value):
        counts["implausible_values"] += 1
        return None
    canonical = to_canonical(loinc, value, unit)
    if canonical is None:
        counts["unconvertible_units"] += 1
        return None
    if not is_plausible(loinc, canonical[0]):  # 1e308 in one patient must not wreck everyone's statistics
        counts["implausible_values"] += 1
        return None
    return Event(when, "observation", f"{LOINC}|{loinc}", value=canonical[0], unit=canonical[1])


def _observation_events(model: Any, when: datetime, counts: Counter) -> list[Event]:
    events = []
    loinc = _loinc_code(model.code)
    if loinc:
        event = _quantity_event(when, loinc, model.valueQuantity, getattr(model, "valueInteger", None), counts)
        if event is not None:
            events.append(event)
    for component in model.component or []:
        code = _loinc_code(component.code)
        if code:
            event = _quantity_event(
                when, code, component.valueQuantity, getattr(component, "valueInteger", None), counts
            )
            if event is not None:
                events.append(event)
    if not events:
        counts["observations_without_value"] += 1
    return events


def _code_of(model: Any, resource_type: str) -> str | None:
    if resource_type in ("MedicationRequest", "MedicationStatement"):
        concept = getattr(model, "medicationCodeableConcept", None)  # R4/R4B
        if concept is None and getattr(model, "medication", None) is not None:  # R5 CodeableReference
            concept = model.medication.concept
        return _token(concept)
    if resource_type == "Encounter":
        for concept in model.type or []:
            token = _token(concept)
            if token:
                return token
        klass = model.class_fhir  # R4B: a Coding; R5: a list of CodeableConcepts
        if isinstance(klass, list):
            return next((t for t in map(_token, klass) if t), None)
        if klass is not None and klass.system and klass.code:
            return f"{klass.system}|{klass.code}"
        return None
    return _token(model.code)


def _note_events(model: Any, when: datetime, counts: Counter, where: str, warnings: list[str]) -> list[Event]:
    code = _token(model.type) or "DocumentReference"
    events = []
    for content in model.content or []:
        attachment = content.attachment
        if attachment is None:
            continue
        if attachment.data is None:
            if attachment.url:
                counts["url_only_attachments"] += 1
            continue
        mime, _, params = (attachment.contentType or "text/plain").partition(";")
        if mime.strip().lower() != "text/plain":
            counts["non_text_attachments"] += 1
            continue
        charset = "utf-8"
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip('"')
        try:
            text = bytes(attachment.data).decode(charset)
        except (LookupError, UnicodeDecodeError):
            counts["undecodable_attachments"] += 1
            label = f"DocumentReference/{model.id} ({where})"
            warnings.append(f"{label}: a text/plain attachment is not valid {charset}; skipped")
            continue
        events.append(Event(when, "note", code, text=text))
    return events


def _demographics(model: Any, index_time: datetime, warnings: list[str], zone: tzinfo | None = None) -> _Demographics:
    sex = model.gender if model.gender in ("male", "female", "other", "unknown") else "unknown"
    out = _Demographics(sex=sex)
    birth = model.birthDate
    if isinstance(birth, str):  # a partial birth date counts from its first day
        parts = [int(p) for p in birth.split("-")]
        birth = date(parts[0], parts[1] if len(parts) > 1 else 1, 1)
    if isinstance(birth, date):
        day = index_time.date()
        age = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
        if age < 0:
            warnings.append("the index time precedes the patient's birth date; age left unknown")
        else:
            out.age_years = age
    death = _as_utc(getattr(model, "deceasedDateTime", None), zone)
    out.deceased_at_index = death is not None and death <= index_time
    return out


# ---------------------------------------------------------------------- the ingestor


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
                raws = _bundle_raws(path, patient_id, types, modality)
        zone = self.config.site_zone()
        parsed: list[_Parsed] = []
        invalid: list[str] = []
        for raw in raws:
            try:
                model = _validate(raw)
            except _BadResource as bad:  # one bad resource does not fail the patient's EHR
                counts["skipped_resources"] += 1
                invalid.append(str(bad))
                warnings.append(f"skipped {bad}")
                continue
            kind = raw.data["resourceType"]
            when = resource_time(model, kind, zone)
            if when is not None and _is_amended(model, kind):
                known = version_time(model, kind, zone)
                when = max(when, known) if known is not None else when
            parsed.append(_Parsed(kind, model, when, raw.where))
        if invalid and not parsed:
            more = f" (and {len(invalid) - 1} more)" if len(invalid) > 1 else ""
            raise IngestError(shown, str(modality), f"no resource of the patient is valid FHIR: {invalid[0]}{more}")
        origin = _Origin(shown, modality, source_kind)
        return _build_record(origin, patient_id, index_time, parsed, counts, warnings, zone)

    # ------------------------------------------------------------------ FHIR server

    def _server_raws(self, ref: FhirRef, index_time: datetime, types: set[str], modality: Modality) -> list[_Raw]:
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
        return _entries_raws(bundle, str(ref), ref.patient_id, types, modality)

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
    ) -> list[_Raw]:
        try:
            index = self.bulk_index(root)
        except OSError as exc:
            raise IngestError(root, str(modality), f"cannot read the export: {exc.strerror or exc}") from None
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
        raws: list[_Raw] = []
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
                    warnings.append(f"skipped {_label(data, where)}: {exc}")
                    continue
                raws.append(_Raw(data, where, release))
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


def _bundle_raws(path: Path, patient_id: str, types: set[str], modality: Modality) -> list[_Raw]:
    return _entries_raws(_load_bundle(path, modality), path, patient_id, types, modality)


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


def _entries_raws(
    data: dict[str, Any], path: str | Path, patient_id: str, types: set[str], modality: Modality
) -> list[_Raw]:
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
            raise IngestError(path, mod, f"{_label(resource, f'entry {number}')}: {exc}") from None
        raws.append(_Raw(resource, f"entry {number}", release))
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


def _event_order(event: Event) -> tuple:
    value = event.value if event.value is not None else -math.inf
    time = cast(datetime, event.time)  # every event here is dated (built from a kept time)
    return (time, event.kind, event.code, value, event.unit or "", event.text or "")


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
    demographics = _Demographics()
    patient = next((p for p in parsed if p.resource_type == "Patient" and p.model.id == patient_id), None)
    if patient is not None:
        demographics = _demographics(patient.model, index_time, warnings, zone)
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
            events += _observation_events(item.model, when, counts)
        elif item.resource_type == "DocumentReference":
            events += _note_events(item.model, when, counts, item.where, warnings)
        else:
            code = _code_of(item.model, item.resource_type)
            if code is None:
                counts["uncoded_resources"] += 1
            else:
                events.append(Event(when, CODE_KINDS[item.resource_type], code))
    # Time order; events of the same time in a fixed order, so the record does not depend on the order the
    # resources were listed in (a Bundle's entries, a Bulk export's files, a server's search pages).
    events.sort(key=_event_order)
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
