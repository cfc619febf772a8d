"""Content-addressed cache of ingested records (safetensors files).

A record is stored under a key made of everything that decides its content: the
modality, the bytes of its source files (for a DICOMweb source: its UIDs and a hash of
the server's URL), the index time, the patient id (a Bulk FHIR folder holds many
patients), the ingest config section, the reader's class and its ``version``, and the
meddx version. Change any of them and the key changes, so a stale entry is never read.

Without an explicit folder the cache lives in :func:`default_cache_dir` (``MEDDX_CACHE``,
else the user cache directory), so every run on the same files shares it.

Each entry is one ``.safetensors`` file: the record's arrays as tensors, and its
events, time, meta and warnings as JSON in the file's metadata header. Nothing is
pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meddx._version import __version__
from meddx.config import IngestConfig
from meddx.dicomweb.ref import DicomWebRef, server_id
from meddx.fhirclient.ref import FhirRef
from meddx.files import atomic_path
from meddx.records import Event, Modality, ModalityRecord, parse_time

if TYPE_CHECKING:
    from meddx.ingest.base import Ingestor

_CHUNK = 1 << 20
CACHE_ENV = "MEDDX_CACHE"


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where ingested records and aligned tensors are cached.

    ``cache_dir`` when given, else the ``MEDDX_CACHE`` environment variable, else the
    user cache directory (``platformdirs`` when installed, else ``~/.cache/meddx``).
    Runs on the same files share it, so nothing is read twice.

    Example:
        >>> default_cache_dir("runs/cache").name
        'cache'
    """
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path.home() / ".cache" / "meddx"
    return Path(user_cache_dir("meddx", appauthor=False))


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes; memoised on (path, size, mtime) within a process."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_digest(path: Path) -> str:
    """Digest of a file, or of every file under a folder (names and bytes)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(_file_digest(str(file), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


def reader_name(reader: Ingestor | type[Ingestor]) -> str:
    """``module.Class@version`` of an ingestor: a new reader or a bumped version is a new key."""
    cls = reader if isinstance(reader, type) else type(reader)
    return f"{cls.__module__}.{cls.__qualname__}@{cls.version}"


def fhir_digest(ref: FhirRef, config: IngestConfig) -> str:
    """Key part of a ``fhir:Patient/<id>`` source: the server's id (a hash of its URL) and the patient id.

    Like a DICOMweb source, a record read from the FHIR server is read once: a second run with the
    same index time asks the server nothing (resources entered later for times before the index
    time are not seen until the cache entry is removed).
    """
    from meddx.fhirclient.client import server_url

    text = f"fhir|{server_id(server_url(config.fhir))}|{ref.patient_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def _digest(source: Path | DicomWebRef | FhirRef, config: IngestConfig) -> str:
    if isinstance(source, DicomWebRef):
        return remote_digest(source, config)
    if isinstance(source, FhirRef):
        return fhir_digest(source, config)
    return source_digest(source)


def remote_digest(ref: DicomWebRef, config: IngestConfig) -> str:
    """Key part of a DICOMweb source: its UIDs and the server's id (a hash of its URL), never the bytes.

    DICOM instances do not change under their UIDs, so a run whose records are cached asks
    the server nothing. A study reference is keyed by the study: a series added to the
    study later is not seen until the cache entry is removed.
    """
    from meddx.dicomweb.client import server_url

    text = f"dicomweb|{server_id(server_url(config.dicomweb))}|{ref.study_uid}|{ref.series_uid or ''}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(
    modality: Modality,
    sources: Sequence[Path | DicomWebRef | FhirRef],
    patient_id: str,
    index_time_iso: str,
    config: IngestConfig,
    *,
    reader: Ingestor | type[Ingestor],
) -> str:
    """The content address of one record read by ``reader`` (an ingestor or its class)."""
    section = getattr(config, Modality(modality).value).model_dump(mode="json")
    if Modality(modality) == Modality.NOTES:  # notes also read the FHIR section's rules
        section = {"notes": section, "ehr": config.ehr.model_dump(mode="json")}
    section = {"section": section, "site_timezone": config.site_timezone}  # every reader reads zone-less times in it
    payload = {
        "meddx": __version__,
        "modality": Modality(modality).value,
        "reader": reader_name(reader),
        "patient_id": patient_id,
        "index_time": index_time_iso,
        "config": section,
        "sources": [_digest(p, config) for p in sources],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class RecordCache:
    """A folder of cached records keyed by :func:`cache_key`.

    Example:
        >>> import tempfile
        >>> from meddx.config import IngestConfig
        >>> from meddx.ingest.audio import AudioIngestor
        >>> from meddx.ingest.base import IngestRequest
        >>> from meddx.records import parse_time
        >>> wav = Path("sample_data/patients/P0001/lung_sound.wav")
        >>> record = AudioIngestor().read(IngestRequest("P0001", parse_time("2024-12-03T08:27:00Z"),
        ...                                             {Modality.AUDIO: wav}))
        >>> key = cache_key(Modality.AUDIO, [wav], "P0001", "2024-12-03T08:27:00+00:00", IngestConfig(),
        ...                 reader=AudioIngestor)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     cache = RecordCache(folder)
        ...     _ = cache.put(key, record)
        ...     cached, missing = cache.get(key), cache.get("0" * 64)
        >>> cached.modality.value, cached.arrays["log_mel"].shape, missing
        ('audio', (32, 251), None)
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, record: ModalityRecord) -> Path:
        """Write a record atomically (a crash never leaves half a file under the key)."""
        from safetensors.numpy import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "modality": record.modality.value,
            "source": record.source,
            "time": record.time.isoformat() if record.time else "",
            "events": json.dumps([e.to_json() for e in record.events]),
            "meta": json.dumps(record.meta),
            "warnings": json.dumps(record.warnings),
            "meddx": __version__,
        }
        arrays = {name: np.ascontiguousarray(a) for name, a in record.arrays.items()}
        with atomic_path(path) as tmp:
            save_file(arrays, str(tmp), metadata=header)
        return path

    def _header(self, key: str) -> dict[str, str]:
        """The cached record's safetensors header (no arrays read); {} when absent."""
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return {}
        with safe_open(str(path), framework="numpy") as handle:
            return handle.metadata() or {}

    def warnings(self, key: str) -> list[str]:
        """The cached record's warnings, read from the file's header only (no arrays); [] when absent."""
        return list(json.loads(self._header(key).get("warnings", "[]")))

    def meta(self, key: str) -> dict:
        """The cached record's ``meta``, read from the file's header only (no arrays); {} when absent."""
        return dict(json.loads(self._header(key).get("meta", "{}")))

    def get(self, key: str) -> ModalityRecord | None:
        """The cached record, or None when absent."""
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
        return ModalityRecord(
            modality=Modality(header["modality"]),
            source=header["source"],
            arrays=arrays,
            events=[Event.from_json(e) for e in json.loads(header["events"])],
            time=parse_time(header["time"]) if header.get("time") else None,
            meta=json.loads(header["meta"]),
            warnings=json.loads(header["warnings"]),
        )
