"""Which FHIR resources must not become features because of their status.

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
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

from meddx.ingest.fhir_times import as_utc, version_time

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
        >>> from datetime import timezone
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
        stopped = as_utc(getattr(model, "statusChanged", None), zone) or as_utc(getattr(period, "end", None), zone)
        if stopped is not None and stopped <= index_time:
            return f"{resource_type}/stopped"
    if resource_type in AMENDED_STATUSES and version_time(model, resource_type, zone) is None:
        element, amended = AMENDED_STATUSES[resource_type]
        hit = sorted(_status_codes(model, element) & amended)
        if hit:
            return f"{resource_type}/{hit[0]}"
    return None


def is_amended(model: Any, resource_type: str) -> bool:
    """Whether a resource's status says its value was amended or corrected (:data:`AMENDED_STATUSES`)."""
    if resource_type not in AMENDED_STATUSES:
        return False
    element, amended = AMENDED_STATUSES[resource_type]
    return bool(_status_codes(model, element) & amended)
