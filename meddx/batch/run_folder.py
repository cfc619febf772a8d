"""The run folder of a batch diagnosis: its plan, its lock, resuming, the chunks' part files (written
by :class:`ChunkWriter` as an engine's stream of finished chunks arrives) and the final files
assembled from them.

Each finished chunk is written to ``OUT/parts/`` atomically (a temporary file, then a rename;
the chunk's ``.parquet`` is written last and marks it done), and at the end the parts are
streamed into the final files:

* ``predictions.parquet`` and ``predictions.csv``: the predictions contract (README,
  ``schemas/prediction_row.schema.json``), one row per (patient, index time, task), in manifest
  order;
* ``risk_assessments.ndjson``: one validated FHIR R4 RiskAssessment per ``ok`` row;
* ``errors.csv``: every ingest error, and every row that could not be diagnosed;
* ``structured_reports.csv`` / ``fhir_writes.csv``: what ``--store-sr`` / ``--store-fhir`` did;
* ``run.json`` (written by :mod:`meddx.batch.run`, last, with ``"complete": true``).

The run plan (``parts/plan.json``) records the model's fingerprint, the manifest's hash, the
split and the chunk size; a resume of another run is refused, and on resuming the plan and
every finished chunk's files are checked first: a damaged one is named, with how to start
over. A run holds a lock on ``OUT/.meddx-diagnose.lock`` (``flock``, released when the process
ends, even killed): a second run on the same folder is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial, wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.cohort import CohortRow
from meddx.errors import ConfigError, short_reason
from meddx.models.checkpoint import WEIGHTS_FILE
from meddx.models.folder import file_sha256
from meddx.predictions.columns import NUMERIC_PREFIXES, ROW, STATUS, TASK, column_order
from meddx.predictions.table import error_row, prediction_row

if TYPE_CHECKING:
    import pandas as pd

    from meddx.batch.predict import ChunkOutput
    from meddx.export.fhir import ModelProvenance
    from meddx.export.fhir_writes import FhirWriter
    from meddx.export.sr_reports import PacsReporter
    from meddx.models.folder import ModelFolder
    from meddx.predictions.types import TaskPrediction
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


def write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    _replace_atomically(write, path)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    _replace_atomically(lambda tmp: frame.to_csv(tmp, index=False), path)


def iso(moment) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def part(parts: Path, number: int, suffix: str) -> Path:
    return parts / f"chunk-{number:05d}{suffix}"


# ----------------------------------------------------------------- the plan


def make_plan(
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


def releases_run_lock(function: Callable[..., DiagnoseResult]) -> Callable[..., DiagnoseResult]:
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


def lock_run_folder(out: Path) -> None:
    """Hold ``OUT/.meddx-diagnose.lock`` until the run ends; ConfigError if another run holds it."""
    import fcntl

    stack = _RUN_LOCKS.get()
    if stack is None:
        raise RuntimeError("lock_run_folder runs inside diagnose()")
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

    table = part(parts, number, ".parquet")
    with _state_file(table):
        found = pq.read_metadata(table).num_rows
        if found != rows:
            raise ValueError(f"{found} prediction rows where the plan gives {rows}")
    resources = part(parts, number, ".ndjson")
    with _state_file(resources), open(resources) as handle:
        for line in handle:
            if not isinstance(json.loads(line), dict):
                raise ValueError("a line is not a JSON object")
    for suffix in (".errors.csv",) + ((".srs.csv",) if store_sr else ()) + ((".fhir.csv",) if store_fhir else ()):
        path = part(parts, number, suffix)
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


def start_or_resume(out: Path, plan: dict, resume: bool, rows_per_chunk: Sequence[int]) -> set[int]:
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
    write_text(plan_path, json.dumps(plan, indent=2))
    return set()


def finished_run(out: Path, plan: dict) -> DiagnoseResult | None:
    """The result of a complete run of this plan in ``out``, if there is one."""
    try:
        run = json.loads((out / RUN).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or not run.get("complete") or run.get("plan") != plan:
        return None
    return DiagnoseResult(out, run.get("counts", {}), run.get("timings_seconds", {}))


# ----------------------------------------------------------------- each chunk's parts


def write_chunk(
    parts: Path, number: int, frame: pd.DataFrame, errors: pd.DataFrame, resources: list[dict[str, Any]]
) -> None:
    """The chunk's three part files; the ``.parquet``, written last, marks the chunk done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _replace_atomically(lambda tmp: errors.to_csv(tmp, index=False), part(parts, number, ".errors.csv"))
    write_text(part(parts, number, ".ndjson"), "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in resources))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    _replace_atomically(lambda tmp: pq.write_table(table, tmp), part(parts, number, ".parquet"))


def model_name(folder: Path) -> str:
    """How the outputs (FHIR resources, DICOM SRs) name a model: its folder's name."""
    return folder.resolve().name


def provenance_of(checked: ModelFolder) -> ModelProvenance:
    """What the FHIR resources say about a checked model folder (name, hash, version, alpha per task)."""
    from meddx._version import __version__
    from meddx.export.fhir import ModelProvenance
    from meddx.models.checkpoint import WEIGHTS_FILE

    alpha = {t: (c.conformal.alpha if c.conformal is not None else None) for t, c in checked.calibration.items()}
    method = {t: type(c.calibrator).__name__ for t, c in checked.calibration.items()}
    return ModelProvenance(model_name(checked.path), checked.sha256[WEIGHTS_FILE], __version__, alpha, method)


def chunk_table(ready: ReadyChunk, predictions: Sequence[TaskPrediction], tasks: Sequence[str]) -> pd.DataFrame:
    """The predictions table of one chunk: a row per (manifest row, task), ``error`` rows for rows
    without inputs, in manifest order, the manifest's extra columns last (``_row`` kept)."""
    import pandas as pd

    from meddx.data.index import json_safe

    rows = [prediction_row(p) for p in predictions]
    for r in ready.rows:
        if r.key is None:
            rows += [error_row(r.row.patient_id, iso(r.row.index_time), t, r.row.row, r.modality_errors) for t in tasks]
    order = {t: i for i, t in enumerate(tasks)}
    rows.sort(key=lambda row: (row[ROW], order[row[TASK]]))
    by_row = {r.row.row: r for r in ready.rows}
    for row in rows:
        row.update({k: v for k, v in json_safe(by_row[row[ROW]].row.extras).items() if k not in row})
    frame = pd.DataFrame(rows)
    return frame[column_order(list(frame.columns))]


def chunk_errors(ready: ReadyChunk) -> pd.DataFrame:
    """The errors table of one chunk: every failed (row, modality), and every row not diagnosed."""
    import pandas as pd

    errors = [
        {
            "patient_id": o.patient_id,
            "index_time": iso(r.row.index_time),
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
            "index_time": iso(r.row.index_time),
            "modality": "",
            "path": "",
            "error": f"not diagnosed: {r.error}",
        }
        for r in ready.rows
        if r.key is None
    ]
    return pd.DataFrame(errors, columns=ERROR_COLUMNS)


class ChunkWriter:
    """Writes each finished chunk's part files (the ``.parquet``, written last, marks it done).

    Args:
        parts: the run folder's ``parts/``.
        tasks: the model's tasks, in order.
        provenance: what the RiskAssessments say about the model.
        reporter: the ``--store-sr`` reporter, or None.
        fhir_writer: the ``--store-fhir`` writer, or None.
    """

    def __init__(
        self,
        parts: Path,
        tasks: Sequence[str],
        provenance: ModelProvenance,
        reporter: PacsReporter | None = None,
        fhir_writer: FhirWriter | None = None,
    ):
        self.parts = parts
        self.tasks = list(tasks)
        self.provenance = provenance
        self.reporter = reporter
        self.fhir_writer = fhir_writer

    def write(self, output: ChunkOutput) -> None:
        from meddx.export.fhir import risk_assessments

        ready, predictions = output.ready, output.predictions
        frame = chunk_table(ready, predictions, self.tasks)
        resources: list[dict[str, Any]] = list(risk_assessments(predictions, self.provenance))
        if self.reporter is not None:  # before the chunk's .parquet marks it done
            write_csv(self.reporter.report(ready, predictions), part(self.parts, ready.number, ".srs.csv"))
        if self.fhir_writer is not None:  # likewise: a resumed chunk writes again, the server keeps one
            written = self.fhir_writer.write(ready, predictions, resources)
            write_csv(written, part(self.parts, ready.number, ".fhir.csv"))
        write_chunk(self.parts, ready.number, frame, chunk_errors(ready), resources)


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
    for name in column_order([n for n in types if n != ROW]):
        found = types[name]
        if len(found) == 1:
            kind = next(iter(found))
        elif found and all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in found):
            kind = pa.float64()
        elif not found and name.startswith(NUMERIC_PREFIXES):
            kind = pa.float64()
        else:
            kind = pa.string()
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def assemble(out: Path, numbers: Sequence[int], shards: bool = False) -> dict[str, int]:
    """Stream the parts into the final files (one part in memory at a time); returns counts.

    With ``shards``, each chunk's rows are also kept as one file of a sharded Parquet dataset
    (``predictions/part-NNNNN.parquet``, the schema of ``predictions.parquet``), as a cluster's
    readers (Spark, Ray Data, ``pd.read_parquet(folder)``) want them.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = out / PARTS
    parquet_parts = [part(parts, n, ".parquet") for n in numbers]
    schema = _unified_schema(parquet_parts)
    counts = {"prediction_rows": 0, "ok_rows": 0, "error_rows": 0, "risk_assessments": 0, "ingest_errors": 0}
    shard_dir = out / PREDICTION_SHARDS
    if shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir()

    def write_predictions(tmp_parquet: Path) -> None:
        def write_both(tmp_csv: Path) -> None:
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
                    status = frame[STATUS]
                    counts["prediction_rows"] += len(frame)
                    counts["ok_rows"] += int((status == "ok").sum())
                    counts["error_rows"] += int((status == "error").sum())

        _replace_atomically(write_both, out / PREDICTIONS_CSV)

    _replace_atomically(write_predictions, out / PREDICTIONS_PARQUET)

    def write_resources(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            for n in numbers:
                with open(part(parts, n, ".ndjson")) as source:
                    for line in source:
                        handle.write(line)
                        counts["risk_assessments"] += 1

    _replace_atomically(write_resources, out / RISK_ASSESSMENTS)

    def write_errors(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            handle.write(",".join(ERROR_COLUMNS) + "\n")
            for n in numbers:
                frame = pd.read_csv(part(parts, n, ".errors.csv"), dtype=str, keep_default_na=False)
                frame.to_csv(handle, header=False, index=False)
                counts["ingest_errors"] += int((frame["modality"] != "").sum())

    _replace_atomically(write_errors, out / ERRORS)
    return counts


def assemble_structured_reports(out: Path, numbers: Sequence[int]) -> dict[str, int]:
    """``structured_reports.csv`` from the chunks' SR parts (``--store-sr``); returns counts."""
    import pandas as pd

    from meddx.export.sr_reports import SR_COLUMNS

    counts = {"structured_reports_stored": 0, "structured_report_errors": 0}

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            handle.write(",".join(SR_COLUMNS) + "\n")
            for n in numbers:
                frame = pd.read_csv(part(out / PARTS, n, ".srs.csv"), dtype=str, keep_default_na=False)
                frame.to_csv(handle, header=False, index=False)
                counts["structured_reports_stored"] += int((frame[STATUS] == "stored").sum())
                counts["structured_report_errors"] += int((frame[STATUS] == "error").sum())

    _replace_atomically(write, out / STRUCTURED_REPORTS)
    return counts


def assemble_fhir_writes(out: Path, numbers: Sequence[int]) -> dict[str, int]:
    """``fhir_writes.csv`` from the chunks' parts (``--store-fhir``); returns counts."""
    import pandas as pd

    from meddx.export.fhir_writes import WRITE_COLUMNS

    frames = [pd.read_csv(part(out / PARTS, n, ".fhir.csv"), dtype=str, keep_default_na=False) for n in numbers]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=WRITE_COLUMNS)
    write_csv(frame, out / "fhir_writes.csv")
    return {
        "fhir_writes_stored": int(frame[STATUS].isin(["created", "exists"]).sum()),
        "fhir_write_errors": int((frame[STATUS] == "error").sum()),
    }


def _csv_cell(text: str) -> str:
    return f'"{text}"' if any(c in text for c in ',"\n') else text


def remove_parts(out: Path) -> None:
    """Remove ``OUT/parts/`` once ``run.json`` says the run is complete."""
    shutil.rmtree(out / PARTS, ignore_errors=True)
