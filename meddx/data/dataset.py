"""``CohortDataset``: a torch ``Dataset`` over a prepared cohort (the fast training path).

It reads the manifest index once and, per item, one safetensors file of the
:class:`~meddx.cache.TensorStore`; never the manifest, the ingest cache or a source
file. It holds no open file, so ``DataLoader`` workers (forked or spawned) can use it, and
its batches support ``pin_memory=True``.

Example:
    >>> from torch.utils.data import DataLoader
    >>> dataset = CohortDataset(prepared.index_path, split="train")  # doctest: +SKIP
    >>> loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2,
    ...                     pin_memory=True, collate_fn=dataset.collate)  # doctest: +SKIP
    >>> batch = next(iter(loader))  # a PatientBatch  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from meddx.cache import RecordCache, TensorStore
from meddx.cohort import TaskSpec
from meddx.data.index import CohortIndex, IndexRow
from meddx.errors import ConfigError
from meddx.predictions.columns import SET_SEPARATOR
from meddx.records import (
    Modality,
    PatientBatch,
    PatientTensors,
    TensorSpec,
    collate,
    parse_time,
)
from meddx.specs import ArraySpec

if TYPE_CHECKING:
    import pandas as pd

    from meddx.align import Aligner

logger = logging.getLogger(__name__)


class CohortDataset(Dataset):
    """One item per manifest row: its aligned tensors, its manifest row number and its labels.

    Args:
        index_path: a manifest index written by :func:`~meddx.data.prepare_cohort`
            (``prepared.index_path``).
        split: keep only rows of this split (``train``, ``val``, ``test``); None keeps all.
        tasks: keep only these tasks' labels; None keeps every task of the manifest.
        rows: keep only these manifest rows (1-based, as in ``item.row``), in this order.

    Attributes:
        array_spec: ``{modality: {name: ArrayField}}``, every array with its role.
        tensor_spec: ``{modality: {name: (shape, torch dtype)}}`` for :func:`~meddx.records.collate`.
        tasks: ``{task: TaskSpec}``; labels are indices into ``TaskSpec.classes``
            (binary: ``("0", "1")``), :data:`~meddx.records.UNKNOWN_LABEL` when unknown.
        index: the :class:`~meddx.data.index.CohortIndex` read from ``index_path``.

    Raises:
        ModelError: the index is missing or damaged.
        ConfigError: ``tasks`` names a task the manifest has no labels for, or ``rows`` a row it lacks.

    Example:
        >>> dataset = CohortDataset(prepared.index_path, split="train", tasks=["disease"])  # doctest: +SKIP
        >>> item = dataset[0]; item.row, item.labels  # doctest: +SKIP
        (3, {'disease': 1})
    """

    def __init__(
        self,
        index_path: str | Path,
        split: str | None = None,
        tasks: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
    ):
        self.index_path = Path(index_path)
        self.index = CohortIndex.read(self.index_path)
        self.split = split
        unknown = [t for t in tasks or () if t not in self.index.tasks]
        if unknown:
            raise ConfigError(
                f"{self.index.manifest} has no label column for task(s) {', '.join(unknown)}; "
                f"its tasks are: {', '.join(self.index.tasks) or 'none'}"
            )
        self.tasks: dict[str, TaskSpec] = {t: self.index.tasks[t] for t in (tasks or self.index.tasks)}
        self.array_spec: dict[Modality, ArraySpec] = self.index.array_spec
        self.tensor_spec: TensorSpec = tensor_spec_of(self.array_spec)
        self.store = TensorStore(self.index.store_root(self.index_path))
        self._entries = self._select(split, rows)
        if not self._entries:
            logger.warning("no rows of %s match split=%r rows=%s", self.index.manifest, split, rows)
        # What __getitem__ needs, parsed once: (row, patient id, index time, labels, store file).
        self._items = [
            (
                e.row,
                e.patient_id,
                parse_time(e.index_time),
                {t: e.labels[t] for t in self.tasks},
                None if e.key is None else str(self.store.path(e.key)),
            )
            for e in self._entries
        ]
        self._aligner: Aligner | None = None

    def _select(self, split: str | None, rows: Sequence[int] | None) -> list[IndexRow]:
        entries = [r for r in self.index.rows if split is None or r.split == split]
        if rows is None:
            return entries
        by_row = {r.row: r for r in entries}
        missing = [r for r in rows if r not in by_row]
        if missing:
            raise ConfigError(
                f"manifest rows {missing[:10]} are not in {self.index.manifest}"
                + (f" (split {split!r})" if split else "")
            )
        return [by_row[r] for r in rows]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> PatientTensors:
        row, patient_id, index_time, labels, path = self._items[i]
        tensors = TensorStore.read(path) if path is not None else {}
        return PatientTensors(patient_id, index_time, tensors, row=row, labels=dict(labels))

    def collate(self, items: Sequence[PatientTensors]) -> PatientBatch:
        """``collate_fn`` for a ``DataLoader``: :func:`~meddx.records.collate` checked against the spec."""
        return collate(items, self.tensor_spec)

    def with_inputs(self) -> CohortDataset:
        """The same rows less those where no modality could be read (nothing for a model to see).

        Training and pretraining use this; batch diagnosis keeps such rows to report them.
        """
        rows = [e.row for e in self._entries if e.key is not None]
        return CohortDataset(self.index_path, split=self.split, tasks=list(self.tasks), rows=rows)

    def label_array(self) -> dict[str, np.ndarray]:
        """Task -> int64 ``(N,)`` class index of every item (:data:`~meddx.records.UNKNOWN_LABEL` if unknown)."""
        return {task: np.array([item[3][task] for item in self._items], dtype=np.int64) for task in self.tasks}

    def acquisition_facts(self) -> dict[int, dict[str, dict[str, float | str | None]]]:
        """Manifest row -> per modality, how its input was acquired
        (:func:`meddx.data.summary.acquisition_facts`, read from the ingest cache's record headers)."""
        from meddx.data.summary import ACQUISITION_FACTS, acquisition_facts
        from meddx.records import ModalityRecord

        cache = RecordCache(self.store.root.resolve().parent)  # prepare_cohort keeps both under one cache root
        mine = set(self.rows)
        return {
            entry.row: {
                m: acquisition_facts(ModalityRecord(Modality(m), "", meta=cache.meta(key)))
                for m, key in entry.records.items()
                if m in ACQUISITION_FACTS
            }
            for entry in self.index.rows
            if entry.row in mine
        }

    @property
    def rows(self) -> list[int]:
        """Manifest row (1-based) of each item, in item order."""
        return [entry.row for entry in self._entries]

    @property
    def aligner(self) -> Aligner:
        """The fitted :class:`~meddx.align.Aligner` the tensors were made with (built on first use)."""
        if self._aligner is None:
            from meddx.align import Aligner

            self._aligner = Aligner.from_state_dict(self.index.aligner)
        return self._aligner

    def table(self) -> pd.DataFrame:
        """One line per item: row, patient_id, index_time, split, modalities, errors, labels, extra columns."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "row": e.row,
                    "patient_id": e.patient_id,
                    "index_time": e.index_time,
                    "split": e.split,
                    "modalities": SET_SEPARATOR.join(e.records),
                    "modality_errors": SET_SEPARATOR.join(e.errors),
                    **{f"label:{t}": e.labels[t] for t in self.tasks},
                    **e.extras,
                }
                for e in self._entries
            ]
        )

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DataLoader workers get the plain index data; the aligner is rebuilt there if needed.
        return {**self.__dict__, "_aligner": None}


def tensor_spec_of(array_spec: dict[Modality, ArraySpec]) -> TensorSpec:
    """``{modality: {name: (shape, torch dtype)}}`` from an array spec with roles."""
    return {
        m: {name: (tuple(f.shape), torch.from_numpy(np.zeros(0, dtype=f.dtype)).dtype) for name, f in spec.items()}
        for m, spec in array_spec.items()
    }
