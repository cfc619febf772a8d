"""The EHR from a FHIR server (``fhir:Patient/<id>``), against a real one: Medplum's FHIR engine.

The server (tests/fhir_server/server.mjs) holds the Synthea Bulk export of tests/data, a
generated Bundle with resources dated after the index time, and a patient whose resources
are dated only by the elements the reader falls back to. Hostile answers come from a small
local listener (:class:`Hostile`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fhir_test_server import FhirTestServer, skip_reason

from meddx.cli import main
from meddx.cohort import load_cohort
from meddx.config import FhirServerConfig, IngestConfig
from meddx.errors import ConfigError
from meddx.fhirclient import client as fhir_client
from meddx.fhirclient.client import FhirClient
from meddx.fhirclient.ref import FhirRef, parse_fhir_ref
from meddx.ingest.fhir import FhirIngestor
from meddx.ingest.runner import ingest_cohort
from meddx.records import Modality, PatientRecord, parse_time
from meddx.synth import write_fhir_bundle

SYNTHEA = Path(__file__).resolve().parent / "data" / "synthea-bulk"
INDEX = parse_time("2020-01-01T00:00:00Z")
GEN_INDEX = datetime(2024, 3, 5, 14, tzinfo=timezone.utc)
# counts of what was dropped: the server leaves out what is dated after the index time, so these
# cover only what it returned (meddx/fhirclient/search.py)
DROP_COUNTS = {
    "dropped_after_index",
    "dropped_after_index_by_type",
    "dropped_undated",
    "dropped_by_status",
    "dropped_by_status_detail",
    "source_kind",
}

needs_node = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def _ndjson(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.glob("*.ndjson")):
        if path.name != "log.ndjson":
            found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def _fallback_bundle(path: Path) -> Path:
    """A patient whose resources test the date searches: dated only by fallback elements, open
    periods, date-only values, some after the index time."""
    pid = "fallback-1"
    subject = {"reference": f"Patient/{pid}"}
    loinc = {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]}
    snomed = {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}

    def obs(rid: str, value: float, **when: Any) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": rid,
            "status": "final",
            "code": loinc,
            "subject": subject,
            "valueQuantity": {
                "value": value,
                "unit": "10*3/uL",
                "system": "http://unitsofmeasure.org",
                "code": "10*3/uL",
            },
            **when,
        }

    resources = [
        {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1980-06-01"},
        obs("o-issued-only", 7.0, issued="2024-03-01T10:00:00Z"),  # no effective[x]: placed by issued
        obs("o-issued-after", 8.0, issued="2024-03-06T10:00:00Z"),
        obs("o-date-only", 9.0, effectiveDateTime="2024-03-04"),
        obs("o-same-day", 10.0, effectiveDateTime="2024-03-05"),  # ends after the index time: dropped
        obs("o-period-open", 11.0, effectivePeriod={"start": "2024-03-02T08:00:00Z"}),
        obs(
            "o-period-ends-after",
            12.0,
            effectivePeriod={"start": "2024-03-02T08:00:00Z", "end": "2024-03-07T08:00:00Z"},
        ),
        obs("o-late-result", 13.0, effectiveDateTime="2024-03-05T10:00:00Z", issued="2024-03-05T15:00:00Z"),
        obs("o-after", 14.0, effectiveDateTime="2024-04-01T10:00:00Z"),
        {
            "resourceType": "Condition",
            "id": "c-recorded-only",
            "subject": subject,
            "code": snomed,
            "recordedDate": "2024-02-01T00:00:00Z",
        },
        {
            "resourceType": "Condition",
            "id": "c-onset",
            "subject": subject,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "onsetDateTime": "2023-01-01T00:00:00Z",
        },
        {
            "resourceType": "Encounter",
            "id": "e-open",
            "status": "in-progress",
            "subject": subject,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "period": {"start": "2024-03-04T09:00:00Z"},
        },
        {
            "resourceType": "MedicationStatement",
            "id": "ms-asserted",
            "status": "active",
            "subject": subject,
            "medicationCodeableConcept": {
                "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]
            },
            "dateAsserted": "2024-02-20T00:00:00Z",
        },
        {
            "resourceType": "Procedure",
            "id": "p-partial",
            "status": "completed",
            "subject": subject,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "80146002"}]},
            "performedDateTime": "2023-11",
        },
    ]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    path.write_text(json.dumps(bundle))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if skip_reason() is not None:
        pytest.skip(skip_reason() or "")
    folder = tmp_path_factory.mktemp("fhir-data")
    generated = write_fhir_bundle(
        folder / "gen.json",
        patient_id="gen-1",
        severity=1.0,
        rng=np.random.default_rng(3),
        index_time=GEN_INDEX,
        sex="F",
        age=61,
        label=1,
    )
    fallback = _fallback_bundle(folder / "fallback.json")
    resources = _ndjson(SYNTHEA)
    for bundle in (generated, fallback):
        resources += [e["resource"] for e in json.loads(bundle.read_text())["entry"]]
    for number, resource in enumerate(resources):
        resource.setdefault("id", f"gen-{number}")  # the Bundle's entries without an id get one
    bundle_files = {}
    for bundle in (generated, fallback):  # the Bundles as the server holds them (ids included)
        data = json.loads(bundle.read_text())
        data["entry"] = [{"resource": r} for r in resources if _refers(r, json.loads(bundle.read_text()))]
        bundle.write_text(json.dumps(data))
        bundle_files[data["entry"][0]["resource"]["id"]] = bundle
    fhir = FhirTestServer()
    fhir.load(resources)
    yield {"server": fhir, "bundles": bundle_files}
    fhir.stop()


def _refers(resource: dict[str, Any], bundle: dict[str, Any]) -> bool:
    pid = next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    if resource["resourceType"] == "Patient":
        return resource["id"] == pid
    ref = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
    return ref in (f"Patient/{pid}", f"urn:uuid:{pid}")


def _config(base: str, cache: Path | None = None, **fhir: Any) -> IngestConfig:
    section = FhirServerConfig(url=base, cache_dir=str(cache) if cache else None, **fhir)
    return IngestConfig(fhir=section)


def _comparable(record) -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
    meta = {k: v for k, v in record.meta.items() if k not in DROP_COUNTS}
    return [e.to_json() for e in record.events], record.time, meta


@pytest.fixture(autouse=True)
def _fresh_clients() -> Iterator[None]:
    fhir_client._CLIENTS.clear()
    yield
    fhir_client._CLIENTS.clear()


# ------------------------------------------------------------------ the record


@needs_node
def test_a_patient_from_the_server_equals_the_same_resources_from_files(server, tmp_path: Path) -> None:
    fhir = server["server"]
    on_server = FhirIngestor(_config(fhir.base, tmp_path / "answers"))
    from_files = FhirIngestor()
    synthea_ids = [r["id"] for r in _ndjson(SYNTHEA) if r["resourceType"] == "Patient"]
    for pid in synthea_ids:  # a Bulk export on disk vs the server
        got = on_server.read_patient(FhirRef(pid), "row-id", INDEX)
        want = from_files.read_patient(SYNTHEA, pid, INDEX)
        assert got.meta["source_kind"] == "fhir"
        assert got.source == f"fhir:Patient/{pid}"
        assert _comparable(got) == _comparable(want), pid
        assert got.meta["n_events"] > 10
    for pid, bundle in server["bundles"].items():  # a Bundle file vs the server
        got = on_server.read_patient(FhirRef(pid), pid, GEN_INDEX)
        want = from_files.read_patient(bundle, pid, GEN_INDEX)
        PatientRecord(pid, GEN_INDEX).add(got)  # nothing after the index time
        assert _comparable(got) == _comparable(want), pid
        # the server was asked to leave out what is dated after the index time, and did
        assert got.meta["dropped_after_index"] < want.meta["dropped_after_index"], pid
    fallback = on_server.read_patient(FhirRef("fallback-1"), "x", GEN_INDEX)
    values = sorted(e.value for e in fallback.events if e.kind == "observation")
    assert values == [7.0, 9.0, 11.0]  # issued-only, date-only and open-period results are kept
    assert {e.kind for e in fallback.events} >= {"condition", "encounter", "medication", "procedure"}


@needs_node
def test_a_second_read_asks_the_server_nothing(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fhir = server["server"]
    config = _config(fhir.base, tmp_path / "answers")
    first = FhirIngestor(config).read_patient(FhirRef("gen-1"), "gen-1", GEN_INDEX)
    fhir_client._CLIENTS.clear()

    def no_requests(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server was asked")

    monkeypatch.setattr(FhirClient, "request", no_requests)
    again = FhirIngestor(config).read_patient(FhirRef("gen-1"), "gen-1", GEN_INDEX)
    assert _comparable(again) == _comparable(first)
    notes = FhirIngestor(config).read_patient(
        FhirRef("gen-1"), "gen-1", GEN_INDEX, resource_types={"DocumentReference"}
    )
    assert [e.text for e in notes.events] == [e.text for e in first.events if e.kind == "note"]
    with pytest.raises(Exception, match="the server was asked"):  # another index time is another search
        FhirIngestor(config).read_patient(FhirRef("gen-1"), "gen-1", parse_time("2024-03-06T00:00:00Z"))


@needs_node
def test_a_manifest_of_fhir_cells_ingests_with_notes(server, tmp_path: Path) -> None:
    fhir = server["server"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "patient_id,index_time,ehr\n"
        f"gen-1,{GEN_INDEX.isoformat()},fhir:Patient/gen-1\n"
        f"absent,{GEN_INDEX.isoformat()},fhir:Patient/absent-9\n"
    )
    cohort = load_cohort(manifest)
    assert cohort.rows[0].remote == {Modality.EHR: FhirRef("gen-1")}
    config = _config(fhir.base)
    report = ingest_cohort(cohort, tmp_path / "cache", config, workers=0, progress=False, out_dir=tmp_path / "run")
    outcomes = {(o.patient_id, o.modality): o for o in report.outcomes}
    assert outcomes[("gen-1", Modality.EHR)].status == "ok"
    assert outcomes[("gen-1", Modality.NOTES)].status == "ok"
    assert outcomes[("absent", Modality.EHR)].status == "error"
    assert "holds no Patient with that id" in outcomes[("absent", Modality.EHR)].error
    assert any((tmp_path / "cache" / "fhir").rglob("*.json"))  # the answers, under the ingest cache


# ------------------------------------------------------------------ credentials and reachability


@needs_node
def test_refused_credentials_stop_the_run_once_with_status_2(tmp_path: Path, monkeypatch, caplog) -> None:
    guarded = FhirTestServer(bearer="s3cret-token")
    try:
        manifest = tmp_path / "manifest.csv"
        manifest.write_text(
            "patient_id,index_time,ehr\n"
            f"a,{GEN_INDEX.isoformat()},fhir:Patient/a\nb,{GEN_INDEX.isoformat()},fhir:Patient/b\n"
        )
        monkeypatch.setenv("MEDDX_FHIR_TOKEN", "wrong-token-value")
        config_file = tmp_path / "ingest.json"
        config_file.write_text(_config(guarded.base).model_dump_json())
        args = [
            "ingest",
            str(manifest),
            "--cache",
            str(tmp_path / "cache"),
            "--config",
            str(config_file),
            "--out",
            str(tmp_path / "run"),
            "--workers",
            "0",
            "--quiet",
        ]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        assert result.output.count("refused the credentials") == 1
        assert "MEDDX_FHIR_TOKEN" in result.output
        assert "wrong-token-value" not in result.output
        assert "wrong-token-value" not in caplog.text
        assert not (tmp_path / "run" / "errors.csv").exists()  # nothing was read

        monkeypatch.setenv("MEDDX_FHIR_TOKEN", "s3cret-token")  # the right one works
        guarded.load([{"resourceType": "Patient", "id": "a", "gender": "male"}])
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        errors = pd.read_csv(tmp_path / "run" / "errors.csv")
        assert list(errors["patient_id"].unique()) == ["b"]
        assert "s3cret-token" not in (tmp_path / "run" / "errors.csv").read_text()
    finally:
        guarded.stop()


def test_an_unreachable_server_is_a_warning_and_one_error_per_row(tmp_path: Path, caplog) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        port = probe.server_address[1]  # a port nothing listens on once closed
    bundle = _fallback_bundle(tmp_path / "fallback.json")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "patient_id,index_time,ehr\n"
        f"a,{GEN_INDEX.isoformat()},fhir:Patient/a\n"
        f"fallback-1,{GEN_INDEX.isoformat()},{bundle}\n"
    )
    config = _config(f"http://127.0.0.1:{port}/fhir", retries=1, backoff_s=0.0)
    report = ingest_cohort(load_cohort(manifest), tmp_path / "cache", config, workers=0, progress=False)
    assert "FHIR preflight: a test search" in caplog.text
    assert "cannot reach" in caplog.text
    by = {(o.patient_id, o.modality): o for o in report.outcomes}
    assert by[("fallback-1", Modality.EHR)].status == "ok"
    assert by[("a", Modality.EHR)].status == "error"
    assert f"cannot reach the FHIR server at http://127.0.0.1:{port}/fhir (2 tries)" in by[("a", Modality.EHR)].error


def test_config_refuses_credentials_in_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="must not carry credentials"):
        IngestConfig.from_dict({"fhir": {"url": "https://user:pw@ehr.example.org/fhir"}})
    monkeypatch.setenv("MEDDX_FHIR_URL", "https://user:pw@ehr.example.org/fhir")
    with pytest.raises(ConfigError) as caught:
        fhir_client.server_url(FhirServerConfig())
    assert "pw" not in str(caught.value).replace("https", "")
    monkeypatch.setenv("MEDDX_FHIR_URL", "https://ehr.example.org/fhir/")
    assert fhir_client.server_url(FhirServerConfig()) == "https://ehr.example.org/fhir"
    for bad in ("fhir:Observation/1", "fhir:Patient/", "fhir:Patient/a/b", "fhir:Patient/../x"):
        with pytest.raises(ValueError, match="fhir:Patient/<id>"):
            parse_fhir_ref(bad)


# ------------------------------------------------------------------ hostile answers


class Hostile:
    """A local listener answering FHIR searches; what a patient's searches get depends on its id."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                tail = url.path.split("/fhir/", 1)[-1]
                patient = (query.get("subject") or [""])[0].removeprefix("Patient/") or tail.partition("/")[2]
                owner.hits[patient] = owner.hits.get(patient, 0) + 1
                if tail == "metadata":
                    return self._json(200, {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})
                if tail.startswith("Patient") and "_count" in query and "subject" not in query:
                    return self._json(200, {"resourceType": "Bundle", "type": "searchset"})  # the preflight
                if tail.startswith("Patient/"):
                    return self._json(200, {"resourceType": "Patient", "id": patient, "gender": "male"})
                empty = {"resourceType": "Bundle", "type": "searchset", "entry": []}
                if patient == "other-host":
                    link = [{"relation": "next", "url": "http://198.51.100.7/fhir/Observation?page=2"}]
                    return self._json(200, {**empty, "link": link})
                if patient == "endless":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.end_headers()  # no length, then a body that does not end
                    try:
                        self.wfile.write(b'{"resourceType": "Bundle", "entry": [')
                        while True:
                            self.wfile.write(b'{"resource": {"resourceType": "Observation"}},' * 1000)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                if patient == "huge":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(10 * 2**30))
                    self.end_headers()
                    try:
                        self.wfile.write(b"{" * 65536)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if patient == "malformed":
                    data = b'{"resourceType": "Bundle", "entry": [ {"resou'
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if patient in ("busy", "busy-long") and owner.hits[patient] <= 2:
                    wait = "1" if patient == "busy" else "86400"
                    return self._json(429, {"resourceType": "OperationOutcome", "issue": []}, {"Retry-After": wait})
                return self._json(200, empty)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.close()


def test_hostile_answers_each_fail_their_own_row_only(hostile: Hostile, tmp_path: Path) -> None:
    names = ["good", "other-host", "endless", "huge", "malformed", "busy", "busy-long"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "patient_id,index_time,ehr\n" + "".join(f"{n},{GEN_INDEX.isoformat()},fhir:Patient/{n}\n" for n in names)
    )
    config = _config(hostile.base, max_response_mb=1.0, max_concurrency=1, backoff_s=0.0, max_retry_after_s=5.0)
    report = ingest_cohort(load_cohort(manifest), tmp_path / "cache", config, workers=0, progress=False)
    errors = {o.patient_id: o.error for o in report.outcomes if o.modality == Modality.EHR}
    assert errors["good"] is None
    assert errors["busy"] is None  # a 429 with Retry-After: 1 is waited out
    assert "points at another server" in errors["other-host"]
    assert "198.51.100.7" in errors["other-host"]
    assert "larger than fhir.max_response_mb (1 MB)" in errors["endless"]
    assert "announces 10,737,418,240 bytes" in errors["huge"]
    assert "not JSON" in errors["malformed"]
    assert "asked to wait 86400 s (HTTP 429, Retry-After)" in errors["busy-long"]
    for name in names:  # nothing about a patient in a message but the row's own columns
        assert "?" not in (errors[name] or "")


# ------------------------------------------------------------------ predictions back to the server

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


@needs_node
def test_diagnose_store_fhir_writes_each_risk_assessment_once(
    server, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Four rows, one per chunk: the run dies after writing chunk 1; on --resume chunk 1 is written
    again (the server keeps one), chunk 2's transaction is refused (its rows still diagnosed)."""
    import meddx.batch.run_folder

    fhir = server["server"]
    sample = pd.read_csv(SAMPLE / "manifest.csv", dtype=str)
    rows = sample[sample["ehr"].notna()].head(4)
    for path in rows["ehr"]:
        fhir.load(e["resource"] for e in json.loads((SAMPLE / path).read_text())["entry"])
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {
            "patient_id": rows["patient_id"],
            "index_time": rows["index_time"],
            "ehr": "fhir:Patient/" + rows["patient_id"],
        }
    ).to_csv(manifest, index=False)
    monkeypatch.setenv("MEDDX_FHIR_URL", fhir.base)  # the model's config names no server: the environment does
    out = tmp_path / "run"
    args = ["diagnose", str(manifest), "--model", str(tiny_model), "--out", str(out), "--cache",
            str(tmp_path / "cache"), "--workers", "0", "--chunk-size", "1", "--store-fhir", "--quiet"]  # fmt: skip

    write_chunk = meddx.batch.run_folder.write_chunk

    def dies_after_writing_chunk_1(parts, number, *rest):
        if number == 1:
            raise KeyboardInterrupt
        write_chunk(parts, number, *rest)

    monkeypatch.setattr(meddx.batch.run_folder, "write_chunk", dies_after_writing_chunk_1)
    assert CliRunner().invoke(main, args).exit_code != 0
    monkeypatch.setattr(meddx.batch.run_folder, "write_chunk", write_chunk)

    request = FhirClient.request
    third = rows["patient_id"].iloc[2]

    def refuses_the_third(self, method, path, what, **kwargs):
        body = kwargs.get("body") or {}
        if body.get("type") == "transaction" and third in json.dumps(body):
            return request(self, method, "RiskAssessment/not-a-transaction", what, **kwargs)  # an error answer
        return request(self, method, path, what, **kwargs)

    monkeypatch.setattr(FhirClient, "request", refuses_the_third)
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "RiskAssessments on the FHIR server: 3 (1 failed)" in result.output

    predictions = pd.read_parquet(out / "predictions.parquet")
    assert (predictions.status == "ok").all()
    assert len(predictions) == 4  # the refused write cost no prediction
    writes = pd.read_csv(out / "fhir_writes.csv", dtype=str, keep_default_na=False)
    assert list(writes.patient_id) == list(rows["patient_id"])
    assert list(writes.status) == ["created", "exists", "error", "created"]
    assert "HTTP" in writes.error.iloc[2]
    for write in writes.to_dict("records"):
        found = fhir.search_all(f"RiskAssessment?identifier=urn:meddx:prediction|{write['identifier']}")
        if write["status"] == "error":
            assert found == []
            continue
        assert len(found) == 1  # written once, the resumed chunk included
        back = found[0]
        assert back["id"] == write["resource_id"]
        assert back["subject"]["reference"] == f"Patient/{write['patient_id']}"
        row = predictions.set_index("patient_id").loc[write["patient_id"]]
        assert back["prediction"][0]["probabilityDecimal"] == pytest.approx(row["probability"], abs=1e-6)


# ------------------------------------------------------------------ a cohort from the server


@needs_node
def test_fhir_manifest_finds_inpatient_stays_and_ingests_end_to_end(server, tmp_path: Path) -> None:
    fhir = server["server"]
    act = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

    def encounter(rid: str, klass: str, patient: str | None, **period: str) -> dict[str, Any]:
        found: dict[str, Any] = {"resourceType": "Encounter", "id": rid, "status": "finished",
                                 "class": {"system": act, "code": klass}, "period": period}  # fmt: skip
        if patient:
            found["subject"] = {"reference": f"Patient/{patient}"}
        return found

    snomed = {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}
    fhir.load(
        [
            {"resourceType": "Patient", "id": "cohort-1", "gender": "female", "birthDate": "1970-01-01"},
            {"resourceType": "Patient", "id": "cohort-2", "gender": "male", "birthDate": "1960-01-01"},
            {
                "resourceType": "Condition",
                "id": "cohort-c1",
                "subject": {"reference": "Patient/cohort-1"},
                "code": snomed,
                "onsetDateTime": "2029-05-01T00:00:00Z",
            },  # fmt: skip
            encounter("stay-1", "IMP", "cohort-1", start="2030-01-10T08:00:00Z", end="2030-01-14T10:00:00Z"),
            encounter("stay-2", "IMP", "cohort-2", start="2030-01-12"),
            encounter("stay-anon", "IMP", None, start="2030-01-13T08:00:00Z"),
            encounter("stay-nostart", "IMP", "cohort-1", end="2030-01-11T08:00:00Z"),
            encounter("visit", "AMB", "cohort-2", start="2030-01-11T08:00:00Z"),
            encounter("stay-later", "IMP", "cohort-1", start="2030-02-03T08:00:00Z"),
        ]
    )
    config_file = tmp_path / "ingest.json"
    config_file.write_text(_config(fhir.base).model_dump_json())
    manifest = tmp_path / "manifest.csv"
    result = CliRunner().invoke(
        main,
        [
            "fhir",
            "manifest",
            "--encounter-class",
            "IMP",
            "--since",
            "2030-01-01",
            "--until",
            "2030-01-31",
            "--out",
            str(manifest),
            "--config",
            str(config_file),
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "1 left out (no Patient subject)" in result.output
    assert "1 left out (no start)" in result.output
    rows = pd.read_csv(manifest, dtype=str)
    assert list(rows.patient_id) == ["cohort-1", "cohort-2"]
    assert list(rows.index_time) == ["2030-01-11T08:00:00Z", "2030-01-13T23:59:59.999999Z"]
    assert list(rows.ehr) == ["fhir:Patient/cohort-1", "fhir:Patient/cohort-2"]
    assert list(rows.encounter) == ["Encounter/stay-1", "Encounter/stay-2"]

    report = ingest_cohort(load_cohort(manifest), tmp_path / "cache", IngestConfig.from_file(config_file),
                           workers=0, progress=False)  # fmt: skip
    ehr = {o.patient_id: o for o in report.outcomes if o.modality == Modality.EHR}
    assert {pid: o.status for pid, o in ehr.items()} == {"cohort-1": "ok", "cohort-2": "ok"}
    records = {r.patient_id: r for r in report.patient_records()}
    first = records["cohort-1"].records[Modality.EHR]
    assert [e.code for e in first.events if e.kind == "condition"] == ["http://snomed.info/sct|38341003"]
    assert all(e.time <= parse_time("2030-01-11T08:00:00Z") for e in first.events)  # the stay ended later


# ------------------------------------------------------------------ Bulk export


@needs_node
def test_fhir_export_resumes_and_gives_a_folder_read_as_the_server(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fhir = server["server"]
    config_file = tmp_path / "ingest.json"
    config_file.write_text(_config(fhir.base).model_dump_json())
    out = tmp_path / "export"
    args = ["fhir", "export", "--since", "2000-01-01", "--out", str(out), "--config", str(config_file), "--quiet"]
    kick_offs: list[str] = []
    request, download = FhirClient.request, FhirClient.download

    def counting(self, method, path, what, **kwargs):
        if path.endswith("$export"):
            kick_offs.append(path)
        return request(self, method, path, what, **kwargs)

    def dies_after_two_files(self, url, dest, what, **kwargs):
        if len(list(out.glob("*.ndjson"))) >= 2:
            raise KeyboardInterrupt
        return download(self, url, dest, what, **kwargs)

    monkeypatch.setattr(FhirClient, "request", counting)
    monkeypatch.setattr(FhirClient, "download", dies_after_two_files)
    assert CliRunner().invoke(main, args).exit_code != 0
    assert len(list(out.glob("*.ndjson"))) == 2
    assert not list(out.glob("*.part"))
    monkeypatch.setattr(FhirClient, "download", download)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("resumed: ")
    assert len(kick_offs) == 1  # polled and finished, not started again
    state = json.loads((out / ".meddx-export.json").read_text())
    assert state["complete"]
    assert set(state["files"]) == {p.name for p in out.glob("*.ndjson")}
    assert "Observation.000.ndjson" in state["files"]
    assert (out / "CapabilityStatement.json").is_file()

    on_server = FhirIngestor(_config(fhir.base))
    from_export = FhirIngestor()
    synthea_ids = [r["id"] for r in _ndjson(SYNTHEA) if r["resourceType"] == "Patient"]
    for pid, index_time in [*((p, INDEX) for p in synthea_ids), ("gen-1", GEN_INDEX), ("fallback-1", GEN_INDEX)]:
        got = from_export.read_patient(out, pid, index_time)
        assert got.meta["source_kind"] == "bulk"
        assert _comparable(got) == _comparable(on_server.read_patient(FhirRef(pid), pid, index_time)), pid
    assert CliRunner().invoke(main, [*args[:-1], "--type", "Patient"]).exit_code == 2  # another export, same folder
