"""What a patient's FHIR resources become: dated events and the patient's demographics.

**What is kept.** Observations: numeric LOINC-coded values (and each component of a
panel such as blood pressure) converted to a canonical unit (:mod:`meddx.ingest.units`);
values that are not finite or outside the plausible range of their code
(:func:`meddx.ingest.units.is_plausible`) are masked: left out, counted in
``meta["implausible_values"]`` and reported in the record's warnings.
Conditions, MedicationRequests/Statements, Procedures and Encounters: ``system|code``
tokens. DocumentReference: ``text/plain`` attachments with inline ``data`` as note events.
Patient: ``sex`` and ``age_years`` at the index time in ``meta`` (never the birth date).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from typing import Any, cast

from meddx.ingest.fhir_times import as_utc
from meddx.ingest.units import is_plausible, to_canonical
from meddx.records import Event

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


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


@dataclass
class Demographics:
    """What the Patient resource says at the index time (never the birth date itself)."""

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


def observation_events(model: Any, when: datetime, counts: Counter) -> list[Event]:
    """The events of an Observation: its LOINC-coded value and those of its components."""
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


def code_of(model: Any, resource_type: str) -> str | None:
    """The ``system|code`` token of a Condition, medication, Procedure or Encounter, or None."""
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


def note_events(model: Any, when: datetime, counts: Counter, where: str, warnings: list[str]) -> list[Event]:
    """The note events of a DocumentReference: its inline ``text/plain`` attachments."""
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


def patient_demographics(
    model: Any, index_time: datetime, warnings: list[str], zone: tzinfo | None = None
) -> Demographics:
    """The sex, age at the index time and death by it of a Patient resource."""
    sex = model.gender if model.gender in ("male", "female", "other", "unknown") else "unknown"
    out = Demographics(sex=sex)
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
    death = as_utc(getattr(model, "deceasedDateTime", None), zone)
    out.deceased_at_index = death is not None and death <= index_time
    return out


def event_order(event: Event) -> tuple:
    """A sort key: time first, then a fixed order among the events of the same time."""
    value = event.value if event.value is not None else -math.inf
    time = cast(datetime, event.time)  # every event here is dated (built from a kept time)
    return (time, event.kind, event.code, value, event.unit or "", event.text or "")
