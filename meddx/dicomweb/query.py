"""A cohort manifest from a PACS query (``meddx pacs manifest``): one row per study found by QIDO-RS.

Each row is ``patient_id`` (the study's PatientID), ``index_time`` and
``imaging = dicomweb:studies/<StudyInstanceUID>``, ready for ingestion and diagnosis.

**The index time** is the study's date and time (``StudyDate``/``StudyTime``, read in
``TimezoneOffsetFromUTC`` when the server gives it, else in ``IngestConfig.site_timezone``,
else as UTC; a date without a time is the end of that day) plus ``index_offset`` (60
minutes by default). The offset matters: a study's images are acquired after the study
starts, and the leakage rule drops every series acquired after the index time, so an
index time at the study's start would see no image.

Studies without a PatientID or a StudyDate are left out and counted, never logged by value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.config import DicomWebConfig
from meddx.dicomweb.client import describe_failure, open_session, server_url
from meddx.dicomweb.ref import DicomWebRef, is_uid
from meddx.errors import MeddxError

if TYPE_CHECKING:
    from meddx.dicomweb.guard import GuardedSession

logger = logging.getLogger(__name__)

_STUDY_FIELDS = ["PatientID", "StudyDate", "StudyTime", "TimezoneOffsetFromUTC", "ModalitiesInStudy"]


class PacsQueryError(MeddxError):
    """A PACS query failed (server unreachable, refused, or an error answer); the message says why."""


@dataclass
class PacsManifest:
    """The rows a query found, and how many studies were left out and why."""

    rows: list[dict[str, str]]
    n_studies: int
    skipped: dict[str, int] = field(default_factory=dict)

    def write(self, path: str | Path) -> Path:
        """Write the rows as a manifest CSV (``patient_id,index_time,imaging``), header even when empty."""
        import pandas as pd

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.rows, columns=["patient_id", "index_time", "imaging"]).to_csv(path, index=False)
        return path


def _value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def study_time(item: dict[str, Any], site_zone: tzinfo | None) -> datetime | None:
    """When a study (a QIDO-RS JSON answer) took place, aware UTC; None without a StudyDate.

    Example:
        >>> study_time({"00080020": {"vr": "DA", "Value": ["20240305"]},
        ...             "00080030": {"vr": "TM", "Value": ["091500"]}}, None).isoformat()
        '2024-03-05T09:15:00+00:00'
    """
    from pydicom.dataset import Dataset

    from meddx.dicom_times import dicom_time

    ds = Dataset()
    for tag, keyword in (("00080020", "StudyDate"), ("00080030", "StudyTime"), ("00080201", "TimezoneOffsetFromUTC")):
        value = _value(item, tag)
        if value:
            setattr(ds, keyword, str(value))
    if "StudyDate" not in ds:
        return None
    return dicom_time(ds, site_zone=site_zone)


def query_studies(
    session: GuardedSession, modality: str, since: date, until: date | None = None, page_size: int = 500
) -> list[dict[str, Any]]:
    """QIDO-RS: the studies holding ``modality`` whose StudyDate lies in ``[since, until]`` (all pages).

    Pages are asked for with ``limit`` and ``offset`` (``dicomweb-client``'s own paging sends
    ``offset`` alone, which some servers ignore, repeating the first page forever); a page
    that repeats an earlier study ends the paging. Each page is held to ``dicomweb.max_json_mb``.

    Example:
        >>> query_studies(open_session(config), "CT", date(2024, 3, 1))  # doctest: +SKIP
    """
    from meddx.dicomweb.guard import get_json

    dates = f"{since:%Y%m%d}-{until:%Y%m%d}" if until else f"{since:%Y%m%d}-"
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    while True:
        page = get_json(
            session,
            f"{session.limits.base_url}/studies",
            {
                "includefield": _STUDY_FIELDS,
                "limit": page_size,
                "offset": len(found),
                "ModalitiesInStudy": modality.upper(),
                "StudyDate": dates,
            },
        )
        fresh = [item for item in page if str(_value(item, "0020000D")) not in seen]
        found += fresh
        seen.update(str(_value(item, "0020000D")) for item in fresh)
        if len(page) < page_size or len(fresh) < len(page):
            return found


def pacs_manifest(
    config: DicomWebConfig,
    modality: str,
    since: date,
    until: date | None = None,
    site_zone: tzinfo | None = None,
    index_offset: timedelta = timedelta(minutes=60),
) -> PacsManifest:
    """Query the configured PACS and make one manifest row per study found.

    Args:
        config: the ``dicomweb`` section of the ingest config (server URL, credentials' variables).
        modality: a DICOM Modality the studies must hold (``CT``, ``MR``, ``CR``...).
        since: first StudyDate (inclusive).
        until: last StudyDate (inclusive); None: no upper bound.
        site_zone: the zone of study times without ``TimezoneOffsetFromUTC``.
        index_offset: added to the study's time to make the index time (see the module docstring).

    Raises:
        PacsQueryError: the server cannot be reached or refused the query.
        ConfigError: no server configured.

    Example:
        >>> found = pacs_manifest(DicomWebConfig(url="http://127.0.0.1:8042/dicom-web"), "CT",
        ...                       date(2024, 3, 1))  # doctest: +SKIP
        >>> found.write("manifest.csv")  # doctest: +SKIP
    """
    import requests

    from meddx.dicomweb.guard import AnswerError

    url = server_url(config)
    try:
        studies = query_studies(open_session(config, url), modality, since, until)
    except (requests.RequestException, AnswerError) as exc:
        raise PacsQueryError(describe_failure(exc, config, url)) from None
    rows: list[dict[str, str]] = []
    skipped = {"no PatientID": 0, "no StudyDate": 0, "invalid StudyInstanceUID": 0, "same patient and time": 0}
    seen: set[tuple[str, datetime]] = set()
    for item in sorted(studies, key=lambda s: str(_value(s, "0020000D") or "")):
        uid = str(_value(item, "0020000D") or "")
        patient = str(_value(item, "00100020") or "").strip()
        when = study_time(item, site_zone)
        if not is_uid(uid):
            skipped["invalid StudyInstanceUID"] += 1
        elif not patient:
            skipped["no PatientID"] += 1
        elif when is None:
            skipped["no StudyDate"] += 1
        elif (patient, when) in seen:  # a manifest holds one row per patient and index time
            skipped["same patient and time"] += 1
        else:
            seen.add((patient, when))
            index_time = (when + index_offset).astimezone(timezone.utc)
            rows.append(
                {
                    "patient_id": patient,
                    "index_time": index_time.isoformat().replace("+00:00", "Z"),
                    "imaging": str(DicomWebRef(uid)),
                }
            )
    rows.sort(key=lambda r: (r["index_time"], r["patient_id"]))
    skipped = {why: n for why, n in skipped.items() if n}
    for why, n in skipped.items():
        logger.warning("pacs manifest: %d stud%s left out (%s)", n, "y" if n == 1 else "ies", why)
    return PacsManifest(rows=rows, n_studies=len(studies), skipped=skipped)
