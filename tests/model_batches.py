"""Tiny configs and batches for the model tests: real sample files through the real readers and aligner,
plus batches drawn from the fitted spec (by role) for any subset of modalities."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from meddx.align import Aligner
from meddx.cohort import load_cohort
from meddx.config import (
    AudioConfig,
    DeviceLogConfig,
    EhrConfig,
    ImagingConfig,
    IngestConfig,
    NotesConfig,
    VideoConfig,
)
from meddx.ingest.base import IngestRequest
from meddx.ingest.registry import registered_ingestors
from meddx.models.config import BackboneConfig
from meddx.records import MODALITIES, Modality, PatientRecord, PatientTensors, parse_time

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "manifest.csv"
INDEX = parse_time("2024-03-05T14:00:00Z")


def tiny_ingest_config() -> IngestConfig:
    return IngestConfig(
        imaging=ImagingConfig(spatial_size=(8, 16, 16)),
        ehr=EhrConfig(n_bins=4, n_lab_features=4, max_codes=8, code_vocab_size=32),
        notes=NotesConfig(max_length=16, max_chunks=2),
        device_logs=DeviceLogConfig(window_hours=1.0),
        audio=AudioConfig(duration_s=1.0, n_mels=8),
        video=VideoConfig(n_frames=4, size=(16, 16)),
    )


def tiny_backbone_config(**overrides) -> BackboneConfig:
    data = {
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "dropout": 0.0,
        "imaging": {"init_features": 4, "growth_rate": 4, "block_config": [1, 1]},
        "device_logs": {"patch_length": 15},
        "audio": {"patch_mels": 4, "patch_frames": 8},
        "video": {"frame_features": 8},
    }
    data.update(overrides)
    for section in ("imaging", "video"):  # the tiny 8x16x16 volumes and 16x16 frames are not pooled first
        data[section] = {"input_pool": 1, **data.get(section, {})}
    return BackboneConfig.from_dict(data)


def sample_patients(n_rows: int = 3) -> list[PatientRecord]:
    """The first ``n_rows`` sample-data rows, every modality they name, read with the tiny config."""
    readers = {m: cls(tiny_ingest_config()) for m, cls in registered_ingestors().items()}
    patients = []
    for row in list(load_cohort(SAMPLE))[:n_rows]:
        patient = PatientRecord(row.patient_id, row.index_time)
        request = IngestRequest(row.patient_id, row.index_time, dict(row.paths))
        for reader in readers.values():
            if reader.wants(request):
                record = reader.read(request)
                if record is not None:
                    patient.add(record)
        patients.append(patient)
    return patients


def random_patient(spec, modalities, seed: int, patient_id: str = "p") -> PatientTensors:
    """Tensors drawn by role from a fitted array spec, for the given modalities only."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for modality in modalities:
        arrays = {}
        for name, field in spec[modality].items():
            shape = field.shape
            if field.role == "values":
                a = rng.normal(size=shape).astype(np.float32)
            elif field.role in ("mask", "token_mask"):
                a = rng.random(shape) < 0.7
                a.reshape(-1)[0] = True  # at least one real item
            elif field.role == "ids":
                a = rng.integers(1, field.vocab_size or 1000, size=shape)
            else:
                a = rng.uniform(0, 5000, size=shape).astype(np.float32)
            arrays[name] = torch.from_numpy(np.asarray(a))
        tensors[Modality(modality)] = arrays
    return PatientTensors(patient_id, INDEX, tensors)


@functools.lru_cache(maxsize=1)  # shared by the model test files of one pytest run
def fitted_aligner() -> tuple[Aligner, tuple[PatientRecord, ...]]:
    patients = sample_patients()
    return Aligner(tiny_ingest_config()).fit(patients), tuple(patients)


__all__ = ["MODALITIES", "fitted_aligner", "random_patient", "sample_patients", "tiny_backbone_config"]
