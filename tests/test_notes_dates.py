"""Dated and undated note files: dates in names and first-line headers, the undated policy, chunk ages."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from meddx.config import IngestConfig, NotesConfig
from meddx.errors import IngestError
from meddx.ingest.base import IngestRequest
from meddx.ingest.notes import NotesIngestor, note_file_time
from meddx.records import Modality, PatientRecord, parse_time

INDEX = datetime(2024, 3, 5, 14, tzinfo=timezone.utc)


def reader(undated: str = "drop", site_timezone: str | None = None, max_chunks: int = 4) -> NotesIngestor:
    notes = NotesConfig(max_length=32, max_chunks=max_chunks, undated=undated)  # type: ignore[arg-type]
    return NotesIngestor(IngestConfig(notes=notes, site_timezone=site_timezone))


def read(notes_reader: NotesIngestor, path: Path, index_time: datetime = INDEX):
    record = notes_reader.read(IngestRequest("P1", index_time, {Modality.NOTES: path}))
    if record is not None:
        PatientRecord("P1", index_time).add(record)  # nothing after the index time reached the record
    return record


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two dated notes before the index time, one after it, one undated and one with a bad header."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "2024-03-01_admission.txt").write_text("Admitted with cough.\n", encoding="utf-8")
    (notes / "triage.txt").write_text("Date: 2024-03-05T09:30:00Z\nTriage: fever.\n", encoding="utf-8")
    (notes / "20240306T0800_discharge.txt").write_text("Discharged home.\n", encoding="utf-8")
    (notes / "scratch.txt").write_text("Undated remarks.\n", encoding="utf-8")
    (notes / "misdated.txt").write_text("Date: last Tuesday\nMore remarks.\n", encoding="utf-8")
    return notes


def texts(record) -> list[str]:
    return [e.text.splitlines()[-1] for e in record.events]


def test_undated_files_in_a_folder_are_dropped_by_default(folder: Path) -> None:
    record = read(reader(), folder)
    assert texts(record) == ["Admitted with cough.", "Triage: fever."]  # time order
    assert [e.time for e in record.events] == [
        parse_time("2024-03-01T23:59:59.999999Z"),
        parse_time("2024-03-05T09:30:00Z"),
    ]
    meta = record.meta
    assert (meta["files_dated"], meta["files_undated"], meta["files_dropped_undated"]) == (3, 2, 2)
    assert meta["files_dropped_after_index"] == 1
    assert meta["dropped_after_index"] == 1
    assert meta["from_files"] == 2
    assert meta["undated_rule"] == "drop"
    assert any("2 undated note file(s)" in w for w in record.warnings)
    assert any("misdated.txt" in w and "not an ISO 8601" in w for w in record.warnings)
    assert not any("Discharged" in (e.text or "") for e in record.events)


def test_undated_files_kept_count_as_written_at_the_index_time(folder: Path) -> None:
    record = read(reader("keep", max_chunks=6), folder)
    assert texts(record) == ["Admitted with cough.", "Triage: fever.", "More remarks.", "Undated remarks."]
    assert record.meta["note_times"] == ["2024-03-01T23:59:59.999999+00:00", "2024-03-05T09:30:00+00:00", None, None]
    # one 32-token chunk per note here; each chunk knows its note and its age at the index time
    assert record.meta["chunk_note"] == [0, 1, 2, 3]
    assert record.arrays["chunk_age_hours"][: record.meta["n_chunks"]].tolist() == pytest.approx(
        [(INDEX - record.events[0].time).total_seconds() / 3600, 4.5, 0.0, 0.0]
    )
    assert record.meta["files_dropped_undated"] == 0
    assert record.time == parse_time("2024-03-05T09:30:00Z")


def test_undated_files_can_be_an_error_naming_the_file(folder: Path) -> None:
    with pytest.raises(IngestError, match="has no date") as caught:
        read(reader("error"), folder)
    assert caught.value.path in (str(folder / "misdated.txt"), str(folder / "scratch.txt"))
    assert caught.value.modality == "notes"


@pytest.mark.parametrize("policy", ["keep", "drop", "error"])
def test_an_undated_file_named_directly_is_available_at_the_index_time(tmp_path: Path, policy: str) -> None:
    note = tmp_path / "note.txt"
    note.write_text("Chief complaint: cough.\n", encoding="utf-8")
    record = read(reader(policy), note)
    assert record.time is None
    assert record.meta["files_undated"] == 1
    assert record.meta["from_files"] == 1
    assert record.arrays["chunk_age_hours"][: record.meta["n_chunks"]].tolist() == [0.0]


def test_a_file_named_directly_but_dated_after_the_index_time_is_dropped(tmp_path: Path) -> None:
    note = tmp_path / "20240305T1430_note.txt"
    note.write_text("Written after the index time.\n", encoding="utf-8")
    assert read(reader("keep"), note) is None
    record = read(reader("keep"), note, index_time=INDEX + timedelta(minutes=30))
    assert record.time == INDEX + timedelta(minutes=30)
    assert record.meta["files_dated"] == 1


def test_note_dates_without_a_zone_use_the_site_time_zone(tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("Date: 2024-03-05T14:30\nWard round.\n", encoding="utf-8")  # 14:30 wall time
    assert read(reader(), note) is None  # read as UTC it is after 14:00Z
    record = read(reader(site_timezone="Europe/Berlin"), note)  # 13:30Z
    assert record.time == parse_time("2024-03-05T13:30:00Z")
    named = tmp_path / "2024-03-05_day.txt"  # a date alone: the end of that day, in the site zone
    named.write_text("Day summary.\n", encoding="utf-8")
    assert read(reader(site_timezone="Asia/Tokyo"), named, index_time=parse_time("2024-03-05T15:00:00Z")) is not None
    assert read(reader(), named, index_time=parse_time("2024-03-05T15:00:00Z")) is None


def test_the_later_of_name_and_header_counts() -> None:
    when, problem = note_file_time(Path("2024-03-01_note.txt"), "Date: 2024-03-04T10:00:00Z\ntext")
    assert when == parse_time("2024-03-04T10:00:00Z")
    assert problem is None
    when, _ = note_file_time(Path("20240306_note.txt"), "Date: 2024-03-04T10:00:00Z\ntext")
    assert when == parse_time("2024-03-06T23:59:59.999999Z")
    # not dates: a longer number, an impossible month, a date in the text below the first line
    assert note_file_time(Path("mrn_120240301.txt"), "x")[0] is None
    assert note_file_time(Path("20241399.txt"), "x")[0] is None
    assert note_file_time(Path("note.txt"), "History:\nDate: 2024-03-01")[0] is None


def test_a_long_dated_note_gives_each_chunk_its_note(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "2024-03-04_old.txt").write_text("Short old note.\n", encoding="utf-8")
    (folder / "20240305T1200Z_new.txt").write_text("Fever and cough with chills. " * 12, encoding="utf-8")
    record = read(reader(max_chunks=4), folder)
    n = record.meta["n_chunks"]
    assert n == 4
    assert record.meta["chunk_note"][-1] == len(record.events) - 1
    assert record.arrays["chunk_age_hours"][: record.meta["n_chunks"]].tolist()[-1] == pytest.approx(2.0)
    assert (
        len(record.meta["chunk_note"]) == len(record.arrays["chunk_age_hours"][: record.meta["n_chunks"]].tolist()) == n
    )
