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
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meddx.cache import RecordCache, cache_key
from meddx.cohort import Cohort
from meddx.config import IngestConfig
from meddx.dicomweb.ref import DicomWebRef
from meddx.errors import IngestError, MeddxError
from meddx.fhirclient.ref import FhirRef
from meddx.ingest.base import Ingestor, IngestRequest
from meddx.ingest.preflight import check_run, with_dicomweb_store
from meddx.ingest.registry import build_ingestors, registered_ingestors
from meddx.ingest.worker_pool import DEFAULT_TASK_TIMEOUT, WorkerPool, default_workers
from meddx.progress import worker_counter
from meddx.records import MODALITIES, Modality, PatientRecord

logger = logging.getLogger(__name__)

Status = Literal["ok", "empty", "error"]


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
    """

    config: IngestConfig | None = None
    ingestors: dict[Modality, Ingestor] = field(default_factory=dict)
    cache: RecordCache | None = None


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


def _run_parallel(
    tasks: list[IngestTask], workers: int, initargs: tuple, timeout: float | None
) -> Iterator[IngestOutcome]:
    """Every task through one :class:`WorkerPool` (see there for crashes and hangs)."""
    with WorkerPool(
        workers, initargs, timeout, initializer=init_worker, work=ingest_one, failed=failure_outcome
    ) as pool:
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
