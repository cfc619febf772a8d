"""Run every registered ingestor over a cohort, in parallel worker processes, into a cache.

Each (row, modality) is one task. Workers are long-lived processes that build their
ingestors once (a Bulk FHIR index, a tokenizer, resampling kernels are reused across
files). A file that fails becomes an error outcome and the run goes on; a reader that
crashes its worker natively (a segfaulting decoder) is found by re-running the tasks
that were in flight one at a time, reported, and the run goes on in a fresh pool; a
reader that hangs past the task timeout is stopped and reported the same way.

Before any file is read, :func:`check_run` makes sure the run can work: the config's
values (:meth:`~meddx.config.IngestConfig.check`), each used reader's own check (the
notes tokenizer loads offline), the cache and run folders can be written, and, when rows
name ``dicomweb:`` sources, that the DICOMweb server takes the credentials. A run's
reports (``errors.csv``, ``warnings.csv``) go to its own folder, never into the cache
that other runs share.

Workers are spawned (not forked), so a script that calls :func:`ingest_cohort` (or
:func:`meddx.data.prepare_cohort`) with workers must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from meddx.cache import RecordCache, cache_key
from meddx.cohort import Cohort
from meddx.config import IngestConfig
from meddx.dicomweb.ref import DicomWebRef
from meddx.errors import ConfigError, IngestError, MeddxError
from meddx.fhirclient.ref import FhirRef
from meddx.ingest.base import Ingestor, IngestRequest
from meddx.ingest.registry import build_ingestors, registered_ingestors
from meddx.progress import worker_counter
from meddx.records import MODALITIES, Modality, PatientRecord

logger = logging.getLogger(__name__)

Status = Literal["ok", "empty", "error"]
DEFAULT_TASK_TIMEOUT = 600.0  # seconds one file may take in a worker before it is stopped


@dataclass(frozen=True)
class IngestTask:
    row: int
    modality: Modality
    request: IngestRequest
    display_path: str  # as the user named it, relative to the manifest folder when possible


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one (row, modality).

    ``status`` is ``ok`` (a record is cached under ``key``), ``empty`` (the files held
    nothing usable at the index time) or ``error`` (``error`` says why).
    """

    row: int
    patient_id: str
    index_time: str
    modality: Modality
    path: str
    status: Status
    key: str | None = None
    error: str | None = None
    cached: bool = False
    warnings: tuple[str, ...] = ()


def tasks_for(cohort: Cohort, ingestors: dict[Modality, Ingestor]) -> list[IngestTask]:
    """One task per row and modality that the row gives an ingestor something to read."""
    tasks = []
    for row in cohort:
        request = IngestRequest(row.patient_id, row.index_time, dict(row.paths), dict(row.remote))
        for modality in MODALITIES:
            ingestor = ingestors.get(modality)
            if ingestor is not None and ingestor.wants(request):
                path = (
                    row.paths.get(modality) or row.remote.get(modality) or next(iter(ingestor.sources(request)), None)
                )
                tasks.append(IngestTask(row.row, modality, request, _display(path, cohort.path.parent)))
    return tasks


def _display(path: Path | DicomWebRef | FhirRef | None, base: Path) -> str:
    if path is None:
        return ""
    if isinstance(path, (DicomWebRef, FhirRef)):
        return str(path)
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------- the work itself


@dataclass
class WorkerState:
    """What an ingest worker process keeps between its tasks, in one place.

    Attributes:
        config: the ingest config (None until :func:`init_worker` ran).
        ingestors: one reader per modality, built from ``config``.
        cache: the record cache the readers' records go to.
        started: this worker's end of its pool's queue of started tasks (:class:`WorkerPool`).
    """

    config: IngestConfig | None = None
    ingestors: dict[Modality, Ingestor] = field(default_factory=dict)
    cache: RecordCache | None = None
    started: Any = None


# This process's state: a pool worker's, or the parent's when it runs the tasks itself (workers=0).
_WORKER = WorkerState()


def init_worker(config_json: str, cache_root: str, plugins: tuple[str, ...] = (), in_worker: bool = True) -> None:
    """Build this worker's ingestors and cache (the initializer of every ingest worker process)."""
    if in_worker:
        # Workers share the cores: one math thread each avoids oversubscription (audio
        # resampling and spectrograms, imaging resizes). torch reads this when first
        # imported, so a worker that only meets cache hits never pays for importing it.
        os.environ["OMP_NUM_THREADS"] = "1"
    for module in plugins:  # modules that register custom ingestors
        importlib.import_module(module)
    if in_worker and "torch" in sys.modules:  # a plugin imported it already
        sys.modules["torch"].set_num_threads(1)
    config = IngestConfig.model_validate_json(config_json)
    _WORKER.config, _WORKER.ingestors, _WORKER.cache = config, build_ingestors(config), RecordCache(cache_root)


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Stop this worker now, or as soon as ``parent`` (the PID the parent gave) is no longer its parent.

    A pool's workers hold both ends of their task queue, so a dead parent never reads as the end
    of the queue: without this, each would wait forever, holding its memory (over 1 GiB). The PID
    must come from the parent: a parent killed while this worker was still starting (importing
    torch) is gone before the worker could ask, and ``os.getppid()`` then names the process that
    adopted the orphan. The watch runs before the initializer, so a parent that dies while the
    workers import their plugins or build their readers stops them too. (``PR_SET_PDEATHSIG`` is no
    substitute: it fires when the parent *thread* that started the worker ends, and the streaming
    feeder starts workers from a thread that ends before the pool does.)
    """
    if os.getppid() != parent:  # an orphan is handed to another process (PID 1 or a subreaper)
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(0)

    threading.Thread(target=watch, name="meddx-parent-watch", daemon=True).start()


def _start_worker(parent: int, started: Any, initializer: Callable[..., None], initargs: tuple) -> None:
    """The initializer every :class:`WorkerPool` worker runs: the parent watch first, then ``initializer``."""
    _exit_with_parent(parent)
    _WORKER.started = started
    initializer(*initargs)


def _run_task(work: Callable[[Any], Any], token: int, task: Any) -> Any:
    """Run one task in a worker, first telling the parent it started (its time limit counts from here).

    The put writes to the pipe before the task runs (a SimpleQueue has no feeder thread), so a task
    that hangs holding the GIL (in a native decoder) is still known to have started.
    """
    if _WORKER.started is not None:
        _WORKER.started.put(token)
    return work(task)


def worker_cache() -> RecordCache | None:
    """The record cache of this worker process (None before :func:`init_worker` ran)."""
    return _WORKER.cache


def ingest_one(task: IngestTask) -> IngestOutcome:
    """Read (or find in the cache) one record, in a worker; never raises for a bad file."""
    config, cache = _WORKER.config, _WORKER.cache
    if cache is None or config is None:
        raise RuntimeError("init_worker must run before ingest_one")
    request = task.request
    base: dict[str, Any] = dict(
        row=task.row,
        patient_id=request.patient_id,
        index_time=request.index_time.isoformat(),
        modality=task.modality,
        path=task.display_path,
    )
    ingestor = _WORKER.ingestors[task.modality]
    try:
        key = cache_key(
            task.modality,
            ingestor.sources(request),
            request.patient_id,
            request.index_time.isoformat(),
            config,
            reader=ingestor,
        )
        if key in cache:
            return IngestOutcome(**base, status="ok", key=key, cached=True, warnings=tuple(cache.warnings(key)))
        record = ingestor.read(request)
        if record is None:
            return IngestOutcome(**base, status="empty")
        PatientRecord(request.patient_id, request.index_time).add(record)  # the leakage guard
        cache.put(key, record)
        return IngestOutcome(**base, status="ok", key=key, warnings=tuple(record.warnings))
    except IngestError as exc:
        return IngestOutcome(**base, status="error", error=str(exc))
    except MeddxError as exc:  # e.g. a ConfigError met while reading (an unusable text model)
        return IngestOutcome(**base, status="error", error=f"{task.modality}: {exc}")
    except Exception as exc:  # a reader bug must not stop the batch; say it is one
        logger.warning("row %d %s: unexpected %s in the reader", task.row, task.modality, type(exc).__name__)
        return IngestOutcome(
            **base,
            status="error",
            error=f"{task.modality}: unexpected {type(exc).__name__} reading {task.display_path}: {exc}",
        )


def failure_outcome(task: IngestTask, reason: str) -> IngestOutcome:
    """The error outcome of a task that crashed or hung its worker."""
    return IngestOutcome(
        row=task.row,
        patient_id=task.request.patient_id,
        index_time=task.request.index_time.isoformat(),
        modality=task.modality,
        path=task.display_path,
        status="error",
        error=f"{task.modality}: reading {task.display_path} {reason}",
    )


CRASHED = "crashed the worker process (a native decoder failure); check or re-export the file"


def _timed_out(timeout: float) -> str:
    return f"took longer than {timeout:g} s and was stopped; check the file, or raise the task timeout"


# ----------------------------------------------------------------- scheduling


START_LIMIT = 600.0  # seconds a task may wait for its worker to start it (beyond its timeout) before it is stopped
_POLL = 0.5  # seconds between looks for started tasks while some wait for theirs


@dataclass
class _Pool:
    """A process pool, and the queue its workers use to say when each task starts."""

    executor: ProcessPoolExecutor
    started: Any  # a multiprocessing SimpleQueue of task tokens: written before the task runs, no feeder thread
    tokens: Iterator[int] = field(default_factory=itertools.count)
    running: set[int] = field(default_factory=set)  # tokens of the tasks submitted and not finished
    started_at: dict[int, float] = field(default_factory=dict)

    def submit(self, work: Callable[[Any], Any], task: Any) -> tuple[Future, int]:
        token = next(self.tokens)
        future = self.executor.submit(_run_task, work, token, task)
        self.running.add(token)
        return future, token

    def finished(self, token: int) -> None:
        self.running.discard(token)
        self.started_at.pop(token, None)

    def note_started(self) -> None:
        """Record the time of every start the workers have reported since the last look."""
        now = time.monotonic()
        while not self.started.empty():  # this process is the queue's only reader: get() will not block
            token = self.started.get()
            if token in self.running:  # a start can be told after its result came back
                self.started_at[token] = now

    def deadline(self, token: int, submitted: float, timeout: float) -> float:
        """When a task's time is up: ``timeout`` after it started, or a start-up that hangs."""
        started = self.started_at.get(token)
        return submitted + timeout + START_LIMIT if started is None else started + timeout

    def kill(self) -> None:
        """Stop a pool whose worker hangs: the executor has no per-task cancel once a task runs."""
        for process in list((getattr(self.executor, "_processes", None) or {}).values()):
            process.terminate()
        self.executor.shutdown(wait=False, cancel_futures=True)


class WorkerPool:
    """Long-lived spawned worker processes, reused by every :meth:`run` until one crashes or hangs.

    At most ``workers`` tasks are in flight, so that a crash or a hang implicates only those.
    A task's time limit counts from the moment a worker starts it (each worker says so), so a
    worker's own start-up (a few seconds, minutes on a loaded machine) never counts against a
    file; a task no worker has started ``START_LIMIT`` seconds past its limit (a start-up that
    hangs) is stopped the same way.
    A task past ``timeout`` is reported and the pool killed; the tasks that were in flight
    beside it go back in the queue. After a crash, the tasks that were in flight are re-run
    one by one: the one that breaks a pool alone is the culprit. A fresh pool replaces a
    killed one; otherwise the same processes serve every call (batch diagnosis calls
    :meth:`run` once per chunk of rows). Workers stop by themselves when this process dies,
    at any moment, their start-up included (:func:`_exit_with_parent`).

    Args:
        workers: worker processes.
        initargs: arguments of ``initializer`` in each worker.
        timeout: seconds one task may take once a worker has started it (None: no limit).
        initializer: runs once in each new worker (default: builds the ingestors and cache).
        work: the function each task is given to in a worker (must be importable).
        failed: ``(task, reason) -> outcome`` for a task that crashed or hung its worker.

    Example:
        >>> with WorkerPool(2, (config.model_dump_json(), "runs/cache", ())) as pool:  # doctest: +SKIP
        ...     outcomes = list(pool.run(tasks))
    """

    def __init__(
        self,
        workers: int,
        initargs: tuple,
        timeout: float | None = DEFAULT_TASK_TIMEOUT,
        initializer: Callable[..., None] = init_worker,
        work: Callable[[Any], Any] = ingest_one,
        failed: Callable[[Any, str], Any] = failure_outcome,
    ):
        self.workers = max(1, workers)
        self.initargs = initargs
        self.timeout = timeout
        self.initializer = initializer
        self.work = work
        self.failed = failed
        self._pool: _Pool | None = None

    def _new_pool(self, size: int) -> _Pool:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of a parent holding threads/torch
        started = context.SimpleQueue()
        # The parent's PID is taken here, in the parent: a worker cannot learn it once its parent is gone.
        initargs = (os.getpid(), started, self.initializer, self.initargs)
        executor = ProcessPoolExecutor(size, mp_context=context, initializer=_start_worker, initargs=initargs)
        return _Pool(executor, started)

    def run(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """Outcomes of ``tasks`` in the order they finish; never raises for a bad task."""
        pending = deque(tasks)
        timeout = self.timeout
        while pending:
            if self._pool is None:
                self._pool = self._new_pool(self.workers)
            pool = self._pool
            inflight: dict = {}  # future -> (task, token, submitted at)
            suspects: list = []
            stop = False
            try:
                while (pending or inflight) and not stop:
                    while pending and len(inflight) < self.workers:
                        task = pending.popleft()
                        try:
                            future, token = pool.submit(self.work, task)
                        except BrokenProcessPool:  # a worker died since the last wait
                            pending.appendleft(task)
                            stop = True
                            break
                        inflight[future] = (task, token, time.monotonic())
                    if not inflight:
                        break
                    wait_for = None
                    pool.note_started()  # always read: an unread queue would fill and block the workers
                    if timeout is not None:
                        deadlines = [pool.deadline(token, at, timeout) for _, token, at in inflight.values()]
                        wait_for = max(0.0, min(deadlines) - time.monotonic())
                        if any(token not in pool.started_at for _, token, _ in inflight.values()):
                            wait_for = min(wait_for, _POLL)  # look again for starts soon
                    done, _ = wait(inflight, timeout=wait_for, return_when=FIRST_COMPLETED)
                    for future in done:
                        task, token, _ = inflight.pop(future)
                        pool.finished(token)
                        try:
                            yield future.result()
                        except BrokenProcessPool:
                            stop = True
                            suspects.append(task)
                    if stop:
                        suspects.extend(task for task, _, _ in inflight.values())
                        break
                    if timeout is None:
                        continue
                    pool.note_started()
                    now = time.monotonic()
                    overdue = [f for f, (_, token, at) in inflight.items() if now > pool.deadline(token, at, timeout)]
                    if overdue:
                        for future in overdue:
                            task, _, _ = inflight.pop(future)
                            logger.warning(
                                "row %d %s: the reader hung; stopped after %g s",
                                getattr(task, "row", -1),
                                getattr(task, "modality", "align"),
                                timeout,
                            )
                            yield self.failed(task, _timed_out(timeout))
                        pending.extendleft(reversed([task for task, _, _ in inflight.values()]))  # innocent: run again
                        inflight.clear()
                        stop = True
            finally:
                if stop or pending or inflight:  # stopped, or the caller left early: not reused
                    pool.kill()
                    self._pool = None
            for task in suspects:
                yield self._run_alone(task)

    def _run_alone(self, task: Any) -> Any:
        solo = self._new_pool(1)
        try:
            future, token = solo.submit(self.work, task)
            submitted = time.monotonic()
            while self.timeout is not None and not future.done():
                solo.note_started()
                left = solo.deadline(token, submitted, self.timeout) - time.monotonic()
                if left <= 0:
                    raise FutureTimeout
                wait([future], timeout=min(left, _POLL))
            outcome = future.result()
        except BrokenProcessPool:
            logger.warning(
                "row %d %s: the task crashed its worker process",
                getattr(task, "row", -1),
                getattr(task, "modality", "align"),
            )
            outcome = self.failed(task, CRASHED)
        except FutureTimeout:
            outcome = self.failed(task, _timed_out(self.timeout or 0.0))
        solo.kill()
        return outcome

    def close(self) -> None:
        """Stop the worker processes (waits for none: every run has finished its tasks)."""
        if self._pool is not None:
            self._pool.executor.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _run_parallel(
    tasks: list[IngestTask], workers: int, initargs: tuple, timeout: float | None
) -> Iterator[IngestOutcome]:
    """Every task through one :class:`WorkerPool` (see there for crashes and hangs)."""
    with WorkerPool(workers, initargs, timeout) as pool:
        yield from pool.run(tasks)


def run_tasks(
    tasks: list[IngestTask],
    cache_dir: str | Path,
    config: IngestConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
    plugins: tuple[str, ...] = (),
    task_timeout: float | None = DEFAULT_TASK_TIMEOUT,
) -> list[IngestOutcome]:
    """Ingest every task into ``cache_dir``; outcomes come back in task order.

    Args:
        workers: worker processes; 0 reads in this process (for debugging).
        progress: show a progress bar.
        plugins: importable modules that register custom ingestors; each worker
            imports them before building its ingestors.
        task_timeout: seconds one file may take in a worker before it is stopped and
            reported (None: no limit). Not applied with ``workers=0``.
    """
    from tqdm.auto import tqdm

    config = config or IngestConfig()
    workers = default_workers() if workers is None else workers
    initargs = (config.model_dump_json(), str(cache_dir), tuple(plugins))
    order = {(t.row, t.modality): i for i, t in enumerate(tasks)}
    if workers <= 0:
        init_worker(*initargs, in_worker=False)
        stream: Iterable[IngestOutcome] = (ingest_one(t) for t in tasks)
    else:
        stream = _run_parallel(tasks, min(workers, max(len(tasks), 1)), initargs, task_timeout)
    outcomes: list[IngestOutcome] = []
    with tqdm(total=len(tasks), desc="ingest", unit="file", disable=not progress) as bar:
        # no ETA until each worker has read a file of each kind: the first ones load the readers' libraries
        count = worker_counter(bar, warm_up=workers * len({t.modality for t in tasks}))
        for outcome in stream:
            outcomes.append(outcome)
            count(1)
    return sorted(outcomes, key=lambda o: order[(o.row, o.modality)])


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS tells it: a container's
    CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    return max(1, min(4, available_cores()))


# ----------------------------------------------------------------- before the run


def ensure_writable_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it.

    Args:
        folder: the folder.
        what: how the user named it, for the message (``"--cache"``, ``"--out"``).

    Raises:
        ConfigError: the folder cannot be created or written; the message names it.

    Example:
        >>> ensure_writable_folder("runs/cache", "--cache")  # doctest: +SKIP
        PosixPath('runs/cache')
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"meddx")
    except OSError as exc:
        raise ConfigError(
            f"{what} {folder}: cannot write there ({exc.strerror or exc}); choose a folder you can write"
        ) from None
    return folder


def new_run_folder(root: str | Path = "runs", prefix: str = "ingest") -> Path:
    """A fresh folder name under ``root`` for one run's reports (not created here).

    Example:
        >>> new_run_folder().name  # doctest: +SKIP
        'ingest-20240305T140000Z'
    """
    root = Path(root)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = root / f"{prefix}-{stamp}"
    n = 1
    while candidate.exists():
        n += 1
        candidate = root / f"{prefix}-{stamp}-{n}"
    return candidate


def check_run(
    config: IngestConfig,
    ingestors: dict[Modality, Ingestor],
    tasks: list[IngestTask],
    cache_dir: str | Path,
    out_dir: str | Path | None = None,
) -> None:
    """Everything that would fail every file, checked once before any file is read.

    Raises:
        ConfigError: an unusable config value, a reader that cannot work with the config
            (a text model that does not load offline), or a folder that cannot be written.
    """
    config.check()
    for modality in sorted({task.modality for task in tasks}, key=MODALITIES.index):
        ingestors[modality].check()
    ensure_writable_folder(cache_dir, "--cache")
    if out_dir is not None:
        ensure_writable_folder(out_dir, "--out")
    refs = {type(ref) for task in tasks for ref in task.request.remote.values()}
    if DicomWebRef in refs:
        from meddx.dicomweb.client import check_server

        check_server(config.dicomweb)  # refused credentials stop the run here, reported once
    if FhirRef in refs:
        from meddx.fhirclient.client import check_server as check_fhir_server

        check_fhir_server(config.fhir)  # the same for the FHIR server


def with_dicomweb_store(config: IngestConfig, cache_dir: str | Path) -> IngestConfig:
    """The config with ``dicomweb.cache_dir`` set to ``<cache_dir>/dicomweb`` and ``fhir.cache_dir`` to
    ``<cache_dir>/fhir`` (the FHIR server's answers), each when it is not set."""
    if config.fhir.cache_dir is None:
        answers = str(Path(cache_dir).resolve() / "fhir")
        config = config.model_copy(update={"fhir": config.fhir.model_copy(update={"cache_dir": answers})})
    if config.dicomweb.cache_dir is not None:
        return config
    store = str(Path(cache_dir).resolve() / "dicomweb")
    return config.model_copy(update={"dicomweb": config.dicomweb.model_copy(update={"cache_dir": store})})


def prefetch_remote(
    tasks: list[IngestTask], cache_dir: str | Path, config: IngestConfig, progress: bool = True
) -> dict[tuple[int, Modality], IngestOutcome]:
    """Retrieve the DICOMweb series the tasks need, ``dicomweb.max_concurrency`` at a time, before the readers run.

    Tasks whose record is cached already are skipped (a second run asks the server nothing).

    Returns:
        An error outcome for each task whose series could not be retrieved (not to be read again).
    """
    from meddx.dicomweb.store import SeriesStore

    cache = RecordCache(cache_dir)
    readers = registered_ingestors()
    wanted: dict[DicomWebRef, list[IngestTask]] = {}
    for task in tasks:
        ref = task.request.remote.get(task.modality)
        if not isinstance(ref, DicomWebRef):  # fhir: sources are read by the EHR reader itself
            continue
        key = cache_key(
            task.modality,
            [ref],
            task.request.patient_id,
            task.request.index_time.isoformat(),
            config,
            reader=readers[task.modality],
        )
        if key not in cache:
            wanted.setdefault(ref, []).append(task)
    if not wanted:
        return {}
    failed = SeriesStore(config.dicomweb).prefetch(wanted, config.imaging.series_rule, progress=progress)
    outcomes = {}
    for ref, reason in failed.items():
        for task in wanted[ref]:
            outcomes[(task.row, task.modality)] = IngestOutcome(
                row=task.row,
                patient_id=task.request.patient_id,
                index_time=task.request.index_time.isoformat(),
                modality=task.modality,
                path=task.display_path,
                status="error",
                error=reason,
            )
    if failed:
        logger.warning("dicomweb: %d of %d series could not be retrieved (see errors.csv)", len(failed), len(wanted))
    return outcomes


def ingest_cohort(
    cohort: Cohort,
    cache_dir: str | Path,
    config: IngestConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
    plugins: tuple[str, ...] = (),
    task_timeout: float | None = DEFAULT_TASK_TIMEOUT,
    out_dir: str | Path | None = None,
) -> IngestReport:
    """Read every modality of every row into a content-addressed cache.

    Args:
        cohort: a validated cohort (:func:`meddx.cohort.load_cohort`).
        cache_dir: where records are cached (safetensors files); runs may share it.
        config: shapes and rules of every reader; defaults fit a 2-core CPU.
        workers: parallel worker processes (0 = in this process).
        progress: show a progress bar.
        plugins: importable modules that register custom ingestors (see :func:`run_tasks`).
        task_timeout: seconds one file may take in a worker (None: no limit).
        out_dir: this run's own folder; when given, ``errors.csv``, ``warnings.csv`` and
            ``ingest_config.json`` are written there.

    Returns:
        An :class:`IngestReport` with one outcome per (row, modality).

    Rows whose ``imaging`` is a ``dicomweb:`` reference have their series retrieved first
    (:func:`prefetch_remote`, into ``<cache_dir>/dicomweb`` unless ``dicomweb.cache_dir`` says
    otherwise); a reference that cannot be retrieved is one error for each of its rows.

    Raises:
        ConfigError: the run cannot work (:func:`check_run`: also a DICOMweb server that refuses
            the credentials); nothing was read.

    Example:
        >>> report = ingest_cohort(load_cohort("sample_data/manifest.csv"), "runs/cache")  # doctest: +SKIP
        >>> print(report.coverage_table())  # doctest: +SKIP
    """
    config = with_dicomweb_store(config or IngestConfig(), cache_dir)
    for module in plugins:
        importlib.import_module(module)
    ingestors = build_ingestors(config)  # readers check their own cheap settings here
    tasks = tasks_for(cohort, ingestors)
    check_run(config, ingestors, tasks, cache_dir, out_dir)
    failed = prefetch_remote(tasks, cache_dir, config, progress) if any(t.request.remote for t in tasks) else {}
    to_read = [task for task in tasks if (task.row, task.modality) not in failed]
    order = {(t.row, t.modality): i for i, t in enumerate(tasks)}
    outcomes = run_tasks(to_read, cache_dir, config, workers, progress, plugins, task_timeout) + list(failed.values())
    outcomes.sort(key=lambda o: order[(o.row, o.modality)])
    report = IngestReport(cohort=cohort, cache_dir=Path(cache_dir), outcomes=outcomes)
    if out_dir is not None:
        out = Path(out_dir)
        report.write_errors(out / "errors.csv")
        report.write_warnings(out / "warnings.csv")
        (out / "ingest_config.json").write_text(config.model_dump_json(indent=2) + "\n")
    return report


@dataclass
class IngestReport:
    """Outcomes of an ingest run, with coverage and errors."""

    cohort: Cohort
    cache_dir: Path
    outcomes: list[IngestOutcome]

    @property
    def errors(self) -> list[IngestOutcome]:
        return [o for o in self.outcomes if o.status == "error"]

    @property
    def warnings(self) -> list[tuple[IngestOutcome, str]]:
        """Every record warning (a folder holding two series, a skipped resource), with its outcome."""
        return [(o, warning) for o in self.outcomes for warning in o.warnings]

    def coverage(self):
        """A pandas table, one row per modality: rows naming it, ok, empty, errors, cached."""
        import pandas as pd

        rows = []
        n = len(self.cohort)
        for modality in MODALITIES:
            mine = [o for o in self.outcomes if o.modality == modality]
            ok = sum(o.status == "ok" for o in mine)
            rows.append(
                {
                    "modality": modality.value,
                    "requested": len(mine),
                    "ok": ok,
                    "empty": sum(o.status == "empty" for o in mine),
                    "errors": sum(o.status == "error" for o in mine),
                    "cached": sum(o.cached for o in mine),
                    "coverage": f"{ok / n:.0%}" if n else "-",
                }
            )
        return pd.DataFrame(rows)

    def coverage_table(self) -> str:
        return self.coverage().to_string(index=False)

    def write_errors(self, path: str | Path) -> Path:
        """Write ``errors.csv``: patient_id, index_time, modality, path, error (header even when empty)."""
        import pandas as pd

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = ["patient_id", "index_time", "modality", "path", "error"]
        frame = pd.DataFrame(
            [
                {
                    "patient_id": o.patient_id,
                    "index_time": o.index_time,
                    "modality": o.modality.value,
                    "path": o.path,
                    "error": o.error,
                }
                for o in self.errors
            ],
            columns=columns,
        )
        frame.to_csv(path, index=False)
        return path

    def write_warnings(self, path: str | Path) -> Path:
        """Write ``warnings.csv``: patient_id, index_time, modality, path, warning (one row per warning)."""
        import pandas as pd

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = ["patient_id", "index_time", "modality", "path", "warning"]
        frame = pd.DataFrame(
            [
                {
                    "patient_id": o.patient_id,
                    "index_time": o.index_time,
                    "modality": o.modality.value,
                    "path": o.path,
                    "warning": warning,
                }
                for o, warning in self.warnings
            ],
            columns=columns,
        )
        frame.to_csv(path, index=False)
        return path

    def patient_records(self) -> Iterator[PatientRecord]:
        """Load each row's records back from the cache, in manifest order."""
        cache = RecordCache(self.cache_dir)
        by_row: dict[int, list[IngestOutcome]] = {}
        for outcome in self.outcomes:
            by_row.setdefault(outcome.row, []).append(outcome)
        for row in self.cohort:
            record = PatientRecord(row.patient_id, row.index_time)
            for outcome in by_row.get(row.row, []):
                if outcome.status == "ok" and outcome.key:
                    cached = cache.get(outcome.key)
                    if cached is not None:
                        record.add(cached)
            yield record
