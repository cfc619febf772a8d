"""The ingestor and tensorizer protocols, and the registry keyed by modality.

An :class:`Ingestor` reads the file(s) of one modality for one manifest row into a
:class:`~meddx.records.ModalityRecord` (only items available at the index time). Its
:class:`Tensorizer` turns records into fixed-shape arrays; a tensorizer may be fitted
on training records (vocabularies, normalisation) and saves that state as JSON with
the model, so inference transforms exactly as training did.

Register a new modality reader with the :func:`register_ingestor` decorator; each
modality has exactly one ingestor and a second registration raises.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from meddx.config import IngestConfig
from meddx.dicomweb.ref import DicomWebRef
from meddx.errors import ConfigError
from meddx.fhirclient.ref import FhirRef
from meddx.records import Modality, ModalityRecord
from meddx.specs import ArraySpec


@dataclass(frozen=True)
class IngestRequest:
    """What an ingestor needs to know about one manifest row.

    Attributes:
        patient_id: the patient (also the FHIR Patient id for Bulk FHIR folders).
        index_time: the moment of prediction (aware UTC); nothing after it may be kept.
        paths: absolute paths of every modality the row names (all of them, because
            some readers look beyond their own column: notes also come from FHIR).
        remote: sources on a server: ``dicomweb:`` cells (imaging), ``fhir:Patient/<id>`` cells (ehr).
    """

    patient_id: str
    index_time: datetime
    paths: dict[Modality, Path]
    remote: dict[Modality, DicomWebRef | FhirRef] = field(default_factory=dict)


class Tensorizer(ABC):
    """Turns records of one modality into fixed-shape arrays (scikit-learn style).

    ``fit`` learns state from training records and returns ``self``; fitted attributes
    end in ``_``. Stateless tensorizers keep the default ``fit``.
    """

    modality: ClassVar[Modality]

    def __init__(self, config: IngestConfig):
        self.config = config

    def fit(self, records: Iterable[ModalityRecord]) -> Tensorizer:
        """Learn vocabularies / normalisation from training records."""
        return self

    @abstractmethod
    def spec(self) -> ArraySpec:
        """Name -> :class:`ArrayField` (shape, dtype, role) of every array :meth:`transform` returns."""

    @abstractmethod
    def transform(self, record: ModalityRecord) -> dict[str, np.ndarray]:
        """Fixed-shape arrays for one record, exactly as :meth:`spec` says."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able fitted state (empty for stateless tensorizers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> Tensorizer:
        """Restore what :meth:`state_dict` returned."""
        return self


class ArrayTensorizer(Tensorizer):
    """For records whose ingestor already wrote the fixed-shape arrays (imaging, audio, video...).

    Subclasses only declare :meth:`spec`; ``transform`` checks shapes and casts dtypes.
    """

    def transform(self, record: ModalityRecord) -> dict[str, np.ndarray]:
        out = {}
        for name, (shape, dtype, *_) in self.spec().items():
            if name not in record.arrays:
                raise ValueError(f"{self.modality} record from {record.source} lacks array {name!r}")
            array = np.asarray(record.arrays[name])
            if array.shape != shape:
                raise ValueError(
                    f"{self.modality}/{name} from {record.source} has shape {array.shape}, expected {shape}; "
                    "was it read with another config?"
                )
            out[name] = array.astype(dtype, copy=False)
        return out


class Ingestor(ABC):
    """Reads one modality of one manifest row.

    Subclasses set ``modality`` and ``tensorizer_class`` and implement :meth:`read`.
    Instances are built once per worker process and reused for many files, so they may
    keep caches (a Bulk FHIR index, a tokenizer).

    ``version`` is part of every cache key of the reader's records: bump it when a change
    to the reader alters what it returns for the same file, so cached records are read again.
    """

    modality: ClassVar[Modality]
    tensorizer_class: ClassVar[type[Tensorizer]]
    version: ClassVar[int] = 1

    def __init__(self, config: IngestConfig | None = None):
        self.config = config or IngestConfig()

    def wants(self, request: IngestRequest) -> bool:
        """Whether this row has anything for this ingestor to read."""
        return self.modality in request.paths

    def sources(self, request: IngestRequest) -> Sequence[Path | DicomWebRef | FhirRef]:
        """The files or folders (or server references) :meth:`read` uses for this row (they key the cache)."""
        return [request.paths[self.modality]] if self.modality in request.paths else []

    @abstractmethod
    def read(self, request: IngestRequest) -> ModalityRecord | None:
        """Read the row's file(s); None when there turns out to be nothing to use.

        Raises:
            IngestError: the file is unreadable; the message names it and says why.
        """

    def check(self) -> None:
        """Raise :class:`ConfigError` when this reader cannot work with its config.

        Called once in the parent process before a run reads any file, for the modalities
        the run uses. Checks that are cheap belong in ``__init__``; this is for the costly
        ones (loading a tokenizer). The default checks nothing.
        """
        return None

    def tensorizer(self) -> Tensorizer:
        """A new, unfitted tensorizer for this modality with the same config."""
        return self.tensorizer_class(self.config)


_REGISTRY: dict[Modality, type[Ingestor]] = {}


def register_ingestor(cls: type[Ingestor]) -> type[Ingestor]:
    """Class decorator: make ``cls`` the reader of its modality.

    Raises:
        ConfigError: another class is already registered for that modality.
    """
    modality = Modality(cls.modality)
    current = _REGISTRY.get(modality)
    if current is not None and current is not cls:
        raise ConfigError(
            f"an ingestor for {modality} is already registered ({current.__module__}.{current.__qualname__}); "
            f"unregister it before registering {cls.__module__}.{cls.__qualname__}"
        )
    _REGISTRY[modality] = cls
    return cls


def unregister_ingestor(modality: Modality | str) -> type[Ingestor] | None:
    """Remove the reader of a modality (to replace it with your own); returns it."""
    return _REGISTRY.pop(Modality(modality), None)


def ingestors_registered_so_far() -> dict[Modality, type[Ingestor]]:
    """The classes registered until now; the built-in readers are among them only once imported.

    Ask :func:`meddx.ingest.registry.registered_ingestors` for the full set: it imports them first.
    """
    return dict(_REGISTRY)
