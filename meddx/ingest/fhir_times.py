"""When a FHIR resource became known: the time rules of the EHR reader.

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
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Any

from meddx.records import wall_time_to_utc

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


def as_utc(value: Any, zone: tzinfo | None = None) -> datetime | None:
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
        when = as_utc(value, zone)
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


def version_time(model: Any, resource_type: str, zone: tzinfo | None = None) -> datetime | None:
    """When the current version of a resource was made available: ``issued``, else ``meta.lastUpdated``."""
    issued = as_utc(getattr(model, "issued", None), zone) if resource_type == "Observation" else None
    meta = getattr(model, "meta", None)
    return issued or as_utc(getattr(meta, "lastUpdated", None), zone)
