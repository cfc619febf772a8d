"""The aligned-tensor store: what the aligner made of each manifest row, as safetensors files.

One file per row holds every present modality of that row (tensor names ``modality/array``).
Its key is a hash of the row's record keys (the ingest cache keys, which already cover the
source bytes, patient, index time, config section and reader) and of the fitted aligner
state, so a row is aligned once per aligner and any change upstream makes a new key.

Why one file per row and not one per record: a training step wants all of a row's
modalities at once, and opening one file is cheaper than opening up to six. Measured on the
default CPU config (about 1 MB per row, six modalities, warm page cache, one thread):
0.47 ms per row from one file against 0.63 ms from six per-record files
(``benchmarks/bench_dataset.py`` gives the end-to-end figures).

Files are written atomically (a temporary file, then ``os.replace``) with
:func:`safetensors.torch.save_file`; nothing is ever pickled. A row is read whole into one buffer
and its tensors are views into it (:func:`read_safetensors`): safetensors' own ``load`` copies each
of a row's ~15 tensors once more and wraps each in several Python calls. Reading the 1800 default
rows of an epoch in random order took about 0.9 s that way and 0.6 s this way (the layout is the
documented safetensors format: an 8-byte header length, a JSON header, then little-endian data).
Not memory-mapped: a training step touches every byte of a row anyway, and the page faults of a
mapped file, taken inside torch's multi-threaded ``torch.stack`` in ``collate``, cost 17-36 ms per
row with two torch threads on the 2-core machine against 1.3 ms for reading the bytes
(``docs/training.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx._version import __version__
from meddx.errors import ModelError
from meddx.files import atomic_path
from meddx.records import MODALITIES, Modality

if TYPE_CHECKING:
    import torch

    from meddx.align import Aligner

STORE_FORMAT = "meddx-aligned-tensors/1"
_SEPARATOR = "/"


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


class TensorStore:
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

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The file of ``key`` (two-character subfolders keep folders small)."""
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

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
    import numpy as np
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
