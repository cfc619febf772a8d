"""Imaging from a PACS over DICOMweb, and prediction SRs back to it, against a real Orthanc.

The server is Orthanc with its DICOMweb plugin on a free loopback port, authentication on
(``conftest.py``); these tests skip where it is not installed.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner

from meddx.cache import RecordCache
from meddx.cli import main
from meddx.cohort import load_cohort
from meddx.config import DicomWebConfig, ImagingConfig, IngestConfig
from meddx.dicomweb.client import DicomWebAuthError
from meddx.dicomweb.ref import DicomWebRef
from meddx.ingest.runner import ingest_cohort
from meddx.records import Modality
from meddx.synth import write_ct_series

ACQUIRED = {
    "P1": datetime(2024, 3, 5, 9, 0, tzinfo=timezone.utc),
    "P2": datetime(2024, 3, 6, 10, 30, tzinfo=timezone.utc),
    "P3": datetime(2024, 4, 2, 8, 0, tzinfo=timezone.utc),
}


@dataclass
class Study:
    patient_id: str
    folder: Path  # the study's files on disk (one subfolder per series)
    study_uid: str
    series: dict[str, int]  # SeriesInstanceUID -> instances


def _write_study(root: Path, patient_id: str, sizes: list[int], seed: int, rle: bool = False) -> Study:
    """A CT study of one or more series (write_ct_series makes one study per call: the UIDs are joined)."""
    folder = root / patient_id
    study_uid = ""
    series: dict[str, int] = {}
    for i, n_slices in enumerate(sizes):
        files = write_ct_series(
            folder / f"series{i}",
            severity=0.5 + i,
            rng=np.random.default_rng([seed, i]),
            acquisition_time=ACQUIRED[patient_id] + timedelta(minutes=5 * i),
            patient_id=patient_id,
            n_slices=n_slices,
            size=24,
            rle=rle and i == 0,
        )
        for path in files:
            ds = pydicom.dcmread(path)
            study_uid = study_uid or str(ds.StudyInstanceUID)
            if ds.StudyInstanceUID != study_uid:
                ds.StudyInstanceUID = study_uid
                ds.save_as(path, enforce_file_format=True)
        series[str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)] = len(files)
    return Study(patient_id, folder, study_uid, series)


def _upload(server, study: Study) -> None:
    server.client().store_instances([pydicom.dcmread(p) for p in sorted(study.folder.rglob("*.dcm"))])


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Study]:
    root = tmp_path_factory.mktemp("studies")
    return {
        "P1": _write_study(root, "P1", [6], seed=1, rle=True),
        "P2": _write_study(root, "P2", [7, 4], seed=2),  # the rule keeps the 7-slice series
        "P3": _write_study(root, "P3", [5], seed=3),
    }


@pytest.fixture(scope="module")
def pacs(orthanc, studies: dict[str, Study]):
    for study in studies.values():
        _upload(orthanc, study)
    return orthanc


@pytest.fixture
def logged_in(monkeypatch: pytest.MonkeyPatch):
    """Credentials in the environment variables the config names, as a user would set them."""

    def login(server, password: str | None = None) -> None:
        monkeypatch.setenv("MEDDX_DICOMWEB_USER", server.user)
        monkeypatch.setenv("MEDDX_DICOMWEB_PASSWORD", password or server.password)

    return login


def _config(server, **dicomweb) -> IngestConfig:
    # a loaded machine may answer slowly: the timeout is only for a hang
    settings = {"url": server.url, "retries": 1, "backoff_s": 0.0, "timeout_s": 300.0, **dicomweb}
    return IngestConfig(imaging=ImagingConfig(spatial_size=(8, 16, 16)), dicomweb=DicomWebConfig(**settings))


def _manifest(folder: Path, cells: dict[str, str], name: str = "manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"patient_id": pid, "index_time": (ACQUIRED[pid] + timedelta(days=1)).isoformat(), "imaging": cell}
        for pid, cell in cells.items()
    ]
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _volumes(report) -> dict[str, dict[str, np.ndarray]]:
    cache = RecordCache(report.cache_dir)
    found = {}
    for outcome in report.outcomes:
        assert outcome.status == "ok", outcome.error
        found[outcome.patient_id] = cache.get(outcome.key)
    return found


# ------------------------------------------------------------------ reading from the PACS


def test_dicomweb_rows_give_the_same_tensors_as_the_files(pacs, studies, logged_in, tmp_path: Path) -> None:
    logged_in(pacs)
    config = _config(pacs)
    on_disk = load_cohort(_manifest(tmp_path, {p: str(studies[p].folder) for p in ("P1", "P2")}, "disk.csv"))
    remote = load_cohort(
        _manifest(
            tmp_path,
            {
                "P1": f"dicomweb:studies/{studies['P1'].study_uid}",
                "P2": f"dicomweb:studies/{studies['P2'].study_uid}",
            },
        )
    )
    assert remote.rows[0].remote[Modality.IMAGING] == DicomWebRef(studies["P1"].study_uid)
    assert remote.coverage()[Modality.IMAGING] == 2

    disk = _volumes(ingest_cohort(on_disk, tmp_path / "disk-cache", config, workers=0, progress=False))
    pulled = _volumes(ingest_cohort(remote, tmp_path / "cache", config, workers=0, progress=False))
    for pid in ("P1", "P2"):
        for name in ("volume", "slice_mask"):
            np.testing.assert_array_equal(pulled[pid].arrays[name], disk[pid].arrays[name])
        assert pulled[pid].meta["series_uid"] == disk[pid].meta["series_uid"]
        assert pulled[pid].time == disk[pid].time
    seven = next(uid for uid, n in studies["P2"].series.items() if n == 7)
    assert pulled["P2"].meta["series_uid"] == seven  # the same series rule as for a folder
    assert pulled["P1"].meta["transfer_syntax_name"] == "RLE Lossless"  # retrieved as stored
    assert pulled["P2"].source == f"dicomweb:studies/{studies['P2'].study_uid}"


def test_the_series_store_holds_the_bytes_the_pacs_sent(pacs, studies, logged_in, tmp_path: Path) -> None:
    """Streamed part by part to files: the same bytes as dicomweb-client's splitting of the whole answer."""
    from meddx.dicomweb.store import AS_STORED, SeriesStore

    logged_in(pacs)
    store = SeriesStore(_config(pacs).dicomweb, tmp_path / "store")
    client = pacs.client()
    for pid in ("P1", "P2"):  # P1's first series is RLE, kept as stored
        study = studies[pid]
        for series_uid in study.series:
            folder = store.fetch(study.study_uid, series_uid, patient_id=pid)
            answer = client._session.get(
                f"{pacs.url}/studies/{study.study_uid}/series/{series_uid}", headers={"Accept": AS_STORED}
            )
            expected = sorted(bytes(part) for part in client._decode_multipart_message(answer, stream=False))
            assert sorted(path.read_bytes() for path in folder.glob("*.dcm")) == expected
            assert len(expected) == study.series[series_uid]


def test_a_series_reference_reads_that_series(pacs, studies, logged_in, tmp_path: Path) -> None:
    logged_in(pacs)
    four = next(uid for uid, n in studies["P2"].series.items() if n == 4)
    cohort = load_cohort(_manifest(tmp_path, {"P2": f"dicomweb:studies/{studies['P2'].study_uid}/series/{four}"}))
    record = _volumes(ingest_cohort(cohort, tmp_path / "cache", _config(pacs), workers=0, progress=False))["P2"]
    assert record.meta["series_uid"] == four
    assert record.meta["n_slices"] == 4


def test_a_second_run_fetches_nothing(orthanc_factory, studies, logged_in, tmp_path: Path) -> None:
    server = orthanc_factory()
    _upload(server, studies["P1"])
    logged_in(server)
    cohort = load_cohort(_manifest(tmp_path, {"P1": f"dicomweb:studies/{studies['P1'].study_uid}"}))
    cache = tmp_path / "cache"
    first = ingest_cohort(cohort, cache, _config(server), workers=1, progress=False, out_dir=tmp_path / "run1")
    assert [o.status for o in first.outcomes] == ["ok"]
    server.stop()  # from now on, any request would fail

    again = ingest_cohort(cohort, cache, _config(server), workers=0, progress=False)
    assert [(o.status, o.cached) for o in again.outcomes] == [("ok", True)]
    # Another volume size misses the record cache; the series store still has the files.
    other = _config(server).model_copy(update={"imaging": ImagingConfig(spatial_size=(4, 8, 8))})
    reread = ingest_cohort(cohort, cache, other, workers=0, progress=False)
    assert [(o.status, o.cached) for o in reread.outcomes] == [("ok", False)]
    assert RecordCache(cache).get(reread.outcomes[0].key).arrays["volume"].shape == (4, 8, 8)


def test_a_stopped_server_is_one_error_per_row_and_the_run_goes_on(
    orthanc_factory, studies, logged_in, tmp_path: Path
) -> None:
    server = orthanc_factory()
    logged_in(server)
    server.stop()
    cohort = load_cohort(
        _manifest(
            tmp_path,
            {
                "P1": f"dicomweb:studies/{studies['P1'].study_uid}",
                "P2": f"dicomweb:studies/{studies['P2'].study_uid}",
                "P3": str(studies["P3"].folder),
            },
        )
    )
    report = ingest_cohort(
        cohort, tmp_path / "cache", _config(server), workers=0, progress=False, out_dir=tmp_path / "run"
    )
    by_patient = {o.patient_id: o for o in report.outcomes}
    assert by_patient["P3"].status == "ok"
    for pid in ("P1", "P2"):
        assert by_patient[pid].status == "error"
        assert "cannot reach the DICOMweb server at http://127.0.0.1:" in by_patient[pid].error
        assert "2 tries" in by_patient[pid].error
    errors = pd.read_csv(tmp_path / "run" / "errors.csv")
    assert sorted(errors["patient_id"]) == ["P1", "P2"]
    assert errors["path"].str.startswith("dicomweb:studies/").all()
    assert server.password not in (tmp_path / "run" / "errors.csv").read_text()


def test_a_wrong_password_is_reported_once_before_anything_is_read(
    pacs, studies, logged_in, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logged_in(pacs, password="not-the-password")
    manifest = _manifest(tmp_path, {p: f"dicomweb:studies/{studies[p].study_uid}" for p in ("P1", "P2")})
    with pytest.raises(DicomWebAuthError) as caught:
        ingest_cohort(load_cohort(manifest), tmp_path / "cache", _config(pacs), workers=0, progress=False)
    message = str(caught.value)
    assert "HTTP 401" in message
    assert "MEDDX_DICOMWEB_USER" in message
    assert "MEDDX_DICOMWEB_PASSWORD" in message
    assert "not-the-password" not in message
    assert "not-the-password" not in caplog.text

    config_file = tmp_path / "ingest.json"
    config_file.write_text(_config(pacs).model_dump_json())
    result = CliRunner().invoke(
        main,
        [
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
        ],
    )
    assert result.exit_code == 2
    assert result.output.count("refused the credentials") == 1
    assert "not-the-password" not in result.output
    assert not (tmp_path / "run" / "errors.csv").exists()  # nothing was read


def test_unknown_studies_and_series_are_row_errors(pacs, studies, logged_in, tmp_path: Path) -> None:
    logged_in(pacs)
    study = studies["P1"].study_uid
    cohort = load_cohort(
        _manifest(
            tmp_path,
            {
                "P1": f"dicomweb:studies/{study}/series/1.2.3.999",
                "P2": "dicomweb:studies/1.2.3.4.5.6",
                "P3": f"dicomweb:studies/{studies['P3'].study_uid}",
            },
        )
    )
    report = ingest_cohort(cohort, tmp_path / "cache", _config(pacs), workers=0, progress=False)
    by_patient = {o.patient_id: o for o in report.outcomes}
    assert "HTTP 404" in by_patient["P1"].error
    assert by_patient["P1"].path.endswith("/series/1.2.3.999")
    assert "no series in this study" in by_patient["P2"].error
    assert by_patient["P3"].status == "ok"


# ------------------------------------------------------------------ the manifest from a query


def test_pacs_manifest_finds_the_studies_of_a_date_range(pacs, studies, logged_in, tmp_path: Path) -> None:
    logged_in(pacs)
    config_file = tmp_path / "ingest.json"
    config_file.write_text(json.dumps({"dicomweb": {"url": pacs.url}, "site_timezone": "Europe/Berlin"}))
    out = tmp_path / "manifest.csv"
    result = CliRunner().invoke(
        main,
        [
            "pacs",
            "manifest",
            "--modality",
            "ct",
            "--since",
            "2024-03-01",
            "--until",
            "2024-03-31",
            "--out",
            str(out),
            "--config",
            str(config_file),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 CT studies found" in result.output

    cohort = load_cohort(out)  # ready for ingestion and diagnosis
    assert [row.patient_id for row in cohort] == ["P1", "P2"]
    for row in cohort:
        study = studies[row.patient_id]
        assert row.remote[Modality.IMAGING] == DicomWebRef(study.study_uid)
        first = pydicom.dcmread(next(study.folder.rglob("*.dcm")), stop_before_pixels=True)
        # StudyTime carries TimezoneOffsetFromUTC +0000, which wins over the site zone; plus the 60-minute offset.
        started = datetime.strptime(first.StudyDate + first.StudyTime, "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
        assert row.index_time == started + timedelta(minutes=60)

    # Rows made this way ingest: the index time is after the series' acquisition.
    report = ingest_cohort(cohort, tmp_path / "cache", _config(pacs), workers=0, progress=False)
    assert [o.status for o in report.outcomes] == ["ok", "ok"]


def test_study_times_without_an_offset_use_the_site_zone() -> None:
    from zoneinfo import ZoneInfo

    from meddx.dicomweb.query import study_time

    item = {"00080020": {"vr": "DA", "Value": ["20240705"]}, "00080030": {"vr": "TM", "Value": ["101500"]}}
    assert study_time(item, ZoneInfo("Europe/Berlin")) == datetime(2024, 7, 5, 8, 15, tzinfo=timezone.utc)
    assert study_time(item, None) == datetime(2024, 7, 5, 10, 15, tzinfo=timezone.utc)
    assert study_time({}, None) is None


# ------------------------------------------------------------------ SRs back to the PACS


def test_prediction_srs_are_stored_and_read_back_valid(pacs, studies, logged_in, tmp_path: Path) -> None:
    import highdicom
    from pydicom.uid import generate_uid

    from meddx.dicomweb.client import connect
    from meddx.export.sr import ModelInfo, build_prediction_sr, store_srs

    logged_in(pacs)
    series_uid = generate_uid()
    srs, sources = [], {}
    predictions = [
        {
            "patient_id": "P1",
            "index_time": "2024-03-06T09:00:00Z",
            "task": "disease",
            "probability": 0.83,
            "raw_probability": 0.9,
            "prediction": "1",
            "prediction_set": "1",
            "status": "ok",
        },
        {
            "patient_id": "P2",
            "index_time": "2024-03-07T10:30:00Z",
            "task": "disease",
            "probability": 0.41,
            "raw_probability": 0.3,
            "prediction": "0",
            "prediction_set": "0|1",
            "status": "ok",
        },
    ]
    for number, row in enumerate(predictions, start=1):
        files = sorted((studies[row["patient_id"]].folder / "series0").glob("*.dcm"))
        sources[row["patient_id"]] = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        srs.append(
            build_prediction_sr(
                sources[row["patient_id"]],
                row,
                ModelInfo("meddx-test", "0.1.0"),
                series_instance_uid=series_uid,
                instance_number=number,
            )
        )
    client = connect(_config(pacs).dicomweb)
    stored = store_srs(client, srs)
    assert stored == [str(sr.SOPInstanceUID) for sr in srs]

    for sr, row in zip(srs, predictions, strict=True):
        back = client.retrieve_instance(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
        path = tmp_path / f"{row['patient_id']}.dcm"
        back.save_as(path, enforce_file_format=True)
        read = pydicom.dcmread(path)
        assert read.Modality == "SR"
        assert read.StudyInstanceUID == studies[row["patient_id"]].study_uid
        parsed = highdicom.sr.srread(path)
        assert isinstance(parsed, highdicom.sr.Comprehensive3DSR)
        evidence = parsed.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == sources[row["patient_id"]][0].SeriesInstanceUID
        assert {item.ReferencedSOPInstanceUID for item in evidence.ReferencedSOPSequence} == {
            ds.SOPInstanceUID for ds in sources[row["patient_id"]]
        }
        text = _content_text(read)
        assert f"Calibrated probability of {row['task']}" in text
        assert float(_numeric(read)) == pytest.approx(row["probability"])
        members = {m for m in row["prediction_set"].split("|")}
        assert members <= set(_set_members(read))
        assert "meddx-test" in text
        assert "0.1.0" in text
        buffer = io.BytesIO()
        read.save_as(buffer)  # writes again: a valid dataset

    # The SR series joins the study; reading the study still picks its image series.
    cohort = load_cohort(_manifest(tmp_path, {"P1": f"dicomweb:studies/{studies['P1'].study_uid}"}))
    report = ingest_cohort(cohort, tmp_path / "cache", _config(pacs), workers=0, progress=False)
    record = _volumes(report)["P1"]
    assert record.meta["series_uid"] in studies["P1"].series


def test_diagnose_store_sr_puts_one_report_per_prediction_on_the_pacs(
    pacs, studies, logged_in, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``meddx diagnose --store-sr`` on PACS studies: SRs stored once (resume too), valid, on the series read."""
    import highdicom

    from meddx.dicomweb.client import connect

    logged_in(pacs)
    monkeypatch.setenv("MEDDX_DICOMWEB_URL", pacs.url)  # the model's config names no server: the environment does
    cells = {p: f"dicomweb:studies/{studies[p].study_uid}" for p in ("P1", "P2")}
    cells["P3"] = str(studies["P3"].folder)  # images from files: diagnosed, but no SR (not on the PACS)
    manifest = _manifest(tmp_path, cells)
    out = tmp_path / "run"
    args = [
        "diagnose",
        str(manifest),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        "--workers",
        "0",
        "--chunk-size",
        "1",
        "--store-sr",
        "--quiet",
    ]

    # The run dies after its first chunk (P1's SR stored); --resume must not store P1's again.
    import meddx.batch.run_folder

    write_chunk = meddx.batch.run_folder.write_chunk

    def dies_after_the_first_chunk(parts, number, *rest):
        if number > 0:
            raise KeyboardInterrupt
        write_chunk(parts, number, *rest)

    monkeypatch.setattr(meddx.batch.run_folder, "write_chunk", dies_after_the_first_chunk)
    assert CliRunner().invoke(main, args).exit_code != 0
    monkeypatch.setattr(meddx.batch.run_folder, "write_chunk", write_chunk)
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "DICOM SRs stored on the PACS: 2 (0 failed)" in result.output

    predictions = pd.read_parquet(out / "predictions.parquet")
    assert (predictions.status == "ok").all()
    assert len(predictions) == 3
    reports = pd.read_csv(out / "structured_reports.csv", dtype=str, keep_default_na=False)
    assert list(reports.patient_id) == ["P1", "P2"]
    assert (reports.status == "stored").all()
    assert json.loads((out / "run.json").read_text())["counts"]["structured_reports_stored"] == 2

    client = connect(_config(pacs).dicomweb)
    for report in reports.to_dict("records"):
        study = studies[report["patient_id"]]
        uid = report["sop_instance_uid"]
        mine = client.search_for_instances(study.study_uid, search_filters={"SOPInstanceUID": uid})
        sr_series = mine[0]["0020000E"]["Value"][0]
        assert len(client.search_for_instances(study.study_uid, sr_series)) == 1  # stored once, resume included
        back = client.retrieve_instance(study.study_uid, sr_series, report["sop_instance_uid"])
        path = tmp_path / f"{report['patient_id']}-sr.dcm"
        back.save_as(path, enforce_file_format=True)
        parsed = highdicom.sr.srread(path)
        assert isinstance(parsed, highdicom.sr.Comprehensive3DSR)
        evidence = parsed.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        read_series = max(study.series, key=study.series.get)  # the series rule keeps the most slices
        assert evidence.SeriesInstanceUID == read_series
        row = predictions.set_index("patient_id").loc[report["patient_id"]]
        assert float(_numeric(pydicom.dcmread(path))) == pytest.approx(row["probability"], abs=1e-6)
        assert f"Calibrated probability of {row['task']}" in _content_text(pydicom.dcmread(path))
        # The SR carries the source's patient module to join the study (README); nothing else does.
        headers = (pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(study.folder.rglob("*.dcm")))
        source = next(h for h in headers if h.SeriesInstanceUID == read_series)
        sr = pydicom.dcmread(path)
        assert sr.PatientName == source.PatientName
        assert "PatientBirthDate" in sr
        family = str(source.PatientName).split("^")[0]
        pattern = re.compile(rf"\b{re.escape(family)}\b")
        for written in out.rglob("*"):
            if written.is_file():
                assert not pattern.search(written.read_bytes().decode("utf-8", "replace")), written
        assert not pattern.search(result.output)


def test_store_sr_without_a_server_is_refused_before_any_work(tiny_model: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEDDX_DICOMWEB_URL", raising=False)
    manifest = _manifest(tmp_path, {"P1": "dicomweb:studies/1.2.3"})
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "diagnose",
            str(manifest),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            "--workers",
            "0",
            "--store-sr",
            "--quiet",
        ],
    )
    assert result.exit_code != 0
    assert "MEDDX_DICOMWEB_URL" in result.output
    assert not (out / "predictions.parquet").exists()


def test_a_failed_prediction_row_makes_no_sr(studies) -> None:
    pytest.importorskip("highdicom")
    from meddx.errors import PredictionsError
    from meddx.export.sr import ModelInfo, build_prediction_sr

    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in (studies["P1"].folder / "series0").glob("*.dcm")]
    row = {"patient_id": "P1", "index_time": "2024-03-06T09:00:00Z", "task": "disease", "status": "error"}
    with pytest.raises(PredictionsError, match="status 'ok'"):
        build_prediction_sr(source, row, ModelInfo("m", "1"))
    flagged = {**row, "status": "abstain", "probability": 0.7, "prediction": "1", "prediction_set": "1"}
    assert "Abstained: inputs unlike" in _content_text(build_prediction_sr(source, flagged, ModelInfo("m", "1")))
    assert "Abstained" not in _content_text(
        build_prediction_sr(source, {**flagged, "status": "ok"}, ModelInfo("m", "1"))
    )
    with pytest.raises(PredictionsError, match="PatientID"):
        build_prediction_sr(
            source, {**row, "status": "ok", "probability": 0.5, "patient_id": "P2"}, ModelInfo("m", "1")
        )


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _content_text(ds: pydicom.Dataset) -> str:
    parts = []
    for item in _walk(ds.ContentSequence):
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(keyword, []):
                parts.append(str(code.CodeMeaning))
        if "TextValue" in item:
            parts.append(str(item.TextValue))
    return "\n".join(parts)


def _numeric(ds: pydicom.Dataset) -> float:
    for item in _walk(ds.ContentSequence):
        if item.ValueType == "NUM":
            return float(item.MeasuredValueSequence[0].NumericValue)
    raise AssertionError("no numeric content item")


def _set_members(ds: pydicom.Dataset) -> list[str]:
    return [
        str(item.ConceptCodeSequence[0].CodeMeaning)
        for item in _walk(ds.ContentSequence)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "conformal-set"
    ]


# ------------------------------------------------------------------ without a server


def test_the_manifest_checks_dicomweb_cells(tmp_path: Path) -> None:
    from meddx.errors import ManifestError

    good = "dicomweb:studies/1.2.840.1/series/1.2.840.1.2"
    rows = [
        {"patient_id": "a", "index_time": "2024-03-05T14:00:00Z", "imaging": good},
        {"patient_id": "b", "index_time": "2024-03-05T14:00:00Z", "imaging": "dicomweb:studies/1.2/../../etc"},
        {"patient_id": "c", "index_time": "2024-03-05T14:00:00Z", "imaging": "dicomweb:series/1.2"},
        {"patient_id": "d", "index_time": "2024-03-05T14:00:00Z", "audio": "dicomweb:studies/1.2"},
    ]
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(ManifestError) as caught:
        load_cohort(path)
    problems = {(p.row, p.column): p.reason for p in caught.value.problems}
    assert set(problems) == {(2, "imaging"), (3, "imaging"), (4, "audio")}
    assert "write dicomweb:studies/<StudyInstanceUID>" in problems[(3, "imaging")]
    assert "imaging only" in problems[(4, "audio")]

    pd.DataFrame(rows[:1]).to_csv(path, index=False)
    row = load_cohort(path).rows[0]
    assert row.paths == {}
    assert row.remote == {Modality.IMAGING: DicomWebRef("1.2.840.1", "1.2.840.1.2")}


def test_credentials_never_go_in_the_config() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must not carry credentials"):
        DicomWebConfig(url="https://user:secret@pacs.example.org/dicom-web")
    assert "password" not in DicomWebConfig().model_dump_json().replace("password_env", "")


def test_a_dicomweb_cache_key_is_its_uids_and_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from meddx.cache import cache_key
    from meddx.ingest.dicom import ImagingIngestor

    ref = DicomWebRef("1.2.3", "1.2.3.4")

    def key(url: str, ref: DicomWebRef = ref) -> str:
        config = IngestConfig(dicomweb=DicomWebConfig(url=url))
        return cache_key(Modality.IMAGING, [ref], "p1", "2024-03-05T14:00:00+00:00", config, reader=ImagingIngestor)

    assert key("http://pacs:8042/dicom-web") == key("http://PACS:8042/dicom-web/")
    assert key("http://pacs:8042/dicom-web") != key("http://other:8042/dicom-web")
    assert key("http://pacs:8042/dicom-web") != key("http://pacs:8042/dicom-web", DicomWebRef("1.2.3"))
    monkeypatch.setenv("MEDDX_DICOMWEB_USER", "someone")  # credentials do not change where a record is
    assert key("http://pacs:8042/dicom-web") == key("http://pacs:8042/dicom-web")


def test_series_are_tried_in_the_order_of_the_series_rule() -> None:
    from meddx.dicomweb.store import SeriesEntry, order_series

    entries = [
        SeriesEntry("1.9", "CT", 40),
        SeriesEntry("1.5", "CT", 80),
        SeriesEntry("1.7", "CT", 80),
        SeriesEntry("1.3", "CT", 10),
        SeriesEntry("1.1", "SR", 500),
        SeriesEntry("1.2", "KO", 1),
    ]
    assert [e.series_uid for e in order_series(entries, "most_slices")] == ["1.5", "1.7", "1.9", "1.3"]
    assert [e.series_uid for e in order_series(entries, "first_uid")] == ["1.3", "1.5", "1.7", "1.9"]
