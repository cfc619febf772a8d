"""A cohort manifest from the FHIR server (``meddx fhir manifest``): one row per Encounter found.

The server is searched for Encounters of a class (``IMP`` for inpatient stays, ``EMER``,
``AMB``...) whose period touches ``[since, until]`` (``Encounter?class=<code>&date=ge..&date=le..``,
every page followed); the rows are the Encounters that **start** in that range. Each row is
``patient_id`` (the Patient's logical id), ``index_time`` (the start plus ``index_offset``, 24 hours
by default: a prediction a day into the stay), ``ehr = fhir:Patient/<id>`` and ``encounter``
(``Encounter/<id>``, kept in the predictions as an extra column).

A start without a time zone is read in ``IngestConfig.site_timezone`` (else UTC); a start that
is a date only counts from the end of that day, as the EHR reader places it. Encounters without
a Patient subject or a start, entered in error, cancelled or planned, or giving a patient and
index time already taken, are left out and counted, never logged by value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

from meddx.config import FhirServerConfig
from meddx.fhirclient.client import FhirClient
from meddx.fhirclient.ref import FhirRef, parse_fhir_ref

logger = logging.getLogger(__name__)

COLUMNS = ["patient_id", "index_time", "ehr", "encounter"]
NOT_HAPPENED = frozenset({"entered-in-error", "cancelled", "planned"})


@dataclass
class FhirManifest:
    """The rows a search found, and how many Encounters were left out and why."""

    rows: list[dict[str, str]]
    n_encounters: int
    skipped: dict[str, int] = field(default_factory=dict)

    def write(self, path: str | Path) -> Path:
        """Write the rows as a manifest CSV (``patient_id,index_time,ehr,encounter``), header even when empty."""
        import pandas as pd

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.rows, columns=COLUMNS).to_csv(path, index=False)
        return path


def encounter_start(encounter: dict[str, Any], site_zone: tzinfo | None) -> datetime | None:
    """When an Encounter began (``period.start``, R5 ``actualPeriod.start``), aware UTC; None without one.

    Example:
        >>> encounter_start({"period": {"start": "2024-03-05T09:15:00+01:00"}}, None).isoformat()
        '2024-03-05T08:15:00+00:00'
        >>> encounter_start({"period": {"start": "2024-03-05"}}, None).isoformat()
        '2024-03-05T23:59:59.999999+00:00'
    """
    from meddx.records import wall_time_to_utc

    period = encounter.get("period") or encounter.get("actualPeriod")
    start = period.get("start") if isinstance(period, dict) else None
    if not isinstance(start, str) or len(start) < 10:
        return None
    try:
        if len(start) == 10:  # a date: the end of that day
            return wall_time_to_utc(datetime.combine(date.fromisoformat(start), time.max), site_zone or timezone.utc)
        moment = datetime.fromisoformat(start.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return wall_time_to_utc(moment, site_zone or timezone.utc)
    return moment.astimezone(timezone.utc)


def _patient_of(encounter: dict[str, Any]) -> FhirRef | None:
    ref = (encounter.get("subject") or {}).get("reference") if isinstance(encounter.get("subject"), dict) else None
    if not isinstance(ref, str) or not ref.startswith("Patient/"):
        return None
    try:
        return parse_fhir_ref(f"fhir:{ref.split('/_history')[0]}")
    except ValueError:
        return None


def fhir_manifest(
    config: FhirServerConfig,
    encounter_class: str,
    since: date,
    until: date | None = None,
    site_zone: tzinfo | None = None,
    index_offset: timedelta = timedelta(hours=24),
) -> FhirManifest:
    """Search the configured FHIR server and make one manifest row per Encounter that starts in the range.

    Args:
        config: the ``fhir`` section of the ingest config.
        encounter_class: the Encounter class code (v3 ActCode ``IMP``, ``EMER``, ``AMB``...).
        since: first start date (inclusive). until: last start date (inclusive); None: no bound.
        site_zone: the zone of starts written without one.
        index_offset: added to the start to make the index time.

    Raises:
        FhirRequestError: the search failed. FhirAuthError: refused credentials. ConfigError: no server.

    Example:
        >>> found = fhir_manifest(FhirServerConfig(url="http://127.0.0.1:8103/fhir/R4"), "IMP",
        ...                       date(2024, 3, 1))  # doctest: +SKIP
        >>> found.write("manifest.csv")  # doctest: +SKIP
    """
    zone = site_zone or timezone.utc
    low = datetime.combine(since, time.min, zone).astimezone(timezone.utc)
    high = datetime.combine(until, time.max, zone).astimezone(timezone.utc) if until is not None else None
    params: dict[str, Any] = {"class": encounter_class, "_count": config.page_size}
    # the period touches the range: it ended on or after since, and (with until) started on or before it
    dates = [f"ge{low:%Y-%m-%dT%H:%M:%SZ}"] + ([f"le{high:%Y-%m-%dT%H:%M:%SZ}"] if high is not None else [])
    params["date"] = dates
    client = FhirClient(config)
    encounters = []
    for page in client.search("Encounter", params):
        for entry in page.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "Encounter":
                encounters.append(resource)
    skipped = {"no Patient subject": 0, "no start": 0, "did not happen": 0, "starts outside the range": 0,
               "same patient and time": 0}  # fmt: skip
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, datetime]] = set()
    for encounter in sorted(encounters, key=lambda e: str(e.get("id") or "")):
        ref = _patient_of(encounter)
        start = encounter_start(encounter, site_zone)
        if encounter.get("status") in NOT_HAPPENED:
            skipped["did not happen"] += 1
        elif ref is None:
            skipped["no Patient subject"] += 1
        elif start is None:
            skipped["no start"] += 1
        elif start < low or (high is not None and start > high):
            skipped["starts outside the range"] += 1
        elif (ref.patient_id, start) in seen:
            skipped["same patient and time"] += 1
        else:
            seen.add((ref.patient_id, start))
            rows.append(
                {
                    "patient_id": ref.patient_id,
                    "index_time": (start + index_offset).isoformat().replace("+00:00", "Z"),
                    "ehr": str(ref),
                    "encounter": f"Encounter/{encounter.get('id')}",
                }
            )
    rows.sort(key=lambda r: (r["index_time"], r["patient_id"]))
    skipped = {why: n for why, n in skipped.items() if n}
    for why, n in skipped.items():
        logger.warning("fhir manifest: %d encounter%s left out (%s)", n, "" if n == 1 else "s", why)
    return FhirManifest(rows=rows, n_encounters=len(encounters), skipped=skipped)
