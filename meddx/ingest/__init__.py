"""Ingestors: one reader per modality, registered by importing its module."""

from meddx.ingest.base import (
    ArrayTensorizer,
    Ingestor,
    IngestRequest,
    Tensorizer,
    build_ingestors,
    register_ingestor,
    registered_ingestors,
    unregister_ingestor,
)

# Built-in readers register themselves on import.
from meddx.ingest import fhir  # noqa: F401
from meddx.ingest import notes  # noqa: F401
from meddx.ingest import dicom  # noqa: F401
from meddx.ingest import device_logs  # noqa: F401
from meddx.ingest import audio  # noqa: F401
from meddx.ingest import video  # noqa: F401
