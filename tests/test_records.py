"""Records, the leakage rule, and collation with missing modalities."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch

from meddx.errors import LeakageError
from meddx.records import (
    MODALITIES,
    UNKNOWN_LABEL,
    Event,
    Modality,
    ModalityRecord,
    PatientRecord,
    PatientTensors,
    collate,
    is_available,
    keep_available,
    parse_time,
)

INDEX = parse_time("2024-03-05T14:00:00Z")


def test_parse_time_normalises_zones_and_refuses_naive() -> None:
    assert parse_time("2024-03-05T15:00:00+01:00") == INDEX
    assert parse_time(INDEX.timestamp()) == INDEX
    with pytest.raises(ValueError, match="no time zone"):
        parse_time("2024-03-05T14:00:00")
    assert parse_time("2024-03-05T14:00:00", assume_utc=True) == INDEX
    with pytest.raises(ValueError, match="not an ISO 8601"):
        parse_time("March 5th")


def test_leakage_rule_keeps_past_present_and_undated() -> None:
    second = timedelta(seconds=1)
    assert is_available(INDEX - second, INDEX)
    assert is_available(INDEX, INDEX)  # at the index time is allowed
    assert is_available(None, INDEX)  # undated files are taken as available
    assert not is_available(INDEX + second, INDEX)
    events = [
        Event(INDEX - second, "condition", "a"),
        Event(INDEX + second, "condition", "b"),
        Event(None, "note", "c"),
    ]
    kept, dropped = keep_available(events, INDEX)
    assert [e.code for e in kept] == ["a", "c"]
    assert dropped == 1


def test_patient_record_refuses_leaked_items() -> None:
    patient = PatientRecord("p1", INDEX)
    late = ModalityRecord(Modality.EHR, "bundle.json", events=[Event(INDEX + timedelta(days=1), "condition", "x")])
    with pytest.raises(LeakageError, match="after the index time") as caught:
        patient.add(late)
    assert caught.value.path == "bundle.json"
    assert caught.value.modality == "ehr"
    with pytest.raises(LeakageError):
        patient.add(ModalityRecord(Modality.IMAGING, "ct", time=INDEX + timedelta(minutes=1)))
    patient.add(ModalityRecord(Modality.IMAGING, "ct", time=INDEX))
    assert patient.modalities == [Modality.IMAGING]


def test_event_json_round_trip() -> None:
    event = Event(INDEX, "observation", "http://loinc.org|1988-5", 12.5, "mg/L")
    assert Event.from_json(event.to_json()) == event


def patient(pid: str, **tensors: dict) -> PatientTensors:
    return PatientTensors(pid, INDEX, {Modality(k): v for k, v in tensors.items()})


def test_collate_packs_each_modality_over_the_patients_that_have_it() -> None:
    a = patient("a", audio={"log_mel": torch.ones(2, 3), "frame_mask": torch.ones(3, dtype=torch.bool)})
    b = patient("b", video={"frames": torch.full((4, 1, 2, 2), 0.5)})
    c = patient("c", audio={"log_mel": torch.full((2, 3), 2.0), "frame_mask": torch.zeros(3, dtype=torch.bool)})
    batch = collate([a, b, c])
    assert batch.patient_ids == ["a", "b", "c"]
    assert len(batch) == 3
    # absent modalities are not zero-filled: audio holds a and c only, in batch order
    assert batch.tensors[Modality.AUDIO]["log_mel"].shape == (2, 2, 3)
    assert batch.tensors[Modality.AUDIO]["log_mel"][1].eq(2.0).all()
    assert batch.rows_with(Modality.AUDIO).tolist() == [0, 2]
    assert batch.rows_with(Modality.VIDEO).tolist() == [1]
    assert batch.tensors[Modality.AUDIO]["frame_mask"].dtype == torch.bool
    assert batch.present.shape == (3, len(MODALITIES))
    audio, video = MODALITIES.index(Modality.AUDIO), MODALITIES.index(Modality.VIDEO)
    assert batch.present[:, audio].tolist() == [True, False, True]
    assert batch.present[:, video].tolist() == [False, True, False]
    assert Modality.IMAGING not in batch.tensors  # no patient had it


def test_collate_carries_rows_labels_and_label_masks() -> None:
    a = PatientTensors("a", INDEX, row=4, labels={"sepsis": 1, "grade": 2})
    b = PatientTensors("b", INDEX, row=7, labels={"sepsis": UNKNOWN_LABEL})
    batch = collate([a, b])
    assert batch.rows.tolist() == [4, 7]
    assert batch.labels["sepsis"].tolist() == [1, UNKNOWN_LABEL]
    assert batch.label_mask["sepsis"].tolist() == [True, False]
    assert batch.label_mask["grade"].tolist() == [True, False]  # b has no grade label: unknown
    moved = batch.to("cpu")
    assert moved.labels["sepsis"].device.type == "cpu"
    assert moved.rows.tolist() == [4, 7]


def test_collate_checks_tensors_against_the_spec() -> None:
    spec = {Modality.AUDIO: {"log_mel": ((2, 3), torch.float32)}}
    with pytest.raises(ValueError, match="another config|expected"):
        collate([patient("a", audio={"log_mel": torch.ones(2, 4)})], spec)
    with pytest.raises(ValueError, match="lacks"):
        collate([patient("a", audio={"other": torch.ones(2, 3)})], spec)


def test_collate_refuses_mismatched_shapes_and_empty_batches() -> None:
    with pytest.raises(ValueError, match="expected"):
        collate([patient("a", audio={"x": torch.ones(2)}), patient("b", audio={"x": torch.ones(3)})])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_modality_record_coerces_modality_names() -> None:
    record = ModalityRecord("audio", "x.wav", arrays={"a": np.zeros(2)})
    assert record.modality is Modality.AUDIO


def test_collate_copies_every_dtype_exactly_and_owns_its_memory() -> None:
    when = parse_time("2024-01-01T00:00:00Z")
    arrays = [
        {"x": torch.randn(3, 4), "m": torch.rand(3) > 0.5, "ids": torch.randint(0, 9, (5,)), "h": torch.randn(2).half()}
        for _ in range(3)
    ]
    items = [PatientTensors(f"p{i}", when, {Modality.EHR: a}) for i, a in enumerate(arrays)]
    batch = collate(items).tensors[Modality.EHR]
    for name in arrays[0]:
        expected = torch.stack([a[name] for a in arrays])
        assert batch[name].dtype == expected.dtype, name
        assert torch.equal(batch[name], expected), name
    before = arrays[0]["x"].clone()
    batch["x"].add_(1.0)  # the batch is a copy: writing to it leaves the patients' tensors alone
    assert torch.equal(arrays[0]["x"], before)
