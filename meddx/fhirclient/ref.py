"""``fhir:`` references: a patient on the configured FHIR server (the EHR's REST API).

A manifest's ``ehr`` cell may read ``fhir:Patient/<id>``: the record is then read from the
server by searches for that patient's resources (:mod:`meddx.fhirclient.search`). The server
itself (URL, credentials) comes from the ingest config and the environment, never from the
manifest. This module is light (no network library): :mod:`meddx.cohort` parses with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "fhir:"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # the FHIR id datatype


@dataclass(frozen=True)
class FhirRef:
    """One patient on the FHIR server, by its logical ``Patient.id``.

    Example:
        >>> ref = parse_fhir_ref("fhir:Patient/p-17")
        >>> ref.patient_id, str(ref)
        ('p-17', 'fhir:Patient/p-17')
    """

    patient_id: str

    def __str__(self) -> str:
        return f"{PREFIX}Patient/{self.patient_id}"


def is_fhir_ref(value: object) -> bool:
    """Whether a manifest cell names a FHIR server source (starts with ``fhir:``)."""
    return isinstance(value, str) and value.strip().lower().startswith(PREFIX)


def parse_fhir_ref(text: str) -> FhirRef:
    """Parse ``fhir:Patient/<id>``.

    Raises:
        ValueError: the text is not such a reference; the message says how to write one.

    Example:
        >>> parse_fhir_ref("fhir:Patient/123")
        FhirRef(patient_id='123')
    """
    body = text.strip()[len(PREFIX) :].strip().rstrip("/")
    kind, _, rid = body.partition("/")
    if kind != "Patient" or not _ID.match(rid):
        raise ValueError(
            f"{text.strip()!r} is not a FHIR patient reference; write fhir:Patient/<id> (the Patient's logical id:"
            " letters, digits, '-' and '.', at most 64)"
        )
    return FhirRef(rid)
