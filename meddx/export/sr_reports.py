"""``meddx diagnose --store-sr``: a Structured Report per prediction made on PACS images, stored back.

For each diagnosed chunk, :class:`PacsReporter` finds the rows whose image series came from
the DICOMweb server (a ``dicomweb:`` cell in the manifest, and ``imaging`` among the
modalities the prediction used), reads the headers of that very series (the one the reader
kept by the series rule, as its cached record says) from the local series store, builds one
SR per (row, task) with :func:`~meddx.export.sr.build_prediction_sr` and stores the chunk's
SRs with one STOW-RS request. The SRs of a run share one SR series per study. Their UIDs are
derived from the run (manifest, model, split) and the row, so a run killed between storing a
chunk's SRs and marking the chunk done stores the same instances again on ``--resume``: the
PACS keeps one copy of each, not two.

What happened to each is a row of ``structured_reports.csv`` (patient, index time, task,
status ``stored`` or ``error``, the SR's SOPInstanceUID, the reason of a failure), so a PACS
that refuses a request costs the SRs of that chunk, never the predictions or the run.
Rows whose images were read from files get no SR: their instances are not on the PACS to
be referenced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.errors import MeddxError, short_reason
from meddx.export.sr import ModelInfo, build_prediction_sr, store_srs
from meddx.records import Modality

if TYPE_CHECKING:
    import pandas as pd

    from meddx.config import IngestConfig
    from meddx.predictions.types import TaskPrediction
    from meddx.streaming import ReadyChunk

logger = logging.getLogger(__name__)

SR_COLUMNS = ["patient_id", "index_time", "task", "status", "sop_instance_uid", "study_instance_uid", "error"]


class PacsReporter:
    """Makes and stores the SRs of each diagnosed chunk (see the module docstring).

    Args:
        config: the ingest config the images were read with (its ``dicomweb`` section, with
            ``cache_dir`` set, names the server and the series store).
        cache_dir: the ingest cache (the cached imaging records say which series was read).
        model_info: the model's name and version, written into each SR.
        run_id: names the run (stable across ``--resume``); the SR series UIDs derive from it.

    Raises:
        ConfigError: no DICOMweb server is configured.

    Example:
        >>> reporter = PacsReporter(config, "runs/cache", ModelInfo("chest-ct", "0.1.0"), "run-1")  # doctest: +SKIP
        >>> reporter.report(ready_chunk, task_predictions)  # doctest: +SKIP
    """

    def __init__(self, config: IngestConfig, cache_dir: str | Path, model_info: ModelInfo, run_id: str):
        from meddx.cache import RecordCache
        from meddx.dicomweb.store import SeriesStore

        self.store = SeriesStore(config.dicomweb)
        self.records = RecordCache(cache_dir)
        self.model_info = model_info
        self.run_id = run_id

    def sr_series_uid(self, study_uid: str) -> str:
        """This run's SR series in a study: the same UID on every call (and after ``--resume``)."""
        return self._uid("sr-series", study_uid)

    def _uid(self, *parts: str) -> str:
        """A UID derived from the run and ``parts``: the same on a resumed run, so a re-stored SR replaces itself."""
        from pydicom.uid import generate_uid

        return str(generate_uid(entropy_srcs=["meddx", self.run_id, *parts]))

    def _series_of(self, ready: ReadyChunk) -> dict[int, tuple[str, str]]:
        """Manifest row -> (StudyInstanceUID, SeriesInstanceUID) of the PACS series its imaging record holds."""
        found = {}
        for ready_row in ready.rows:
            if Modality.IMAGING not in ready_row.row.remote:
                continue
            for outcome in ready_row.outcomes:
                if outcome.modality == Modality.IMAGING and outcome.status == "ok" and outcome.key:
                    meta = self.records.meta(outcome.key)
                    if meta.get("study_uid") and meta.get("series_uid"):
                        found[ready_row.row.row] = (str(meta["study_uid"]), str(meta["series_uid"]))
        return found

    def _headers(self, study_uid: str, series_uid: str) -> list[Any]:
        """The series' instances without pixels, from the series store (retrieved again if pruned)."""
        import pydicom

        folder = self.store.fetch(study_uid, series_uid)
        return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.glob("*.dcm"))]

    def report(self, ready: ReadyChunk, predictions: Sequence[TaskPrediction]) -> pd.DataFrame:
        """Make and store the SRs of one chunk's predictions; one ``SR_COLUMNS`` row per SR attempted."""
        import pandas as pd

        from meddx.predictions.table import prediction_row

        series = self._series_of(ready)
        wanted = [p for p in predictions if p.row in series and "imaging" in p.modalities]
        outcomes: list[dict[str, Any]] = []
        made: list[tuple[dict[str, Any], Any]] = []
        headers: dict[tuple[str, str], list[Any]] = {}
        for number, prediction in enumerate(wanted, start=1):
            row = prediction_row(prediction)
            study_uid, series_uid = series[prediction.row]
            outcome = {
                "patient_id": row["patient_id"],
                "index_time": row["index_time"],
                "task": row["task"],
                "study_instance_uid": study_uid,
            }
            try:
                if (study_uid, series_uid) not in headers:
                    headers[(study_uid, series_uid)] = self._headers(study_uid, series_uid)
                sr = build_prediction_sr(
                    headers[(study_uid, series_uid)],
                    row,
                    self.model_info,
                    series_instance_uid=self.sr_series_uid(study_uid),
                    sop_instance_uid=self._uid("sr-instance", study_uid, row["index_time"], row["task"]),
                    instance_number=ready.number * 100_000 + number,
                )
            except MeddxError as exc:
                outcomes.append({**outcome, "status": "error", "error": f"SR not made: {short_reason(exc)}"})
                continue
            made.append((outcome, sr))
        outcomes += self._store(made)
        return pd.DataFrame(outcomes, columns=SR_COLUMNS)

    def _store(self, made: Sequence[tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
        """One STOW-RS request for the chunk's SRs; a refusal marks them all as errors."""
        if not made:
            return []
        try:
            store_srs(self.store.client, [sr for _, sr in made])
        except MeddxError as exc:
            logger.warning("storing %d SR(s) failed: %s", len(made), short_reason(exc))
            return [{**outcome, "status": "error", "error": short_reason(exc)} for outcome, _ in made]
        return [{**outcome, "status": "stored", "sop_instance_uid": str(sr.SOPInstanceUID)} for outcome, sr in made]
