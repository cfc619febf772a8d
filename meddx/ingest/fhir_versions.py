"""Which FHIR version a resource is written in, and its validated ``fhir.resources`` model.

**Which FHIR version.** The nearest declaration wins: the resource's own, then its
container's (the Bundle, or the export folder's CapabilityStatement), else R4. A
declaration is a ``fhirVersion`` element (CapabilityStatement, or the key some exporters
add to a resource), or a versioned core profile in ``meta.profile``
(``http://hl7.org/fhir/4.0/StructureDefinition/...``, ``.../R5/...``). 4.0.x, 4.3.x,
R4 and R4B are validated with ``fhir.resources.R4B``; 5.0.x and R5 with the top-level
``fhir.resources`` models (R5). Any other version (DSTU2 ``1.0.2``, STU3 ``3.0.x``...)
is refused with an :class:`~meddx.errors.IngestError`.

A resource that fails validation raises :class:`BadResource` (fields and reasons, never
values); :class:`~meddx.ingest.fhir.FhirIngestor` skips it and reports it as a record warning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

DEFAULT_VERSION = "4.0.1"  # R4: what Synthea and most EHR exports write

_PROFILE_VERSION = re.compile(
    r"^https?://hl7\.org/fhir/(\d+\.\d+(?:\.\d+)?|R\d+B?|DSTU\d|STU\d)/StructureDefinition/", re.IGNORECASE
)


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


@dataclass
class RawResource:
    """One resource as plain JSON, with where it came from (for messages) and its release."""

    data: dict[str, Any]
    where: str
    release: str


class BadResource(ValueError):
    """A resource of an unknown type, or one that fails validation."""


def resource_label(data: Mapping[str, Any], where: str) -> str:
    """``Type/id (where)`` for messages; a Patient without its id."""
    kind = data.get("resourceType", "resource")
    rid = data.get("id")
    # a Patient's id is the patient's identifier: never put it in a message
    if kind != "Patient" and isinstance(rid, str) and rid:
        return f"{kind}/{rid} ({where})"
    return f"{kind} ({where})"


def validate_resource(raw: RawResource) -> Any:
    """The validated ``fhir.resources`` model of one resource.

    Raises:
        BadResource: unknown type or a validation failure (fields and reasons, never values).
    """
    from pydantic import ValidationError

    data = dict(raw.data)
    data.pop("fhirVersion", None)  # a version note some exporters add; not an element of these types
    kind = data.get("resourceType")
    try:
        cls = _model_class(raw.release, str(kind))
    except ValueError:
        raise BadResource(
            f"{resource_label(data, raw.where)}: unknown resourceType {kind!r} in FHIR {raw.release}"
        ) from None
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(resource)'}: {err['msg']}" for err in exc.errors()[:3]
        )
        more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise BadResource(
            f"{resource_label(data, raw.where)} fails FHIR {raw.release} validation: {problems}{more}"
        ) from None
