"""Streaming ingestion for batch diagnosis: chunks of rows made ready while the model runs.

A cohort is cut into chunks of rows. For each chunk, long-lived worker processes (one
:class:`~meddx.ingest.worker_pool.WorkerPool` for the whole run) read every (row, modality) into
the ingest cache, then align each row that has a record into the aligned-tensor store with
the model's fitted aligner. A background thread drives this one chunk ahead of the model, so
chunk ``k + 1`` is ingested while the model runs on chunk ``k``; the queue between them holds
one ready chunk, and a ready chunk is only store keys and outcomes (the tensors stay on disk
until the model reads them), so memory does not grow with the cohort.

Workers are spawned, so a script that streams with workers must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.cache import ALIGNED_FOLDER, TensorStore, aligner_hash, row_key
from meddx.cohort import Cohort, CohortRow
from meddx.ingest.preflight import check_run, with_dicomweb_store
from meddx.ingest.registry import build_ingestors
from meddx.ingest.runner import (
    IngestOutcome,
    IngestTask,
    failure_outcome,
    ingest_one,
    init_worker,
    prefetch_remote,
    tasks_for,
    worker_cache,
)
from meddx.ingest.worker_pool import WorkerPool, available_cores
from meddx.records import MODALITIES, Modality, PatientRecord

if TYPE_CHECKING:
    from meddx.align import Aligner
    from meddx.cache import RecordCache
    from meddx.config import IngestConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignTask:
    """Align one row whose records are cached: ``records`` maps modality value -> cache key."""

    row: int
    patient_id: str
    index_time: str
    records: dict[str, str]


@dataclass(frozen=True)
class AlignOutcome:
    """The store key of a row's aligned tensors, or why they could not be made."""

    row: int
    key: str | None
    error: str | None = None
    facts: dict[str, dict[str, float | str | None]] = field(default_factory=dict)


@dataclass
class ReadyRow:
    """One manifest row after ingestion and alignment.

    Attributes:
        row: the manifest row (1-based).
        key: its aligned tensors in the store; None when no modality could be read.
        outcomes: one per (row, modality) the row names.
        error: why the row has no tensors (every modality failed, none named, alignment failed).
        facts: per modality, how its input was acquired (:func:`meddx.data.summary.acquisition_facts`).
    """

    row: CohortRow
    key: str | None
    outcomes: list[IngestOutcome] = field(default_factory=list)
    error: str | None = None
    facts: dict[str, dict[str, float | str | None]] = field(default_factory=dict)

    @property
    def modality_errors(self) -> list[str]:
        return [o.modality.value for o in self.outcomes if o.status == "error"]


@dataclass
class ReadyChunk:
    """A chunk whose rows are all ready for the model (or known to have no inputs)."""

    number: int
    rows: list[ReadyRow]
    ingest_seconds: float


# ----------------------------------------------------------------- in the workers


@dataclass
class AlignerState:
    """What a streaming worker keeps for aligning rows, beside the ingest worker's state.

    Attributes:
        aligner: the model's fitted aligner (None until :func:`_init_stream_worker` ran).
        digest: its hash, part of every aligned row's store key.
        store: the aligned-tensor store rows go to.
    """

    aligner: Aligner | None = None
    digest: str = ""
    store: TensorStore | None = None


# This process's state: a pool worker's, or the feeder's own when it aligns in-process (workers=0).
_ALIGNING = AlignerState()


def _init_stream_worker(
    config_json: str,
    cache_root: str,
    plugins: tuple[str, ...],
    aligner_json: str,
    store_root: str,
    in_worker: bool = True,
) -> None:
    import json

    from meddx.align import Aligner

    init_worker(config_json, cache_root, plugins, in_worker=in_worker)
    if in_worker:
        _one_thread_each()
    aligner = Aligner.from_state_dict(json.loads(aligner_json))
    _ALIGNING.aligner, _ALIGNING.digest, _ALIGNING.store = aligner, aligner_hash(aligner), TensorStore(store_root)


def _one_thread_each() -> None:
    """One math thread per worker, in every library that keeps a pool of its own.

    The workers and the model share the cores; a worker running several threads only makes them
    queue. ``init_worker`` sets ``OMP_NUM_THREADS`` for torch, but numpy's BLAS was loaded before
    (by the imports that unpickle this initializer) and OpenCV (video, resizes) sizes its own pool.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    import cv2

    cv2.setNumThreads(1)


def _align_one(task: AlignTask) -> AlignOutcome:
    """Align one row into the store (or find it there); never raises for a bad record."""
    cache = worker_cache()
    aligner, store = _ALIGNING.aligner, _ALIGNING.store
    if aligner is None or store is None or cache is None:
        raise RuntimeError("_init_stream_worker must run before _align_one")
    key = row_key({Modality(m): k for m, k in task.records.items()}, _ALIGNING.digest)
    facts = _acquisition(cache, task.records)
    if key in store:
        return AlignOutcome(task.row, key, facts=facts)
    from meddx.records import parse_time

    patient = PatientRecord(task.patient_id, parse_time(task.index_time))
    for modality, record_key in task.records.items():
        record = cache.get(record_key)
        if record is None:
            return AlignOutcome(task.row, None, f"{modality}: its cached record vanished; run again")
        patient.add(record)
    try:
        tensors = aligner.transform(patient)
    except (ValueError, RuntimeError) as exc:  # a record of another shape (another config)
        return AlignOutcome(task.row, None, f"cannot align the records with the model's tensorizers: {exc}")
    store.put(key, tensors.tensors)
    return AlignOutcome(task.row, key, facts=facts)


def _acquisition(cache: RecordCache, records: dict[str, str]) -> dict[str, dict[str, float | str | None]]:
    """Per modality, how the row's input was acquired (read from the cached records' headers)."""
    from meddx.data.summary import ACQUISITION_FACTS, acquisition_facts
    from meddx.records import ModalityRecord

    return {
        m: acquisition_facts(ModalityRecord(Modality(m), "", meta=cache.meta(k)))
        for m, k in records.items()
        if m in ACQUISITION_FACTS
    }


def _stream_work(task: IngestTask | AlignTask) -> IngestOutcome | AlignOutcome:
    return _align_one(task) if isinstance(task, AlignTask) else ingest_one(task)


def _stream_failed(task: IngestTask | AlignTask, reason: str) -> IngestOutcome | AlignOutcome:
    if isinstance(task, AlignTask):
        return AlignOutcome(task.row, None, f"aligning {reason}")
    return failure_outcome(task, reason)


class _InlinePool:
    """The :class:`WorkerPool` interface, in this process (``workers=0``: debugging, tests)."""

    def run(self, tasks: Sequence[IngestTask | AlignTask]) -> Iterator[IngestOutcome | AlignOutcome]:
        return (_stream_work(task) for task in tasks)

    def close(self) -> None:
        return None


# ----------------------------------------------------------------- the feeder


class ChunkFeeder:
    """Ingests and aligns chunks of rows one chunk ahead of its consumer.

    Args:
        cohort: the whole cohort (its rows are only read chunk by chunk).
        chunks: ``(number, rows)`` of the chunks to make ready, in order.
        aligner: the model's fitted aligner (its config says how files are read).
        cache_dir: the ingest cache; the aligned-tensor store is ``<cache_dir>/aligned``.
        workers: worker processes (0: in this process).
        task_timeout: seconds one file may take in a worker.
        plugins: modules that register custom ingestors.
        on_read: called (from the feeder's thread) with a number of rows whose files are all read,
            as each row's last file comes back: a progress bar per row, not per chunk.

    Raises:
        ConfigError: before any file is read, when the run cannot work (config, text model, cache).

    Example:
        >>> with ChunkFeeder(cohort, chunks, model.aligner, "runs/cache", workers=2) as feeder:  # doctest: +SKIP
        ...     for ready in feeder:
        ...         ...  # run the model on ready.rows
    """

    def __init__(
        self,
        cohort: Cohort,
        chunks: Sequence[tuple[int, Sequence[CohortRow]]],
        aligner: Aligner,
        cache_dir: str | Path,
        workers: int,
        task_timeout: float | None,
        plugins: tuple[str, ...] = (),
        on_read: Callable[[int], None] | None = None,
    ):
        import json

        self.cohort = cohort
        self.chunks = list(chunks)
        self.on_read = on_read
        self.config: IngestConfig = with_dicomweb_store(aligner.config, cache_dir)
        self.cache_dir = Path(cache_dir)
        self.store = TensorStore(Path(cache_dir) / ALIGNED_FOLDER)
        self.ingestors = build_ingestors(self.config)
        check_run(self.config, self.ingestors, tasks_for(cohort, self.ingestors), cache_dir)
        initargs = (
            self.config.model_dump_json(),
            str(cache_dir),
            tuple(plugins),
            json.dumps(aligner.state_dict()),
            str(self.store.root),
        )
        self.pool: WorkerPool | _InlinePool
        if workers <= 0:
            _init_stream_worker(*initargs, in_worker=False)
            self.pool = _InlinePool()
        else:
            self.pool = WorkerPool(
                workers,
                initargs,
                task_timeout,
                initializer=_init_stream_worker,
                work=_stream_work,
                failed=_stream_failed,
            )
        self._queue: queue.Queue = queue.Queue(maxsize=1)  # one chunk ready ahead of the model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="meddx-ingest", daemon=True)

    def __enter__(self) -> ChunkFeeder:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self.pool.close()

    def __iter__(self) -> Iterator[ReadyChunk]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _produce(self) -> None:
        try:
            for number, rows in self.chunks:
                if self._stop.is_set():
                    return
                self._queue.put(self.make_ready(number, rows))
            self._queue.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(exc)

    def _read(self, n: int) -> None:
        if n > 0 and self.on_read is not None:
            self.on_read(n)

    def make_ready(self, number: int, rows: Sequence[CohortRow]) -> ReadyChunk:
        """Ingest and align the rows of one chunk (in the workers)."""
        import time

        started = time.perf_counter()
        sub = Cohort(
            path=self.cohort.path, rows=list(rows), tasks=self.cohort.tasks, extra_columns=self.cohort.extra_columns
        )
        tasks = tasks_for(sub, self.ingestors)
        by_row: dict[int, list[IngestOutcome]] = {row.row: [] for row in rows}
        if any(task.request.remote for task in tasks):  # PACS series: retrieved concurrently, once
            failed = prefetch_remote(tasks, self.cache_dir, self.config, progress=False)
            for failure in failed.values():
                by_row[failure.row].append(failure)
            tasks = [task for task in tasks if (task.row, task.modality) not in failed]
        unread = Counter(task.row for task in tasks)  # files still to come back, per row
        self._read(len(rows) - len(unread))  # rows with nothing (left) to read
        for outcome in self.pool.run(tasks):
            if isinstance(outcome, IngestOutcome):
                by_row[outcome.row].append(outcome)
                unread[outcome.row] -= 1
                if unread[outcome.row] == 0:
                    self._read(1)
        align_tasks = []
        for row in rows:
            records = {o.modality.value: o.key for o in by_row[row.row] if o.status == "ok" and o.key}
            if records:
                align_tasks.append(AlignTask(row.row, row.patient_id, row.index_time.isoformat(), records))
        aligned = {o.row: o for o in self.pool.run(align_tasks) if isinstance(o, AlignOutcome)}
        ready = []
        for row in rows:
            outcomes = sorted(by_row[row.row], key=lambda o: MODALITIES.index(o.modality))
            found = aligned.get(row.row)
            if found is None:
                ready.append(ReadyRow(row, None, outcomes, _why_no_inputs(outcomes)))
            else:
                ready.append(ReadyRow(row, found.key, outcomes, found.error, found.facts))
        return ReadyChunk(number, ready, time.perf_counter() - started)


@contextmanager
def model_threads(workers: int) -> Iterator[int]:
    """Run the model with the torch threads the ingestion workers leave free (at least one).

    The model and the workers share the cores. torch's default (one thread per core) beside
    busy workers oversubscribes them, and then every side waits: on 2 cores a 64-row forward
    took 3x longer with 2 threads than with 1 beside other work. With ``workers=0`` the ingestion
    runs in a thread of this process, which counts as one worker. The old setting is restored.

    Example:
        >>> with model_threads(workers=2) as threads:  # doctest: +SKIP
        ...     logits, withheld = model.batch_logits(batch)
    """
    import torch

    before = torch.get_num_threads()
    threads = max(1, min(before, available_cores() - max(workers, 1)))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def _why_no_inputs(outcomes: Sequence[IngestOutcome]) -> str:
    if not outcomes:
        return "the manifest names no file for this row"
    if any(o.status == "error" for o in outcomes):
        failed = ", ".join(o.modality.value for o in outcomes if o.status == "error")
        return f"no modality could be read (failed: {failed}; see their errors)"
    return "no file held data from before the index time"


def store_items(store: TensorStore, rows: Sequence[ReadyRow]) -> list[Any]:
    """The aligned :class:`~meddx.records.PatientTensors` of rows that have them, in order."""
    from meddx.records import PatientTensors

    return [
        PatientTensors(r.row.patient_id, r.row.index_time, store.get(r.key), row=r.row.row)
        for r in rows
        if r.key is not None
    ]
