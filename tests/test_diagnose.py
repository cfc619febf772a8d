"""Batch diagnosis end to end: the CLI on sample_data, broken files, kill and resume, FHIR output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO, SAMPLE_MANIFEST, process_alive
from fhir.resources.R4B.riskassessment import RiskAssessment

from meddx.batch import diagnose
from meddx.cli import main

MODALITY_COLUMNS = ["imaging", "ehr", "notes", "device_logs", "audio", "video"]
KEY = ["patient_id", "index_time", "task"]


def _absolute_manifest(rows: pd.DataFrame, path: Path) -> Path:
    """A manifest elsewhere naming sample_data's files by absolute path."""
    rows = rows.copy()
    for column in MODALITY_COLUMNS:
        rows[column] = [str(SAMPLE_MANIFEST.parent / v) if v else "" for v in rows[column]]
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, index=False)
    return path


def _sample_rows() -> pd.DataFrame:
    return pd.read_csv(SAMPLE_MANIFEST, dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_cli_diagnoses_the_test_split_of_sample_data(tmp_path: Path, tiny_model: Path, sample_cache: Path) -> None:
    out = tmp_path / "run"
    args = [
        "diagnose",
        str(SAMPLE_MANIFEST),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--split",
        "test",
        "--cache",
        str(sample_cache),
        "--workers",
        "2",
        "--chunk-size",
        "5",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "diagnosed 12 of 12 rows" in result.output
    assert "12 FHIR RiskAssessments" in result.output
    assert "%|" not in result.stderr
    assert "Loading weights" not in result.stderr  # --quiet: not even transformers'

    frame = pd.read_parquet(out / "predictions.parquet")
    test_rows = _sample_rows().query("split == 'test'")
    assert list(frame.patient_id) == list(test_rows.patient_id)
    assert list(frame.index_time) == list(test_rows.index_time)
    assert (frame.status == "ok").all()
    assert frame["probability"].between(0, 1).all()
    assert set(frame.prediction) <= {"0", "1"}
    assert frame.prediction_set.isin(["0", "1", "0|1", ""]).all()
    assert list(frame.sex) == list(test_rows.sex)  # the manifest's extra columns ride along
    # a contribution for every modality a row used, none for the others
    for _, row in frame.iterrows():
        used = set(row.modalities.split("|"))
        for modality in MODALITY_COLUMNS:
            assert pd.notna(row.get(f"contribution:{modality}")) == (modality in used)

    schema = json.loads((REPO / "schemas" / "prediction_row.schema.json").read_text())
    csv = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    assert list(csv.columns) == list(frame.columns)
    assert len(csv) == len(frame)
    for record in frame.to_dict("records"):
        jsonschema.validate({k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}, schema)

    run = json.loads((out / "run.json").read_text())
    assert run["complete"]
    assert run["counts"]["rows"] == 12
    assert run["counts"]["prediction_rows"] == 12
    assert len(run["model"]["sha256"]) == 64
    assert run["versions"]["meddx"]
    assert run["settings"]["model_threads"] >= 1
    assert not (out / "parts").exists()
    assert list(pd.read_csv(out / "errors.csv").columns) == ["patient_id", "index_time", "modality", "path", "error"]

    # what `meddx evaluate` reads
    evaluated = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(out / "predictions.parquet"),
            "--manifest",
            str(SAMPLE_MANIFEST),
            "--out",
            str(tmp_path / "eval"),
            "--bootstrap",
            "0",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert (tmp_path / "eval" / "report.html").is_file()


def test_every_risk_assessment_validates_and_names_no_one(tmp_path: Path, tiny_model: Path, sample_cache: Path) -> None:
    result = diagnose(
        SAMPLE_MANIFEST, tiny_model, tmp_path / "run", split="test", cache_dir=sample_cache, workers=0, progress=False
    )
    frame = pd.read_parquet(result.predictions)
    lines = result.risk_assessments.read_text().splitlines()
    assert len(lines) == (frame.status == "ok").sum() == 12
    sha256 = json.loads(result.run.read_text())["model"]["sha256"]
    birth_dates = {
        json.loads((SAMPLE_MANIFEST.parent / p).read_text())["entry"][0]["resource"].get("birthDate")
        for p in _sample_rows().query("split == 'test'").ehr
        if p
    }
    for line, (_, row) in zip(lines, frame.iterrows(), strict=True):
        resource = RiskAssessment.model_validate_json(line)
        assert resource.subject.identifier.value == row.patient_id
        assert resource.occurrenceDateTime.isoformat().replace("+00:00", "Z") == row.index_time
        assert float(resource.prediction[0].probabilityDecimal) == pytest.approx(row.probability, abs=1e-6)
        assert [b.display for b in resource.basis] == row.modalities.split("|")
        extensions = {e.url.rsplit("/", 1)[1]: e for e in resource.extension}
        assert extensions["model-sha256"].valueString == sha256
        assert float(extensions["calibration-alpha"].valueDecimal) == pytest.approx(0.1)
        assert extensions["conformal-set"].valueString == row.prediction_set
        assert "name" not in json.loads(line)["subject"]
        assert "birthDate" not in line
    assert birth_dates - {None}
    assert not any(d in "".join(lines) for d in birth_dates if d)


@pytest.mark.slow
def test_a_broken_file_fails_one_modality_and_a_row_without_inputs_is_one_error_row(
    tmp_path: Path, tiny_model: Path, sample_cache: Path
) -> None:
    rows = _sample_rows().query("split == 'test'").head(5).reset_index(drop=True)
    clean = _absolute_manifest(rows, tmp_path / "clean" / "manifest.csv")
    broken_wav = tmp_path / "broken" / "lung_sound.wav"
    broken_wav.parent.mkdir(parents=True)
    broken_wav.write_bytes(b"RIFF\x00\x00not really a wave file")
    damaged = rows.copy()
    with_audio = [i for i in range(len(rows)) if rows.audio[i]]
    one_bad, all_bad = with_audio[0], with_audio[1]
    damaged.loc[one_bad, "audio"] = str(broken_wav)  # the rest of this row still diagnoses
    for column in MODALITY_COLUMNS:  # this row names only the broken file
        damaged.loc[all_bad, column] = ""
    damaged = _absolute_manifest(damaged, tmp_path / "broken" / "manifest.csv")
    damaged_rows = pd.read_csv(damaged, dtype=str, keep_default_na=False)
    damaged_rows.loc[all_bad, "audio"] = str(broken_wav)
    damaged_rows.to_csv(damaged, index=False)

    reference = pd.read_parquet(
        diagnose(clean, tiny_model, tmp_path / "a", cache_dir=sample_cache, workers=1, progress=False).predictions
    )
    result = diagnose(
        damaged, tiny_model, tmp_path / "b", cache_dir=sample_cache, workers=1, chunk_size=2, progress=False
    )
    frame = pd.read_parquet(result.predictions)
    assert len(frame) == 5
    assert list(frame.patient_id) == list(rows.patient_id)

    error = frame.iloc[all_bad]
    assert error.status == "error"
    assert pd.isna(error.probability)
    assert error.modality_errors == "audio"
    assert error.modalities == ""
    assert pd.isna(error.prediction)

    partial = frame.iloc[one_bad]
    assert partial.status == "ok"
    assert partial.modality_errors == "audio"
    assert "audio" not in partial.modalities
    assert set(partial.modalities.split("|")) == set(reference.iloc[one_bad].modalities.split("|")) - {"audio"}

    others = [i for i in range(5) if i not in (one_bad, all_bad)]
    pd.testing.assert_frame_equal(
        frame.iloc[others].reset_index(drop=True),
        reference.iloc[others].reset_index(drop=True)[frame.columns],
        check_dtype=False,
        atol=1e-5,
    )  # batches differ: float32 sums in another order
    assert not (frame.iloc[others].modality_errors != "").any()

    errors = pd.read_csv(result.errors, dtype=str, keep_default_na=False)
    assert sorted(errors.modality) == ["", "audio", "audio"]
    assert errors.loc[errors.modality == "", "error"].str.contains("not diagnosed: no modality could be read").all()
    assert len(result.risk_assessments.read_text().splitlines()) == 4
    assert result.counts["undiagnosed_rows"] == 1
    assert result.counts["ingest_errors"] == 2


def _children(pid: int) -> list[int]:
    """The child processes of every thread of ``pid`` (the workers are started by the feeder thread)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


@pytest.mark.slow
def test_a_run_killed_midway_finishes_with_resume_and_every_row_once(
    tmp_path: Path, tiny_model: Path, sample_cache: Path
) -> None:
    rows = _sample_rows().query("split == 'test'").head(8)
    manifest = _absolute_manifest(rows, tmp_path / "cohort" / "manifest.csv")
    out, cold_cache = tmp_path / "run", tmp_path / "cold-cache"  # a cold cache: each chunk takes a while
    args = [
        sys.executable,
        "-m",
        "meddx.cli",
        "diagnose",
        str(manifest),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--cache",
        str(cold_cache),
        "--workers",
        "1",
        "--chunk-size",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600  # the bounds here are only reached by a hang
    while not list((out / "parts").glob("chunk-*.parquet")):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    children = _children(process.pid)  # the ingestion worker and multiprocessing's resource tracker
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 600
    while any(process_alive(child) for child in children):  # orphaned workers stop by themselves
        assert time.monotonic() < deadline, "a worker outlived the killed diagnose run"
        time.sleep(0.2)
    done = sorted(p.name for p in (out / "parts").glob("chunk-*.parquet"))
    assert 1 <= len(done) < 4
    assert not (out / "predictions.parquet").exists()
    assert not (out / "run.json").exists()

    result = CliRunner().invoke(main, args[3:] + ["--resume"])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out / "predictions.parquet")
    assert len(frame) == 8
    assert not frame.duplicated(KEY).any()
    assert list(frame.patient_id) == list(rows.patient_id)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["chunks_done_before"] == len(done)
    assert run["counts"]["prediction_rows"] == 8
    assert len((out / "risk_assessments.ndjson").read_text().splitlines()) == 8

    # the same as a run that was never killed
    reference = pd.read_parquet(
        diagnose(manifest, tiny_model, tmp_path / "whole", cache_dir=cold_cache, workers=0, progress=False).predictions
    )
    pd.testing.assert_frame_equal(frame, reference, atol=1e-5)

    again = CliRunner().invoke(main, args[3:] + ["--resume"])  # finished: nothing to do
    assert again.exit_code == 0
    assert pd.read_parquet(out / "predictions.parquet").equals(frame)


def test_resume_refuses_a_run_of_another_model_or_split(tmp_path: Path, tiny_model: Path, sample_cache: Path) -> None:
    out = tmp_path / "run"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "plan.json").write_text(json.dumps({"format": "meddx-diagnose-run/1", "split": "val"}))
    args = [
        "diagnose",
        str(SAMPLE_MANIFEST),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--split",
        "test",
        "--cache",
        str(sample_cache),
        "--workers",
        "0",
        "--resume",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--resume" in result.output
    assert "split" in result.output


def test_bad_arguments_are_refused_before_any_work(tmp_path: Path, tiny_model: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "diagnose",
            str(SAMPLE_MANIFEST),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "a"),
            "--split",
            "holdout",
        ],
    )
    assert result.exit_code == 2
    assert "no rows of split 'holdout'" in result.output
    result = runner.invoke(
        main, ["diagnose", str(SAMPLE_MANIFEST), "--model", str(tmp_path), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2
    assert "--model" in result.output
    assert "model.safetensors" in result.output


def test_store_sr_is_refused_on_the_ray_engine_before_any_work(tmp_path: Path) -> None:
    from meddx.errors import ConfigError

    with pytest.raises(ConfigError, match="--store-sr runs with the local engine"):
        diagnose(SAMPLE_MANIFEST, tmp_path / "no-model", tmp_path / "run", engine="ray", store_sr=True)
    assert not (tmp_path / "run").exists()


def test_the_model_gets_the_threads_the_workers_leave() -> None:
    import torch

    from meddx.streaming import available_cores, model_threads

    before = torch.get_num_threads()
    cores = available_cores()
    for workers in (0, 1, 2, cores + 3):
        with model_threads(workers) as threads:
            assert threads == torch.get_num_threads() == max(1, min(before, cores - max(workers, 1)))
        assert torch.get_num_threads() == before  # restored


def test_the_feeder_counts_rows_as_their_files_come_back(tiny_model: Path, sample_cache: Path) -> None:
    """diagnose's bar moves per row, not per chunk of 5."""
    from meddx.cohort import load_cohort
    from meddx.models.checkpoint import read_aligner
    from meddx.streaming import ChunkFeeder

    rows = load_cohort(SAMPLE_MANIFEST).split("test")
    chunks = [(k, rows[i : i + 5]) for k, i in enumerate(range(0, len(rows), 5))]
    counts: list[int] = []
    cohort = load_cohort(SAMPLE_MANIFEST)
    with ChunkFeeder(cohort, chunks, read_aligner(tiny_model), sample_cache, 0, None, on_read=counts.append) as feeder:
        ready = [len(chunk.rows) for chunk in feeder]
    assert ready == [5, 5, 2], counts
    assert sum(counts) == 12, counts
    assert max(counts) < 5, counts
