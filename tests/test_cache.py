"""The record cache: safetensors files, content-addressed, lossless round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddx.cache import RecordCache, cache_key, default_cache_dir, reader_name
from meddx.config import IngestConfig
from meddx.ingest.audio import AudioIngestor
from meddx.records import Event, Modality, ModalityRecord, parse_time

INDEX = parse_time("2024-03-05T14:00:00Z")


def test_round_trip_keeps_arrays_events_and_meta(tmp_path: Path) -> None:
    record = ModalityRecord(
        Modality.EHR,
        "bundle.json",
        arrays={"mask": np.array([True, False]), "ids": np.arange(3, dtype=np.int64)},
        events=[Event(INDEX, "observation", "http://loinc.org|1988-5", 5.0, "mg/L")],
        time=INDEX,
        meta={"sex": "female", "age_years": 51.5},
        warnings=["one resource skipped"],
    )
    cache = RecordCache(tmp_path)
    path = cache.put("ab" * 32, record)
    assert path.suffix == ".safetensors"
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    back = cache.get("ab" * 32)
    assert back is not None
    assert back.events == record.events
    assert back.meta == record.meta
    assert back.warnings == record.warnings
    assert back.time == INDEX
    assert back.modality is Modality.EHR
    assert back.arrays["mask"].dtype == np.bool_
    assert back.arrays["ids"].tolist() == [0, 1, 2]
    assert cache.get("cd" * 32) is None


def test_record_without_arrays(tmp_path: Path) -> None:
    cache = RecordCache(tmp_path)
    cache.put("ef" * 32, ModalityRecord(Modality.NOTES, "note.txt", events=[Event(None, "note", "n", text="hi")]))
    back = cache.get("ef" * 32)
    assert back is not None
    assert back.arrays == {}
    assert back.events[0].text == "hi"
    assert back.time is None


def test_key_changes_with_content_config_patient_and_time(tmp_path: Path) -> None:
    source = tmp_path / "a.wav"
    source.write_bytes(b"one")
    config = IngestConfig()

    def key_of(patient: str = "p1", time: str = INDEX.isoformat(), cfg: IngestConfig = config) -> str:
        return cache_key(Modality.AUDIO, [source], patient, time, cfg, reader=AudioIngestor)

    key = key_of()
    assert key == key_of()
    assert key != key_of(patient="p2")
    assert key != key_of(time="2024-03-06T00:00:00+00:00")
    assert key != key_of(cfg=IngestConfig.from_dict({"audio": {"n_mels": 16}}))
    assert key == key_of(cfg=IngestConfig.from_dict({"video": {"n_frames": 4}}))
    source.write_bytes(b"three")
    assert key != key_of()


def test_key_changes_with_the_reader_class_and_its_version(tmp_path: Path) -> None:
    source = tmp_path / "a.wav"
    source.write_bytes(b"one")

    class PatchedAudio(AudioIngestor):
        version = AudioIngestor.version + 1

    def key_of(reader) -> str:
        return cache_key(Modality.AUDIO, [source], "p1", INDEX.isoformat(), IngestConfig(), reader=reader)

    assert key_of(AudioIngestor) == key_of(AudioIngestor(IngestConfig()))  # class or instance alike
    assert key_of(PatchedAudio) != key_of(AudioIngestor)
    PatchedAudio.version += 1
    bumped = key_of(PatchedAudio)
    assert bumped != key_of(AudioIngestor)
    assert reader_name(PatchedAudio).endswith(f"@{AudioIngestor.version + 2}")


def test_default_cache_dir_prefers_the_argument_then_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "env"))
    assert default_cache_dir(tmp_path / "given") == tmp_path / "given"
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("MEDDX_CACHE")
    fallback = default_cache_dir()
    assert fallback.is_absolute()
    assert "meddx" in fallback.parts
    assert fallback != tmp_path / "env"
