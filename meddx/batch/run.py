"""Batch diagnosis: a cohort through a fine-tuned model, streamed, resumable, into files other systems read.

:func:`diagnose` checks the model folder whole before any patient is read, cuts the manifest's
rows into chunks and plans the run folder (:mod:`meddx.batch.run_folder`: plan, lock, resume);
an engine (:mod:`meddx.batch.engines`: local worker processes, or Ray) turns the chunks still to
do into a stream of finished chunks (:mod:`meddx.batch.predict`); the run folder's
:class:`~meddx.batch.run_folder.ChunkWriter` writes each one's part files, and at the end the parts
are assembled into the final files:

* ``predictions.parquet`` and ``predictions.csv``: the predictions contract (README,
  ``schemas/prediction_row.schema.json``), one row per (patient, index time, task), in manifest
  order; a row whose every modality failed (or that names none) has ``status=error``; a failed
  modality is named in ``modality_errors`` and the rest still diagnose;
* ``risk_assessments.ndjson``: one validated FHIR R4 RiskAssessment per ``ok`` row;
* ``errors.csv``: every ingest error, and every row that could not be diagnosed;
* ``run.json``: the model (name, SHA-256 of ``model.safetensors``), versions, counts, timings,
  and with a model that has OOD scores the batch ``"shift"`` report (:mod:`meddx.batch.shift`);
  written last, with ``"complete": true``.

A run killed at any point (even SIGKILL) and started again with ``resume=True`` keeps its
finished chunks and does the rest, so every (patient, index time, task) appears exactly once.
A second run on the same folder is refused (ConfigError, exit status 2).

Workers are spawned, so a script that calls :func:`diagnose` with workers must guard its entry
point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from meddx._version import __version__
from meddx.batch import run_folder
from meddx.batch.options import ENGINES, ChunkSettings, EngineJob, IngestSettings
from meddx.batch.run_folder import (
    PARTS,
    RUN,
    RUN_FORMAT,
    ChunkWriter,
    DiagnoseResult,
    finished_run,
    lock_run_folder,
    make_plan,
    model_name,
    provenance_of,
    releases_run_lock,
    start_or_resume,
    write_text,
)
from meddx.cohort import CohortRow, load_cohort
from meddx.errors import ConfigError, ModelError
from meddx.ingest.preflight import ensure_writable_folder
from meddx.ingest.worker_pool import DEFAULT_TASK_TIMEOUT, default_workers
from meddx.models.checkpoint import WEIGHTS_FILE

if TYPE_CHECKING:
    from meddx.batch.options import RayOptions

logger = logging.getLogger(__name__)

__all__ = ["DiagnoseResult", "diagnose"]


def _check_arguments(
    engine: str, store_sr: bool, store_fhir: bool, ray: bool, batch_size: int, chunk_size: int
) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if store_sr and engine == "ray":
        raise ConfigError("--store-sr runs with the local engine; leave out --engine ray to store SRs")
    if store_fhir and engine == "ray":
        raise ConfigError("--store-fhir runs with the local engine; leave out --engine ray to write RiskAssessments")
    if ray and engine != "ray":
        raise ConfigError(f"Ray settings (--address, --actors, --gpus-per-actor) need --engine ray; got {engine!r}")
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"batch_size and chunk_size must be >= 1; got {batch_size} and {chunk_size}")


def _pacs_reporter(config, cache_root: Path, model_dir: Path, sha256: str, plan: dict, rows: Sequence[CohortRow]):
    """The ``--store-sr`` reporter; checks a DICOMweb server is configured before any work."""
    from meddx.export.sr import ModelInfo
    from meddx.export.sr_reports import PacsReporter
    from meddx.ingest.preflight import with_dicomweb_store
    from meddx.records import Modality

    if not any(Modality.IMAGING in row.remote for row in rows):
        logger.warning("--store-sr: no row reads its images from DICOMweb (dicomweb: cells); no SR will be made")
    run_id = json.dumps(plan, sort_keys=True)
    model_info = ModelInfo(model_name(model_dir), f"{sha256[:16]} (meddx {__version__})")
    return PacsReporter(with_dicomweb_store(config, cache_root), cache_root, model_info, run_id)


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {"meddx": __version__, "python": platform.python_version()}
    for package in ("torch", "monai", "pydicom", "fhir.resources", "pandas", "pyarrow", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


@releases_run_lock
def diagnose(
    manifest: str | Path,
    model: str | Path,
    out_dir: str | Path,
    *,
    split: str | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    resume: bool = False,
    batch_size: int = 64,
    chunk_size: int = 64,
    contributions: bool = True,
    task_timeout: float | None = DEFAULT_TASK_TIMEOUT,
    abstain: bool = True,
    plugins: tuple[str, ...] = (),
    engine: str = "local",
    device: str = "cpu",
    store_sr: bool = False,
    progress: bool = True,
    store_fhir: bool = False,
    ray_options: RayOptions | None = None,
) -> DiagnoseResult:
    """Diagnose every row of a manifest (or of one split) with a fine-tuned model folder.

    Args:
        manifest: the cohort manifest (labels are not needed).
        model: a model folder written by ``meddx finetune`` / ``DiagnosisModel.save_pretrained``.
        out_dir: the run folder (created): predictions, RiskAssessments, errors, run.json.
        split: only rows of this split (``test``...); None: every row.
        cache_dir: ingest cache and aligned-tensor store (default ``MEDDX_CACHE``, else the user cache).
        workers: ingestion worker processes (default up to 4; 0: in this process, no overlap).
        resume: keep the finished chunks of a killed run in ``out_dir`` and do the rest.
        batch_size: patients per forward pass.
        chunk_size: rows per chunk (what is ingested ahead, and the unit of resuming).
        contributions: add ``contribution:<modality>`` and ``ablation:<modality>`` columns.
        task_timeout: seconds one file may take in a worker (None: no limit).
        abstain: a row above the model's fused out-of-distribution threshold (``ood`` > 1) gets
            ``status=abstain`` and a ``preliminary`` RiskAssessment; its prediction is still written.
            False: ``ood`` columns only. Without ``ood.json`` in the model folder nothing abstains.
        plugins: modules that register custom ingestors (imported in every worker).
        engine: ``local`` (worker processes on this machine) or ``ray`` (ingestion as Ray tasks,
            the model in Ray actors; :mod:`meddx.batch.engines.on_ray`, ``pip install 'meddx[distributed]'``).
        device: where the model runs (``cpu``, ``cuda``).
        store_sr: store a DICOM Structured Report per prediction made on PACS images back on the
            DICOMweb server (:mod:`meddx.export.sr_reports`); ``structured_reports.csv`` lists them.
        progress: show a progress bar.
        store_fhir: write each RiskAssessment to the FHIR server (a transaction per chunk, conditional
            creates: once each, ``--resume`` included; :mod:`meddx.export.fhir_writes`); ``fhir_writes.csv``
            lists them.
        ray_options: the Ray engine's settings (cluster address, actors, GPUs per actor); ``engine="ray"`` only.

    Returns:
        A :class:`DiagnoseResult`.

    Raises:
        ManifestError: the manifest is invalid. ConfigError: bad arguments, a split with no rows,
        a ``resume`` of another run or with a damaged file, an unusable cache, another run holding
        ``out_dir``. ModelError: an unusable model folder (any file, checked before any patient is read).

    Example:
        >>> if __name__ == "__main__":  # workers are spawned  # doctest: +SKIP
        ...     result = diagnose("sample_data/manifest.csv", "runs/model", "runs/diagnose", split="test")
        ...     pd.read_parquet(result.predictions)
    """
    from meddx.align import Aligner
    from meddx.batch.engines import make_engine
    from meddx.cache import default_cache_dir
    from meddx.models.folder import check_model_folder
    from meddx.progress import show_library_bars

    started = time.perf_counter()
    show_library_bars(progress)  # transformers' "Loading weights" too
    _check_arguments(engine, store_sr, store_fhir, ray_options is not None, batch_size, chunk_size)
    manifest, model_dir, out = Path(manifest), Path(model), Path(out_dir)
    cohort = load_cohort(manifest)
    rows = cohort.split(split) if split is not None else list(cohort.rows)
    if not rows:
        splits = sorted({r.split for r in cohort.rows if r.split}) or ["none"]
        raise ConfigError(f"{manifest} has no rows of split {split!r}; its splits: {', '.join(splits)}")
    cache_root = default_cache_dir(cache_dir)
    ensure_writable_folder(cache_root, "--cache")
    ensure_writable_folder(out, "--out")
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise ModelError(f"{model_dir} has no {WEIGHTS_FILE}; point --model at a folder written by meddx finetune")
    # Every file of the model folder is checked before any patient is read. The aligner comes from
    # config.json alone: the workers can start ingesting while the network is built (importing
    # MONAI and transformers and reading the weights take about 12 s on 2 cores).
    checked = check_model_folder(model_dir, fingerprint=True)
    sha256 = checked.sha256[WEIGHTS_FILE]
    aligner = Aligner.from_state_dict(checked.checkpoint.aligner or {})
    lock_run_folder(out)

    chunks = [(k, rows[i : i + chunk_size]) for k, i in enumerate(range(0, len(rows), chunk_size))]
    plan = make_plan(manifest, checked, split, chunk_size, rows, store_sr, store_fhir)
    finished = finished_run(out, plan) if resume else None
    if finished is not None:
        logger.info("--resume: %s holds this run, complete; nothing to do", out)
        return finished
    done = start_or_resume(out, plan, resume, [len(c) * len(checked.tasks) for _, c in chunks])
    todo = [(k, chunk) for k, chunk in chunks if k not in done]
    job = EngineJob(
        cohort,
        todo,
        aligner,
        model_dir,
        IngestSettings(cache_root, workers, task_timeout, tuple(plugins)),
        ChunkSettings(batch_size, contributions, device, abstain),
        progress,
    )
    workers = default_workers() if workers is None else workers
    timings = {"ingest": 0.0, "model": 0.0, "waiting_for_ingest": 0.0, "writing": 0.0}
    logger.info("diagnosing %d rows in %d chunk(s) (%d done before)", len(rows), len(chunks), len(done))
    provenance = provenance_of(checked)
    # checks that a DICOMweb server is configured, before any work
    reporter = _pacs_reporter(aligner.config, cache_root, model_dir, sha256, plan, rows) if store_sr else None
    fhir_writer = None
    if store_fhir:  # a FHIR server configured and taking the credentials, before any work
        from meddx.export.fhir_writes import FhirWriter

        fhir_writer = FhirWriter(aligner.config.fhir)
    writer = ChunkWriter(out / PARTS, list(checked.tasks), provenance, reporter, fhir_writer)
    runner = make_engine(engine, ray_options)
    shift = None
    if checked.ood is not None:
        from meddx.batch.shift import ShiftSample

        shift = ShiftSample(checked.ood)
    inputs = None
    if checked.training_summary is not None:  # what the readers saw in the training rows, to set beside this run's
        from meddx.batch.shift import InputSample

        inputs = InputSample(checked.training_summary, cache_root)
    with closing(runner.run(job)) as outputs:
        for output in outputs:
            tick = time.perf_counter()
            writer.write(output)
            if shift is not None:
                shift.add(output)
            if inputs is not None:
                inputs.add(output)
            timings["writing"] += time.perf_counter() - tick
    timings.update(runner.timings)

    tick = time.perf_counter()
    numbers = [k for k, _ in chunks]
    counts = run_folder.assemble(out, numbers, shards=engine == "ray")
    if store_sr:
        counts.update(run_folder.assemble_structured_reports(out, numbers))
    if store_fhir:
        counts.update(run_folder.assemble_fhir_writes(out, numbers))
    timings["assembling"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    tasks = len(checked.tasks)
    counts.update(
        rows=len(rows),
        chunks=len(chunks),
        chunks_done_before=len(done),
        diagnosed_rows=len(rows) - counts["error_rows"] // max(tasks, 1),
        undiagnosed_rows=counts["error_rows"] // max(tasks, 1),
    )
    run = {
        "format": RUN_FORMAT,
        "complete": True,
        "plan": plan,
        "manifest": str(manifest),
        "split": split,
        "model": {
            "name": provenance.name,
            "path": str(model_dir),
            "sha256": sha256,
            "tasks": {t: list(classes) for t, (_, classes) in checked.tasks.items()},
            "alpha": dict(provenance.alpha),
            "training": (checked.checkpoint.diagnosis or {}).get("training", {}),
        },
        "versions": _versions(),
        "settings": {
            "workers": workers,
            "model_threads": None,
            "batch_size": batch_size,
            "chunk_size": chunk_size,
            "engine": engine,
            "device": device,
            "contributions": contributions,
            "abstain": abstain,
            "resume": resume,
            "store_sr": store_sr,
            "store_fhir": store_fhir,
            **runner.settings,
        },
        "counts": counts,
        "shift": shift.report() if shift is not None else None,
        "inputs": inputs.report() if inputs is not None else None,
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "rows_per_second": round(job.rows / max(timings["total"], 1e-9), 2),
    }
    write_text(out / RUN, json.dumps(run, indent=2) + "\n")
    run_folder.remove_parts(out)  # run.json says complete; the parts served their purpose
    return DiagnoseResult(out, counts, {k: round(v, 3) for k, v in timings.items()})
