"""The ingestor registry, and the contract every registered ingestor keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meddx.align import Aligner
from meddx.cache import RecordCache
from meddx.cohort import load_cohort
from meddx.config import IngestConfig
from meddx.errors import ConfigError, IngestError
from meddx.ingest import base
from meddx.ingest.base import Ingestor, IngestRequest, register_ingestor
from meddx.ingest.registry import registered_ingestors
from meddx.records import MODALITIES, Modality, PatientRecord, collate, parse_time

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "manifest.csv"
INDEX = parse_time("2024-03-05T14:00:00Z")
GARBAGE_NAME = {
    Modality.IMAGING: "scan.dcm",
    Modality.EHR: "bundle.json",
    Modality.NOTES: "note.txt",
    Modality.DEVICE_LOGS: "monitor.csv",
    Modality.AUDIO: "lung.wav",
    Modality.VIDEO: "clip.mp4",
}


def test_every_modality_has_a_reader() -> None:
    assert set(registered_ingestors()) == set(MODALITIES)


def test_a_second_reader_for_a_modality_raises() -> None:
    class AnotherAudioReader(Ingestor):
        modality = Modality.AUDIO

        def read(self, request):
            return None

    with pytest.raises(ConfigError, match="already registered"):
        register_ingestor(AnotherAudioReader)
    assert registered_ingestors()[Modality.AUDIO] is not AnotherAudioReader


def test_unregister_then_register_replaces_a_reader() -> None:
    saved = dict(base._REGISTRY)
    try:
        original = base.unregister_ingestor("audio")

        class MyAudio(Ingestor):
            modality = Modality.AUDIO

            def read(self, request):
                return None

        register_ingestor(MyAudio)
        assert registered_ingestors()[Modality.AUDIO] is MyAudio
        assert original is not MyAudio
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(saved)


@pytest.fixture(scope="module")
def sample_rows():
    cohort = load_cohort(SAMPLE)
    return {m: next(r for r in cohort if m in r.paths) for m in MODALITIES}


@pytest.mark.parametrize("modality", MODALITIES, ids=str)
def test_reader_contract(modality: Modality, sample_rows, tmp_path: Path) -> None:
    """Missing and garbage files give IngestError naming the file; a real file gives the declared shapes."""
    reader = registered_ingestors()[modality](IngestConfig())

    missing = tmp_path / ("nothing" + Path(GARBAGE_NAME[modality]).suffix)
    with pytest.raises(IngestError) as caught:
        reader.read(IngestRequest("p1", INDEX, {modality: missing}))
    assert caught.value.path == str(missing)
    assert caught.value.modality == modality.value

    garbage = tmp_path / GARBAGE_NAME[modality]
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 600, dtype=np.uint8)))
    with pytest.raises(IngestError) as caught:
        reader.read(IngestRequest("p1", INDEX, {modality: garbage}))
    assert caught.value.path == str(garbage)
    assert caught.value.modality == modality.value

    row = sample_rows[modality]
    request = IngestRequest(row.patient_id, row.index_time, dict(row.paths))
    assert reader.wants(request)
    record = reader.read(request)
    assert record is not None
    assert record.modality is modality
    PatientRecord(row.patient_id, row.index_time).add(record)  # nothing after the index time

    tensorizer = reader.tensorizer().fit([record])
    arrays = tensorizer.transform(record)
    spec = tensorizer.spec()
    assert set(arrays) == set(spec)
    for name, (shape, dtype, *_) in spec.items():
        assert arrays[name].shape == shape, name
        assert arrays[name].dtype == np.dtype(dtype), name
    restored = reader.tensorizer().load_state_dict(tensorizer.state_dict())
    cache = RecordCache(tmp_path / "cache")
    cache.put("00" * 32, record)
    again = restored.transform(cache.get("00" * 32))
    for name in spec:
        np.testing.assert_array_equal(again[name], arrays[name])


def test_aligner_makes_a_batch_from_sample_records(sample_rows) -> None:
    readers = {m: cls(IngestConfig()) for m, cls in registered_ingestors().items()}
    patients = []
    for modality, row in sample_rows.items():
        request = IngestRequest(row.patient_id, row.index_time, {modality: row.paths[modality]})
        patient = PatientRecord(row.patient_id, row.index_time)
        patient.add(readers[modality].read(request))
        patients.append(patient)
    aligner = Aligner().fit(patients)
    restored = Aligner.from_state_dict(aligner.state_dict())
    tensors = [restored.transform(p) for p in patients]
    batch = collate(tensors, restored.tensor_spec())
    assert batch.present.sum(dim=1).tolist() == [1] * len(MODALITIES)
    assert batch.present.diagonal().all()
    assert set(batch.tensors) == set(MODALITIES)
    spec = restored.array_spec()
    for modality, arrays in batch.tensors.items():
        assert set(arrays) == set(spec[modality])  # every array declared, with its role
        assert {f.role for f in spec[modality].values()} <= {"values", "mask", "token_mask", "ids", "age_hours"}
        for name, tensor in arrays.items():
            assert tuple(tensor.shape) == (1, *spec[modality][name].shape), (modality, name)
        age = arrays["age_hours"]
        assert age.shape == (1, 1)
        assert (age >= 0).all()  # time before the index, every modality
