"""meddx diagnose's run folder: the model checked before any patient, --resume checking every state
file it reads (named, with how to start over), the model fingerprint in the plan, one run per folder."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_MANIFEST

from meddx.batch import diagnose
from meddx.batch.run_folder import LOCK, PARTS, PLAN, make_plan, start_or_resume, write_chunk
from meddx.cli import main
from meddx.cohort import load_cohort
from meddx.errors import ConfigError
from meddx.models.folder import check_model_folder

CHUNK_SIZE = 2


def _args(model: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "diagnose",
        str(SAMPLE_MANIFEST),
        "--model",
        str(model),
        "--out",
        str(out),
        "--split",
        "test",
        "--chunk-size",
        str(CHUNK_SIZE),
        "--cache",
        str(cache),
        "--workers",
        "0",
        "--quiet",
        *extra,
    ]


def _unfinished_run(model: Path, out: Path) -> Path:
    """A run folder as a killed run leaves it before its first chunk: OUT/parts/plan.json."""
    rows = load_cohort(SAMPLE_MANIFEST).split("test")
    checked = check_model_folder(model, fingerprint=True)
    plan = make_plan(SAMPLE_MANIFEST, checked, "test", CHUNK_SIZE, rows, False)
    n_chunks = -(-len(rows) // CHUNK_SIZE)
    start_or_resume(out, plan, False, [CHUNK_SIZE * len(checked.tasks)] * n_chunks)
    return out / PARTS


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_a_bad_calibration_fails_before_any_patient_is_read(model_copy, tmp_path, sample_cache) -> None:
    calibration = json.loads((model_copy / "calibration.json").read_text())
    task = next(iter(calibration["tasks"]))
    calibration["tasks"][task]["calibrator"]["temperature"] = -1
    (model_copy / "calibration.json").write_text(json.dumps(calibration))
    result = CliRunner().invoke(main, _args(model_copy, tmp_path / "run", sample_cache))
    assert result.exit_code == 2, result.output  # bad input
    assert f"calibration.json: tasks.{task}.calibrator.temperature must be a finite number > 0" in result.output
    assert not (tmp_path / "run" / PARTS).exists()  # nothing ingested, nothing written


def test_resume_refuses_a_model_whose_calibration_changed(model_copy, tmp_path, sample_cache) -> None:
    out = tmp_path / "run"
    _unfinished_run(model_copy, out)
    calibration = json.loads((model_copy / "calibration.json").read_text())
    task = next(iter(calibration["tasks"]))
    calibration["tasks"][task]["calibrator"]["temperature"] *= 1.5  # valid, but other probabilities
    (model_copy / "calibration.json").write_text(json.dumps(calibration))
    result = CliRunner().invoke(main, _args(model_copy, out, sample_cache, "--resume"))
    assert result.exit_code == 2, result.output
    assert "another model_fingerprint" in result.output, result.output


def test_a_garbled_plan_is_named_with_how_to_start_over(tiny_model, tmp_path, sample_cache) -> None:
    out = tmp_path / "run"
    (_unfinished_run(tiny_model, out) / PLAN).write_text('{"format": "meddx-diag')
    result = CliRunner().invoke(main, _args(tiny_model, out, sample_cache, "--resume"))
    assert result.exit_code == 2, result.output
    assert f"{out / PARTS / PLAN} is damaged" in result.output
    assert "run without --resume" in result.output


@pytest.mark.parametrize("name", ["chunk-00000.copy.parquet", "chunk-99999.parquet", "notes.txt"])
def test_an_unexpected_file_in_the_run_folder_is_named(tiny_model, tmp_path, sample_cache, name) -> None:
    out = tmp_path / "run"
    (_unfinished_run(tiny_model, out) / name).write_text("")
    result = CliRunner().invoke(main, _args(tiny_model, out, sample_cache, "--resume"))
    assert result.exit_code == 2, result.output
    assert f"{out / PARTS / name} is not a file of this run" in result.output


def _chunk_zero(parts: Path, rows: int) -> None:
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(rows)], "probability": [0.5] * rows})
    errors = pd.DataFrame(columns=["patient_id", "index_time", "modality", "path", "error"])
    write_chunk(parts, 0, frame, errors, [{"resourceType": "RiskAssessment"}])


def test_a_damaged_chunk_is_named_before_any_work(tiny_model, tmp_path, sample_cache) -> None:
    out = tmp_path / "run"
    parts = _unfinished_run(tiny_model, out)
    tasks = len(check_model_folder(tiny_model).tasks)
    _chunk_zero(parts, CHUNK_SIZE * tasks)
    table = parts / "chunk-00000.parquet"
    table.write_bytes(table.read_bytes()[: len(table.read_bytes()) // 2])  # cut short
    result = CliRunner().invoke(main, _args(tiny_model, out, sample_cache, "--resume"))
    assert result.exit_code == 2, result.output
    assert f"{table} is damaged" in result.output
    assert "run without --resume to start over" in result.output

    _chunk_zero(parts, CHUNK_SIZE * tasks + 1)  # a chunk of other rows than the plan's
    result = CliRunner().invoke(main, _args(tiny_model, out, sample_cache, "--resume"))
    assert result.exit_code == 2, result.output
    assert "prediction rows where the plan gives" in result.output, result.output

    _chunk_zero(parts, CHUNK_SIZE * tasks)
    (parts / "chunk-00000.ndjson").write_text("{not json\n")
    result = CliRunner().invoke(main, _args(tiny_model, out, sample_cache, "--resume"))
    assert result.exit_code == 2, result.output
    assert "chunk-00000.ndjson is damaged" in result.output, result.output


def test_a_second_run_on_the_same_folder_is_refused(tiny_model, tmp_path, sample_cache) -> None:
    out = tmp_path / "run"
    (_unfinished_run(tiny_model, out) / PLAN).write_text("garbled")  # what a run that got the folder reports
    with open(out / LOCK, "a") as held:  # another run holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = CliRunner().invoke(main, _args(tiny_model, out, sample_cache, "--resume"))
    assert result.exit_code == 2, result.output
    assert "another meddx diagnose is writing to" in result.output, result.output

    # a holder killed with SIGKILL leaves the folder free: the kernel drops its lock
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); sys.stdin.read()",
            str(out / LOCK),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    result = CliRunner().invoke(main, _args(tiny_model, out, sample_cache, "--resume"))
    assert result.exit_code == 2
    assert "another meddx diagnose" in result.output
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = CliRunner().invoke(main, _args(tiny_model, out, sample_cache, "--resume"))
    assert result.exit_code == 2, result.output
    assert "plan.json is damaged" in result.output, result.output

    # a run that failed released the folder (twice in one process: the lock does not outlive the call)
    for _ in range(2):
        with pytest.raises(ConfigError, match="plan.json is damaged"):
            diagnose(
                SAMPLE_MANIFEST,
                tiny_model,
                out,
                split="test",
                chunk_size=CHUNK_SIZE,
                cache_dir=sample_cache,
                workers=0,
                resume=True,
                progress=False,
            )
