"""FHIR time rules: periods count from their end, retracted statuses, amended values, site time zone.

Every Bundle here is a real R4 Bundle, validated with ``fhir.resources`` before it is read.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from meddx.config import IngestConfig
from meddx.ingest.fhir import FhirIngestor
from meddx.ingest.fhir_status import RETRACTED_STATUSES
from meddx.records import PatientRecord, parse_time

INDEX = datetime(2024, 3, 5, 14, tzinfo=timezone.utc)
PID = "T1"
SUBJECT = {"reference": f"Patient/{PID}"}
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"


def iso(delta_hours: float) -> str:
    """An instant ``delta_hours`` from the index time."""
    return (INDEX + timedelta(hours=delta_hours)).isoformat()


def encounter(rid: str, status: str = "finished", **times: Any) -> dict:
    return {
        "resourceType": "Encounter",
        "id": rid,
        "status": status,
        "subject": SUBJECT,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "type": [{"coding": [{"system": SNOMED, "code": f"1{len(rid)}{ord(rid[-1])}"}]}],
        **times,
    }


def condition(rid: str, verification: str = "confirmed", onset: str | None = None) -> dict:
    return {
        "resourceType": "Condition",
        "id": rid,
        "subject": SUBJECT,
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]
        },
        "code": {"coding": [{"system": SNOMED, "code": "233604007"}]},
        "onsetDateTime": onset or iso(-48),
    }


def observation(rid: str, status: str = "final", value: float = 12.0, **times: Any) -> dict:
    if not any(key.startswith("effective") for key in times):
        times["effectiveDateTime"] = iso(-5)
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": status,
        "subject": SUBJECT,
        "code": {"coding": [{"system": LOINC, "code": "1988-5"}]},
        "valueQuantity": {"value": value, "unit": "mg/L", "system": "http://unitsofmeasure.org", "code": "mg/L"},
        **times,
    }


def procedure(rid: str, status: str = "completed", **times: Any) -> dict:
    times = times or {"performedDateTime": iso(-3)}
    return {
        "resourceType": "Procedure",
        "id": rid,
        "status": status,
        "subject": SUBJECT,
        "code": {"coding": [{"system": SNOMED, "code": "399208008"}]},
        **times,
    }


def med_request(rid: str, status: str = "active") -> dict:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": status,
        "intent": "order",
        "subject": SUBJECT,
        "authoredOn": iso(-10),
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "1191"}]},
    }


def med_statement(rid: str, status: str = "active", **times: Any) -> dict:
    times = times or {"effectiveDateTime": iso(-10)}
    return {
        "resourceType": "MedicationStatement",
        "id": rid,
        "status": status,
        "subject": SUBJECT,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "29046"}]},
        **times,
    }


def document(rid: str, status: str = "current", doc_status: str | None = None) -> dict:
    doc = {
        "resourceType": "DocumentReference",
        "id": rid,
        "status": status,
        "subject": SUBJECT,
        "date": iso(-2),
        "content": [{"attachment": {"contentType": "text/plain", "data": "Q291Z2gu"}}],
    }
    if doc_status:
        doc["docStatus"] = doc_status
    return doc


def read(tmp_path: Path, *resources: dict, config: IngestConfig | None = None, index_time: datetime = INDEX):
    """Write an R4 Bundle of the patient and ``resources`` (validated first) and read it."""
    patient = {"resourceType": "Patient", "id": PID, "gender": "female", "birthDate": "1970-01-01"}
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in (patient, *resources)],
    }
    Bundle.model_validate(bundle)  # a real FHIR R4 Bundle, not something only meddx accepts
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    record = FhirIngestor(config).read_patient(path, PID, index_time)
    PatientRecord(PID, index_time).add(record)  # nothing after the index time reached the record
    return record


def kept_ids(record) -> dict[str, int]:
    return record.meta["resources"]


# ---------------------------------------------------------------------------- periods


def test_a_period_counts_from_its_end(tmp_path: Path) -> None:
    ended_before = encounter("e1", period={"start": iso(-30), "end": iso(-6)})
    ends_after = encounter("e2", period={"start": iso(-30), "end": iso(+6)})  # started before, ended after
    record = read(tmp_path, ended_before, ends_after)
    assert kept_ids(record).get("Encounter") == 1
    assert record.meta["dropped_after_index"] == 1
    assert [e.time for e in record.events if e.kind == "encounter"] == [parse_time(iso(-6))]


def test_an_open_period_counts_from_its_start(tmp_path: Path) -> None:
    in_progress = encounter("e1", status="in-progress", period={"start": iso(-4)})
    not_yet = encounter("e2", status="in-progress", period={"start": iso(+1)})
    record = read(tmp_path, in_progress, not_yet)
    assert [e.time for e in record.events] == [parse_time(iso(-4))]
    assert record.meta["dropped_after_index"] == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda end: procedure("p1", performedPeriod={"start": iso(-20), "end": end}),
        lambda end: med_statement("m1", status="completed", effectivePeriod={"start": iso(-200), "end": end}),
        lambda end: observation("o1", effectivePeriod={"start": iso(-20), "end": end}),
        lambda end: {**condition("c1"), "onsetDateTime": None, "onsetPeriod": {"start": iso(-90), "end": end}},
    ],
    ids=[
        "Procedure.performedPeriod",
        "MedicationStatement.effectivePeriod",
        "Observation.effectivePeriod",
        "Condition.onsetPeriod",
    ],
)
def test_every_kind_of_period_counts_from_its_end(tmp_path: Path, make) -> None:
    resource = make(iso(+2))
    resource = {k: v for k, v in resource.items() if v is not None}
    assert read(tmp_path, resource).meta["dropped_after_index"] == 1
    resource = {k: v for k, v in make(iso(-2)).items() if v is not None}
    record = read(tmp_path, resource)
    assert record.meta["dropped_after_index"] == 0
    assert record.time == parse_time(iso(-2))


def test_recorded_after_the_period_ended_still_counts_from_the_recording(tmp_path: Path) -> None:
    lab = observation("o1", effectivePeriod={"start": iso(-8), "end": iso(-6)}, issued=iso(+1))
    assert read(tmp_path, lab).meta["dropped_after_index"] == 1
    lab["issued"] = iso(-1)
    assert read(tmp_path, lab).time == parse_time(iso(-1))


# --------------------------------------------------------------------------- statuses


RETRACTED = [
    ("Observation", "entered-in-error", lambda s: observation("x", status=s)),
    ("Observation", "cancelled", lambda s: observation("x", status=s)),
    ("Condition", "entered-in-error", lambda s: condition("x", verification=s)),
    ("Condition", "refuted", lambda s: condition("x", verification=s)),
    ("Procedure", "entered-in-error", lambda s: procedure("x", status=s)),
    ("Procedure", "not-done", lambda s: procedure("x", status=s)),
    ("Procedure", "preparation", lambda s: procedure("x", status=s)),
    ("Encounter", "entered-in-error", lambda s: encounter("x", status=s, period={"start": iso(-3)})),
    ("Encounter", "cancelled", lambda s: encounter("x", status=s, period={"start": iso(-3)})),
    ("Encounter", "planned", lambda s: encounter("x", status=s, period={"start": iso(-3)})),
    ("MedicationRequest", "entered-in-error", lambda s: med_request("x", status=s)),
    ("MedicationRequest", "cancelled", lambda s: med_request("x", status=s)),
    ("MedicationRequest", "draft", lambda s: med_request("x", status=s)),
    ("MedicationStatement", "entered-in-error", lambda s: med_statement("x", status=s)),
    ("MedicationStatement", "not-taken", lambda s: med_statement("x", status=s)),
    ("MedicationStatement", "intended", lambda s: med_statement("x", status=s)),
    ("DocumentReference", "entered-in-error", lambda s: document("x", status=s)),
]


@pytest.mark.parametrize("kind,status,make", RETRACTED, ids=[f"{k}/{s}" for k, s, _ in RETRACTED])
def test_retracted_or_never_happened_resources_are_dropped_and_counted(tmp_path: Path, kind, status, make) -> None:
    record = read(tmp_path, make(status))
    assert record.events == []
    assert kind not in kept_ids(record)
    assert record.meta["dropped_by_status"] == 1
    assert record.meta["dropped_by_status_detail"] == {f"{kind}/{status}": 1}
    assert record.meta["dropped_after_index"] == 0


def test_the_status_table_is_the_one_tested() -> None:
    tested = {(k, s) for k, s, _ in RETRACTED}
    table = {(k, s) for k, elements in RETRACTED_STATUSES.items() for values in elements.values() for s in values}
    # R5-only codes (MedicationStatement "draft") and docStatus share their names with tested ones
    assert table - tested == {("MedicationStatement", "draft")}


def test_a_docstatus_entered_in_error_note_is_dropped(tmp_path: Path) -> None:
    record = read(tmp_path, document("d1", doc_status="entered-in-error"), document("d2"))
    assert [e.kind for e in record.events] == ["note"]
    assert record.meta["dropped_by_status_detail"] == {"DocumentReference/entered-in-error": 1}


def test_valid_statuses_are_kept(tmp_path: Path) -> None:
    record = read(
        tmp_path,
        observation("o1", status="preliminary"),
        condition("c1", verification="provisional"),
        procedure("p1", status="unknown"),
        encounter("e1", status="unknown", period={"start": iso(-3)}),
        med_request("m1", status="on-hold"),
        med_statement("m2", status="unknown"),
    )
    assert record.meta["dropped_by_status"] == 0
    assert record.meta["n_events"] == 6


def test_a_medication_stopped_before_the_index_time_is_dropped(tmp_path: Path) -> None:
    stopped_before = med_statement("m1", status="stopped", effectivePeriod={"start": iso(-300), "end": iso(-24)})
    record = read(tmp_path, stopped_before)
    assert record.events == []
    assert record.meta["dropped_by_status_detail"] == {"MedicationStatement/stopped": 1}
    # stopped at an unknown time: it was prescribed at the index time, and nothing says it had stopped
    record = read(tmp_path, med_request("m2", status="stopped"))
    assert [e.kind for e in record.events] == ["medication"]
    assert record.meta["dropped_by_status"] == 0


def test_an_r5_medication_request_stopped_after_the_index_time_is_kept(tmp_path: Path) -> None:
    def bundle(changed: str) -> dict:
        request = {
            "resourceType": "MedicationRequest",
            "id": "m1",
            "status": "stopped",
            "intent": "order",
            "subject": SUBJECT,
            "authoredOn": iso(-100),
            "statusChanged": changed,
            "medication": {"concept": {"coding": [{"system": RXNORM, "code": "1191"}]}},
        }
        return {
            "resourceType": "Bundle",
            "type": "collection",
            "meta": {"profile": ["http://hl7.org/fhir/5.0/StructureDefinition/Bundle"]},
            "entry": [{"resource": {"resourceType": "Patient", "id": PID}}, {"resource": request}],
        }

    from fhir.resources.bundle import Bundle as R5Bundle

    path = tmp_path / "r5.json"
    for changed, n_events in ((iso(+5), 1), (iso(-5), 0)):
        data = bundle(changed)
        R5Bundle.model_validate(data)
        path.write_text(json.dumps(data))
        record = FhirIngestor().read_patient(path, PID, INDEX)
        assert record.meta["n_events"] == n_events
        assert record.meta["dropped_by_status"] == 1 - n_events


# ------------------------------------------------------------------- amended values


def test_amended_and_corrected_values_need_a_version_time_at_or_before_the_index_time(tmp_path: Path) -> None:
    issued_before = observation("o1", status="amended", value=5.0, issued=iso(-1))
    issued_after = observation("o2", status="corrected", value=50.0, issued=iso(+1))
    no_version_time = observation("o3", status="amended", value=500.0)
    record = read(tmp_path, issued_before, issued_after, no_version_time)
    assert [e.value for e in record.events] == [5.0]
    assert record.meta["dropped_after_index"] == 1
    assert record.meta["dropped_by_status_detail"] == {"Observation/amended": 1}
    # meta.lastUpdated dates the version when there is no issued; the value counts from it
    last_updated = observation("o4", status="corrected", value=7.0, meta={"lastUpdated": iso(-0.5)})
    record = read(tmp_path, last_updated)
    assert [(e.value, e.time) for e in record.events] == [(7.0, parse_time(iso(-0.5)))]
    last_updated["meta"]["lastUpdated"] = iso(+0.5)
    assert read(tmp_path, last_updated).events == []


def test_an_amended_note_without_a_version_time_is_dropped(tmp_path: Path) -> None:
    record = read(tmp_path, document("d1", doc_status="amended"))
    assert record.events == []
    assert record.meta["dropped_by_status_detail"] == {"DocumentReference/amended": 1}
    dated = {**document("d1", doc_status="amended"), "meta": {"lastUpdated": iso(-1)}}
    assert read(tmp_path, dated).time == parse_time(iso(-1))


# --------------------------------------------------------------------- site time zone


def test_fhir_dates_without_a_time_end_in_the_site_time_zone(tmp_path: Path) -> None:
    # A condition dated 2024-03-05 (no time): by the end of that day in UTC it is 23:59:59Z; in
    # Tokyo the day ends at 14:59:59Z, in New York at 04:59:59Z the next day.
    dated = condition("c1", onset="2024-03-05")
    index = parse_time("2024-03-05T15:00:00Z")
    assert read(tmp_path, dated, index_time=index).meta["dropped_after_index"] == 1
    tokyo = read(tmp_path, dated, index_time=index, config=IngestConfig(site_timezone="Asia/Tokyo"))
    assert tokyo.time == parse_time("2024-03-05T14:59:59.999999Z")
    late = parse_time("2024-03-06T00:00:00Z")
    assert read(tmp_path, dated, index_time=late).meta["dropped_after_index"] == 0
    new_york = read(tmp_path, dated, index_time=late, config=IngestConfig(site_timezone="America/New_York"))
    assert new_york.meta["dropped_after_index"] == 1
