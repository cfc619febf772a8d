"""When a DICOM file says it was acquired: the date and time rules, shared by the readers and the PACS query.

:func:`dicom_time` places an image in time by ``AcquisitionDateTime``, else
``AcquisitionDate``/``AcquisitionTime``, else ``SeriesDate``/``SeriesTime``, else
``StudyDate``/``StudyTime`` (enhanced multi-frame images: ``FrameAcquisitionDateTime`` per
frame first). DICOM times carry no zone. The zone they are read in is, in this order: an
offset inside a DT value (``20240305130000-0500``); ``TimezoneOffsetFromUTC`` (0008,0201);
the site time zone (``IngestConfig.site_timezone``, an IANA name, daylight saving included);
else UTC (what meddx always did; :func:`time_zone_rule` names the rule used, for
``record.meta``). A date without a time is taken as the end of that day, so a same-day image
is never assumed to precede the index time; a wall time that a daylight-saving change makes
ambiguous is the later of its two instants, for the same reason. :func:`latest_time` dates a
whole file (the latest of its own time and its frames' times).

The readers (:mod:`meddx.ingest.dicom_series`, :mod:`meddx.ingest.video`) and the DICOMweb
study query (:mod:`meddx.dicomweb.query`) read times here, so the query does not reach into a reader.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from meddx.records import wall_time_to_utc

_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")
_DT = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?([+-]\d{4})?$")
_END_OF_DAY = time(23, 59, 59, 999999)
_DATE_TIME_PAIRS = (("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime"))


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(getattr(value, "original_string", None) or value).strip()


def element_strings(ds: Dataset, keyword: str) -> list[str]:
    """The values of a text-encoded element (DS, IS, DA, TM, DT, UI, CS, SH) as strings.

    Reads the raw bytes when pydicom has not converted the element yet: building DSfloat
    and friends for every header field is a large share of the time to read a series.
    """
    element = ds.get_item(tag_for_keyword(keyword))  # type: ignore[arg-type]
    if element is None or element.value is None:
        return []
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        return [part.strip(" \x00") for part in bytes(value).decode("latin-1").split("\\")]
    if isinstance(value, (list, tuple, MultiValue)):
        return [_text(v) for v in value]
    return [_text(value)]


def first_value(ds: Dataset, keyword: str) -> str:
    """The first value of a text-encoded element as a string; ``""`` when absent."""
    values = element_strings(ds, keyword)
    return values[0] if values else ""


def _offset(text: str) -> timezone | None:
    match = re.fullmatch(r"([+-])(\d{2})(\d{2})", text.strip())
    if not match:
        return None
    sign = -1 if match.group(1) == "-" else 1
    return timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))


def _parse_da_tm(da: str, tm: str, zone: tzinfo) -> datetime | None:
    day = _DA.match(da)
    if not day:
        return None
    try:
        on = date(int(day.group(1)), int(day.group(2)), int(day.group(3)))
        clock = _END_OF_DAY
        match = _TM.match(tm) if tm else None
        if match:
            frac = (match.group(4) or "").ljust(6, "0")
            clock = time(int(match.group(1)), int(match.group(2) or 0), int(match.group(3) or 0), int(frac or 0))
    except ValueError:
        return None
    return wall_time_to_utc(datetime.combine(on, clock), zone)


def _parse_dt(dt: str, zone: tzinfo) -> datetime | None:
    match = _DT.match(dt)
    if not match:
        return None
    year, month, day, hour, minute, second, frac, offset = match.groups()
    try:
        on = date(int(year), int(month), int(day))
        clock = (
            _END_OF_DAY
            if hour is None
            else time(int(hour), int(minute or 0), int(second or 0), int((frac or "").ljust(6, "0") or 0))
        )
    except ValueError:
        return None
    return wall_time_to_utc(datetime.combine(on, clock), (_offset(offset) if offset else None) or zone)


def time_zone_rule(ds: Dataset, site_zone: tzinfo | None = None) -> str:
    """Which rule reads the zone-less times of a file: ``TimezoneOffsetFromUTC``, ``site``, or ``assumed UTC``.

    Example:
        >>> time_zone_rule(Dataset())
        'assumed UTC'
    """
    if _offset(first_value(ds, "TimezoneOffsetFromUTC")) is not None:
        return "TimezoneOffsetFromUTC"
    return "site" if site_zone is not None else "assumed UTC"


def dicom_time(ds: Dataset, frame_item: Dataset | None = None, site_zone: tzinfo | None = None) -> datetime | None:
    """When an image was acquired (aware UTC), or None when undated.

    The order is ``FrameAcquisitionDateTime`` (of ``frame_item``, an enhanced image's
    per-frame group), ``AcquisitionDateTime``, ``AcquisitionDate``/``Time``,
    ``SeriesDate``/``Time``, ``StudyDate``/``Time``. Zone-less values are read with
    ``TimezoneOffsetFromUTC`` when present, else in ``site_zone``, else as UTC; a date
    without a time means the end of that day.

    Example:
        >>> from zoneinfo import ZoneInfo
        >>> ds = Dataset(); ds.StudyDate = "20240305"; ds.StudyTime = "140000"
        >>> dicom_time(ds).isoformat()
        '2024-03-05T14:00:00+00:00'
        >>> dicom_time(ds, site_zone=ZoneInfo("Europe/Berlin")).isoformat()
        '2024-03-05T13:00:00+00:00'
    """
    zone = _zone_of(ds, site_zone)
    if frame_item is not None:
        content = frame_item.get("FrameContentSequence")
        if content:
            found = _parse_dt(first_value(content[0], "FrameAcquisitionDateTime"), zone)
            if found is not None:
                return found
    found = _parse_dt(first_value(ds, "AcquisitionDateTime"), zone)
    if found is not None:
        return found
    for date_kw, time_kw in _DATE_TIME_PAIRS:
        day = first_value(ds, date_kw)
        found = _parse_da_tm(day, first_value(ds, time_kw), zone) if day else None
        if found is not None:
            return found
    return None


def latest_time(ds: Dataset, site_zone: tzinfo | None = None) -> datetime | None:
    """When a whole file was complete: the latest of its own time and its frames' times, or None.

    A multi-frame file is one acquisition: it is dated by its last frame, never kept in part.

    Example:
        >>> ds = Dataset(); ds.AcquisitionDateTime = "20240305140000"
        >>> latest_time(ds).isoformat()
        '2024-03-05T14:00:00+00:00'
    """
    times = [dicom_time(ds, site_zone=site_zone)]
    for item in ds.get("PerFrameFunctionalGroupsSequence") or []:
        content = item.get("FrameContentSequence")
        if content:
            times.append(_parse_dt(first_value(content[0], "FrameAcquisitionDateTime"), _zone_of(ds, site_zone)))
    dated = [t for t in times if t is not None]
    return max(dated) if dated else None


def _zone_of(ds: Dataset, site_zone: tzinfo | None) -> tzinfo:
    return _offset(first_value(ds, "TimezoneOffsetFromUTC")) or site_zone or timezone.utc
