"""The cache folder's two content-keyed stores: ingested records, and aligned rows.

Both are folders of ``.safetensors`` files named by a key that covers everything deciding the
content (change any of it and the key changes, so a stale entry is never read), written
atomically, and never pickled. Without an explicit folder the cache lives in
:func:`default_cache_dir` (``MEDDX_CACHE``, else the user cache directory), so every run on the
same files shares it; aligned rows live in its ``aligned/`` subfolder.

**Records** (:class:`RecordCache`, keyed by :func:`cache_key`). A record is stored under a key
made of the modality, the bytes of its source files (for a DICOMweb source: its UIDs and a hash
of the server's URL), the index time, the patient id (a Bulk FHIR folder holds many patients),
the ingest config section, the reader's class and its ``version``, and the meddx version. Each
entry is one file: the record's arrays as tensors, and its events, time, meta and warnings as
JSON in the file's metadata header.

**Aligned rows** (:class:`TensorStore`, keyed by :func:`row_key`): what the aligner made of each
manifest row. One file per row holds every present modality of that row (tensor names
``modality/array``). Its key is a hash of the row's record keys and of the fitted aligner state,
so a row is aligned once per aligner and any change upstream makes a new key.

Why one file per row and not one per record: a training step wants all of a row's
modalities at once, and opening one file is cheaper than opening up to six. Measured on the
default CPU config (about 1 MB per row, six modalities, warm page cache, one thread):
0.47 ms per row from one file against 0.63 ms from six per-record files
(``benchmarks/bench_dataset.py`` gives the end-to-end figures).

A row is read whole into one buffer and its tensors are views into it (:func:`read_safetensors`):
safetensors' own ``load`` copies each of a row's ~15 tensors once more and wraps each in several
Python calls. Reading the 1800 default rows of an epoch in random order took about 0.9 s that way
and 0.6 s this way (the layout is the documented safetensors format: an 8-byte header length, a
JSON header, then little-endian data). Not memory-mapped: a training step touches every byte of a
row anyway, and the page faults of a mapped file, taken inside torch's multi-threaded
``torch.stack`` in ``collate``, cost 17-36 ms per row with two torch threads on the 2-core
machine against 1.3 ms for reading the bytes (``docs/training.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddx._version import __version__
from meddx.config import IngestConfig
from meddx.dicomweb.ref import DicomWebRef, server_id
from meddx.errors import ModelError
from meddx.fhirclient.ref import FhirRef
from meddx.files import atomic_path
from meddx.records import MODALITIES, Event, Modality, ModalityRecord, parse_time

if TYPE_CHECKING:
    import torch

    from meddx.align import Aligner
    from meddx.ingest.base import Ingestor

_CHUNK = 1 << 20
CACHE_ENV = "MEDDX_CACHE"
ALIGNED_FOLDER = "aligned"  # the aligned rows' folder inside the cache folder
STORE_FORMAT = "meddx-aligned-tensors/1"
_SEPARATOR = "/"


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


class KeyedFolder:
    """What both stores share: a folder of ``<key[:2]>/<key>.safetensors`` files (two-character
    subfolders keep folders small)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The file of ``key``."""
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()


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


class RecordCache(KeyedFolder):
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

    def put(self, key: str, record: ModalityRecord) -> Path:
        """Write a record atomically (a crash never leaves half a file under the key)."""
        from safetensors.numpy import save_file

        path = self.path(key)
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

        path = self.path(key)
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

        path = self.path(key)
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


def aligner_hash(aligner: Aligner) -> str:
    """SHA-256 of the fitted aligner state (JSON, sorted keys) and its tensorizer classes.

    Example:
        >>> from meddx.align import Aligner
        >>> len(aligner_hash(Aligner().fit([])))
        64
    """
    payload = {
        "state": aligner.state_dict(),
        "tensorizers": {
            m.value: f"{type(t).__module__}.{type(t).__qualname__}" for m, t in aligner.tensorizers.items()
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def row_key(record_keys: Mapping[Modality, str], aligner_digest: str) -> str:
    """The store key of one row: its records' ingest cache keys and the aligner hash.

    The record keys already include the patient id and the index time, which is all
    the aligner reads besides the records (for the ``age_hours`` arrays).
    """
    payload = {
        "format": STORE_FORMAT,
        "aligner": aligner_digest,
        "records": {Modality(m).value: key for m, key in record_keys.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class TensorStore(KeyedFolder):
    """A folder of aligned rows, one safetensors file per key.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     store = TensorStore(folder)
        ...     _ = store.put("row-key", {Modality.AUDIO: {"log_mel": np.zeros((32, 251), np.float32)}})
        ...     shape = store.get("row-key")[Modality.AUDIO]["log_mel"].shape
        >>> shape
        torch.Size([32, 251])
    """

    def put(self, key: str, tensors: Mapping[Modality, Mapping[str, Any]]) -> Path:
        """Write one row's tensors (``{modality: {name: tensor or array}}``) atomically."""
        import torch
        from safetensors.torch import save_file

        flat = {}
        for modality, named in tensors.items():
            for name, value in named.items():
                tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
                flat[f"{Modality(modality).value}{_SEPARATOR}{name}"] = tensor.detach().cpu().contiguous()
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(flat, str(tmp), metadata={"format": STORE_FORMAT, "meddx": __version__})
        return path

    def get(self, key: str) -> dict[Modality, dict[str, torch.Tensor]]:
        """One row's tensors, per modality.

        Raises:
            ModelError: the file is missing or unreadable (the store was pruned or moved).
        """
        return self.read(self.path(key))

    @staticmethod
    def read(path: str | Path) -> dict[Modality, dict[str, torch.Tensor]]:
        """The tensors of one store file (what :meth:`get` does once the path is known)."""
        try:
            flat = read_safetensors(path)
        except (OSError, ValueError) as exc:  # missing, truncated or foreign file
            raise ModelError(
                f"aligned tensors {path} cannot be read ({exc}); run prepare_cohort again to rebuild the store"
            ) from None
        by_modality: dict[str, dict[str, torch.Tensor]] = {}
        for flat_name, tensor in flat.items():
            modality, _, name = flat_name.partition(_SEPARATOR)
            by_modality.setdefault(modality, {})[name] = tensor
        return {m: by_modality[m.value] for m in MODALITIES if m.value in by_modality}


# safetensors dtype names -> little-endian NumPy dtypes (the types the store writes, and a few more).
_NUMPY_DTYPES = {
    "BOOL": "|b1",
    "U8": "|u1",
    "I8": "|i1",
    "I16": "<i2",
    "U16": "<u2",
    "I32": "<i4",
    "U32": "<u4",
    "I64": "<i8",
    "U64": "<u8",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as writable views into one buffer that holds the file.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not a complete safetensors file (bad header, unknown dtype, a tensor
            whose bytes lie outside the file or do not match its shape).
    """
    import torch

    with open(path, "rb", buffering=0) as file:
        # One writable buffer for the whole file (not zero-filled first: it is read over at once).
        data = np.empty(os.fstat(file.fileno()).st_size, dtype=np.uint8)
        if file.readinto(data.data) != len(data):
            raise ValueError("the file changed size while it was read")
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    header_length = int.from_bytes(data[:8].tobytes(), "little")
    if 8 + header_length > len(data):
        raise ValueError("the header runs past the end of the file (truncated?)")
    try:
        header = json.loads(data[8 : 8 + header_length].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    start_of_data = 8 + header_length
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
            shape = [int(n) for n in entry["shape"]]
            begin, end = (start_of_data + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: unreadable header entry {str(entry)[:100]}") from None
        count = math.prod(shape)
        if not start_of_data <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: its bytes do not fit the file or its shape {shape} (truncated?)")
        array = data[begin:end].view(dtype).reshape(shape)
        if not array.dtype.isnative:  # a big-endian machine: torch takes native byte order only
            array = array.astype(array.dtype.newbyteorder("="))
        tensors[name] = torch.from_numpy(array)
    return tensors
