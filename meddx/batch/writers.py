"""The writers that consume an engine's stream of finished chunks: each chunk's predictions table,
errors table and FHIR RiskAssessments (its part files in ``OUT/parts/``), and with ``--store-sr`` /
``--store-fhir`` its DICOM SRs on the PACS and its RiskAssessments on the FHIR server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.batch import run_folder
from meddx.batch.run_folder import ERROR_COLUMNS, iso, part, write_csv
from meddx.predictions.columns import ROW, TASK, column_order
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
        run_folder.write_chunk(self.parts, ready.number, frame, chunk_errors(ready), resources)
