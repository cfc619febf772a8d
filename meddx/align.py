"""Alignment: patient records → fixed-shape :class:`~meddx.records.PatientTensors`.

The :class:`Aligner` holds one tensorizer per registered modality. ``fit`` learns, on
training records only, what each tensorizer needs (LOINC codes and their scales,
device channels, code vocabularies); ``transform`` then turns any record into the same
shapes. Its state is plain JSON saved beside the model weights, so inference reads
and transforms data exactly as training did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from meddx._version import __version__
from meddx.config import IngestConfig
from meddx.errors import ConfigError, ModelError, NotFittedError
from meddx.ingest.base import Tensorizer
from meddx.ingest.registry import registered_ingestors
from meddx.records import MODALITIES, Modality, ModalityRecord, PatientRecord, PatientTensors, TensorSpec
from meddx.specs import ArrayField, ArraySpec

RECORD_AGE = "age_hours"
RECORD_AGE_FIELD = ArrayField((1,), "float32", "age_hours")


def record_age_hours(record: ModalityRecord, index_time: datetime) -> float:
    """Hours between a record's acquisition and the index time; 0 for undated records.

    Undated files are taken as available at the index time (the leakage rule), so age 0 is
    the honest reading of what we know.
    """
    if record.time is None:
        return 0.0
    return max((index_time - record.time).total_seconds() / 3600.0, 0.0)


class Aligner:
    """Fits and applies the tensorizers of every modality.

    Example:
        >>> from pathlib import Path
        >>> from meddx.ingest.audio import AudioIngestor
        >>> from meddx.ingest.base import IngestRequest
        >>> from meddx.records import Modality, PatientRecord, collate, parse_time
        >>> index_time = parse_time("2024-12-03T08:27:00Z")
        >>> record = PatientRecord("P0001", index_time)
        >>> record.add(AudioIngestor().read(IngestRequest("P0001", index_time,
        ...     {Modality.AUDIO: Path("sample_data/patients/P0001/lung_sound.wav")})))
        >>> aligner = Aligner(IngestConfig()).fit([record])  # the training rows' records
        >>> tensors = aligner.transform(record)  # PatientTensors: every modality, masks for the missing
        >>> batch = collate([tensors], aligner.tensor_spec())
        >>> batch.present.tolist()  # (B, 6): which modalities each patient has
        [[False, False, False, False, True, False]]
    """

    def __init__(self, config: IngestConfig | None = None):
        self.config = config or IngestConfig()
        self.tensorizers: dict[Modality, Tensorizer] = {
            modality: cls.tensorizer_class(self.config) for modality, cls in registered_ingestors().items()
        }
        self.fitted_ = False

    def fit(self, records: Iterable[PatientRecord]) -> Aligner:
        """Fit every tensorizer on the training patients' records."""
        per_modality: dict[Modality, list] = {m: [] for m in self.tensorizers}
        for patient in records:
            for modality, record in patient.records.items():
                if modality in per_modality:
                    per_modality[modality].append(record)
        for modality, tensorizer in self.tensorizers.items():
            tensorizer.fit(per_modality[modality])
        self.fitted_ = True
        return self

    def array_spec(self) -> dict[Modality, ArraySpec]:
        """Every array of every modality with its role; each modality also gets ``age_hours`` (1,):
        how long before the index time its content was acquired (0 when undated)."""
        return {m: {**t.spec(), RECORD_AGE: RECORD_AGE_FIELD} for m, t in self.tensorizers.items()}

    def tensor_spec(self) -> TensorSpec:
        """``{modality: {name: (shape, torch dtype)}}``, for :func:`~meddx.records.collate`."""
        import torch

        return {
            m: {name: (f.shape, torch.from_numpy(np.zeros(0, dtype=f.dtype)).dtype) for name, f in spec.items()}
            for m, spec in self.array_spec().items()
        }

    def transform(self, patient: PatientRecord) -> PatientTensors:
        """Fixed-shape tensors of one patient; absent modalities stay absent."""
        import torch

        if not self.fitted_:
            raise NotFittedError(
                "this Aligner is not fitted; call fit(training_records) or load a saved one before transform"
            )
        tensors = {}
        for modality in MODALITIES:
            record = patient.records.get(modality)
            tensorizer = self.tensorizers.get(modality)
            if record is None or tensorizer is None:
                continue
            arrays = dict(tensorizer.transform(record))
            arrays[RECORD_AGE] = np.array([record_age_hours(record, patient.index_time)], np.float32)
            tensors[modality] = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        return PatientTensors(patient.patient_id, patient.index_time, tensors)

    # ------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "meddx": __version__,
            "config": self.config.model_dump(mode="json"),
            "tensorizers": {m.value: t.state_dict() for m, t in self.tensorizers.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Aligner:
        try:
            config = IngestConfig.model_validate(state["config"])
            aligner = cls(config)
            for name, tensorizer_state in state["tensorizers"].items():
                modality = Modality(name)
                if modality in aligner.tensorizers:
                    aligner.tensorizers[modality].load_state_dict(tensorizer_state)
        except (KeyError, ValueError) as exc:
            raise ModelError(f"aligner state is not usable: {exc}") from None
        aligner.fitted_ = True
        return aligner

    def save(self, path: str | Path) -> Path:
        """Write the fitted state as JSON (``aligner.json`` in a model folder)."""
        path = Path(path)
        path.write_text(json.dumps(self.state_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Aligner:
        path = Path(path)
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read aligner state {path}: {exc}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"{path} does not hold an aligner state")
        return cls.from_state_dict(state)
