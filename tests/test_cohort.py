"""The cohort manifest: every failure the contract lists is reported, all at once."""

from __future__ import annotations

from datetime import timezone
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from meddx.cli import main
from meddx.cohort import load_cohort
from meddx.errors import ManifestError
from meddx.records import Modality

HEADER = "patient_id,index_time,split,imaging,audio,label:disease,label:stage,sex\n"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "ct").mkdir()
    (tmp_path / "p1" / "lung.wav").write_bytes(b"RIFF")
    return tmp_path


def write(folder: Path, body: str, header: str = HEADER) -> Path:
    path = folder / "manifest.csv"
    path.write_text(header + body)
    return path


def test_valid_manifest_resolves_paths_tasks_and_extras(folder: Path) -> None:
    path = write(
        folder,
        "p1,2024-03-05T14:00:00Z,train,p1/ct,p1/lung.wav,1,mild,F\n"
        "p2,2024-03-05T15:00:00+01:00,test,,,0,severe,M\n"
        "p3,2024-03-06T10:00:00Z,,,,,,\n",
    )
    cohort = load_cohort(path)
    assert len(cohort) == 3
    first, second, third = cohort.rows
    assert first.paths == {Modality.IMAGING: folder / "p1" / "ct", Modality.AUDIO: folder / "p1" / "lung.wav"}
    assert second.paths == {}
    assert second.index_time.tzinfo == timezone.utc and second.index_time.hour == 14
    assert third.split is None and third.labels == {"disease": None, "stage": None}
    assert cohort.tasks["disease"].kind == "binary"
    assert cohort.tasks["stage"].kind == "multiclass" and cohort.tasks["stage"].classes == ("mild", "severe")
    assert first.extras == {"sex": "F"} and cohort.extra_columns == ["sex"]
    assert [r.patient_id for r in cohort.split("test")] == ["p2"]


def test_parquet_manifest(folder: Path) -> None:
    frame = pd.DataFrame(
        {"patient_id": ["p1"], "index_time": ["2024-03-05T14:00:00Z"], "imaging": ["p1/ct"], "label:disease": [1]}
    )
    frame.to_parquet(folder / "manifest.parquet")
    cohort = load_cohort(folder / "manifest.parquet")
    assert cohort.rows[0].labels == {"disease": "1"}
    assert cohort.rows[0].paths[Modality.IMAGING] == folder / "p1" / "ct"


def test_every_problem_is_listed_at_once(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path.parent / "outside.wav"
    outside.write_bytes(b"x")
    path = write(
        folder,
        "p1,2024-03-05T14:00:00,train,,,1,mild,F\n"  # no time zone
        "p2,yesterday,val,,,0,mild,F\n"  # not a time
        "p3,2024-03-05T14:00:00Z,holdout,,,0,mild,F\n"  # unknown split
        "p4,2024-03-05T14:00:00Z,train,p4/missing,,0,mild,F\n"  # path does not exist
        "p5,2024-03-05T14:00:00Z,train,,../outside.wav,0,mild,F\n"  # climbs out of the folder
        "p6,2024-03-05T14:00:00Z,train,,,1,mild,F\n"
        "p6,2024-03-05T14:00:00Z,train,,,1,severe,F\n"  # duplicate (patient_id, index_time)
        "p7,2024-03-05T14:00:00Z,train,,,2,severe,F\n"  # not a binary label
        ",2024-03-05T14:00:00Z,train,,,1,severe,F\n",  # empty patient id
    )
    with pytest.raises(ManifestError) as caught:
        load_cohort(path)
    problems = {(p.row, p.column): p.reason for p in caught.value.problems}
    assert "no time zone" in problems[(1, "index_time")]
    assert "not an ISO 8601 time" in problems[(2, "index_time")]
    assert "not a split" in problems[(3, "split")]
    assert "does not exist" in problems[(4, "imaging")]
    assert "climbs out of the manifest folder" in problems[(5, "audio")]
    assert "duplicate of row 6" in problems[(7, "index_time")]
    assert "not a binary label" in problems[(8, "label:disease")]
    assert "patient_id is empty" in problems[(9, "patient_id")]
    assert len(caught.value.problems) == 8
    message = str(caught.value)
    assert "8 problems" in message and "row 4, column 'imaging'" in message


def test_missing_required_columns(folder: Path) -> None:
    path = write(folder, "p1,F,x\n", header="patient_id,sex,label:\n")
    with pytest.raises(ManifestError) as caught:
        load_cohort(path)
    reasons = [str(p) for p in caught.value.problems]
    assert any("'index_time': required column is missing" in r for r in reasons)


def test_one_class_multiclass_task_is_refused(folder: Path) -> None:
    path = write(folder, "p1,2024-03-05T14:00:00Z,train,,,1,mild,F\n")
    with pytest.raises(ManifestError, match="only one class"):
        load_cohort(path)


def test_absolute_paths_may_point_anywhere(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "lung.wav"
    elsewhere.write_bytes(b"RIFF")
    path = write(folder, f"p1,2024-03-05T14:00:00Z,train,,{elsewhere},1,mild,F\np2,2024-03-05T14:00:00Z,train,,,0,severe,F\n")
    assert load_cohort(path).rows[0].paths[Modality.AUDIO] == elsewhere


@pytest.mark.parametrize("command", ["validate", "ingest"])
def test_cli_exits_2_and_lists_problems(folder: Path, command: str) -> None:
    path = write(folder, "p1,2024-03-05T14:00:00,train,,,1,mild,F\np2,2024-03-05T14:00:00Z,bogus,,,0,severe,F\n")
    args = [command, str(path)] + (["--cache", str(folder / "cache")] if command == "ingest" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "2 problems" in result.output and "no time zone" in result.output and "not a split" in result.output
    assert not (folder / "cache").exists()  # nothing started


def test_cli_missing_manifest_exits_2(folder: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(folder / "nope.csv")])
    assert result.exit_code == 2 and "file not found" in result.output
