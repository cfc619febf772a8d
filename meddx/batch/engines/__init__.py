"""The engines of batch diagnosis. Each turns an :class:`~meddx.batch.options.EngineJob` into a
stream of :class:`~meddx.batch.predict.ChunkOutput` (one per finished chunk) and knows nothing
of the run folder or the writers that consume the stream:

* :class:`~meddx.batch.engines.local.LocalEngine`: worker processes on this machine ingest
  chunk ``k + 1`` while the model, in this process, runs on chunk ``k``;
* :class:`~meddx.batch.engines.on_ray.RayEngine`: ingestion as Ray tasks, the model in Ray actors.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from meddx.batch.options import EngineJob, RayOptions
    from meddx.batch.predict import ChunkOutput


class Engine(Protocol):
    """What :func:`meddx.batch.diagnose` asks of an engine.

    Attributes:
        timings: seconds spent (``ingest``, ``model``, ...), filled while :meth:`run` streams.
        settings: what it ran with, for ``run.json``.
    """

    timings: dict[str, float]
    settings: dict[str, Any]

    def run(self, job: EngineJob) -> Generator[ChunkOutput, None, None]:
        """The job's chunks as they finish (in order for the local engine, as they come on Ray)."""
        ...


def make_engine(name: str, ray_options: RayOptions | None = None) -> Engine:
    """The engine called ``name`` (``local`` or ``ray``)."""
    if name == "ray":
        from meddx.batch.engines.on_ray import RayEngine
        from meddx.batch.options import RayOptions

        return RayEngine(ray_options or RayOptions())
    from meddx.batch.engines.local import LocalEngine

    return LocalEngine()
