"""Long-lived worker processes that survive a task which crashes or hangs its worker.

A task that crashes its worker natively (a segfaulting decoder) is found by re-running
the tasks that were in flight one at a time, reported, and the run goes on in a fresh
pool; a task that hangs past the time limit is stopped and reported the same way.
Workers stop by themselves when the parent process dies. The work itself (what a worker
builds, what a task does, what a failed task becomes) is given by the caller: ingest
(:mod:`meddx.ingest.runner`) and streaming (:mod:`meddx.streaming`) each give their own.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TASK_TIMEOUT = 600.0  # seconds one file may take in a worker before it is stopped
START_LIMIT = 600.0  # seconds a task may wait for its worker to start it (beyond its timeout) before it is stopped
_POLL = 0.5  # seconds between looks for started tasks while some wait for theirs

# This worker's end of its pool's queue of started tasks (set in each worker by :func:`_start_worker`).
_started: Any = None

CRASHED = "crashed the worker process (a native decoder failure); check or re-export the file"


def _timed_out(timeout: float) -> str:
    return f"took longer than {timeout:g} s and was stopped; check the file, or raise the task timeout"


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
    global _started
    _started = started
    initializer(*initargs)


def _run_task(work: Callable[[Any], Any], token: int, task: Any) -> Any:
    """Run one task in a worker, first telling the parent it started (its time limit counts from here).

    The put writes to the pipe before the task runs (a SimpleQueue has no feeder thread), so a task
    that hangs holding the GIL (in a native decoder) is still known to have started.
    """
    if _started is not None:
        _started.put(token)
    return work(task)


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
        initializer: runs once in each new worker (ingest: :func:`~meddx.ingest.runner.init_worker`
            builds the ingestors and cache).
        work: the function each task is given to in a worker (must be importable).
        failed: ``(task, reason) -> outcome`` for a task that crashed or hung its worker.

    Example:
        >>> from meddx.ingest.runner import failure_outcome, ingest_one, init_worker  # doctest: +SKIP
        >>> pool = WorkerPool(2, (config.model_dump_json(), "runs/cache", ()), initializer=init_worker,
        ...                   work=ingest_one, failed=failure_outcome)  # doctest: +SKIP
        >>> with pool:  # doctest: +SKIP
        ...     outcomes = list(pool.run(tasks))
    """

    def __init__(
        self,
        workers: int,
        initargs: tuple,
        timeout: float | None = DEFAULT_TASK_TIMEOUT,
        *,
        initializer: Callable[..., None],
        work: Callable[[Any], Any],
        failed: Callable[[Any, str], Any],
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


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS tells it: a container's
    CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    return max(1, min(4, available_cores()))
