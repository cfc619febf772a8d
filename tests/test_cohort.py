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
    assert second.index_time.tzinfo == timezone.utc
    assert second.index_time.hour == 14
    assert third.split is None
    assert third.labels == {"disease": None, "stage": None}
    assert cohort.tasks["disease"].kind == "binary"
    assert cohort.tasks["stage"].kind == "multiclass"
    assert cohort.tasks["stage"].classes == ("mild", "severe")
    assert first.extras == {"sex": "F"}
    assert cohort.extra_columns == ["sex"]
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
        "p7,2024-03-05T14:00:00Z,train,,,0.5,severe,F\n"  # not a class
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
    assert "'0.5' is not a class" in problems[(8, "label:disease")]
    assert "patient_id is empty" in problems[(9, "patient_id")]
    assert len(caught.value.problems) == 8
    message = str(caught.value)
    assert "8 problems" in message
    assert "row 4, column 'imaging'" in message


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
    path = write(
        folder, f"p1,2024-03-05T14:00:00Z,train,,{elsewhere},1,mild,F\np2,2024-03-05T14:00:00Z,train,,,0,severe,F\n"
    )
    assert load_cohort(path).rows[0].paths[Modality.AUDIO] == elsewhere


@pytest.mark.parametrize("command", ["validate", "ingest"])
def test_cli_exits_2_and_lists_problems(folder: Path, command: str) -> None:
    path = write(folder, "p1,2024-03-05T14:00:00,train,,,1,mild,F\np2,2024-03-05T14:00:00Z,bogus,,,0,severe,F\n")
    args = [command, str(path)] + (["--cache", str(folder / "cache")] if command == "ingest" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "2 problems" in result.output
    assert "no time zone" in result.output
    assert "not a split" in result.output
    assert not (folder / "cache").exists()  # nothing started


def test_cli_missing_manifest_exits_2(folder: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(folder / "nope.csv")])
    assert result.exit_code == 2
    assert "file not found" in result.output


# ------------------------------------------------------- strict where it must be, lenient where it can


@pytest.mark.parametrize("epoch", ["1709647200", "1709647200.5"])
def test_an_epoch_index_time_in_a_csv_is_refused_with_how_to_write_it(folder: Path, epoch: str) -> None:
    path = write(folder, f"p1,{epoch},train,,,1,mild,F\np2,2024-03-05T14:00:00Z,train,,,0,severe,F\n")
    with pytest.raises(ManifestError) as caught:
        load_cohort(path)
    problem = {(p.row, p.column): p.reason for p in caught.value.problems}[(1, "index_time")]
    assert "epoch number" in problem
    assert "2024-03-05T14:00:00Z" in problem


@pytest.mark.parametrize("values", [[1709647200, 1709650800], [1709647200.0, 1709650800.5]], ids=["int", "float"])
def test_an_epoch_index_time_column_in_parquet_is_refused(folder: Path, values: list) -> None:
    frame = pd.DataFrame({"patient_id": ["p1", "p2"], "index_time": values})
    frame.to_parquet(folder / "manifest.parquet")
    with pytest.raises(ManifestError) as caught:
        load_cohort(folder / "manifest.parquet")
    assert [(p.row, p.column) for p in caught.value.problems] == [(1, "index_time"), (2, "index_time")]
    assert all("epoch number" in p.reason for p in caught.value.problems)


def test_a_zone_aware_parquet_timestamp_column_is_accepted_and_a_naive_one_refused(folder: Path) -> None:
    aware = pd.DataFrame({"patient_id": ["p1"], "index_time": pd.to_datetime(["2024-03-05T15:00:00+01:00"])})
    aware.to_parquet(folder / "aware.parquet")
    assert load_cohort(folder / "aware.parquet").rows[0].index_time.isoformat() == "2024-03-05T14:00:00+00:00"
    naive = pd.DataFrame({"patient_id": ["p1"], "index_time": pd.to_datetime(["2024-03-05T14:00:00"])})
    naive.to_parquet(folder / "naive.parquet")
    with pytest.raises(ManifestError, match="has no time zone"):
        load_cohort(folder / "naive.parquet")


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00Z", "9999-12-31T23:00:00-05:00", "1500-06-01T00:00:00Z"])
def test_an_index_time_pandas_cannot_hold_fails_in_validate(folder: Path, when: str) -> None:
    path = write(folder, f"p1,{when},train,,,1,mild,F\np2,2024-03-05T14:00:00Z,train,,,0,severe,F\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "row 1, column 'index_time'" in result.output
    assert "outside the times pandas can hold" in result.output


def test_integer_coded_grades_are_a_multiclass_task(folder: Path) -> None:
    body = "".join(f"p{g}{k},2024-03-05T14:00:00Z,train,,,{g},,F\n" for g in (4, 0, 2, 1, 3, 10) for k in "ab")
    cohort = load_cohort(
        write(folder, body, header="patient_id,index_time,split,imaging,audio,label:grade,label:stage,sex\n")
    )
    grade = cohort.tasks["grade"]
    assert grade.kind == "multiclass"
    assert grade.classes == ("0", "1", "2", "3", "4", "10")  # numeric order
    assert cohort.rows[0].labels["grade"] == "4"


def test_integer_grades_from_parquet_with_gaps_are_multiclass_and_binary_needs_exactly_0_and_1(folder: Path) -> None:
    frame = pd.DataFrame(
        {
            "patient_id": ["p1", "p2", "p3", "p4"],
            "index_time": ["2024-03-05T14:00:00Z"] * 4,
            "label:grade": [0, 3, None, 2],  # a float column because of the gap
            "label:disease": [1, 0, 0, None],
            "label:only_ones": [1, 1, None, 1],
        }
    )
    frame.to_parquet(folder / "manifest.parquet")
    cohort = load_cohort(folder / "manifest.parquet")
    assert cohort.tasks["grade"].kind == "multiclass"
    assert cohort.tasks["grade"].classes == ("0", "2", "3")
    assert cohort.tasks["disease"].kind == "binary"
    assert cohort.tasks["only_ones"].kind == "binary"
    assert [r.labels["grade"] for r in cohort] == ["0", "3", None, "2"]


def test_class_names_and_codes_mixed_in_one_column_are_refused(folder: Path) -> None:
    path = write(folder, "p1,2024-03-05T14:00:00Z,train,,,1,mild,F\np2,2024-03-05T14:00:00Z,train,,,0,2,F\n")
    with pytest.raises(ManifestError) as caught:
        load_cohort(path)
    assert [(p.row, p.column) for p in caught.value.problems] == [(1, "label:stage")]
    assert "class name in a column of integer codes" in caught.value.problems[0].reason


@pytest.mark.parametrize("ids", [[12, 345], [12.0, None]], ids=["int", "float-with-gap"])
def test_integer_patient_ids_from_parquet_are_strings(folder: Path, ids: list) -> None:
    frame = pd.DataFrame({"patient_id": ids + [7], "index_time": ["2024-03-05T14:00:00Z"] * 3})
    frame.to_parquet(folder / "manifest.parquet")
    if None in ids:
        with pytest.raises(ManifestError) as caught:
            load_cohort(folder / "manifest.parquet")
        assert [(p.row, p.column) for p in caught.value.problems] == [(2, "patient_id")]
        return
    assert [r.patient_id for r in load_cohort(folder / "manifest.parquet")] == ["12", "345", "7"]


def test_a_patient_in_train_and_val_is_a_warning(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(
        folder,
        "p1,2024-03-05T14:00:00Z,train,,,1,mild,F\n"
        "p2,2024-03-05T14:00:00Z,train,,,0,severe,F\n"
        "p1,2024-04-05T14:00:00Z,val,,,1,mild,F\n",
    )
    with caplog.at_level("WARNING", logger="meddx.cohort"):
        cohort = load_cohort(path)
    (warning,) = cohort.warnings
    assert (warning.row, warning.column) == (3, "split")
    assert "'train' at row 1" in warning.reason
    assert "'train' at row 1" in caplog.text
    assert "p1" not in warning.reason  # rows, never the patient id
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0
    assert "warning: row 3, column 'split'" in result.output


def test_a_patient_in_train_and_test_is_an_error(folder: Path) -> None:
    path = write(
        folder,
        "p1,2024-03-05T14:00:00Z,test,,,1,mild,F\n"
        "p2,2024-03-05T14:00:00Z,train,,,0,severe,F\n"
        "p1,2024-04-05T14:00:00Z,train,,,1,mild,F\n"
        "p3,2024-04-05T14:00:00Z,val,,,1,mild,F\n"
        "p3,2024-04-06T14:00:00Z,test,,,1,mild,F\n",
    )
    with pytest.raises(ManifestError) as caught:
        load_cohort(path)
    (problem,) = caught.value.problems
    assert (problem.row, problem.column) == (3, "split")
    assert "in 'test' at row 1 and in 'train' here" in problem.reason
    assert "one split" in problem.reason


# ------------------------------------------------------- columns that look like a modality's


@pytest.mark.parametrize(
    ("column", "resembles"),
    [
        ("image", "imaging"),
        ("Imaging", "imaging"),
        ("ehr_path", "ehr"),
        ("DeviceLogs", "device_logs"),
        ("Split", "split"),
    ],
)
def test_a_column_that_looks_like_a_modality_is_an_error_naming_it(folder: Path, column: str, resembles: str) -> None:
    path = write(
        folder,
        "p1,2024-03-05T14:00:00Z,p1/ct,1,F,north,64\np2,2024-03-05T14:00:00Z,,0,M,south,71\n",
        header=f"patient_id,index_time,{column},label:disease,sex,site,age\n",
    )
    with pytest.raises(ManifestError) as caught:
        load_cohort(path)
    (problem,) = caught.value.problems
    assert problem.column == column
    assert f"not named {resembles!r}" in problem.reason
    assert f"rename it {resembles!r}" in problem.reason


def test_legitimate_extra_columns_are_kept_and_label_lookalikes_warned(folder: Path) -> None:
    path = write(
        folder,
        "p1,2024-03-05T14:00:00Z,p1/ct,1,F,north,64,x,1\np2,2024-03-05T14:00:00Z,,0,M,south,71,y,0\n",
        header="patient_id,index_time,imaging,label:disease,sex,site,age,study_id,label_sepsis\n",
    )
    cohort = load_cohort(path)
    assert cohort.extra_columns == ["sex", "site", "age", "study_id", "label_sepsis"]
    assert [(w.column, "label:sepsis" in w.reason) for w in cohort.warnings] == [("label_sepsis", True)]


def test_a_misnamed_required_column_is_named_in_the_error(folder: Path) -> None:
    path = write(folder, "p1,2024-03-05T14:00:00Z\n", header="PatientID,index_time\n")
    with pytest.raises(ManifestError, match="column 'PatientID' looks like it: rename it 'patient_id'"):
        load_cohort(path)
