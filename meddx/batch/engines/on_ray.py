"""The Ray engine (``meddx diagnose --engine ray``): the same chunks, on a cluster.

:func:`meddx.batch.diagnose` plans the run (chunks of rows, ``--resume``), writes each finished
chunk and assembles the final files for both engines; this engine only turns the chunks still
to do into a stream of :class:`~meddx.batch.predict.ChunkOutput`. A Ray Dataset holds one item
per chunk (its manifest rows, as JSON). Two stages run over it, streamed, so the cluster's
memory holds a few chunks whatever the cohort's size:

1. **ingestion**, stateless Ray tasks (``map_batches`` with a function, one CPU each): every
   (row, modality) of the chunk through the local engine's own code (a
   :class:`~meddx.streaming.ChunkFeeder` with one worker process, per Ray worker), then the
   rows' aligned tensors, packed into one safetensors blob per chunk. A file that cannot be read, crashes its reader or
   hangs past ``task_timeout`` is an error outcome, exactly as in the local engine;
2. **the model**, an actor pool (``map_batches`` with a callable class): each actor loads the
   model folder once and runs :func:`meddx.batch.predict.predict_chunk` on the blob, returning
   the chunk's typed predictions as JSON. ``gpus_per_actor`` puts each actor on a GPU.

The driver writes each finished chunk as it arrives (:class:`meddx.batch.run_folder.ChunkWriter`):
that is what ``--resume`` keeps. Ray retries a task whose worker died (``max_retries``) and
restarts a dead actor (``max_restarts``), so a lost node costs its chunks' work, never a row twice.

On a cluster, every node must read the manifest's files, the model folder and the cache folder
at the same paths (a shared file system); the outputs are written by the driver only.

Ray is an optional extra (``pip install 'meddx[distributed]'``); nothing else in meddx imports it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Generator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.batch.options import ChunkSettings, EngineJob, RayOptions
from meddx.batch.predict import ChunkOutput
from meddx.cohort import Cohort, CohortRow
from meddx.errors import ConfigError, MeddxError
from meddx.predictions.types import TaskPrediction
from meddx.records import Modality

if TYPE_CHECKING:
    from meddx.streaming import ChunkFeeder, ReadyChunk

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'meddx[distributed]'"


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra)
    except ImportError as exc:
        raise ConfigError(f"--engine ray needs Ray Data ({exc}); install it with: {INSTALL_HINT}") from None
    return ray


# ----------------------------------------------------------------- rows and ready chunks as JSON
# Stages hand each other plain JSON and bytes (Arrow columns), never pickled objects.


def _row_json(row: CohortRow) -> dict[str, Any]:
    from meddx.data.index import json_safe

    return {
        "row": row.row,
        "patient_id": row.patient_id,
        "index_time": row.index_time.isoformat(),
        "split": row.split,
        "paths": {m.value: str(p) for m, p in row.paths.items()},
        "labels": dict(row.labels),
        "extras": json_safe(row.extras),
        "remote": {m.value: str(r) for m, r in row.remote.items()},
    }


def _row_from_json(data: dict[str, Any]) -> CohortRow:
    from meddx.dicomweb.ref import parse_dicomweb_ref
    from meddx.fhirclient.ref import is_fhir_ref, parse_fhir_ref
    from meddx.records import parse_time

    return CohortRow(
        row=data["row"],
        patient_id=data["patient_id"],
        index_time=parse_time(data["index_time"]),
        split=data["split"],
        paths={Modality(m): Path(p) for m, p in data["paths"].items()},
        labels=dict(data["labels"]),
        extras=dict(data["extras"]),
        remote={
            Modality(m): parse_fhir_ref(r) if is_fhir_ref(r) else parse_dicomweb_ref(r)
            for m, r in data["remote"].items()
        },
    )


def _ready_json(ready: ReadyChunk) -> str:
    rows = []
    for r in ready.rows:
        outcomes = [{**asdict(o), "modality": o.modality.value, "warnings": list(o.warnings)} for o in r.outcomes]
        rows.append({"row": _row_json(r.row), "key": r.key, "error": r.error, "outcomes": outcomes, "facts": r.facts})
    return json.dumps({"number": ready.number, "ingest_seconds": ready.ingest_seconds, "rows": rows})


def _ready_from_json(text: str) -> ReadyChunk:
    from meddx.ingest.runner import IngestOutcome
    from meddx.streaming import ReadyChunk, ReadyRow

    data = json.loads(text)
    rows = [
        ReadyRow(
            _row_from_json(r["row"]),
            r["key"],
            [
                IngestOutcome(**{**o, "modality": Modality(o["modality"]), "warnings": tuple(o["warnings"])})
                for o in r["outcomes"]
            ],
            r["error"],
            r["facts"],
        )
        for r in data["rows"]
    ]
    return ReadyChunk(data["number"], rows, data["ingest_seconds"])


class _BlobStore:
    """A chunk's aligned tensors from one safetensors blob; the ``get`` of a TensorStore."""

    def __init__(self, blob: bytes):
        from safetensors.torch import load

        self.rows: dict[str, dict[Modality, dict[str, Any]]] = {}
        for flat, tensor in load(blob).items():
            key, modality, name = flat.split("/", 2)
            self.rows.setdefault(key, {}).setdefault(Modality(modality), {})[name] = tensor

    def get(self, key: str) -> dict[Modality, dict[str, Any]]:
        return self.rows[key]


def _pack(store: Any, ready: ReadyChunk) -> bytes:
    """The aligned tensors of a chunk's rows as one safetensors blob (``key/modality/array``)."""
    from safetensors.torch import save

    flat = {}
    for r in ready.rows:
        if r.key is not None:
            for modality, named in store.get(r.key).items():
                for name, tensor in named.items():
                    flat[f"{r.key}/{Modality(modality).value}/{name}"] = tensor.contiguous()
    return save(flat) if flat else b""


def _pack_embeddings(embeddings: dict[str, list]) -> bytes:
    """A chunk's OOD embeddings (space -> ``(P, D)`` arrays) as one safetensors blob, for the shift test."""
    import numpy as np
    from safetensors.numpy import save

    flat = {
        space: np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
        for space, parts in embeddings.items()
        if parts
    }
    return save(flat) if flat else b""


def _unpack_embeddings(blob: bytes) -> dict[str, list]:
    from safetensors.numpy import load

    return {space: [values] for space, values in load(blob).items()} if blob else {}


# ----------------------------------------------------------------- stage 1: ingestion tasks


_feeder: tuple[str, ChunkFeeder] | None = None  # per worker process: (setup digest, feeder)


def _worker_feeder(setup: dict[str, Any]) -> ChunkFeeder:
    """This worker process's chunk feeder, built once per run's setup (Ray reuses worker processes).

    It is the local engine's :class:`~meddx.streaming.ChunkFeeder` with one worker process: files
    are read in that child, so a reader that crashes natively or hangs past the task timeout costs
    that file (an error outcome, as in the local engine), not the Ray task and its chunk.
    """
    global _feeder
    import hashlib
    import importlib

    from meddx.align import Aligner
    from meddx.streaming import ChunkFeeder

    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()
    if _feeder is None or _feeder[0] != digest:
        if _feeder is not None:
            _feeder[1].pool.close()
        for module in setup["plugins"]:  # what the feeder asks which rows to read
            importlib.import_module(module)
        aligner = Aligner.from_state_dict(json.loads(setup["aligner"]))
        shell = Cohort(Path(setup["manifest"]), [], {}, list(setup["extra_columns"]))  # rows come per chunk
        feeder = ChunkFeeder(shell, [], aligner, setup["cache"], 1, setup["task_timeout"], tuple(setup["plugins"]))
        _feeder = (digest, feeder)
    return _feeder[1]


def ingest_chunks(batch: dict[str, Any], setup: dict[str, Any]) -> dict[str, list]:
    """Ray task: ingest and align the chunks of a batch (``chunk``, ``rows`` JSON) -> ready JSON + blob.

    Example:
        >>> ready = ingest_chunks({"chunk": [0], "rows": [rows_json]}, setup)  # doctest: +SKIP
        >>> ready["chunk"], len(ready["tensors"][0]) > 0  # doctest: +SKIP
        ([0], True)
    """
    feeder = _worker_feeder(setup)
    out: dict[str, list] = {"chunk": [], "ready": [], "tensors": []}
    for number, rows in zip(batch["chunk"], batch["rows"], strict=True):
        ready = feeder.make_ready(int(number), [_row_from_json(r) for r in json.loads(rows)])
        out["chunk"].append(int(number))
        out["ready"].append(_ready_json(ready))
        out["tensors"].append(_pack(feeder.store, ready))
    return out


# ----------------------------------------------------------------- stage 2: the model actors


class ChunkPredictor:
    """Ray actor: loads the model folder once, then turns ready chunks into their typed predictions.

    Args:
        model_dir: the model folder (readable on every node).
        cache_root: the cache folder (the frozen text encoder's cache is under it).
        settings: batch size, contributions, device.
        threads: torch threads of the model (Ray sets ``OMP_NUM_THREADS`` to the actor's CPUs,
            which on one machine would starve the model while ingestion sits idle on a warm cache).

    Example:
        >>> predictor = ChunkPredictor("runs/model", "cache", ChunkSettings())  # doctest: +SKIP
        >>> predictor(ingest_chunks(batch, setup))["rows"]  # rows of each chunk  # doctest: +SKIP
        [256]
    """

    def __init__(self, model_dir: str, cache_root: str, settings: ChunkSettings, threads: int | None = None):
        import torch

        from meddx.batch.predict import load_model

        if threads is not None:
            torch.set_num_threads(threads)
        self.net = load_model(Path(model_dir), Path(cache_root), settings.device)
        self.settings = settings

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from meddx.batch.predict import predict_chunk

        out: dict[str, list] = {k: [] for k in ("chunk", "rows", "ready", "predictions", "seconds", "embeddings")}
        for number, ready_text, blob in zip(batch["chunk"], batch["ready"], batch["tensors"], strict=True):
            started = time.perf_counter()
            ready = _ready_from_json(ready_text)
            store = _BlobStore(bytes(blob)) if len(blob) else None
            embeddings: dict[str, list] = {}
            predictions = predict_chunk(self.net, ready, store, self.settings, embeddings)
            out["chunk"].append(int(number))
            out["rows"].append(len(ready.rows))
            out["ready"].append(ready_text)
            out["predictions"].append(json.dumps([p.to_json() for p in predictions]))
            out["seconds"].append(json.dumps({"ingest": ready.ingest_seconds, "model": time.perf_counter() - started}))
            out["embeddings"].append(_pack_embeddings(embeddings))
        return out


# ----------------------------------------------------------------- the driver


def _start(ray: Any, options: RayOptions, progress: bool) -> bool:
    """Join the cluster or start a local Ray; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    settings: dict[str, Any] = dict(
        include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True
    )
    if options.address is None:
        # one slot per core for ingestion, plus the actors' own: the local engine's layout
        # (workers on every core, the model in the main process)
        from meddx.ingest.worker_pool import available_cores

        cpus = available_cores() + options.actors * options.cpus_per_actor
        ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", **settings)
    else:
        try:
            ray.init(address=options.address, **settings)
        except ConnectionError as exc:
            raise ConfigError(f"--address {options.address}: cannot join the Ray cluster ({exc})") from None
    return True


class _DropNotice(logging.Filter):
    """Drops Ray Data's notice that its progress bars are off (meddx shows its own bar)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


def _quiet_data(ray: Any) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False
    notices = logging.getLogger("ray.data._internal.progress")  # the logger that says so
    if not any(isinstance(f, _DropNotice) for f in notices.filters):
        notices.addFilter(_DropNotice())
    data_logger = logging.getLogger("ray.data")
    if data_logger.getEffectiveLevel() < logging.WARNING:  # its per-stage progress lines
        data_logger.setLevel(logging.WARNING)


class RayEngine:
    """Streams a job's chunks through Ray tasks (ingestion) and Ray actors (the model).

    Args:
        options: how it uses the cluster (address, actors, CPUs and GPUs per actor, retries).

    Example:
        >>> diagnose("cohort.csv", "runs/model", "runs/out", engine="ray",  # doctest: +SKIP
        ...          ray_options=RayOptions(address="auto", actors=4, gpus_per_actor=1.0), device="cuda")

    Raises (from :meth:`run`):
        ConfigError: Ray is not installed, the cluster cannot be joined or has no CPU left for
            ingestion. MeddxError: a stage failed after Ray's retries (finished chunks are kept:
            run again with ``resume=True``).
    """

    def __init__(self, options: RayOptions):
        self.options = options
        self.timings: dict[str, float] = {"ingest": 0.0, "model": 0.0}
        self.settings: dict[str, Any] = {}

    def run(self, job: EngineJob) -> Generator[ChunkOutput, None, None]:
        """The chunks as they finish. ``job.ingest.workers`` caps the ingestion tasks running at
        once (None: every CPU slot the actors leave)."""
        from tqdm.auto import tqdm

        from meddx.ingest.preflight import check_run
        from meddx.ingest.registry import build_ingestors
        from meddx.ingest.runner import tasks_for

        options = self.options
        options.check(job.chunk.device)
        ray = import_ray()
        config = job.aligner.config
        check_run(  # fail before the cluster starts: config, readers, cache
            config, build_ingestors(config), tasks_for(job.cohort, build_ingestors(config)), job.ingest.cache_root
        )
        started_here = _start(ray, options, job.progress)
        results: Generator[dict[str, Any], None, None] | None = None
        try:
            _quiet_data(ray)
            cpus = float(ray.cluster_resources().get("CPU", 0))
            left = cpus - options.actors * options.cpus_per_actor
            if left < 1:
                raise ConfigError(
                    f"the Ray cluster has {cpus:g} CPUs and {options.actors} actor(s) of {options.cpus_per_actor:g} "
                    "CPU take them all; lower --actors or cpus_per_actor so at least one is left for ingestion"
                )
            self.settings = {
                "workers": job.ingest.workers or None,
                "ray_address": options.address,
                "ray_cpus": cpus,
                "actors": options.actors,
                "cpus_per_actor": options.cpus_per_actor,
                "gpus_per_actor": options.gpus_per_actor,
                "max_retries": options.max_retries,
            }
            logger.info("diagnosing %d chunk(s) on Ray (%g CPUs, %d actor(s))", len(job.todo), cpus, options.actors)
            results = _results(ray, _stages(ray, job, options))
            with tqdm(total=job.rows, desc="diagnose", unit="row", disable=not job.progress) as bar:
                for result in results:
                    seconds = json.loads(result["seconds"])
                    self.timings["ingest"] += seconds["ingest"]
                    self.timings["model"] += seconds["model"]
                    predictions = [TaskPrediction.from_json(p) for p in json.loads(result["predictions"])]
                    embeddings = _unpack_embeddings(bytes(result["embeddings"]))
                    yield ChunkOutput(_ready_from_json(result["ready"]), predictions, seconds, embeddings)
                    bar.update(int(result["rows"]))
        finally:
            if results is not None:
                results.close()  # stops the stages (and frees their actors) when the driver stops early
            if started_here:
                ray.shutdown()


def _model_threads(options: RayOptions) -> int:
    """Torch threads per model actor: on a local Ray, this machine's cores shared by the actors, as
    the local engine gives its model every core while its workers read; on a cluster, the CPUs the
    actor reserved."""
    if options.address is None:
        from meddx.ingest.worker_pool import available_cores

        return max(1, available_cores() // options.actors)
    return max(1, int(options.cpus_per_actor))


def _stages(ray: Any, job: EngineJob, options: RayOptions) -> Any:
    """The Ray Dataset of the run (lazy): the chunks' rows -> ingestion tasks -> model actors."""
    setup = {
        "manifest": str(job.cohort.path),
        "extra_columns": list(job.cohort.extra_columns),
        "aligner": json.dumps(job.aligner.state_dict()),
        "cache": str(job.ingest.cache_root),
        "task_timeout": job.ingest.task_timeout,
        "plugins": list(job.ingest.plugins),
    }
    workers = job.ingest.workers or None
    items = [{"chunk": k, "rows": json.dumps([_row_json(r) for r in rows])} for k, rows in job.todo]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))  # a chunk per block
    with warnings.catch_warnings():
        # Ray >= 2.60 flags the retry settings (extra remote arguments) as deprecated, yet names
        # no replacement for them; they still work, and a user can do nothing about the warning.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ready = dataset.map_batches(
            ingest_chunks,
            batch_size=1,
            fn_kwargs={"setup": setup},
            num_cpus=1,
            max_retries=options.max_retries,
            compute=ray.data.TaskPoolStrategy(size=workers) if workers else None,
        )
        return ready.map_batches(
            ChunkPredictor,
            batch_size=1,
            fn_constructor_kwargs=dict(
                model_dir=str(job.model_dir),
                cache_root=str(job.ingest.cache_root),
                settings=job.chunk,
                threads=_model_threads(options),
            ),
            compute=ray.data.ActorPoolStrategy(size=options.actors),
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
            max_restarts=options.max_retries,
            max_task_retries=options.max_retries,
        )


def _results(ray: Any, dataset: Any) -> Generator[dict[str, Any], None, None]:
    """The dataset's rows as they finish; a stage that failed past Ray's retries raises a MeddxError."""
    try:
        yield from dataset.iter_rows()
    except (ray.exceptions.RayError, ray.exceptions.UserCodeException) as exc:
        raise _as_meddx_error(exc) from None


# "module.Type: message" lines of the remote traceback that Ray's exceptions carry as text
_REMOTE_ERROR = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception)): (?P<message>.*)$", re.MULTILINE)
_MESSAGE_ERRORS = ("ConfigError", "ModelError", "PredictionsError")  # made from a message alone


def _as_meddx_error(exc: BaseException) -> MeddxError:
    """The error a task or actor raised, out of Ray's wrappers (which keep only its traceback's text)."""
    import meddx.errors

    found = [m for m in _REMOTE_ERROR.finditer(str(exc)) if not m["type"].startswith("ray.")]
    if found:
        first = found[0]  # the original, before Ray wrapped it
        name = first["type"].rsplit(".", 1)[-1]
        if first["type"].startswith("meddx.errors.") and name in _MESSAGE_ERRORS:
            return getattr(meddx.errors, name)(first["message"])
        detail = f"{first['type']}: {first['message']}"
    else:
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return MeddxError(
        f"the Ray run stopped ({detail}); its finished chunks are kept: run the same command again with --resume"
    )
