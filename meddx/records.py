"""Records and tensors: what ingestors produce and what models consume.

The flow is ``ModalityRecord`` (one modality of one patient, typed items with times)
→ ``PatientRecord`` (all modalities of one patient at one index time) → alignment →
``PatientTensors`` (fixed shapes + masks per present modality) → :func:`collate` →
``PatientBatch`` (stacked per modality over the patients that have it, with a presence mask
over all six modalities, row identity and labels with their masks).

The leakage rule lives here once: :func:`is_available` / :func:`keep_available` decide
what an ingestor may keep, and :meth:`PatientRecord.add` refuses any record that still
holds something dated after the index time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from meddx.errors import LeakageError
from meddx.specs import MODALITIES, Modality, TensorSpec

if TYPE_CHECKING:  # torch is imported lazily: `import torch` costs seconds at CLI start
    import torch


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
    items: Iterable[T],
    index_time: datetime,
    time_of: Callable[[T], datetime | None] = lambda x: x.time,  # type: ignore[attr-defined]
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
    def from_json(cls, data: Mapping[str, Any]) -> Event:
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
    tensors too (bool). Absent modalities have no entry.

    Attributes:
        patient_id: the patient.
        index_time: the moment of prediction.
        tensors: per present modality, its named arrays (see the aligner's ``array_spec`` for roles).
        row: the manifest row this came from (-1 when not from a manifest).
        labels: task -> class index (binary: 0/1); :data:`UNKNOWN_LABEL` where the label is unknown.
    """

    patient_id: str
    index_time: datetime
    tensors: dict[Modality, dict[str, torch.Tensor]] = field(default_factory=dict)
    row: int = -1
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def present(self) -> torch.Tensor:
        """Bool mask over :data:`MODALITIES`, shape ``(M,)``."""
        import torch

        return torch.tensor([m in self.tensors for m in MODALITIES], dtype=torch.bool)


UNKNOWN_LABEL = -1  # an empty label cell: left out of that task's loss and metrics, never a negative


@dataclass
class PatientBatch:
    """A batch of patients; each modality's tensors hold only the patients that have it.

    Absent modalities are not zero-filled: ``tensors[m][name]`` has shape ``(P_m, ...)`` where
    ``P_m = present[:, m].sum()``, in batch order. :meth:`rows_with` maps them back to batch rows.
    A modality no patient of the batch has is not in ``tensors`` at all.

    Attributes:
        patient_ids: ``B`` patient ids.
        index_times: ``B`` index times.
        tensors: ``tensors[modality][name]`` of shape ``(P_m, ...)``.
        present: bool ``(B, M)`` over :data:`MODALITIES`.
        rows: int64 ``(B,)`` manifest row of each patient (-1 when unknown).
        labels: task -> int64 ``(B,)`` class index; ``label_mask[task]`` bool ``(B,)`` is False where unknown.
    """

    patient_ids: list[str]
    index_times: list[datetime]
    tensors: dict[Modality, dict[str, torch.Tensor]]
    present: torch.Tensor
    rows: torch.Tensor | None = None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patient_ids)

    @property
    def label_mask(self) -> dict[str, torch.Tensor]:
        """Task -> bool ``(B,)``: True where the label is known."""
        return {task: labels != UNKNOWN_LABEL for task, labels in self.labels.items()}

    def rows_with(self, modality: Modality) -> torch.Tensor:
        """Batch positions (int64 ``(P_m,)``) of the patients that have ``modality``."""
        return self.present[:, MODALITIES.index(Modality(modality))].nonzero().flatten()

    def keeping(self, keep: torch.Tensor) -> PatientBatch:
        """The same patients with only the modalities ``keep`` (bool ``(B, M)``) lets through.

        Each modality's arrays lose the rows of patients whose modality is not kept; a modality
        nobody keeps leaves ``tensors``. Labels, ids and rows are unchanged.
        """
        present = self.present & keep.to(self.present.device).bool()
        tensors = {}
        for modality, arrays in self.tensors.items():
            m = MODALITIES.index(modality)
            kept = present[self.present[:, m], m]  # (P_m,) over this modality's rows, in batch order
            if bool(kept.any()):
                tensors[modality] = arrays if bool(kept.all()) else {k: v[kept] for k, v in arrays.items()}
        return PatientBatch(self.patient_ids, self.index_times, tensors, present, self.rows, self.labels)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> PatientBatch:
        """Move every tensor to ``device``."""
        return PatientBatch(
            self.patient_ids,
            self.index_times,
            {m: {k: v.to(device, non_blocking=non_blocking) for k, v in d.items()} for m, d in self.tensors.items()},
            self.present.to(device, non_blocking=non_blocking),
            None if self.rows is None else self.rows.to(device, non_blocking=non_blocking),
            {t: v.to(device, non_blocking=non_blocking) for t, v in self.labels.items()},
        )

    def pin_memory(self) -> PatientBatch:
        """Pinned host copies, for ``DataLoader(pin_memory=True)``."""
        return PatientBatch(
            self.patient_ids,
            self.index_times,
            {m: {k: v.pin_memory() for k, v in d.items()} for m, d in self.tensors.items()},
            self.present.pin_memory(),
            None if self.rows is None else self.rows.pin_memory(),
            {t: v.pin_memory() for t, v in self.labels.items()},
        )


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, copied by numpy in the calling thread for plain CPU tensors.

    torch spreads a large copy over its intra-op threads; when the cores are busy (a 2-core
    machine training with two torch threads) the copy waits for every thread, and collating a
    batch of 32 default patients took 0.3-0.5 s instead of about 30 ms (``docs/training.md``).
    """
    import torch

    first = tensors[0]
    if first.device.type != "cpu" or first.dtype == torch.bfloat16 or any(t.requires_grad for t in tensors):
        return torch.stack(tensors)
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def collate(items: Sequence[PatientTensors], spec: TensorSpec | None = None) -> PatientBatch:
    """Stack patients into a :class:`PatientBatch`; each modality holds only its present patients.

    Args:
        items: the patients of the batch.
        spec: ``{modality: {name: (shape, dtype)}}`` of every tensor; when given, every
            patient's tensors are checked against it (a tensor from another config fails here,
            not deep inside a model).

    Raises:
        ValueError: an empty batch, or a tensor whose shape differs between patients or from the spec.

    Example:
        >>> import torch
        >>> a = PatientTensors("p1", parse_time("2024-01-01T00:00:00Z"),
        ...                    {Modality.AUDIO: {"mel": torch.ones(2, 3)}}, labels={"sepsis": 1})
        >>> b = PatientTensors("p2", parse_time("2024-01-01T00:00:00Z"), labels={"sepsis": -1})
        >>> batch = collate([a, b])
        >>> tuple(batch.tensors[Modality.AUDIO]["mel"].shape), batch.present[:, 4].tolist()
        ((1, 2, 3), [True, False])
        >>> batch.label_mask["sepsis"].tolist()
        [True, False]
    """
    import torch

    if not items:
        raise ValueError("cannot collate an empty batch")
    stacked: dict[Modality, dict[str, torch.Tensor]] = {}
    for modality in MODALITIES:
        having = [item for item in items if modality in item.tensors]
        if not having:
            continue
        expected = dict((spec or {}).get(modality, {}))
        names = list(expected) or list(having[0].tensors[modality])
        stacked[modality] = {}
        for name in names:
            tensors = []
            for item in having:
                tensor = item.tensors[modality].get(name)
                if tensor is None:
                    raise ValueError(f"{modality}/{name}: patient {item.patient_id!r} lacks this tensor")
                known = expected.get(name)
                if known is None:
                    expected[name] = (tuple(tensor.shape), tensor.dtype)
                elif known[0] != tuple(tensor.shape):
                    raise ValueError(
                        f"{modality}/{name}: patient {item.patient_id!r} has shape {tuple(tensor.shape)}, "
                        f"expected {known[0]}; tensors must come from one config"
                    )
                tensors.append(tensor)
            stacked[modality][name] = _stack(tensors)
    tasks = sorted({task for item in items for task in item.labels})
    labels = {
        task: torch.tensor([item.labels.get(task, UNKNOWN_LABEL) for item in items], dtype=torch.int64)
        for task in tasks
    }
    return PatientBatch(
        patient_ids=[item.patient_id for item in items],
        index_times=[item.index_time for item in items],
        tensors=stacked,
        present=torch.stack([item.present for item in items]),
        rows=torch.tensor([item.row for item in items], dtype=torch.int64),
        labels=labels,
    )
