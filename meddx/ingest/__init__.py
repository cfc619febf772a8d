"""Ingestors: one reader per modality, registered by importing its module."""

# Built-in readers register themselves on import.
from meddx.ingest import audio, device_logs, dicom, fhir, notes, video  # noqa: F401
from meddx.ingest.base import (
    ArrayTensorizer,
    Ingestor,
    IngestRequest,
    Tensorizer,
    register_ingestor,
    unregister_ingestor,
)
from meddx.ingest.registry import build_ingestors, registered_ingestors

__all__ = [
    "ArrayTensorizer",
    "IngestRequest",
    "Ingestor",
    "Tensorizer",
    "build_ingestors",
    "register_ingestor",
    "registered_ingestors",
    "unregister_ingestor",
]
