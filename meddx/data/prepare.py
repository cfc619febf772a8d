"""``prepare_cohort``: ingest what is not cached yet, align every row once, write the index.

The first call on a manifest runs :func:`~meddx.ingest.runner.ingest_cohort` (the ingest
cache skips files read before), fits an :class:`~meddx.align.Aligner` on the ``fit_split``
rows when none is given, writes each row's aligned tensors into the
:class:`~meddx.cache.TensorStore` (rows already there are skipped) and writes the
manifest index. Later calls with the same manifest content, config and aligner find the
index and return at once: no ingest, no hashing of sources, no ``Aligner.transform``. The
sources are only looked at (sizes and modification times, when they still exist) to notice
that one was rewritten, which rebuilds the index; a source moved away is not needed.

Ingestion runs in spawned worker processes, so a script that calls :func:`prepare_cohort`
must guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meddx.cache import ALIGNED_FOLDER, RecordCache, TensorStore, aligner_hash, default_cache_dir, row_key
from meddx.cohort import Cohort, TaskSpec, load_cohort
from meddx.config import IngestConfig
from meddx.data.index import (
    CohortIndex,
    IndexRow,
    fit_pointer_name,
    index_name,
    json_safe,
    label_index,
    manifest_identity,
    source_signature,
)
from meddx.errors import ConfigError, MeddxError, ModelError
from meddx.files import write_atomic
from meddx.ingest.base import Tensorizer
from meddx.ingest.runner import IngestOutcome, IngestReport, ingest_cohort
from meddx.ingest.worker_pool import DEFAULT_TASK_TIMEOUT
from meddx.records import MODALITIES, PatientRecord

if TYPE_CHECKING:
    from meddx.align import Aligner
    from meddx.data.dataset import CohortDataset

logger = logging.getLogger(__name__)

INDEX_FOLDER = "indexes"


@dataclass
class PreparedCohort:
    """A cohort whose rows are aligned and stored.

    Attributes:
        aligner: the fitted aligner the tensors were made with (its state goes with a model).
        index_path: the manifest index; :class:`~meddx.data.dataset.CohortDataset` reads it.
        tasks: ``{task: TaskSpec}`` from the manifest's label columns.
        report: the ingest report when this call ingested; None when it found the index.
    """

    aligner: Aligner
    index_path: Path
    tasks: dict[str, TaskSpec]
    report: IngestReport | None = None

    def dataset(
        self, split: str | None = None, tasks: Sequence[str] | None = None, rows: Sequence[int] | None = None
    ) -> CohortDataset:
        """A :class:`~meddx.data.dataset.CohortDataset` over this cohort (see its arguments)."""
        from meddx.data.dataset import CohortDataset

        return CohortDataset(self.index_path, split=split, tasks=tasks, rows=rows)


def prepare_cohort(
    cohort_or_manifest_path: Cohort | str | Path,
    cache_dir: str | Path | None = None,
    *,
    config: IngestConfig | None = None,
    aligner: Aligner | None = None,
    workers: int | None = None,
    progress: bool = True,
    fit_split: str | None = "train",
    plugins: tuple[str, ...] = (),
    task_timeout: float | None = DEFAULT_TASK_TIMEOUT,
) -> PreparedCohort:
    """Make a cohort ready for training: ingested, aligned, stored and indexed.

    Args:
        cohort_or_manifest_path: a manifest file, or a loaded :class:`~meddx.cohort.Cohort`.
        cache_dir: the cache folder (records, aligned tensors, indexes); default
            :func:`~meddx.cache.default_cache_dir` (``MEDDX_CACHE``, else the user cache dir).
        config: reader shapes and rules; default the aligner's config, else ``IngestConfig()``.
        aligner: a fitted aligner to use as is (a pretrained model's); None fits one.
        workers: ingest worker processes (0 = in this process).
        progress: show progress bars.
        fit_split: the split whose rows fit a new aligner; all rows when None or when no row
            has it (a manifest without a split column).
        plugins: importable modules that register custom ingestors.
        task_timeout: seconds one file may take in an ingest worker (None: no limit).

    Returns:
        A :class:`PreparedCohort`; ``.dataset(split)`` gives a torch ``Dataset``.

    Raises:
        ManifestError: the manifest is invalid (only when it is not prepared yet).
        ConfigError: ``config`` differs from the given aligner's config.
        ModelError: the given aligner is not fitted.

    Example:
        >>> if __name__ == "__main__":  # workers are spawned  # doctest: +SKIP
        ...     prepared = prepare_cohort("sample_data/manifest.csv", cache_dir="runs/cache")
        ...     train = prepared.dataset(split="train")
    """
    from meddx.align import Aligner

    cache_root = default_cache_dir(cache_dir)
    if aligner is not None:
        if not aligner.fitted_:
            raise ModelError("prepare_cohort got an aligner that is not fitted; fit it or pass aligner=None")
        if config is not None and config != aligner.config:
            raise ConfigError(
                "prepare_cohort got a config that differs from the aligner's; the tensors must be read with the "
                "aligner's config: pass config=None (or aligner.config)"
            )
        config = aligner.config
    config = config or IngestConfig()
    manifest, manifest_digest = manifest_identity(cohort_or_manifest_path)
    indexes = cache_root / INDEX_FOLDER
    pointer = indexes / f"{fit_pointer_name(manifest_digest, config, fit_split)}.json"

    # The fast path: an index of this manifest, config and aligner that is still valid.
    if aligner is not None:
        known: Path | None = indexes / f"{index_name(manifest_digest, config, aligner_hash(aligner))}.json"
    else:
        known = _follow_pointer(pointer)
    if known is not None and known.is_file():
        found = _usable_index(known)
        if found is not None:
            logger.info("%s is prepared already (%s)", manifest, known)
            return PreparedCohort(aligner or Aligner.from_state_dict(found.aligner), known, found.tasks)

    cohort = (
        cohort_or_manifest_path if isinstance(cohort_or_manifest_path, Cohort) else load_cohort(cohort_or_manifest_path)
    )
    report = ingest_cohort(cohort, cache_root, config, workers, progress, plugins, task_timeout)
    # Signatures taken after ingesting: a file rewritten later makes the index stale.
    sources = {str(p): source_signature(p) for p in sorted({p for row in cohort for p in row.paths.values()})}
    by_row = _outcomes_by_row(report)
    if aligner is None:
        fit_rows = [r.row for r in cohort if fit_split is not None and r.split == fit_split]
        if not fit_rows:
            if fit_split is not None:
                logger.info("no %r rows in %s: fitting the aligner on all rows", fit_split, manifest)
            fit_rows = [r.row for r in cohort]
        aligner = Aligner(config)
        aligner.fit(_records_for_fit(cohort, by_row, set(fit_rows), RecordCache(cache_root), aligner))
        fitted_here = True
    else:
        fitted_here = False

    digest = aligner_hash(aligner)
    store = TensorStore(cache_root / ALIGNED_FOLDER)
    rows = _align_rows(cohort, by_row, aligner, digest, store, RecordCache(cache_root), progress)
    index = CohortIndex(
        manifest=manifest,
        manifest_digest=manifest_digest,
        config=config.model_dump(mode="json"),
        aligner=aligner.state_dict(),
        aligner_hash=digest,
        store=f"../{ALIGNED_FOLDER}",
        tasks=dict(cohort.tasks),
        extra_columns=list(cohort.extra_columns),
        array_spec=aligner.array_spec(),
        sources={path: signature for path, signature in sources.items() if signature is not None},
        rows=rows,
    )
    index_path = index.write(indexes / f"{index_name(manifest_digest, config, digest)}.json")
    if fitted_here:
        _write_pointer(pointer, index_path)
    return PreparedCohort(aligner, index_path, dict(cohort.tasks), report)


# ---------------------------------------------------------------------- the steps


def _follow_pointer(pointer: Path) -> Path | None:
    try:
        return pointer.parent / json.loads(pointer.read_text())["index"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_pointer(pointer: Path, index_path: Path) -> None:
    write_atomic(pointer, json.dumps({"index": index_path.name}))


def _usable_index(path: Path) -> CohortIndex | None:
    """The index at ``path`` when its tensors are all there and no source changed; else None."""
    try:
        index = CohortIndex.read(path)
    except MeddxError as exc:
        logger.warning("%s; preparing again", exc)
        return None
    store = TensorStore(index.store_root(path))
    missing = next((r.row for r in index.rows if r.key is not None and not os.path.isfile(store.path(r.key))), None)
    if missing is not None:
        logger.warning("aligned tensors of row %d of %s are missing; preparing again", missing, index.manifest)
        return None
    for source, signature in index.sources.items():
        now = source_signature(source)
        if now is not None and now != signature:  # moved away (None) is fine: the store has its tensors
            # Source paths often hold patient identifiers: the log names the manifest only.
            logger.info("a source named in %s changed since it was prepared; preparing again", index.manifest)
            return None
    return index


def _outcomes_by_row(report: IngestReport) -> dict[int, list[IngestOutcome]]:
    by_row: dict[int, list[IngestOutcome]] = {}
    for outcome in report.outcomes:
        by_row.setdefault(outcome.row, []).append(outcome)
    return by_row


def _needs_fit(tensorizer: Tensorizer) -> bool:
    return type(tensorizer).fit is not Tensorizer.fit


def _records_for_fit(
    cohort: Cohort, by_row: dict[int, list[IngestOutcome]], rows: set[int], cache: RecordCache, aligner: Aligner
) -> Iterator[PatientRecord]:
    """The fit rows' records, lazily, and only of modalities whose tensorizer learns something
    (so fitting never holds every training volume in memory)."""
    wanted = {m for m, t in aligner.tensorizers.items() if _needs_fit(t)}
    for row in cohort:
        if row.row not in rows:
            continue
        patient = PatientRecord(row.patient_id, row.index_time)
        for outcome in by_row.get(row.row, []):
            if outcome.status == "ok" and outcome.key and outcome.modality in wanted:
                record = cache.get(outcome.key)
                if record is not None:
                    patient.add(record)
        yield patient


def _align_rows(
    cohort: Cohort,
    by_row: dict[int, list[IngestOutcome]],
    aligner: Aligner,
    digest: str,
    store: TensorStore,
    cache: RecordCache,
    progress: bool,
) -> list[IndexRow]:
    """Align every row not in the store yet; one :class:`IndexRow` per manifest row."""
    from tqdm.auto import tqdm

    rows = []
    written = 0
    for row in tqdm(cohort.rows, desc="align", unit="row", disable=not progress):
        outcomes = by_row.get(row.row, [])
        keys = {o.modality: o.key for o in outcomes if o.status == "ok" and o.key}
        errors = {o.modality.value: o.error or "" for o in outcomes if o.status == "error"}
        key = row_key(keys, digest) if keys else None
        if key is not None and key not in store:
            patient = PatientRecord(row.patient_id, row.index_time)
            for modality, record_key in keys.items():
                record = cache.get(record_key)
                if record is None:
                    raise ModelError(
                        f"record {record_key} of row {row.row} ({modality}) vanished from the cache "
                        f"{cache.root} while preparing; run prepare_cohort again"
                    )
                patient.add(record)
            try:
                tensors = aligner.transform(patient)
            except ValueError as exc:  # a record of another shape: read with another config
                raise ModelError(f"row {row.row} of {cohort.path}: {exc}") from None
            store.put(key, tensors.tensors)
            written += 1
        rows.append(
            IndexRow(
                row=row.row,
                patient_id=row.patient_id,
                index_time=row.index_time.isoformat(),
                split=row.split,
                labels={task: label_index(spec, row.labels.get(task)) for task, spec in cohort.tasks.items()},
                extras=json_safe(row.extras),
                records={m.value: keys[m] for m in MODALITIES if m in keys},
                errors=errors,
                key=key,
            )
        )
    logger.info("aligned %d rows (%d were in the store already)", written, len(rows) - written)
    return rows
