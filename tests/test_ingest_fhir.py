"""The EHR (FHIR) ingestor and tensorizer, on a real Synthea Bulk export and on generated Bundles."""

from __future__ import annotations

import copy
import json
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from meddx.config import EhrConfig, IngestConfig
from meddx.errors import ConfigError, IngestError, NotFittedError
from meddx.ingest.base import IngestRequest
from meddx.ingest.ehr_tensorizer import EhrTensorizer
from meddx.ingest.fhir import FhirIngestor
from meddx.ingest.fhir_versions import declared_version, release_of
from meddx.ingest.registry import registered_ingestors
from meddx.ingest.units import convert, to_canonical
from meddx.records import Modality, PatientRecord, parse_time
from meddx.synth import DISEASE_SNOMED, write_fhir_bundle

SYNTHEA = Path(__file__).resolve().parent / "data" / "synthea-bulk"
INDEX = parse_time("2020-01-01T00:00:00Z")
GEN_INDEX = datetime(2024, 3, 5, 14, tzinfo=timezone.utc)
DECEASED = {"3af3708d-41f1-cd80-f3dd-ec5ac76072bf"}  # born 1960-04-13, died 1971-10-01
SMALL = IngestConfig(ehr=EhrConfig(lookback_days=4.0, n_bins=4, n_lab_features=6, max_codes=8, code_vocab_size=16))


def _patient_ids(folder: Path) -> list[str]:
    with open(folder / "Patient.000.ndjson") as handle:
        return [json.loads(line)["id"] for line in handle]


@pytest.fixture(scope="module")
def synthea_records():
    reader = FhirIngestor()
    return {pid: reader.read_patient(SYNTHEA, pid, INDEX) for pid in _patient_ids(SYNTHEA)}


# ------------------------------------------------------------------- Synthea Bulk export


def test_ehr_is_the_registered_reader() -> None:
    assert registered_ingestors()[Modality.EHR] is FhirIngestor


def test_synthea_export_every_patient_yields_tokens_and_notes(synthea_records) -> None:
    assert len(synthea_records) == 4
    for pid, record in synthea_records.items():
        PatientRecord(pid, INDEX).add(record)  # raises if anything after the index time got through
        kinds = {e.kind for e in record.events}
        assert {"condition", "procedure", "encounter", "note"} <= kinds, pid
        assert all(e.time is not None and e.time <= INDEX for e in record.events)
        assert record.time == max(e.time for e in record.events)
        assert record.meta["sex"] in ("female", "male")
        assert record.meta["skipped_resources"] == 0
        assert "birthDate" not in json.dumps(record.meta)
    deceased = {pid for pid, r in synthea_records.items() if r.meta["deceased_at_index"]}
    assert deceased == DECEASED
    # ages at the index time, also for the deceased (born 1960-04-13)
    assert [synthea_records[pid].meta["age_years"] for pid in sorted(DECEASED)] == [59]


def test_synthea_export_resource_counts_at_the_index_time(synthea_records) -> None:
    # Expected numbers counted once with plain json and the same time rule (onsetDateTime,
    # period.start, authoredOn, performedPeriod.start, date <= 2020-01-01T00:00:00Z).
    kept: dict[str, int] = {}
    dropped = 0
    for record in synthea_records.values():
        for kind, n in record.meta["resources"].items():
            kept[kind] = kept.get(kind, 0) + n
        dropped += record.meta["dropped_after_index"]
    assert kept == {
        "Condition": 86,
        "DocumentReference": 98,
        "Encounter": 98,
        "MedicationRequest": 96,
        "Patient": 4,
        "Procedure": 123,
    }
    assert dropped == 48
    # the export has no Observation file: no lab values
    assert not any(e.kind == "observation" for r in synthea_records.values() for e in r.events)


def test_a_deceased_patient_earlier_in_life() -> None:
    pid = "3af3708d-41f1-cd80-f3dd-ec5ac76072bf"  # born 1960-04-13, died 1971
    record = FhirIngestor().read_patient(SYNTHEA, pid, parse_time("1965-01-01T00:00:00Z"))
    assert record.meta["resources"] == {
        "Condition": 1,
        "DocumentReference": 6,
        "Encounter": 6,
        "Patient": 1,
        "Procedure": 4,
    }
    assert record.meta["age_years"] == 4
    assert record.meta["deceased_at_index"] is False
    assert max(e.time for e in record.events) <= parse_time("1965-01-01T00:00:00Z")


def test_tensorizer_on_the_synthea_export(synthea_records) -> None:
    records = list(synthea_records.values())
    tensorizer = EhrTensorizer(IngestConfig()).fit(records[:3])
    spec = tensorizer.spec()
    for record in records:
        arrays = tensorizer.transform(record)
        for name, (shape, dtype, *_) in spec.items():
            assert arrays[name].shape == shape, name
            assert arrays[name].dtype == np.dtype(dtype), name
        assert not arrays["lab_mask"].any()  # no Observations in this export
        n = int(arrays["code_mask"].sum())
        assert n > 0
        assert (arrays["code_ids"][:n] > 0).all()
        assert (arrays["code_ids"][n:] == 0).all()
        assert np.all(np.diff(arrays["code_age_hours"][:n]) >= 0)  # newest first
    # the last patient was not in the fit: some of its codes are out of vocabulary (id 1)
    unseen = [tensorizer.transform(r)["code_ids"] for r in records[3:]]
    assert any((ids == 1).any() for ids in unseen)


def test_the_bulk_index_is_built_once_and_rebuilt_when_a_file_changes(tmp_path: Path) -> None:
    folder = tmp_path / "bulk"
    folder.mkdir()
    for name in ("Patient.000.ndjson", "Condition.000.ndjson"):
        shutil.copy(SYNTHEA / name, folder / name)
    pid = "cbc86e51-9eca-3855-76ec-c058f72c5761"
    late = parse_time("2030-01-01T00:00:00Z")
    reader = FhirIngestor()
    first = reader.read_patient(folder, pid, late)
    index = reader.bulk_index(folder)
    reader.read_patient(folder, pid, late)
    assert reader.bulk_index(folder) is index
    assert first.meta["resources"] == {"Condition": 21, "Patient": 1}

    extra = json.loads((folder / "Condition.000.ndjson").read_text().splitlines()[0])
    extra.update(id="extra-condition", subject={"reference": f"urn:uuid:{pid}"})
    with open(folder / "Condition.000.ndjson", "a") as handle:
        handle.write(json.dumps(extra) + "\n")
    again = reader.read_patient(folder, pid, late)
    assert reader.bulk_index(folder) is not index
    assert again.meta["resources"] == {"Condition": 22, "Patient": 1}


def test_a_broken_line_in_an_ndjson_export_is_skipped_and_reported(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "bulk"
    folder.mkdir()
    shutil.copy(SYNTHEA / "Encounter.000.ndjson", folder / "Encounter.000.ndjson")
    pid = "cbc86e51-9eca-3855-76ec-c058f72c5761"
    lines = (SYNTHEA / "Condition.000.ndjson").read_text().splitlines()
    # lines of this patient past the first (a torn first line has its own test below)
    mine = [i for i, line in enumerate(lines) if pid in line and i > 0]
    lines[mine[0]] = lines[mine[0]][:-40]  # truncated: not JSON any more
    bad = json.loads(lines[mine[1]])
    bad["onsetDateTime"] = "yesterday"  # JSON, but not a FHIR dateTime
    lines[mine[1]] = json.dumps(bad)
    other = json.loads(lines[mine[2]])
    other["subject"] = {"reference": f"urn:uuid:{pid}"}  # another reference form, still this patient
    lines[mine[2]] = json.dumps(other)
    (folder / "Condition.000.ndjson").write_text("\n".join(lines) + "\n")
    patients = (SYNTHEA / "Patient.000.ndjson").read_text().splitlines()
    row = next(i for i, line in enumerate(patients) if f'"id":"{pid}"' in line)
    patient = json.loads(patients[row])
    patient["birthDate"] = "30/12/1995"  # not a FHIR date
    patients[row] = json.dumps(patient)
    (folder / "Patient.000.ndjson").write_text("\n".join(patients) + "\n")

    late = parse_time("2030-01-01T00:00:00Z")
    with caplog.at_level("WARNING"):
        record = FhirIngestor().read_patient(folder, pid, late)
    assert record.meta["skipped_resources"] == 3
    assert record.meta["resources"] == {"Condition": 21 - 2, "Encounter": 15}
    assert record.meta["sex"] == "unknown"
    assert record.meta["age_years"] is None
    text = "\n".join(record.warnings)
    assert f"Condition.000.ndjson line {mine[0] + 1}: not valid JSON" in text
    assert f"Condition.000.ndjson line {mine[1] + 1}" in text
    assert "onsetDateTime" in text
    assert f"Patient (Patient.000.ndjson line {row + 1})" in text
    assert "birthDate" in text
    # no identifiers, names or birth dates in the warnings or the log
    logged = text + caplog.text + json.dumps(record.meta)
    for phi in (pid, "1995", patient["name"][0]["family"], patient["identifier"][2]["value"]):
        assert phi not in logged
    # another patient of the same files is not affected
    neighbour = FhirIngestor().read_patient(folder, "6a4160eb-a793-2f86-2302-378626f46cce", late)
    assert neighbour.meta["skipped_resources"] == 0
    assert neighbour.meta["resources"]["Condition"] == 62


def test_a_broken_first_line_does_not_hide_the_rest_of_its_file(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "bulk"
    folder.mkdir()
    for name in ("Patient.000.ndjson", "Encounter.000.ndjson"):
        shutil.copy(SYNTHEA / name, folder / name)
    lines = (SYNTHEA / "Condition.000.ndjson").read_text().splitlines()
    lines[0] = lines[0][: len(lines[0]) // 2]  # a torn first line
    (folder / "Condition.000.ndjson").write_text("\n".join(lines) + "\n")
    shutil.copy(SYNTHEA / "log.ndjson", folder / "log.ndjson")  # the export's own log: no resources
    pid = "6a4160eb-a793-2f86-2302-378626f46cce"
    with caplog.at_level("INFO"):
        record = FhirIngestor().read_patient(folder, pid, parse_time("2030-01-01T00:00:00Z"))
    assert record.meta["resources"]["Condition"] == 62  # the file is read, not skipped whole
    assert "Condition.000.ndjson line 1 skipped" in caplog.text
    assert "log.ndjson skipped" in caplog.text


def test_an_export_of_an_unsupported_version_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "bulk"
    folder.mkdir()
    shutil.copy(SYNTHEA / "Patient.000.ndjson", folder / "Patient.000.ndjson")
    (folder / "CapabilityStatement.json").write_text(
        json.dumps({"resourceType": "CapabilityStatement", "status": "active", "fhirVersion": "1.0.2"})
    )
    with pytest.raises(IngestError, match="'1.0.2' is not supported") as caught:
        FhirIngestor().read_patient(folder, "cbc86e51-9eca-3855-76ec-c058f72c5761", INDEX)
    assert caught.value.path == str(folder)


def test_a_patient_absent_from_the_export_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no resources of the row's patient_id") as caught:
        FhirIngestor().read_patient(SYNTHEA, "no-such-patient", INDEX)
    assert caught.value.path == str(SYNTHEA)
    assert caught.value.modality == "ehr"


# ------------------------------------------------------------------- generated Bundles


def _bundle(tmp_path: Path, pid: str, seed: int, **kwargs) -> Path:
    options = dict(severity=0.5, sex="F", age=64)
    options.update(kwargs)
    return write_fhir_bundle(
        tmp_path / f"{pid}.json", patient_id=pid, rng=np.random.default_rng(seed), index_time=GEN_INDEX, **options
    )


def _read(path: Path, pid: str, config: IngestConfig = SMALL):
    return FhirIngestor(config).read(IngestRequest(pid, GEN_INDEX, {Modality.EHR: path}))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles")
    records = []
    for i, (severity, label, sex) in enumerate([(1.0, 1, "F"), (0.8, 1, "M"), (-0.5, 0, "F"), (0.2, 1, "M")]):
        pid = f"P{i:04d}"
        path = _bundle(folder, pid, seed=i, severity=severity, label=label, sex=sex)
        records.append(_read(path, pid))
    return folder, records


def test_post_index_resources_never_reach_the_tensors(generated) -> None:
    _, records = generated
    pneumonia = f"condition:http://snomed.info/sct|{DISEASE_SNOMED[0]}"
    for record in records:
        # the planted Condition (refuted when the label is 0), CRP and discharge note
        assert record.meta["dropped_after_index"] + record.meta["dropped_by_status"] == 3
        assert not any(e.code.endswith(DISEASE_SNOMED[0]) for e in record.events)
        assert not any("Discharge summary" in (e.text or "") for e in record.events)
    tensorizer = EhrTensorizer(SMALL).fit(records)
    assert pneumonia not in tensorizer.code_vocab_
    crp = tensorizer.lab_codes_.index("http://loinc.org|1988-5")
    mean, std = tensorizer.lab_mean_[crp], tensorizer.lab_std_[crp]
    for record in records:
        arrays = tensorizer.transform(record)
        values = arrays["lab_values"][crp][arrays["lab_mask"][crp]] * std + mean
        assert values.size
        assert values.max() < 200.0  # the planted CRP is 250 mg/L
        kept_crp = [e.value for e in record.events if e.code == "http://loinc.org|1988-5"]
        assert max(kept_crp) < 200.0


def test_units_are_converted_to_canonical_ones(tmp_path: Path) -> None:
    metric = _read(_bundle(tmp_path, "P1", seed=3), "P1")
    us = _read(_bundle(tmp_path / "us", "P1", seed=3, crp_unit="mg/dL", temperature_unit="[degF]"), "P1")

    def series(record, code):
        events = [e for e in record.events if e.code == f"http://loinc.org|{code}"]
        return [e.value for e in events], {e.unit for e in events}

    crp_metric, crp_units = series(metric, "1988-5")
    crp_us, crp_us_units = series(us, "1988-5")
    assert crp_units == crp_us_units == {"mg/L"}
    np.testing.assert_allclose(crp_us, crp_metric, atol=0.06)  # mg/dL has 2 decimals: 0.05 mg/L
    temp_metric, temp_units = series(metric, "8310-5")
    temp_us, temp_us_units = series(us, "8310-5")
    assert temp_units == temp_us_units == {"Cel"}
    np.testing.assert_allclose(temp_us, temp_metric, atol=0.08)
    # the blood-pressure panel gives one event per component
    systolic, _ = series(metric, "8480-6")
    diastolic, _ = series(metric, "8462-4")
    assert len(systolic) == len(diastolic) == len(series(metric, "8867-4")[0]) > 0
    assert not series(metric, "85354-9")[0]


def test_the_unit_table() -> None:
    assert convert(1.5, "mg/dL", "mg/L") == 15.0
    assert convert(212.0, "[degF]", "Cel") == 100.0
    assert convert(5.5, "mmol/L", "mg/dL", loinc="2345-7") == pytest.approx(99.09, abs=0.01)
    assert convert(100.0, "mg/dL", "mmol/L", loinc="2345-7") == pytest.approx(5.55, abs=0.01)
    assert convert(135.0, "g/L", "g/dL") == 13.5
    assert convert(1.0, "mg/dL", "mmol/L") is None  # no analyte, no molar mass
    assert convert(1.0, "mg/dL", "kg") is None
    assert to_canonical("6690-2", 7.2, "10*9/L") == (7.2, "10*3/uL")
    assert to_canonical("29463-7", 150.0, "[lb_av]") == (pytest.approx(68.04, abs=0.01), "kg")
    assert to_canonical("8867-4", 80.0, "{beats}/min") == (80.0, "/min")
    assert to_canonical("1988-5", 3.0, "mmol/L") is None


def test_tensorizer_bins_codes_and_demographics(generated) -> None:
    _, records = generated
    tensorizer = EhrTensorizer(SMALL).fit(records)
    record = records[0]
    arrays = tensorizer.transform(record)
    crp = tensorizer.lab_codes_.index("http://loinc.org|1988-5")
    width = SMALL.ehr.lookback_days / SMALL.ehr.n_bins
    expected_counts = np.zeros(SMALL.ehr.n_bins)
    expected_last: dict[int, float] = {}
    for event in record.events:  # in time order
        if event.code == "http://loinc.org|1988-5":
            age = (GEN_INDEX - event.time).total_seconds() / 86400
            b = SMALL.ehr.n_bins - 1 - min(int(age // width), SMALL.ehr.n_bins - 1)
            expected_counts[b] += 1
            expected_last[b] = event.value
    np.testing.assert_array_equal(arrays["lab_counts"][crp], expected_counts)
    np.testing.assert_array_equal(arrays["lab_mask"][crp], expected_counts > 0)
    for b, value in expected_last.items():
        restored = arrays["lab_values"][crp, b] * tensorizer.lab_std_[crp] + tensorizer.lab_mean_[crp]
        assert restored == pytest.approx(value, rel=1e-4)
    codes = sorted(
        ((GEN_INDEX - e.time).total_seconds() / 86400, f"{e.kind}:{e.code}")
        for e in record.events
        if e.kind in ("condition", "medication", "procedure", "encounter")
    )
    n = int(arrays["code_mask"].sum())
    assert n == len({key for _, key in codes})
    assert arrays["code_ids"][0] == tensorizer.code_vocab_.index(codes[0][1]) + 2
    assert arrays["code_age_hours"][0] == pytest.approx(codes[0][0] * 24, rel=1e-5)
    np.testing.assert_array_equal(arrays["demographics"][1:], [1.0, 0.0, 0.0])  # female
    male = tensorizer.transform(records[1])["demographics"]
    np.testing.assert_array_equal(male[1:], [0.0, 1.0, 0.0])


def test_tensorizer_state_round_trip_and_unfitted_use(generated) -> None:
    _, records = generated
    with pytest.raises(NotFittedError, match="not fitted"):
        EhrTensorizer(SMALL).transform(records[0])
    fitted = EhrTensorizer(SMALL).fit(records)
    state = json.loads(json.dumps(fitted.state_dict()))
    restored = EhrTensorizer(SMALL).load_state_dict(state)
    for record in records:
        a, b = fitted.transform(record), restored.transform(record)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    other = IngestConfig(ehr=EhrConfig(n_bins=2))
    with pytest.raises(ConfigError, match="n_bins"):
        EhrTensorizer(other).load_state_dict(state)


# ------------------------------------------------------------------- bad input and versions


def test_invalid_json_bundle(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text('{"resourceType": "Bundle", "entry": [')
    with pytest.raises(IngestError, match="not valid JSON") as caught:
        _read(path, "P1")
    assert caught.value.path == str(path)
    assert caught.value.modality == "ehr"


def test_another_patients_bundle(tmp_path: Path) -> None:
    path = _bundle(tmp_path, "P0001", seed=1).rename(tmp_path / "bundle.json")
    with pytest.raises(IngestError, match="another patient") as caught:
        _read(path, "P0002")
    assert caught.value.path == str(path)
    assert "P0001" not in str(caught.value)
    assert "P0002" not in str(caught.value)  # no identifiers


def test_an_invalid_resource_in_a_bundle_is_skipped_and_reported(tmp_path: Path) -> None:
    path = _bundle(tmp_path, "P1", seed=1)
    good = _read(path, "P1")
    bundle = json.loads(path.read_text())
    obs = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    obs["valueQuantity"]["value"] = "high"
    path.write_text(json.dumps(bundle))
    record = _read(path, "P1")  # the rest of the patient's EHR is read
    assert record.meta["skipped_resources"] == 1
    assert record.meta["resources"]["Observation"] == good.meta["resources"]["Observation"] - 1
    assert {k: n for k, n in record.meta["resources"].items() if k != "Observation"} == {
        k: n for k, n in good.meta["resources"].items() if k != "Observation"
    }
    assert any(re.search(rf"Observation/{obs['id']} .*valueQuantity\.value", w) for w in record.warnings)
    # only when nothing of the patient is valid is the read an error
    for entry in bundle["entry"]:
        entry["resource"]["meta"] = {"lastUpdated": "yesterday"}
    path.write_text(json.dumps(bundle))
    with pytest.raises(IngestError, match="no resource of the patient is valid FHIR") as caught:
        _read(path, "P1")
    assert caught.value.path == str(path)


@pytest.mark.parametrize(
    "declare",
    [
        lambda b: b.update(fhirVersion="1.0.2"),
        lambda b: b.update(meta={"profile": ["http://hl7.org/fhir/DSTU2/StructureDefinition/Bundle"]}),
        lambda b: b["entry"].append({"resource": {"resourceType": "CapabilityStatement", "fhirVersion": "3.0.2"}}),
    ],
    ids=["fhirVersion", "profile", "capability"],
)
def test_unknown_fhir_versions_are_refused(tmp_path: Path, declare) -> None:
    path = _bundle(tmp_path, "P1", seed=1)
    bundle = json.loads(path.read_text())
    declare(bundle)
    path.write_text(json.dumps(bundle))
    with pytest.raises(IngestError, match="not supported"):
        _read(path, "P1")


def test_the_version_rule() -> None:
    assert release_of("4.0.1") == release_of("R4") == release_of("4.3.0") == "R4B"
    assert release_of("5.0.0") == release_of("R5") == "R5"
    assert declared_version({"meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/x"]}}) is None
    assert declared_version({"meta": {"profile": ["http://hl7.org/fhir/4.0/StructureDefinition/Patient"]}}) == "4.0"


RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _r5_bundle(declared: bool) -> dict:
    subject = {"reference": "Patient/R5P"}
    when = (GEN_INDEX - timedelta(days=1)).isoformat()
    resources = [
        {"resourceType": "Patient", "id": "R5P", "gender": "male", "birthDate": "1970-06-01"},
        {
            "resourceType": "Encounter",
            "id": "e1",
            "status": "completed",
            "class": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}]}],
            "subject": subject,
            "actualPeriod": {"start": when},
        },
        {
            "resourceType": "MedicationRequest",
            "id": "m1",
            "status": "active",
            "intent": "order",
            "medication": {"concept": {"coding": [{"system": RXNORM, "code": "1191"}]}},
            "subject": subject,
            "authoredOn": when,
        },
    ]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    if declared:
        bundle["meta"] = {"profile": ["http://hl7.org/fhir/5.0/StructureDefinition/Bundle"]}
    return bundle


def test_an_r5_bundle_is_read_with_r5_models(tmp_path: Path) -> None:
    path = tmp_path / "r5.json"
    path.write_text(json.dumps(_r5_bundle(declared=True)))
    record = _read(path, "R5P")
    codes = {(e.kind, e.code) for e in record.events}
    assert ("encounter", "http://terminology.hl7.org/CodeSystem/v3-ActCode|IMP") in codes
    assert ("medication", f"{RXNORM}|1191") in codes
    assert record.meta["age_years"] == 53
    assert record.meta["sex"] == "male"
    # without the declaration it is read as R4, where these elements do not exist: both are skipped
    path.write_text(json.dumps(_r5_bundle(declared=False)))
    record = _read(path, "R5P")
    assert record.meta["skipped_resources"] == 2
    assert record.events == []
    assert sum("fails FHIR R4B validation" in w for w in record.warnings) == 2


def test_url_only_and_undated_resources_are_counted(tmp_path: Path) -> None:
    path = _bundle(tmp_path, "P1", seed=2)
    bundle = json.loads(path.read_text())
    resources = [e["resource"] for e in bundle["entry"]]
    doc = copy.deepcopy(next(r for r in resources if r["resourceType"] == "DocumentReference"))
    doc["id"] = "url-doc"
    doc["content"] = [{"attachment": {"contentType": "text/plain", "url": "https://ehr.example/Binary/1"}}]
    condition = {
        "resourceType": "Condition",
        "id": "undated",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "subject": {"reference": "Patient/P1"},
    }
    bundle["entry"] += [{"resource": doc}, {"resource": condition}]
    path.write_text(json.dumps(bundle))
    record = _read(path, "P1")
    assert record.meta["url_only_attachments"] == 1
    assert record.meta["dropped_undated"] == 1


def test_a_result_issued_after_the_index_time_is_not_known_at_it(tmp_path: Path) -> None:
    """Drawn before the index time, resulted after it: the result must not leak."""
    path = _bundle(tmp_path, "P1", seed=5)
    bundle = json.loads(path.read_text())
    observations = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and "post-index" not in json.dumps(e["resource"].get("meta", {}))
    ]
    late = observations[0]
    late["effectiveDateTime"] = (GEN_INDEX - timedelta(hours=2)).isoformat()
    late["issued"] = (GEN_INDEX + timedelta(hours=3)).isoformat()
    path.write_text(json.dumps(bundle))
    record = _read(path, "P1")
    before = _read(_bundle(tmp_path / "orig", "P1", seed=5), "P1")
    assert record.meta["dropped_after_index"] == before.meta["dropped_after_index"] + 1
    assert all(e.time <= GEN_INDEX for e in record.events)
