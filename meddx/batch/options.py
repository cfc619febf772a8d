"""The settings of a batch diagnosis, grouped: how the model runs on a chunk, how rows are
ingested, how the Ray engine uses a cluster, and the job an engine is handed. Nothing heavy is
imported here (the CLI and the pipelines build these at start-up)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meddx.errors import ConfigError

if TYPE_CHECKING:
    from meddx.align import Aligner
    from meddx.cohort import Cohort, CohortRow

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class RayOptions:
    """How the Ray engine uses the cluster.

    Attributes:
        address: the Ray cluster to join (``auto``, ``ray://head:10001``, ``head:6379``); None
            starts a local Ray sized to this machine and stops it afterwards.
        actors: model actors (each loads the model once).
        cpus_per_actor: CPUs Ray reserves for each actor (its torch threads).
        gpus_per_actor: GPUs per actor (fractions share a GPU); > 0 needs ``device="cuda"``.
        max_retries: times Ray re-runs an ingestion task whose worker died, and restarts a dead actor.

    Example:
        >>> RayOptions(actors=2, gpus_per_actor=1.0).actors
        2
    """

    address: str | None = None
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_retries: int = 3

    def check(self, device: str) -> None:
        """Raise :class:`~meddx.errors.ConfigError` for settings that cannot work."""
        if self.actors < 1:
            raise ConfigError(f"--actors must be >= 1; got {self.actors}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0 or self.max_retries < 0:
            raise ConfigError("cpus_per_actor, gpus_per_actor and max_retries must be >= 0")
        if self.gpus_per_actor > 0 and not device.startswith("cuda"):
            raise ConfigError(f"--gpus-per-actor {self.gpus_per_actor:g} needs --device cuda; got --device {device}")


@dataclass(frozen=True)
class ChunkSettings:
    """How the model runs on each chunk.

    Attributes:
        batch_size: patients per forward pass.
        contributions: add the ``contribution:``/``ablation:`` columns (a fusion pass per modality).
        device: where the model runs (``cpu``, ``cuda``).
        abstain: rows above the model's fused OOD threshold get ``status=abstain``.
    """

    batch_size: int = 64
    contributions: bool = True
    device: str = "cpu"
    abstain: bool = True


@dataclass(frozen=True)
class IngestSettings:
    """How the chunks' rows are read and aligned.

    Attributes:
        cache_root: the ingest cache and aligned-tensor store.
        workers: worker processes (local engine; 0: in this process) or a cap on ingestion tasks
            at once (Ray; None: every free CPU).
        task_timeout: seconds one file may take in a worker (None: no limit).
        plugins: modules that register custom ingestors (imported in every worker).
    """

    cache_root: Path
    workers: int | None = None
    task_timeout: float | None = None
    plugins: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineJob:
    """What an engine is handed: the chunks still to do and how to do them.

    Attributes:
        cohort: the manifest's cohort (its path and extra columns travel to the workers).
        todo: ``(chunk number, its rows)`` for every chunk not done yet, in order.
        aligner: the model's fitted aligner (from ``config.json``).
        model_dir: the model folder.
        ingest, chunk: the settings above.
        progress: show a progress bar.
    """

    cohort: Cohort
    todo: Sequence[tuple[int, Sequence[CohortRow]]]
    aligner: Aligner
    model_dir: Path
    ingest: IngestSettings
    chunk: ChunkSettings
    progress: bool = True

    @property
    def rows(self) -> int:
        return sum(len(rows) for _, rows in self.todo)
