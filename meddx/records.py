"""Records and tensors: what ingestors produce and what models consume.

The flow is ``ModalityRecord`` (one modality of one patient, typed items with times)
→ ``PatientRecord`` (all modalities of one patient at one index time) → alignment →
``PatientTensors`` (fixed shapes + masks per present modality) → :func:`collate` →
``PatientBatch`` (stacked, with a presence mask over all six modalities).

The leakage rule lives here once: :func:`is_available` / :func:`keep_available` decide
what an ingestor may keep, and :meth:`PatientRecord.add` refuses any record that still
holds something dated after the index time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from meddx.errors import LeakageError

if TYPE_CHECKING:  # torch is imported lazily: `import torch` costs seconds at CLI start
    import torch


class Modality(str, Enum):
    """The six input modalities, in the fixed order of every presence mask."""

    IMAGING = "imaging"
    EHR = "ehr"
    NOTES = "notes"
    DEVICE_LOGS = "device_logs"
    AUDIO = "audio"
    VIDEO = "video"

    def __str__(self) -> str:
        return self.value


MODALITIES: tuple[Modality, ...] = tuple(Modality)


# --------------------------------------------------------------------------- time


def parse_time(value: str | datetime | float | int, *, assume_utc: bool = False) -> datetime:
    """Parse an ISO 8601 string, datetime or epoch seconds into an aware UTC datetime.

    Args:
        value: ``"2024-03-05T14:00:00Z"``, ``"2024-03-05T15:00:00+01:00"``, a datetime,
            or epoch seconds.
        assume_utc: treat a zone-less value as UTC instead of raising.

    Raises:
        ValueError: unparseable, or without a time zone (unless ``assume_utc``).

    Example:
        >>> parse_time("2024-03-05T15:00:00+01:00").isoformat()
        '2024-03-05T14:00:00+00:00'
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"not a finite epoch time: {value!r}")
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        if not text:
            raise ValueError("empty time")
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an ISO 8601 time: {value!r}") from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        if not assume_utc:
            raise ValueError(f"time {value!r} has no time zone; write it like 2024-03-05T14:00:00Z")
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def wall_time_to_utc(wall: datetime, zone: tzinfo) -> datetime:
    """The UTC instant of a zone-less wall-clock time read in ``zone``; the later one when two fit.

    In the hour the clocks go back a wall time happens twice, and one skipped when they go
    forward has two readings: the later instant is taken, so that an item is never placed
    earlier than it could have happened (the leakage rule errs on the safe side).

    Example:
        >>> from zoneinfo import ZoneInfo
        >>> wall_time_to_utc(datetime(2024, 10, 27, 2, 30), ZoneInfo("Europe/Berlin")).isoformat()
        '2024-10-27T01:30:00+00:00'
    """
    naive = wall.replace(tzinfo=None)
    return max(naive.replace(tzinfo=zone, fold=fold).astimezone(timezone.utc) for fold in (0, 1))


def is_available(time: datetime | None, index_time: datetime) -> bool:
    """The leakage rule: an item may be used iff it is undated or dated at/before ``index_time``.

    Undated files named in the manifest are taken as available at the index time.
    """
    return time is None or time <= index_time


T = TypeVar("T")


def keep_available(
    items: Iterable[T], index_time: datetime, time_of: Callable[[T], datetime | None] = lambda x: x.time  # type: ignore[attr-defined]
) -> tuple[list[T], int]:
    """Split items by the leakage rule; returns ``(kept, n_dropped)``.

    Example:
        >>> t0 = parse_time("2024-01-02T00:00:00Z")
        >>> kept, dropped = keep_available([Event(t0, "condition", "x")], parse_time("2024-01-01T00:00:00Z"))
        >>> (len(kept), dropped)
        (0, 1)
    """
    kept: list[T] = []
    dropped = 0
    for item in items:
        if is_available(time_of(item), index_time):
            kept.append(item)
        else:
            dropped += 1
    return kept, dropped


# ------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Event:
    """One dated fact: an observation, a coded diagnosis, a note section, ...

    Attributes:
        time: when it happened (aware UTC), or None when undated.
        kind: ``observation``, ``condition``, ``medication``, ``procedure``, ``encounter``, ``note``...
        code: ``system|code`` (e.g. ``http://loinc.org|6690-2``) or a source name for notes.
        value: numeric value, already in the canonical unit.
        unit: the canonical unit of ``value``.
        text: free text (notes).
    """

    time: datetime | None
    kind: str
    code: str
    value: float | None = None
    unit: str | None = None
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time.isoformat() if self.time else None,
            "kind": self.kind,
            "code": self.code,
            "value": self.value,
            "unit": self.unit,
            "text": self.text,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Event":
        time = data.get("time")
        return cls(
            time=parse_time(time) if time else None,
            kind=data["kind"],
            code=data["code"],
            value=data.get("value"),
            unit=data.get("unit"),
            text=data.get("text"),
        )


@dataclass
class ModalityRecord:
    """What one ingestor read for one patient at one index time.

    Attributes:
        modality: which modality this is.
        source: the file or folder it came from (as named in the manifest).
        arrays: dense payload (a volume, a spectrogram, frames, a resampled grid...) with masks.
        events: dated items (EHR facts, note sections).
        time: when the content was acquired (latest dated part), None when undated.
        meta: JSON-able facts the model or a user needs (spacing, UIDs, counts); never PHI.
        warnings: things a user should know that did not stop the read (a missing slice...).
    """

    modality: Modality
    source: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    time: datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.modality = Modality(self.modality)


@dataclass
class PatientRecord:
    """All modality records of one patient at one index time."""

    patient_id: str
    index_time: datetime
    records: dict[Modality, ModalityRecord] = field(default_factory=dict)

    def add(self, record: ModalityRecord) -> None:
        """Attach a record, enforcing the leakage rule.

        Raises:
            LeakageError: the record holds something dated after ``index_time``.
        """
        late = [e for e in record.events if not is_available(e.time, self.index_time)]
        if not is_available(record.time, self.index_time) or late:
            raise LeakageError(
                record.source,
                str(record.modality),
                f"{len(late) or 1} item(s) dated after the index time {self.index_time.isoformat()} "
                "reached the record; the ingestor must filter with meddx.records.keep_available",
            )
        self.records[record.modality] = record

    @property
    def modalities(self) -> list[Modality]:
        return [m for m in MODALITIES if m in self.records]


# ------------------------------------------------------------------------ tensors


@dataclass
class PatientTensors:
    """Fixed-shape tensors of one patient, per present modality.

    ``tensors[modality][name]`` is a tensor whose shape the config fixes; masks are
    tensors too (``...mask`` names, bool). Absent modalities have no entry.
    """

    patient_id: str
    index_time: datetime
    tensors: dict[Modality, dict[str, "torch.Tensor"]] = field(default_factory=dict)

    @property
    def present(self) -> "torch.Tensor":
        """Bool mask over :data:`MODALITIES`, shape ``(M,)``."""
        import torch

        return torch.tensor([m in self.tensors for m in MODALITIES], dtype=torch.bool)


TensorSpec = dict[Modality, dict[str, tuple[tuple[int, ...], "torch.dtype"]]]


@dataclass
class PatientBatch:
    """A stacked batch; absent modalities are zero-filled with their presence False.

    Attributes:
        patient_ids: ``B`` patient ids.
        index_times: ``B`` index times.
        tensors: ``tensors[modality][name]`` of shape ``(B, ...)``.
        present: bool ``(B, M)`` over :data:`MODALITIES`.
    """

    patient_ids: list[str]
    index_times: list[datetime]
    tensors: dict[Modality, dict[str, "torch.Tensor"]]
    present: "torch.Tensor"

    def __len__(self) -> int:
        return len(self.patient_ids)

    def to(self, device: "str | torch.device") -> "PatientBatch":
        """Move every tensor to ``device``."""
        return PatientBatch(
            self.patient_ids,
            self.index_times,
            {m: {k: v.to(device) for k, v in d.items()} for m, d in self.tensors.items()},
            self.present.to(device),
        )


def collate(items: Sequence[PatientTensors], spec: TensorSpec | None = None) -> PatientBatch:
    """Stack patients into a :class:`PatientBatch`, zero-filling absent modalities.

    Args:
        items: the patients of the batch.
        spec: ``{modality: {name: (shape, dtype)}}`` of every tensor. With it, every
            modality in the spec is in the batch even when no patient has it; without
            it, shapes are taken from the patients that have each modality.

    Raises:
        ValueError: an empty batch, or a tensor whose shape differs between patients.

    Example:
        >>> import torch
        >>> a = PatientTensors("p1", parse_time("2024-01-01T00:00:00Z"),
        ...                    {Modality.AUDIO: {"mel": torch.ones(2, 3)}})
        >>> b = PatientTensors("p2", parse_time("2024-01-01T00:00:00Z"))
        >>> batch = collate([a, b])
        >>> tuple(batch.tensors[Modality.AUDIO]["mel"].shape), batch.present[:, 4].tolist()
        ((2, 2, 3), [True, False])
    """
    import torch

    if not items:
        raise ValueError("cannot collate an empty batch")
    shapes: dict[Modality, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {
        m: dict(d) for m, d in (spec or {}).items()
    }
    for item in items:
        for modality, named in item.tensors.items():
            for name, tensor in named.items():
                known = shapes.setdefault(modality, {}).get(name)
                if known is None:
                    shapes[modality][name] = (tuple(tensor.shape), tensor.dtype)
                elif known[0] != tuple(tensor.shape):
                    raise ValueError(
                        f"{modality}/{name}: patient {item.patient_id!r} has shape {tuple(tensor.shape)}, "
                        f"expected {known[0]}; tensors must come from one config"
                    )
    stacked: dict[Modality, dict[str, torch.Tensor]] = {}
    for modality in MODALITIES:
        if modality not in shapes:
            continue
        stacked[modality] = {}
        for name, (shape, dtype) in shapes[modality].items():
            out = torch.zeros((len(items), *shape), dtype=dtype)
            for i, item in enumerate(items):
                tensor = item.tensors.get(modality, {}).get(name)
                if tensor is not None:
                    out[i] = tensor
            stacked[modality][name] = out
    present = torch.stack([item.present for item in items])
    return PatientBatch(
        patient_ids=[item.patient_id for item in items],
        index_times=[item.index_time for item in items],
        tensors=stacked,
        present=present,
    )
