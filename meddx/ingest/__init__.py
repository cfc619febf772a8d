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
