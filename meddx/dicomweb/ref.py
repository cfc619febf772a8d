"""``dicomweb:`` references: a study or series on the configured DICOMweb server (PACS).

A manifest's ``imaging`` cell may read ``dicomweb:studies/<StudyInstanceUID>`` or
``dicomweb:studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``. The server itself
(URL, credentials) comes from the ingest config and the environment, never from the
manifest. This module is light (no network library): :mod:`meddx.cohort` parses with it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

PREFIX = "dicomweb:"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_REF = re.compile(r"^studies/(?P<study>[^/]+)(?:/series/(?P<series>[^/]+))?/?$")


def is_uid(text: str) -> bool:
    """Whether ``text`` is a DICOM UID: digits and dots, at most 64 characters.

    Example:
        >>> is_uid("1.2.840.10008.5.1.4.1.1.2"), is_uid("../etc")
        (True, False)
    """
    return len(text) <= 64 and bool(_UID.match(text))


@dataclass(frozen=True)
class DicomWebRef:
    """A study (the series is chosen by ``ImagingConfig.series_rule``) or one series on the PACS.

    Example:
        >>> ref = parse_dicomweb_ref("dicomweb:studies/1.2.3/series/1.2.3.4")
        >>> ref.study_uid, ref.series_uid, str(ref)
        ('1.2.3', '1.2.3.4', 'dicomweb:studies/1.2.3/series/1.2.3.4')
    """

    study_uid: str
    series_uid: str | None = None

    def __str__(self) -> str:
        text = f"{PREFIX}studies/{self.study_uid}"
        return f"{text}/series/{self.series_uid}" if self.series_uid else text


def is_dicomweb_ref(value: object) -> bool:
    """Whether a manifest cell names a DICOMweb source (starts with ``dicomweb:``)."""
    return isinstance(value, str) and value.strip().lower().startswith(PREFIX)


def parse_dicomweb_ref(text: str) -> DicomWebRef:
    """Parse ``dicomweb:studies/<uid>[/series/<uid>]``.

    Raises:
        ValueError: the text is not such a reference; the message says how to write one.

    Example:
        >>> parse_dicomweb_ref("dicomweb:studies/1.2.3")
        DicomWebRef(study_uid='1.2.3', series_uid=None)
    """
    body = text.strip()[len(PREFIX) :]
    match = _REF.match(body)
    if match is None:
        raise ValueError(
            f"{text.strip()!r} is not a DICOMweb reference; write dicomweb:studies/<StudyInstanceUID>"
            " or dicomweb:studies/<StudyInstanceUID>/series/<SeriesInstanceUID>"
        )
    study, series = match.group("study"), match.group("series")
    for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if uid is not None and not is_uid(uid):
            raise ValueError(f"{uid!r} is not a {name} (digits and dots, at most 64 characters)")
    return DicomWebRef(study, series)


def server_id(url: str) -> str:
    """A short, stable name of a DICOMweb server for cache keys and folders: a hash of its base URL.

    The scheme, host, port and path count (two services on one host differ); letter case of
    the host and a trailing slash do not. Credentials never appear in a URL meddx accepts.

    Example:
        >>> server_id("http://PACS:8042/dicom-web/") == server_id("http://pacs:8042/dicom-web")
        True
    """
    parts = urlsplit(url.strip())
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    canonical = f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def display_url(url: str) -> str:
    """``scheme://host:port/path`` of a URL, for messages (no query, never credentials).

    Example:
        >>> display_url("http://127.0.0.1:8042/dicom-web?x=1")
        'http://127.0.0.1:8042/dicom-web'
    """
    parts = urlsplit(url.strip())
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path.rstrip('/')}"
