"""Batch diagnosis: a cohort through a fine-tuned model, streamed, resumable, into files other systems read.

:func:`diagnose` cuts the manifest's rows into chunks. Worker processes ingest and align chunk
``k + 1`` (:class:`~meddx.streaming.ChunkFeeder`) while the model runs on chunk ``k``, so
memory holds about two chunks whatever the cohort's size. The tensorizers and shapes come from
the model folder. Each finished chunk is written to ``OUT/parts/`` atomically (a temporary file,
then a rename; the chunk's ``.parquet`` is written last and marks it done), and at the end the
parts are streamed into the final files:

* ``predictions.parquet`` and ``predictions.csv``: the predictions contract (README,
  ``schemas/prediction_row.schema.json``), one row per (patient, index time, task), in manifest
  order; a row whose every modality failed (or that names none) has ``status=error``; a failed
  modality is named in ``modality_errors`` and the rest still diagnose;
* ``risk_assessments.ndjson``: one validated FHIR R4 RiskAssessment per ``ok`` row;
* ``errors.csv``: every ingest error, and every row that could not be diagnosed;
* ``run.json``: the model (name, SHA-256 of ``model.safetensors``), versions, counts, timings;
  written last, with ``"complete": true``.

A run killed at any point (even SIGKILL) and started again with ``resume=True`` keeps its
finished chunks and does the rest, so every (patient, index time, task) appears exactly once.
The model folder is checked whole before any patient is read; the run plan (``parts/plan.json``)
records its fingerprint (weights, adapter, calibration, config and tensorizers), and a resume
of another model, manifest, split or chunk size is refused. On resuming, the plan and every
finished chunk's files are checked first; a damaged one is named, with how to start over. A run
holds a lock on ``OUT/.meddx-diagnose.lock`` (``flock``, released when the process ends, even
killed): a second run on the same folder is refused (ConfigError, exit status 2).

Workers are spawned, so a script that calls :func:`diagnose` with workers must guard its entry
point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial, wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx._version import __version__
from meddx.cohort import CohortRow, load_cohort
from meddx.errors import ConfigError, ModelError, short_reason
from meddx.ingest.runner import DEFAULT_TASK_TIMEOUT, default_workers, ensure_writable_folder
from meddx.models.checkpoint import WEIGHTS_FILE
from meddx.models.folder import file_sha256

if TYPE_CHECKING:
    import pandas as pd

    from meddx.export.fhir import ModelProvenance
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.models.folder import ModelFolder
    from meddx.ray_engine import RayOptions
    from meddx.streaming import ReadyChunk

logger = logging.getLogger(__name__)

RUN_FORMAT = "meddx-diagnose-run/1"
PARTS = "parts"
PLAN = "plan.json"
PREDICTIONS_PARQUET = "predictions.parquet"
PREDICTIONS_CSV = "predictions.csv"
RISK_ASSESSMENTS = "risk_assessments.ndjson"
ERRORS = "errors.csv"
STRUCTURED_REPORTS = "structured_reports.csv"
PREDICTION_SHARDS = "predictions"  # the Ray engine's sharded Parquet: predictions/part-NNNNN.parquet
RUN = "run.json"
LOCK = ".meddx-diagnose.lock"
_CHUNK_FILE = re.compile(r"chunk-(\d{5})\.(parquet|ndjson|errors\.csv|srs\.csv|fhir\.csv)")
ERROR_COLUMNS = ["patient_id", "index_time", "modality", "path", "error"]
ENGINES = ("local", "ray")
_NUMERIC_PREFIXES = ("probability", "raw_probability", "contribution:", "ablation:")


@dataclass
class DiagnoseResult:
    """Where a run's files are, and its figures (also in ``run.json``).

    Attributes:
        out_dir: the run folder.
        predictions: ``predictions.parquet``; ``predictions_csv``, ``risk_assessments``,
            ``errors``, ``run``: the other files.
        counts: rows, ok and error rows, prediction rows, RiskAssessments, ingest errors, chunks.
        timings: seconds: total, ingest (in the workers, overlapping), model, waiting for
            ingestion, writing, assembling.
    """

    out_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def predictions(self) -> Path:
        return self.out_dir / PREDICTIONS_PARQUET

    @property
    def predictions_csv(self) -> Path:
        return self.out_dir / PREDICTIONS_CSV

    @property
    def risk_assessments(self) -> Path:
        return self.out_dir / RISK_ASSESSMENTS

    @property
    def errors(self) -> Path:
        return self.out_dir / ERRORS

    @property
    def run(self) -> Path:
        return self.out_dir / RUN


# ----------------------------------------------------------------- small helpers


def _replace_atomically(write, path: Path) -> None:
    """``write(tmp)`` then rename onto ``path``: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    _replace_atomically(write, path)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    _replace_atomically(lambda tmp: frame.to_csv(tmp, index=False), path)


def _iso(moment) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _part(parts: Path, number: int, suffix: str) -> Path:
    return parts / f"chunk-{number:05d}{suffix}"


def _column_order(columns: Sequence[str]) -> list[str]:
    """The contract's columns first, then per-class, contribution and ablation columns, then the manifest's."""
    head = [
        "patient_id",
        "index_time",
        "task",
        "status",
        "probability",
        "raw_probability",
        "prediction",
        "prediction_set",
        "modalities",
        "modality_errors",
    ]
    groups: list[list[str]] = [[c for c in head if c in columns], [], [], [], [], []]
    for column in columns:
        if column in head:
            continue
        if column.startswith(("probability:", "raw_probability:")):
            groups[1].append(column)
        elif column.startswith("contribution:"):
            groups[2].append(column)
        elif column.startswith("ablation:"):
            groups[3].append(column)
        elif column == "_row":
            groups[5].append(column)
        else:
            groups[4].append(column)
    return [c for group in groups for c in group]


# ----------------------------------------------------------------- the plan


def _plan(
    manifest: Path,
    model: ModelFolder,
    split: str | None,
    chunk_size: int,
    rows: Sequence[CohortRow],
    store_sr: bool,
    store_fhir: bool = False,
) -> dict:
    return {
        "format": RUN_FORMAT,
        "manifest_sha256": file_sha256(manifest),
        "model_sha256": model.sha256[WEIGHTS_FILE],
        "model_fingerprint": model.fingerprint,  # weights, adapter, calibration, config with the tensorizers
        "split": split,
        "chunk_size": chunk_size,
        "rows": len(rows),
        "store_sr": store_sr,
        "store_fhir": store_fhir,
    }


_RUN_LOCKS: ContextVar[ExitStack | None] = ContextVar("meddx_diagnose_locks", default=None)


def _releases_run_lock(function: Callable[..., DiagnoseResult]) -> Callable[..., DiagnoseResult]:
    """Release the run folder's lock when ``function`` returns or raises (the kernel does, if the process dies)."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> DiagnoseResult:
        with ExitStack() as stack:
            token = _RUN_LOCKS.set(stack)
            try:
                return function(*args, **kwargs)
            finally:
                _RUN_LOCKS.reset(token)

    return wrapper


def _lock_run_folder(out: Path) -> None:
    """Hold ``OUT/.meddx-diagnose.lock`` until the run ends; ConfigError if another run holds it."""
    import fcntl

    stack = _RUN_LOCKS.get()
    if stack is None:
        raise RuntimeError("_lock_run_folder runs inside diagnose()")
    path = out / LOCK
    handle = stack.enter_context(open(path, "a+"))
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"another meddx diagnose is writing to {out} (it holds {path}); wait for it to end, or choose another --out"
        ) from None
    stack.callback(fcntl.flock, handle.fileno(), fcntl.LOCK_UN)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # who holds it, for a person looking
    handle.flush()


@contextmanager
def _state_file(path: Path) -> Iterator[None]:
    """Turn any error reading a resumed run's file into a ConfigError naming it and saying how to start over."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:  # a damaged state file can fail a parser in any way
        raise ConfigError(
            f"--resume: {path} is damaged ({type(exc).__name__}: {short_reason(exc)}); run without --resume "
            f"to start over (it clears {path.parent}), or choose another --out"
        ) from None


def _read_plan(path: Path) -> dict:
    with _state_file(path):
        found = json.loads(path.read_text())
        if not isinstance(found, dict) or found.get("format") != RUN_FORMAT:
            raise ValueError(f"not a {RUN_FORMAT} plan")
        return found


def _check_chunk(parts: Path, number: int, rows: int, store_sr: bool, store_fhir: bool = False) -> None:
    """A finished chunk's files read back: the Parquet's ``rows`` rows, the FHIR lines, the error table."""
    import pyarrow.parquet as pq

    table = _part(parts, number, ".parquet")
    with _state_file(table):
        found = pq.read_metadata(table).num_rows
        if found != rows:
            raise ValueError(f"{found} prediction rows where the plan gives {rows}")
    resources = _part(parts, number, ".ndjson")
    with _state_file(resources), open(resources) as handle:
        for line in handle:
            if not isinstance(json.loads(line), dict):
                raise ValueError("a line is not a JSON object")
    for suffix in (".errors.csv",) + ((".srs.csv",) if store_sr else ()) + ((".fhir.csv",) if store_fhir else ()):
        path = _part(parts, number, suffix)
        with _state_file(path), open(path, newline="") as handle:
            header = handle.readline().rstrip("\r\n")
            if suffix == ".errors.csv" and header != ",".join(ERROR_COLUMNS):
                raise ValueError(f"its header is {header!r}, not {','.join(ERROR_COLUMNS)!r}")


def _done_chunks(parts: Path, plan: dict, rows_per_chunk: Sequence[int]) -> set[int]:
    """The finished chunks of the run in ``parts``, every one of their files checked."""
    done: set[int] = set()
    for path in sorted(parts.iterdir()):
        if path.name in (PLAN,) or path.name.startswith("."):
            continue
        match = _CHUNK_FILE.fullmatch(path.name)
        if match is None or int(match.group(1)) >= len(rows_per_chunk):
            raise ConfigError(
                f"--resume: {path} is not a file of this run ({len(rows_per_chunk)} chunks, files "
                f"chunk-NNNNN.parquet/.ndjson/.errors.csv/.srs.csv/.fhir.csv); remove it, or run without --resume "
                "to start over"
            )
        if match.group(2) == "parquet":
            done.add(int(match.group(1)))
    for number in sorted(done):
        _check_chunk(parts, number, rows_per_chunk[number], bool(plan.get("store_sr")), bool(plan.get("store_fhir")))
    return done


def _start_or_resume(out: Path, plan: dict, resume: bool, rows_per_chunk: Sequence[int]) -> set[int]:
    """The chunks already done (resume), after checking the plan and them; a fresh run clears old outputs.

    ``rows_per_chunk``: the prediction rows each chunk writes (its manifest rows times the tasks).
    """
    parts = out / PARTS
    plan_path = parts / PLAN
    if resume and plan_path.is_file():
        found = _read_plan(plan_path)
        differ = [k for k in plan if found.get(k) != plan[k]]
        if differ:
            raise ConfigError(
                f"--resume: {out} holds a run of another {', '.join(differ)} (its {PARTS}/{PLAN}); "
                "run without --resume to start over, or choose another --out"
            )
        for stale in parts.glob(".*.tmp"):  # a write cut short by the kill
            stale.unlink()
        done = _done_chunks(parts, plan, rows_per_chunk)
        logger.info("resuming: %d chunk(s) already done", len(done))
        return done
    if resume:
        logger.info("--resume: %s holds no unfinished run; starting one", out)
    if parts.is_symlink() or parts.is_file():
        parts.unlink()
    shutil.rmtree(parts, ignore_errors=True)
    outputs = (RUN, PREDICTIONS_PARQUET, PREDICTIONS_CSV, RISK_ASSESSMENTS, ERRORS, STRUCTURED_REPORTS)
    for name in outputs:  # run.json first
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PREDICTION_SHARDS, ignore_errors=True)
    parts.mkdir(parents=True)
    _write_text(plan_path, json.dumps(plan, indent=2))
    return set()


def _finished_run(out: Path, plan: dict) -> DiagnoseResult | None:
    """The result of a complete run of this plan in ``out``, if there is one."""
    try:
        run = json.loads((out / RUN).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or not run.get("complete") or run.get("plan") != plan:
        return None
    return DiagnoseResult(out, run.get("counts", {}), run.get("timings_seconds", {}))


# ----------------------------------------------------------------- one chunk


def chunk_frames(
    model: DiagnosisModel,
    ready: ReadyChunk,
    store,
    tensor_spec,
    batch_size: int,
    contributions: bool,
    device: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prediction rows and the error rows of one ready chunk."""
    import pandas as pd

    from meddx.prediction_table import task_rows
    from meddx.records import collate
    from meddx.streaming import store_items

    rows: list[dict[str, Any]] = []
    with_inputs = [r for r in ready.rows if r.key is not None]
    for start in range(0, len(with_inputs), batch_size):
        items = store_items(store, with_inputs[start : start + batch_size])
        batch = collate(items, tensor_spec)
        logits, withheld = model.batch_logits(batch.to(device), ablations=contributions)
        rows += task_rows(model, batch, logits, withheld, contributions)
    by_row = {r.row.row: r for r in ready.rows}
    for row in rows:
        row["modality_errors"] = "|".join(by_row[row["_row"]].modality_errors)
    for r in ready.rows:
        if r.key is None:
            rows += [
                {
                    "patient_id": r.row.patient_id,
                    "index_time": _iso(r.row.index_time),
                    "task": task,
                    "status": "error",
                    "modalities": "",
                    "modality_errors": "|".join(r.modality_errors),
                    "_row": r.row.row,
                }
                for task in model.tasks
            ]
    task_order = {t: i for i, t in enumerate(model.tasks)}
    rows.sort(key=lambda row: (row["_row"], task_order[row["task"]]))
    for row in rows:
        row.update({k: v for k, v in _json_safe(by_row[row["_row"]].row.extras).items() if k not in row})
    frame = pd.DataFrame(rows)
    frame = frame[_column_order(list(frame.columns))]

    errors = [
        {
            "patient_id": o.patient_id,
            "index_time": _iso(r.row.index_time),
            "modality": o.modality.value,
            "path": o.path,
            "error": o.error,
        }
        for r in ready.rows
        for o in r.outcomes
        if o.status == "error"
    ]
    errors += [
        {
            "patient_id": r.row.patient_id,
            "index_time": _iso(r.row.index_time),
            "modality": "",
            "path": "",
            "error": f"not diagnosed: {r.error}",
        }
        for r in ready.rows
        if r.key is None
    ]
    return frame, pd.DataFrame(errors, columns=ERROR_COLUMNS)


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    from meddx.data.index import json_safe

    return json_safe(values)


def write_chunk(
    parts: Path, number: int, frame: pd.DataFrame, errors: pd.DataFrame, resources: list[dict[str, Any]]
) -> None:
    """The chunk's three part files; the ``.parquet``, written last, marks the chunk done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _replace_atomically(lambda tmp: errors.to_csv(tmp, index=False), _part(parts, number, ".errors.csv"))
    _write_text(
        _part(parts, number, ".ndjson"), "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in resources)
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    _replace_atomically(lambda tmp: pq.write_table(table, tmp), _part(parts, number, ".parquet"))


# ----------------------------------------------------------------- assembling


def _unified_schema(paths: Sequence[Path]):
    """One Arrow schema for every part: a column's type where it has values; numbers stay numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types: dict[str, set] = {}
    for path in paths:
        for column in pq.read_schema(path).remove_metadata():
            types.setdefault(column.name, set())
            if not pa.types.is_null(column.type):
                types[column.name].add(column.type)
    fields = []
    for name in _column_order([n for n in types if n != "_row"]):
        found = types[name]
        if len(found) == 1:
            kind = next(iter(found))
        elif found and all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in found):
            kind = pa.float64()
        elif not found and name.startswith(_NUMERIC_PREFIXES):
            kind = pa.float64()
        else:
            kind = pa.string()
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def _assemble(out: Path, numbers: Sequence[int], shards: bool = False) -> dict[str, int]:
    """Stream the parts into the final files (one part in memory at a time); returns counts.

    With ``shards``, each chunk's rows are also kept as one file of a sharded Parquet dataset
    (``predictions/part-NNNNN.parquet``, the schema of ``predictions.parquet``), as a cluster's
    readers (Spark, Ray Data, ``pd.read_parquet(folder)``) want them.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = out / PARTS
    parquet_parts = [_part(parts, n, ".parquet") for n in numbers]
    schema = _unified_schema(parquet_parts)
    counts = {"prediction_rows": 0, "ok_rows": 0, "error_rows": 0, "risk_assessments": 0, "ingest_errors": 0}
    shard_dir = out / PREDICTION_SHARDS
    if shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir()

    def write_predictions(tmp_parquet: Path) -> None:
        def write_csv(tmp_csv: Path) -> None:
            with pq.ParquetWriter(tmp_parquet, schema) as writer, open(tmp_csv, "w", newline="") as csv:
                csv.write(",".join(_csv_cell(name) for name in schema.names) + "\n")
                for number, path in zip(numbers, parquet_parts, strict=True):
                    table = pq.read_table(path)
                    columns = [
                        table.column(f.name).cast(f.type)
                        if f.name in table.column_names
                        else pa.nulls(len(table), f.type)
                        for f in schema
                    ]
                    table = pa.Table.from_arrays(columns, schema=schema)
                    writer.write_table(table)
                    if shards:
                        shard = shard_dir / f"part-{number:05d}.parquet"
                        _replace_atomically(partial(pq.write_table, table), shard)
                    frame = table.to_pandas()
                    frame.to_csv(csv, header=False, index=False)
                    status = frame["status"]
                    counts["prediction_rows"] += len(frame)
                    counts["ok_rows"] += int((status == "ok").sum())
                    counts["error_rows"] += int((status == "error").sum())

        _replace_atomically(write_csv, out / PREDICTIONS_CSV)

    _replace_atomically(write_predictions, out / PREDICTIONS_PARQUET)

    def write_resources(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            for n in numbers:
                with open(_part(parts, n, ".ndjson")) as part:
                    for line in part:
                        handle.write(line)
                        counts["risk_assessments"] += 1

    _replace_atomically(write_resources, out / RISK_ASSESSMENTS)

    def write_errors(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            handle.write(",".join(ERROR_COLUMNS) + "\n")
            for n in numbers:
                frame = pd.read_csv(_part(parts, n, ".errors.csv"), dtype=str, keep_default_na=False)
                frame.to_csv(handle, header=False, index=False)
                counts["ingest_errors"] += int((frame["modality"] != "").sum())

    _replace_atomically(write_errors, out / ERRORS)
    return counts


def _assemble_structured_reports(out: Path, numbers: Sequence[int]) -> dict[str, int]:
    """``structured_reports.csv`` from the chunks' SR parts (``--store-sr``); returns counts."""
    import pandas as pd

    from meddx.export.sr_reports import SR_COLUMNS

    counts = {"structured_reports_stored": 0, "structured_report_errors": 0}

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            handle.write(",".join(SR_COLUMNS) + "\n")
            for n in numbers:
                frame = pd.read_csv(_part(out / PARTS, n, ".srs.csv"), dtype=str, keep_default_na=False)
                frame.to_csv(handle, header=False, index=False)
                counts["structured_reports_stored"] += int((frame["status"] == "stored").sum())
                counts["structured_report_errors"] += int((frame["status"] == "error").sum())

    _replace_atomically(write, out / STRUCTURED_REPORTS)
    return counts


def _assemble_fhir_writes(out: Path, numbers: Sequence[int]) -> dict[str, int]:
    """``fhir_writes.csv`` from the chunks' parts (``--store-fhir``); returns counts."""
    import pandas as pd

    from meddx.export.fhir_writes import WRITE_COLUMNS

    frames = [pd.read_csv(_part(out / PARTS, n, ".fhir.csv"), dtype=str, keep_default_na=False) for n in numbers]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=WRITE_COLUMNS)
    _write_csv(frame, out / "fhir_writes.csv")
    return {
        "fhir_writes_stored": int(frame["status"].isin(["created", "exists"]).sum()),
        "fhir_write_errors": int((frame["status"] == "error").sum()),
    }


def _csv_cell(text: str) -> str:
    return f'"{text}"' if any(c in text for c in ',"\n') else text


# ----------------------------------------------------------------- the run


def _model_name(folder: Path) -> str:
    """How the outputs (FHIR resources, DICOM SRs) name a model: its folder's name."""
    return folder.resolve().name


def model_provenance(model: DiagnosisModel, folder: Path, sha256: str) -> ModelProvenance:
    """What the FHIR resources say about a loaded model folder (name, hash, version, alpha per task)."""
    from meddx.export.fhir import ModelProvenance

    alpha = {t: (c.conformal.alpha if c.conformal is not None else None) for t, c in model.calibration.items()}
    method = {t: type(c.calibrator).__name__ for t, c in model.calibration.items()}
    return ModelProvenance(_model_name(folder), sha256, __version__, alpha, method)


def _load_model(
    model_dir: Path, cache_root: Path, device: str, sha256: str
) -> tuple[DiagnosisModel, ModelProvenance, dict[str, tuple[str, ...]]]:
    """The model folder's network in eval mode on ``device`` (note embeddings cached under the cache
    root), what the FHIR resources say of it, and each task's classes."""
    from meddx.models.diagnosis import DiagnosisModel

    net = DiagnosisModel.from_pretrained(model_dir, cache_dir=cache_root / "text-embeddings").eval().to(device)
    classes = {name: tuple(spec.classes) for name, spec in net.tasks.items()}
    return net, model_provenance(net, model_dir, sha256), classes


def _pacs_reporter(config, cache_root: Path, model_dir: Path, sha256: str, plan: dict, rows: Sequence[CohortRow]):
    """The ``--store-sr`` reporter; checks a DICOMweb server is configured before any work."""
    from meddx.export.sr import ModelInfo
    from meddx.export.sr_reports import PacsReporter
    from meddx.ingest.runner import with_dicomweb_store
    from meddx.records import Modality

    if not any(Modality.IMAGING in row.remote for row in rows):
        logger.warning("--store-sr: no row reads its images from DICOMweb (dicomweb: cells); no SR will be made")
    run_id = json.dumps(plan, sort_keys=True)
    model_info = ModelInfo(_model_name(model_dir), f"{sha256[:16]} (meddx {__version__})")
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


@_releases_run_lock
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
        plugins: modules that register custom ingestors (imported in every worker).
        engine: ``local`` (worker processes on this machine) or ``ray`` (ingestion as Ray tasks,
            the model in Ray actors; :mod:`meddx.ray_engine`, ``pip install 'meddx[distributed]'``).
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
    from tqdm.auto import tqdm

    from meddx.align import Aligner
    from meddx.cache import default_cache_dir
    from meddx.export.fhir import risk_assessments
    from meddx.models.folder import check_model_folder
    from meddx.progress import show_library_bars, worker_counter
    from meddx.streaming import ChunkFeeder, model_threads

    started = time.perf_counter()
    show_library_bars(progress)  # transformers' "Loading weights" too
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if store_sr and engine == "ray":
        raise ConfigError("--store-sr runs with the local engine; leave out --engine ray to store SRs")
    if store_fhir and engine == "ray":
        raise ConfigError("--store-fhir runs with the local engine; leave out --engine ray to write RiskAssessments")
    if ray_options is not None and engine != "ray":
        raise ConfigError(f"Ray settings (--address, --actors, --gpus-per-actor) need --engine ray; got {engine!r}")
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"batch_size and chunk_size must be >= 1; got {batch_size} and {chunk_size}")
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
    _lock_run_folder(out)

    chunks = [(k, rows[i : i + chunk_size]) for k, i in enumerate(range(0, len(rows), chunk_size))]
    plan = _plan(manifest, checked, split, chunk_size, rows, store_sr, store_fhir)
    finished = _finished_run(out, plan) if resume else None
    if finished is not None:
        logger.info("--resume: %s holds this run, complete; nothing to do", out)
        return finished
    done = _start_or_resume(out, plan, resume, [len(c) * len(checked.tasks) for _, c in chunks])
    todo = [(k, chunk) for k, chunk in chunks if k not in done]
    parts = out / PARTS
    tensor_spec = aligner.tensor_spec()
    ingest_tasks = workers  # on Ray: a cap on ingestion tasks at once (None: every free CPU)
    workers = default_workers() if workers is None else workers
    timings = {"ingest": 0.0, "model": 0.0, "waiting_for_ingest": 0.0, "writing": 0.0}
    logger.info("diagnosing %d rows in %d chunk(s) (%d done before)", len(rows), len(chunks), len(done))
    engine_settings: dict[str, Any] = {}
    threads: int | None = None  # the local engine's torch threads (the Ray engine sets its actors')
    # checks that a DICOMweb server is configured, before any work
    reporter = _pacs_reporter(aligner.config, cache_root, model_dir, sha256, plan, rows) if store_sr else None
    fhir_writer = None
    if store_fhir:  # a FHIR server configured and taking the credentials, before any work
        from meddx.export.fhir_writes import FhirWriter

        fhir_writer = FhirWriter(aligner.config.fhir)
    if engine == "ray":
        from meddx.ray_engine import RayOptions, diagnose_on_ray

        net, provenance, classes = _load_model(model_dir, cache_root, "cpu", sha256)  # the actors run the model

        on_ray = diagnose_on_ray(
            cohort,
            todo,
            aligner,
            model_dir,
            cache_root,
            parts,
            provenance,
            options=ray_options or RayOptions(),
            workers=ingest_tasks or None,
            task_timeout=task_timeout,
            batch_size=batch_size,
            contributions=contributions,
            plugins=plugins,
            device=device,
            progress=progress,
        )
        timings.update(on_ray["timings"])
        engine_settings = on_ray["settings"]
    else:
        # the bar counts rows as their files are read (one chunk ahead of the model), the postfix rows diagnosed
        with tqdm(total=sum(len(c) for _, c in todo), desc="diagnose", unit="row", disable=not progress) as bar:
            read = worker_counter(bar, warm_up=2 * max(workers, 1))  # no ETA while the workers start
            diagnosed = 0
            with (
                ChunkFeeder(cohort, todo, aligner, cache_root, workers, task_timeout, plugins, on_read=read) as feeder,
                model_threads(workers) as threads,  # after the workers start: it imports torch
            ):
                # the network loads while the workers ingest the first chunks
                net, provenance, classes = _load_model(model_dir, cache_root, device, sha256)
                waiting = time.perf_counter()
                for ready in feeder:
                    timings["waiting_for_ingest"] += time.perf_counter() - waiting
                    timings["ingest"] += ready.ingest_seconds
                    tick = time.perf_counter()
                    frame, errors = chunk_frames(
                        net, ready, feeder.store, tensor_spec, batch_size, contributions, device
                    )
                    records = [{str(k): v for k, v in r.items()} for r in frame.to_dict("records")]
                    resources = list(risk_assessments(records, classes, provenance))
                    timings["model"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    if reporter is not None:  # before the chunk's .parquet marks it done
                        _write_csv(reporter.report(ready, frame), _part(parts, ready.number, ".srs.csv"))
                    if fhir_writer is not None:  # likewise: a resumed chunk writes again, the server keeps one
                        _write_csv(fhir_writer.write(ready, frame, resources), _part(parts, ready.number, ".fhir.csv"))
                    write_chunk(parts, ready.number, frame, errors, resources)
                    timings["writing"] += time.perf_counter() - tick
                    diagnosed += len(ready.rows)
                    bar.set_postfix_str(f"{diagnosed} diagnosed")
                    waiting = time.perf_counter()

    tick = time.perf_counter()
    counts = _assemble(out, [k for k, _ in chunks], shards=engine == "ray")
    if store_sr:
        counts.update(_assemble_structured_reports(out, [k for k, _ in chunks]))
    if store_fhir:
        counts.update(_assemble_fhir_writes(out, [k for k, _ in chunks]))
    timings["assembling"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    counts.update(
        rows=len(rows),
        chunks=len(chunks),
        chunks_done_before=len(done),
        diagnosed_rows=len(rows) - counts["error_rows"] // max(len(net.tasks), 1),
        undiagnosed_rows=counts["error_rows"] // max(len(net.tasks), 1),
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
            "tasks": {t: list(c) for t, c in classes.items()},
            "alpha": dict(provenance.alpha),
            "training": net.training_info,
        },
        "versions": _versions(),
        "settings": {
            "workers": workers,
            "model_threads": threads,
            "batch_size": batch_size,
            "chunk_size": chunk_size,
            "engine": engine,
            "device": device,
            "contributions": contributions,
            "resume": resume,
            "store_sr": store_sr,
            "store_fhir": store_fhir,
            **engine_settings,
        },
        "counts": counts,
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "rows_per_second": round(sum(len(c) for _, c in todo) / max(timings["total"], 1e-9), 2),
    }
    _write_text(out / RUN, json.dumps(run, indent=2) + "\n")
    shutil.rmtree(parts, ignore_errors=True)  # run.json says complete; the parts served their purpose
    return DiagnoseResult(out, counts, {k: round(v, 3) for k, v in timings.items()})
