"""The readers of every modality: meddx's built-in ones and any registered with ``register_ingestor``.

:mod:`meddx.ingest.base` holds the protocols and the store that ``register_ingestor`` fills; it
imports no reader, so each reader can import it. This module sits above the readers: asking it
for the registered readers first imports the six built-in ones (which register themselves), so
the import graph runs one way (``registry`` -> readers -> ``base``) without a cycle.
"""

from __future__ import annotations

from meddx.config import IngestConfig
from meddx.ingest.base import Ingestor, ingestors_registered_so_far
from meddx.records import Modality


def registered_ingestors() -> dict[Modality, type[Ingestor]]:
    """The registered ingestor classes, after importing meddx's built-in ones."""
    # Imported here, not at the top, so importing this module stays cheap; importing registers them.
    from meddx.ingest import audio, device_logs, dicom, fhir, notes, video  # noqa: F401

    return ingestors_registered_so_far()


def build_ingestors(config: IngestConfig | None = None) -> dict[Modality, Ingestor]:
    """One instance of every registered ingestor."""
    return {m: cls(config) for m, cls in registered_ingestors().items()}
