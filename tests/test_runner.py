"""The batch ingest runner: errors and crashes never stop a run, the cache is reused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from meddx.cache import RecordCache
from meddx.cohort import load_cohort
from meddx.ingest import base
from meddx.ingest.runner import ingest_cohort
from meddx.records import Modality

PLUGIN = ("echo_ingest_plugin",)


@pytest.fixture()
def echo_registry():
    """The echo reader replaces audio in this process; the registry is restored afterwards."""
    saved = dict(base._REGISTRY)
    import echo_ingest_plugin  # installs itself on first import (as in the workers)

    echo_ingest_plugin.install()
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


def make_cohort(folder: Path, behaviours: list[str]) -> Path:
    rows = []
    for i, behaviour in enumerate(behaviours):
        audio = folder / f"p{i}.txt"
        audio.write_text(behaviour)
        rows.append({"patient_id": f"p{i}", "index_time": "2024-03-05T14:00:00Z", "audio": audio.name})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def test_bad_files_are_reported_and_the_others_kept(tmp_path: Path, echo_registry) -> None:
    manifest = make_cohort(tmp_path, ["ok", "bad", "boom", "late", "empty", "okay"])
    report = ingest_cohort(load_cohort(manifest), tmp_path / "cache", workers=0, progress=False)
    status = {o.patient_id: o.status for o in report.outcomes}
    assert status == {"p0": "ok", "p1": "error", "p2": "error", "p3": "error", "p4": "empty", "p5": "ok"}
    errors = {o.patient_id: o.error for o in report.errors}
    assert "the test file says bad" in errors["p1"]
    assert "p1.txt" in errors["p1"]
    assert "unexpected ValueError" in errors["p2"]
    assert "after the index time" in errors["p3"]  # the leakage guard caught a leaking reader
    table = report.coverage().set_index("modality")
    assert table.loc["audio", "ok"] == 2
    assert table.loc["audio", "errors"] == 3
    assert table.loc["audio", "empty"] == 1
    errors_csv = pd.read_csv(report.write_errors(tmp_path / "errors.csv"))
    assert list(errors_csv.columns) == ["patient_id", "index_time", "modality", "path", "error"]
    assert sorted(errors_csv.patient_id) == ["p1", "p2", "p3"]
    assert set(errors_csv.path) == {
        "p1.txt",
        "p2.txt",
        "p3.txt",
    }
    records = {r.patient_id: r for r in report.patient_records()}
    assert records["p5"].records[Modality.AUDIO].events[0].text == "okay"
    assert records["p1"].records == {}


def test_cache_is_reused_and_keyed_by_content(tmp_path: Path, echo_registry) -> None:
    manifest = make_cohort(tmp_path, ["ok", "fine"])
    first = ingest_cohort(load_cohort(manifest), tmp_path / "cache", workers=0, progress=False)
    second = ingest_cohort(load_cohort(manifest), tmp_path / "cache", workers=0, progress=False)
    assert [o.cached for o in first.outcomes] == [False, False]
    assert [o.cached for o in second.outcomes] == [True, True]
    (tmp_path / "p1.txt").write_text("changed")
    third = ingest_cohort(load_cohort(manifest), tmp_path / "cache", workers=0, progress=False)
    assert [o.cached for o in third.outcomes] == [True, False]
    record = RecordCache(tmp_path / "cache").get(third.outcomes[1].key)
    assert record is not None
    assert record.arrays["length"].tolist() == [7.0]


def test_a_native_crash_is_isolated_and_the_run_goes_on(tmp_path: Path, echo_registry) -> None:
    manifest = make_cohort(tmp_path, ["ok", "crash", "fine", "bad", "okay", "good"])
    report = ingest_cohort(load_cohort(manifest), tmp_path / "cache", workers=2, progress=False, plugins=PLUGIN)
    status = {o.patient_id: o.status for o in report.outcomes}
    assert status == {"p0": "ok", "p1": "error", "p2": "ok", "p3": "error", "p4": "ok", "p5": "ok"}
    crashed = next(o for o in report.outcomes if o.patient_id == "p1")
    assert "crashed the worker process" in crashed.error
    assert [o.patient_id for o in report.outcomes] == [f"p{i}" for i in range(6)]  # manifest order


@pytest.mark.slow
def test_a_hung_reader_is_stopped_and_the_run_goes_on(tmp_path: Path, echo_registry) -> None:
    manifest = make_cohort(tmp_path, ["ok", "hang", "fine", "good"])
    report = ingest_cohort(
        load_cohort(manifest), tmp_path / "cache", workers=2, progress=False, plugins=PLUGIN, task_timeout=15
    )
    status = {o.patient_id: o.status for o in report.outcomes}
    assert status == {"p0": "ok", "p1": "error", "p2": "ok", "p3": "ok"}
    hung = next(o for o in report.outcomes if o.patient_id == "p1")
    assert "took longer than 15 s" in hung.error
    assert "p1.txt" in hung.error


@pytest.mark.slow
def test_a_slow_worker_start_up_does_not_count_against_a_file(tmp_path: Path, echo_registry, monkeypatch) -> None:
    """The task timeout counts from when a worker starts the file: workers that take longer than it to
    start (importing torch on a loaded machine) time no file out."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "slow_start_plugin.py").write_text(
        "import multiprocessing, time\n"
        "if multiprocessing.parent_process() is not None:  # in the workers only\n"
        "    time.sleep(16)  # a start-up longer than the 15 s timeout below\n"
    )
    monkeypatch.syspath_prepend(str(code))  # the spawned workers inherit sys.path
    manifest = make_cohort(tmp_path, ["ok", "fine"])
    report = ingest_cohort(
        load_cohort(manifest),
        tmp_path / "cache",
        workers=2,
        progress=False,
        plugins=("slow_start_plugin", *PLUGIN),
        task_timeout=15,
    )
    assert [o.status for o in report.outcomes] == ["ok", "ok"], [o.error for o in report.outcomes]
