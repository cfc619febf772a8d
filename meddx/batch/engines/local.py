"""The local engine: worker processes on this machine ingest and align chunk ``k + 1``
(:class:`~meddx.streaming.ChunkFeeder`) while the model runs on chunk ``k`` in this process, so
memory holds about two chunks whatever the cohort's size.

Workers are spawned, so a script that runs it with workers must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from meddx.batch.predict import ChunkOutput, load_model, predict_chunk

if TYPE_CHECKING:
    from meddx.batch.options import EngineJob


class LocalEngine:
    """Streams a job's chunks through worker processes and the model (see the module docstring).

    Example:
        >>> engine = LocalEngine()
        >>> for output in engine.run(job):  # doctest: +SKIP
        ...     writer.write(output)
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {"ingest": 0.0, "model": 0.0, "waiting_for_ingest": 0.0}
        self.settings: dict[str, Any] = {}

    def run(self, job: EngineJob) -> Generator[ChunkOutput, None, None]:
        from tqdm.auto import tqdm

        from meddx.ingest.worker_pool import default_workers
        from meddx.progress import worker_counter
        from meddx.streaming import ChunkFeeder, model_threads

        ingest = job.ingest
        workers = default_workers() if ingest.workers is None else ingest.workers
        # the bar counts rows as their files are read (one chunk ahead of the model), the postfix rows diagnosed
        with tqdm(total=job.rows, desc="diagnose", unit="row", disable=not job.progress) as bar:
            read = worker_counter(bar, warm_up=2 * max(workers, 1))  # no ETA while the workers start
            diagnosed = 0
            with (
                ChunkFeeder(
                    job.cohort,
                    job.todo,
                    job.aligner,
                    ingest.cache_root,
                    workers,
                    ingest.task_timeout,
                    ingest.plugins,
                    on_read=read,
                ) as feeder,
                model_threads(workers) as threads,  # after the workers start: it imports torch
            ):
                self.settings = {"model_threads": threads}
                # the network loads while the workers ingest the first chunks
                net = load_model(job.model_dir, ingest.cache_root, job.chunk.device)
                waiting = time.perf_counter()
                for ready in feeder:
                    self.timings["waiting_for_ingest"] += time.perf_counter() - waiting
                    self.timings["ingest"] += ready.ingest_seconds
                    tick = time.perf_counter()
                    embeddings: dict[str, list] = {}
                    predictions = predict_chunk(net, ready, feeder.store, job.chunk, embeddings)
                    seconds = time.perf_counter() - tick
                    self.timings["model"] += seconds
                    yield ChunkOutput(
                        ready, predictions, {"ingest": ready.ingest_seconds, "model": seconds}, embeddings
                    )
                    diagnosed += len(ready.rows)
                    bar.set_postfix_str(f"{diagnosed} diagnosed")
                    waiting = time.perf_counter()
