"""A test plugin: replaces the audio reader with one whose behaviour the file's text picks.

Imported by worker processes through ``ingest_cohort(..., plugins=("echo_ingest_plugin",))``.
Text ``ok`` gives a record, ``bad`` an IngestError, ``boom`` an unexpected exception,
``late`` a record dated after the index time, ``crash`` kills the process natively,
``hang`` never returns.
"""

from __future__ import annotations

import ctypes
import time
from datetime import timedelta

import numpy as np

import meddx.ingest  # noqa: F401  (built-in readers first, so ours replaces theirs)
from meddx.errors import IngestError
from meddx.ingest.base import ArrayTensorizer, Ingestor, IngestRequest, register_ingestor, unregister_ingestor
from meddx.records import Event, Modality, ModalityRecord


class EchoTensorizer(ArrayTensorizer):
    modality = Modality.AUDIO

    def spec(self):
        return {"length": ((1,), "float32")}


class EchoAudioIngestor(Ingestor):
    modality = Modality.AUDIO
    tensorizer_class = EchoTensorizer

    def read(self, request: IngestRequest) -> ModalityRecord | None:
        path = request.paths[self.modality]
        text = path.read_text().strip()
        if text == "crash":
            ctypes.string_at(0)  # a segfault, as a broken native decoder would cause
        if text == "hang":
            time.sleep(3600)  # a decoder stuck in a loop
        if text == "bad":
            raise IngestError(path, self.modality, "the test file says bad")
        if text == "boom":
            raise ValueError("reader bug")
        if text == "empty":
            return None
        when = request.index_time + timedelta(hours=1) if text == "late" else None
        return ModalityRecord(
            self.modality,
            str(path),
            arrays={"length": np.array([len(text)], dtype=np.float32)},
            events=[Event(when, "note", "echo", text=text)],
        )


def install() -> type[Ingestor] | None:
    """Register the echo reader for audio; returns the reader it replaced."""
    previous = unregister_ingestor(Modality.AUDIO)
    register_ingestor(EchoAudioIngestor)
    return previous


install()
