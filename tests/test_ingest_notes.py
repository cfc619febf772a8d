"""The notes ingestor: text files and FHIR DocumentReference notes → token chunks."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from meddx.config import IngestConfig, NotesConfig
from meddx.errors import ConfigError, IngestError
from meddx.ingest.base import IngestRequest
from meddx.ingest.notes import NotesIngestor, bundled_text_model
from meddx.ingest.registry import registered_ingestors
from meddx.records import Modality, PatientRecord, parse_time
from meddx.synth import write_fhir_bundle, write_note

SYNTHEA = Path(__file__).resolve().parent / "data" / "synthea-bulk"
INDEX = parse_time("2020-01-01T00:00:00Z")
GEN_INDEX = datetime(2024, 3, 5, 14, tzinfo=timezone.utc)
SMALL = IngestConfig(notes=NotesConfig(max_length=32, max_chunks=4))


@pytest.fixture(scope="module")
def reader() -> NotesIngestor:
    return NotesIngestor(SMALL)  # one instance: the tokenizer loads once for the module


def _request(paths: dict[Modality, Path], pid: str = "P1", index_time: datetime = GEN_INDEX) -> IngestRequest:
    return IngestRequest(pid, index_time, paths)


def test_notes_is_the_registered_reader_and_wants_ehr_rows(reader) -> None:
    assert registered_ingestors()[Modality.NOTES] is NotesIngestor
    assert reader.wants(_request({Modality.EHR: SYNTHEA}))
    assert reader.wants(_request({Modality.NOTES: Path("n.txt")}))
    assert not reader.wants(_request({Modality.AUDIO: Path("a.wav")}))


def test_a_text_file_is_tokenised_with_the_bundled_tokenizer(reader, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = write_note(tmp_path / "note.txt", severity=1.0, rng=np.random.default_rng(0))
    record = reader.read(_request({Modality.NOTES: path}))
    PatientRecord("P1", GEN_INDEX).add(record)
    assert record.time is None  # a text file is undated
    arrays = reader.tensorizer().transform(record)
    assert arrays["input_ids"].shape == (4, 32)
    assert arrays["input_ids"].dtype == np.int64
    assert arrays["attention_mask"].dtype == bool
    assert arrays["chunk_mask"].dtype == bool
    reference = AutoTokenizer.from_pretrained(str(bundled_text_model()), local_files_only=True)
    expected = reference(path.read_text(), max_length=32, truncation=True)["input_ids"]
    assert arrays["input_ids"][0, : len(expected)].tolist() == expected  # [CLS] ... [SEP] of the first window
    assert arrays["input_ids"][0, 0] == reference.cls_token_id
    assert reader.tokenizer is reader.tokenizer  # loaded once


def test_a_long_note_is_chunked_with_a_chunk_mask(reader, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Cough and fever for three days. " * 6)
    n_tokens = len(reader.tokenizer(short.read_text(), add_special_tokens=False)["input_ids"])
    assert 30 < n_tokens <= 60  # two windows of 32 - 2 special tokens
    record = reader.read(_request({Modality.NOTES: short}))
    np.testing.assert_array_equal(record.arrays["chunk_mask"], [True, True, False, False])
    assert record.arrays["attention_mask"][0].all()
    assert not record.arrays["attention_mask"][2:].any()
    assert record.meta["truncated"] is False

    long = tmp_path / "long.txt"
    long.write_text("Patient reports productive cough, fever and pleuritic chest pain. " * 40)
    record = reader.read(_request({Modality.NOTES: long}))
    assert record.arrays["chunk_mask"].all()
    assert record.meta["truncated"] is True
    assert record.meta["n_chunks"] == 4
    cls_id, sep_id = reader.tokenizer.cls_token_id, reader.tokenizer.sep_token_id
    assert (record.arrays["input_ids"][:, 0] == cls_id).all()
    assert (record.arrays["input_ids"][:, -1] == sep_id).all()


def test_a_folder_of_notes_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "b.txt").write_text("second note")
    (folder / "a.txt").write_text("first note")
    (folder / ".hidden").write_bytes(b"\xff\xfe")
    reader = NotesIngestor(IngestConfig(notes=NotesConfig(max_length=32, max_chunks=4, undated="keep")))
    record = reader.read(_request({Modality.NOTES: folder}))
    assert [e.text for e in record.events] == ["first note", "second note"]
    assert record.meta["from_files"] == 2
    assert record.meta["files_undated"] == 2


def test_a_non_utf8_note_is_an_error_naming_the_file(reader, tmp_path: Path) -> None:
    path = tmp_path / "note.txt"
    path.write_bytes("Fièvre et toux depuis trois jours.".encode("latin-1"))
    with pytest.raises(IngestError, match="not UTF-8") as caught:
        reader.read(_request({Modality.NOTES: path}))
    assert caught.value.path == str(path)
    assert caught.value.modality == "notes"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine")
    (folder / "bad.txt").write_bytes(b"\xe9t\xe9")
    with pytest.raises(IngestError) as caught:
        reader.read(_request({Modality.NOTES: folder}))
    assert caught.value.path == str(folder / "bad.txt")


def test_document_reference_notes_from_synthea_in_date_order(tmp_path: Path) -> None:
    pid = "6a4160eb-a793-2f86-2302-378626f46cce"
    reader = NotesIngestor(IngestConfig(notes=NotesConfig(max_length=512, max_chunks=6)))
    record = reader.read(IngestRequest(pid, INDEX, {Modality.EHR: SYNTHEA}))
    PatientRecord(pid, INDEX).add(record)
    # the expected notes, with plain json: this patient's DocumentReferences dated at/before the index time
    dates = []
    with open(SYNTHEA / "DocumentReference.000.ndjson") as handle:
        for line in handle:
            doc = json.loads(line)
            when = parse_time(doc["date"])
            if doc["subject"]["reference"] == f"Patient/{pid}" and when <= INDEX:
                dates.append(when)
    assert record.meta["from_fhir"] == len(dates) == 54
    assert record.meta["dropped_after_index"] == 5
    # each Synthea note fits one 512-token chunk: the six newest notes, oldest first
    assert [e.time for e in record.events] == sorted(dates)[-6:]
    assert record.arrays["chunk_mask"].all()
    assert record.time == max(dates)
    for row, event in enumerate(record.events):  # Synthea notes open with their date
        decoded = reader.tokenizer.decode(record.arrays["input_ids"][row], skip_special_tokens=True)
        assert decoded.replace(" ", "").startswith(event.text.strip().splitlines()[0])


def test_post_index_document_reference_is_excluded(reader, tmp_path: Path) -> None:
    bundle = write_fhir_bundle(
        tmp_path / "b.json",
        patient_id="P1",
        severity=1.0,
        rng=np.random.default_rng(5),
        index_time=GEN_INDEX,
        sex="M",
        age=50,
        label=1,
    )
    note = write_note(tmp_path / "note.txt", severity=1.0, rng=np.random.default_rng(5))
    record = reader.read(_request({Modality.EHR: bundle, Modality.NOTES: note}))
    PatientRecord("P1", GEN_INDEX).add(record)
    assert record.meta["from_fhir"] == 1
    assert record.meta["from_files"] == 1
    assert record.meta["dropped_after_index"] == 1
    texts = [e.text for e in record.events]
    assert texts[0].startswith("Triage note")
    assert texts[-1] == note.read_text()  # dated first, file last
    assert not any("Discharge summary" in t for t in texts)
    discharge = reader.tokenizer("discharge", add_special_tokens=False)["input_ids"]
    assert not np.isin(record.arrays["input_ids"], discharge).any()


def test_an_ehr_row_without_notes_gives_nothing(reader, tmp_path: Path) -> None:
    bundle = write_fhir_bundle(
        tmp_path / "b.json",
        patient_id="P1",
        severity=0.0,
        rng=np.random.default_rng(1),
        index_time=GEN_INDEX,
        sex="F",
        age=30,
    )
    data = json.loads(bundle.read_text())
    data["entry"] = [e for e in data["entry"] if e["resource"]["resourceType"] != "DocumentReference"]
    bundle.write_text(json.dumps(data))
    assert reader.read(_request({Modality.EHR: bundle})) is None


def test_a_text_model_that_is_not_there_is_a_config_error(tmp_path: Path) -> None:
    reader = NotesIngestor(IngestConfig(notes=NotesConfig(text_model=str(tmp_path / "nowhere"))))
    note = tmp_path / "n.txt"
    note.write_text("hello")
    with pytest.raises(ConfigError, match="text_model"):
        reader.read(_request({Modality.NOTES: note}))
