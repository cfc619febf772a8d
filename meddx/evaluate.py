"""``meddx evaluate``: metrics of a predictions file against its manifest's labels.

For each task: AUROC, AUPRC, Brier and ECE before and after calibration, conformal coverage
and mean set size, overall, per modality-availability group and per subgroup of each ``--by``
column, each with a percentile bootstrap interval; and, when the predictions carry
``ablation:<modality>`` columns, the same metrics with each modality withheld. Writes
``metrics.json``, ``report.html`` and PNG plots into one folder (see :mod:`meddx.report`).

The report says what it rests on: the model that made the predictions (from the ``run.json``
``meddx diagnose`` wrote beside them, and its folder's ``config.json``), the rows of each class
per task, a warning when the rows are too few for the intervals to mean much (see
:func:`precision_warnings`), and a reason beside every figure that cannot be computed.

Example:
    >>> from meddx.evaluate import evaluate
    >>> result = evaluate(  # doctest: +SKIP
    ...     "runs/demo/predictions.parquet", "sample_data/manifest.csv", "runs/eval", by=["sex"]
    ... )
    >>> result.metrics["tasks"]["disease"]["overall"]["after_calibration"]["auroc"]  # doctest: +SKIP
    {'value': 0.84, 'low': 0.79, 'high': 0.88, 'n': 600, 'n_resamples': 1000}
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from meddx._version import __version__
from meddx.calibration import availability_groups
from meddx.errors import PredictionsError
from meddx.metrics import (
    AUROC_HALF_WIDTH_LINE,
    COVERAGE_HALF_WIDTH_LINE,
    DEFAULT_SETTINGS,
    REFERENCE_AUROC,
    REFERENCE_COVERAGE,
    MetricSettings,
    auroc,
    auroc_half_width,
    bootstrap,
    coverage_half_width,
    explain,
    grouped_tables,
    metric_table,
    probability_metrics,
    rows_for_auroc_line,
    rows_for_coverage_line,
)
from meddx.predictions import TaskRows, load_task_rows

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
NO_ABLATION_NOTE = (
    "the predictions hold no ablation:<modality> columns (multiclass: ablation:<modality>:<class>); "
    "a model that predicts with each present modality withheld fills them"
)
NO_AVAILABILITY_NOTE = "the predictions have no 'modalities' column, so rows cannot be grouped by availability"
NO_SETS_NOTE = "the predictions hold no prediction_set for this task, so there is no conformal coverage"
NO_RAW_NOTE = "no raw_probability for every evaluated row, so metrics before calibration are left out"
RUN_FILE = "run.json"  # what meddx diagnose writes beside its predictions (meddx.batch.run_folder.RUN)
MAX_RUN_BYTES = 16 << 20
FULL_SETS_SHARE = 0.5  # warn when at least this share of prediction sets hold every class


@dataclass
class EvaluationResult:
    """What :func:`evaluate` wrote: the metrics (as in ``metrics.json``) and the files' paths."""

    metrics: dict[str, Any]
    metrics_path: Path
    report_path: Path
    plots: list[Path]


def _auroc_drop(labels: np.ndarray, full: np.ndarray, withheld: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda rows: auroc(labels[rows], full[rows]) - auroc(labels[rows], withheld[rows])


def ablation_metrics(task: TaskRows, settings: MetricSettings) -> dict[str, Any] | None:
    """Per withheld modality, on the rows where it was present: metrics with and without it.

    ``auroc_drop`` is the paired bootstrap of AUROC(full) - AUROC(withheld) on the same resamples.
    """
    if not task.ablation:
        return None
    table: dict[str, dict[str, Any]] = {}
    for modality, withheld in task.ablation.items():
        absent = np.isnan(withheld) if withheld.ndim == 1 else np.isnan(withheld).any(axis=1)
        rows = np.flatnonzero(~absent)
        labels, full, without = task.labels[rows], task.probabilities[rows], withheld[rows]
        table[modality] = {
            "n": len(rows),
            "full": probability_metrics(labels, full, settings),
            "withheld": probability_metrics(labels, without, settings),
            "auroc_drop": bootstrap(
                _auroc_drop(labels, full, without), len(rows), settings.n_resamples, settings.confidence, settings.seed
            ).to_dict(),
        }
        n_classes = len(task.classes)
        for part in ("full", "withheld"):
            explain(table[modality][part], labels, n_classes, settings)
        explain({"auroc": table[modality]["auroc_drop"]}, labels, n_classes, settings)
    return table


def _count_phrase(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def class_counts(task: TaskRows) -> dict[str, int]:
    """Evaluated rows per class: ``{"positives", "negatives"}`` (binary) or per class name."""
    counts = np.bincount(task.labels, minlength=len(task.classes)).tolist()
    if task.kind == "binary":
        return {"positives": counts[1], "negatives": counts[0]}
    return dict(zip(task.classes, counts, strict=True))


def precision_warnings(task: TaskRows, settings: MetricSettings = DEFAULT_SETTINGS) -> list[str]:
    """What the rows are too few or the sets too wide for, one sentence each (empty when nothing).

    The line: a ``confidence`` interval on AUROC expected to be wider than
    +/-:data:`~meddx.metrics.AUROC_HALF_WIDTH_LINE` at AUROC 0.8 (Hanley & McNeil's standard
    error, from the rows of the rarest class and of the rest: about 40 of each at 95%), or one
    on conformal coverage wider than +/-:data:`~meddx.metrics.COVERAGE_HALF_WIDTH_LINE` at 90%
    (binomial: about 140 rows at 95%). Past it the figures are mostly noise, and a bootstrap
    percentile interval on so few rows is itself unreliable.
    """
    warnings = []
    n = len(task.labels)
    level = f"{settings.confidence:.0%}"
    counts = np.bincount(task.labels, minlength=len(task.classes))
    rare = int(counts.argmin())
    if task.kind == "binary":
        held = f"{_count_phrase(int(counts[1]), 'positive')} and {_count_phrase(int(counts[0]), 'negative')}"
    else:
        held = f"{counts[rare]} rows of class {task.classes[rare]!r} against {n - counts[rare]} of the others"
    auroc_width = auroc_half_width(int(counts[rare]), int(n - counts[rare]), settings.confidence)
    coverage_width = coverage_half_width(n, settings.confidence) if task.sets is not None else 0.0
    if n and (auroc_width > AUROC_HALF_WIDTH_LINE or coverage_width > COVERAGE_HALF_WIDTH_LINE):
        parts = []
        if math.isfinite(auroc_width):
            parts.append(
                f"with {held} a {level} interval on AUROC is about +/-{auroc_width:.2f} wide "
                f"even at AUROC {REFERENCE_AUROC} (Hanley & McNeil)"
            )
        else:
            parts.append(f"with {held} AUROC cannot be computed")
        if task.sets is not None:
            parts.append(
                f"one on conformal coverage about +/-{coverage_width:.2f} at {REFERENCE_COVERAGE:.0%} "
                f"(binomial, {_count_phrase(n, 'row')})"
            )
        warnings.append(
            "Too few rows for these figures to mean much: "
            + ", and ".join(parts)
            + f". This report warns when AUROC's {level} interval is expected to be wider than "
            f"+/-{AUROC_HALF_WIDTH_LINE:.2f} (about {rows_for_auroc_line(settings.confidence)} rows of each class) "
            f"or coverage's wider than +/-{COVERAGE_HALF_WIDTH_LINE:.2f} "
            f"(about {rows_for_coverage_line(settings.confidence)} rows); "
            "on so few rows the bootstrap intervals are themselves unreliable."
        )
    if task.sets is not None and n:
        full = task.sets.all(axis=1)
        if full.mean() >= FULL_SETS_SHARE:
            warnings.append(
                f"{int(full.sum())} of the {n} prediction sets hold every class "
                f"(mean set size {task.sets.sum(axis=1).mean():.2f} of {len(task.classes)}): such a set always "
                "covers the true class, so coverage says little here; read it beside the mean set size."
            )
    return warnings


def task_metrics(task: TaskRows, settings: MetricSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
    """Every table of one task, as written under ``tasks.<name>`` in ``metrics.json``."""
    common = (task.labels, task.probabilities, task.raw_probabilities, task.sets)
    result: dict[str, Any] = {
        "kind": task.kind,
        "classes": list(task.classes),
        "counts": task.counts,
        "class_counts": class_counts(task),
        "overall": metric_table(*common, settings=settings),
        "warnings": precision_warnings(task, settings),
        "notes": [],
    }
    if not len(task.labels):
        result["notes"].append(_nothing_evaluated(task))
    if task.raw_probabilities is None:
        result["notes"].append(NO_RAW_NOTE)
    if task.sets is None:
        result["notes"].append(NO_SETS_NOTE)
    if task.n_missing is None:
        result["availability"] = None
        result["notes"].append(NO_AVAILABILITY_NOTE)
    else:
        groups = availability_groups(task.n_missing)
        result["availability"] = {
            "modalities": task.modalities,
            "groups": grouped_tables(groups, *common, settings=settings),
        }
    result["subgroups"] = {
        column: grouped_tables(values, *common, settings=settings) for column, values in task.subgroups.items()
    }
    result["ablation"] = ablation_metrics(task, settings)
    if result["ablation"] is None:
        result["notes"].append(NO_ABLATION_NOTE)
    return result


def compute_metrics(
    tasks: Sequence[TaskRows],
    settings: MetricSettings = DEFAULT_SETTINGS,
    sources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole ``metrics.json`` document for already loaded tasks."""
    return {
        "meddx_version": __version__,
        **(sources or {}),
        "settings": asdict(settings),
        "tasks": {task.name: task_metrics(task, settings) for task in tasks},
    }


def _nothing_evaluated(task: TaskRows) -> str:
    c = task.counts
    return (
        f"no row of task {task.name!r} could be evaluated: of its {c.get('rows', 0)} rows, "
        f"{c.get('status_error', 0)} have status error, {c.get('unlabelled', 0)} no label in the manifest and "
        f"{c.get('without_probability', 0)} no probability (empty or NaN)"
    )


# --------------------------------------------------------------------------- which model made the predictions


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_RUN_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError covers UnicodeDecodeError and bad JSON
        return None


def _training_rows(training: Any) -> dict[str, int] | None:
    rows = training.get("rows") if isinstance(training, dict) else None
    if not isinstance(rows, dict):
        return None
    kept = {str(k): v for k, v in rows.items() if isinstance(v, int) and not isinstance(v, bool)}
    return kept or None


def model_provenance(predictions: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """The model that made a predictions file, from the ``run.json`` beside it, or a note why not.

    Returns ``({"name", "path", "sha256", "training_rows", "run"}, None)``; ``training_rows``
    (``{"train": n, "val": n}``) come from ``run.json``, else from the model folder's
    ``config.json``, else are ``None``. Without a usable ``run.json``: ``(None, note)``.
    """
    run_path = Path(predictions).parent / RUN_FILE
    run = _read_json(run_path) if run_path.is_file() else None
    model = run.get("model") if isinstance(run, dict) else None
    if not isinstance(model, dict):
        return None, (
            f"no meddx diagnose run.json beside {predictions}: the model that made these predictions is not "
            "known to this report; evaluate the predictions file in the folder meddx diagnose wrote"
        )
    path = str(model.get("path", ""))
    rows = _training_rows(model.get("training"))
    if rows is None and path:
        config = _read_json(Path(path) / "config.json") if (Path(path) / "config.json").is_file() else None
        rows = _training_rows((config.get("diagnosis") or {}).get("training") if isinstance(config, dict) else None)
    info = {
        "name": str(model.get("name", "")) or None,
        "path": path or None,
        "sha256": model.get("sha256") if isinstance(model.get("sha256"), str) else None,
        "training_rows": rows,
        "run": str(run_path),
    }
    return info, None


SHIFT_TEST_KEYS = ("test", "mmd", "p_value", "reference_rows", "sampled_rows")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def batch_shift(predictions: str | Path) -> dict[str, Any] | None:
    """How far the predicted rows are from the training rows: space -> ``rows``, ``flagged_share``, and the test.

    The shares come from the table's OOD columns (``ood`` is ``fused``, ``ood:<space>`` each
    modality and ``summary``; a score over its threshold above 1 is flagged), one value per
    manifest row. The two-sample test of the rows' embeddings against the training ones (MMD with a
    permutation p-value, :mod:`meddx.batch.shift`) comes from the ``run.json`` meddx diagnose wrote
    beside the predictions, when it is there; its numbers are checked to be finite. None: the model
    that made the predictions has no OOD scorers.

    Example:
        >>> import pandas as pd, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     table = pd.DataFrame({"patient_id": ["a", "a", "b"], "index_time": ["2024-01-01T00:00:00Z"] * 3,
        ...                           "task": ["x", "y", "x"], "status": ["ok", "ok", "abstain"],
        ...                           "ood": [0.5, 0.5, 3.0], "ood:audio": [0.4, 0.4, 3.0]})
        ...     table.to_csv(f"{folder}/predictions.csv", index=False)
        ...     batch_shift(f"{folder}/predictions.csv")
        {'fused': {'rows': 2, 'flagged_share': 0.5}, 'audio': {'rows': 2, 'flagged_share': 0.5}}
    """
    import pandas as pd

    from meddx.predictions import read_predictions
    from meddx.predictions.columns import INDEX_TIME, OOD, OOD_PREFIX, PATIENT_ID

    frame = read_predictions(predictions)
    columns = [c for c in frame.columns if c == OOD or c.startswith(OOD_PREFIX)]
    if not columns:
        return None
    rows = frame.drop_duplicates([PATIENT_ID, INDEX_TIME])  # a row's tasks share its scores
    found: dict[str, Any] = {}
    for column in columns:
        scores = pd.to_numeric(rows[column], errors="coerce")
        scores = scores[np.isfinite(scores)]
        if len(scores):
            space = "fused" if column == OOD else column.removeprefix(OOD_PREFIX)
            found[space] = {"rows": int(len(scores)), "flagged_share": round(float((scores > 1).mean()), 4)}
    run = _read_json(Path(predictions).parent / RUN_FILE) if (Path(predictions).parent / RUN_FILE).is_file() else None
    tested = run.get("shift") if isinstance(run, dict) else None
    for space, entry in tested.items() if isinstance(tested, dict) else ():
        if space in found and isinstance(entry, dict) and _finite(entry.get("p_value")) and _finite(entry.get("mmd")):
            found[space].update({k: entry[k] for k in SHIFT_TEST_KEYS if k in entry})
    return found


def compare_inputs(
    predictions: str | Path, manifest: str | Path, model_folder: str | Path, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """The predicted rows' per-modality input summaries beside the training ones: ``{"training", "batch"}``.

    ``training`` comes from the model folder's ``training_summary.json`` (None when it has none);
    ``batch`` from the records of the manifest rows the predictions file names, read with the
    model's ingest config (:func:`meddx.data.summary.batch_input_summaries`).

    Raises:
        ModelError: the model folder does not load.
    """
    from dataclasses import replace

    from meddx.align import Aligner
    from meddx.cache import default_cache_dir
    from meddx.cohort import load_cohort
    from meddx.data.summary import batch_input_summaries
    from meddx.models.folder import check_model_folder
    from meddx.predictions import read_predictions
    from meddx.predictions.columns import INDEX_TIME, PATIENT_ID
    from meddx.records import parse_time

    folder = check_model_folder(model_folder)
    config = Aligner.from_state_dict(cast("dict[str, Any]", folder.checkpoint.aligner)).config  # checked: not None
    frame = read_predictions(predictions)
    predicted = set()
    for patient, when in zip(frame[PATIENT_ID], frame[INDEX_TIME], strict=True):
        try:
            predicted.add((str(patient), parse_time(str(when))))
        except ValueError:
            continue  # load_task_rows has refused such a file already; a bad time names no row
    cohort = load_cohort(manifest)
    cohort = replace(cohort, rows=[r for r in cohort.rows if (r.patient_id, r.index_time) in predicted])
    training = folder.training_summary
    return {
        "model": str(model_folder),
        "training": training.get("inputs") if training else None,
        "training_of": training.get("inputs_of") if training else None,
        "batch": batch_input_summaries(cohort, config, default_cache_dir(cache_dir)),
        "batch_rows": len(cohort.rows),
    }


def evaluate(
    predictions: str | Path,
    manifest: str | Path,
    out: str | Path,
    by: Sequence[str] = (),
    settings: MetricSettings = DEFAULT_SETTINGS,
    progress: bool = True,
    model_card: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> EvaluationResult:
    """Evaluate a predictions file and write ``metrics.json``, ``report.html`` and PNG plots.

    Args:
        predictions: ``predictions.parquet`` or ``.csv`` (the columns: docs/diagnose.md, "Predictions").
        manifest: the cohort manifest with the ``label:<task>`` columns (and subgroup columns).
        out: output folder (created).
        by: subgroup columns, e.g. ``["sex", "site"]``.
        settings: ECE bins, bootstrap resamples, interval level and seed.
        progress: show a progress bar over the bootstrap intervals (the long part).
        model_card: the model folder that made the predictions: its card's metrics section
            (``README.md``, :mod:`meddx.model_card`) is refreshed from these results, and
            ``metrics.json`` and the report gain ``inputs``: the evaluated rows' per-modality
            input summaries beside the training ones (``training_summary.json``).
        cache_dir: the ingest cache the predicted rows' records are in (with ``model_card``;
            default ``MEDDX_CACHE``, else the user cache).

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        PredictionsError, ManifestError, ConfigError: bad input; the message says what to fix.
    """
    from meddx.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = load_task_rows(predictions, manifest, by)
    if not any(len(task.labels) for task in tasks):
        raise PredictionsError(
            f"{predictions}: nothing to evaluate; " + "; ".join(_nothing_evaluated(t) for t in tasks)
        )
    model, model_note = model_provenance(predictions)
    sources: dict[str, Any] = {
        "predictions": str(predictions),
        "manifest": str(manifest),
        "by": list(by),
        "model": model,
        "notes": [model_note] if model_note else [],
    }
    metrics = _with_progress(lambda s: compute_metrics(tasks, s, sources), settings, progress)
    shift = batch_shift(predictions)
    if shift is not None:
        metrics["shift"] = shift
    if model_card is not None:
        metrics["inputs"] = compare_inputs(predictions, manifest, model_card, cache_dir)
    metrics_path = out / METRICS_FILE
    metrics_path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")  # strict JSON
    report_path, plots = write_report(out, tasks, metrics)
    logger.info("wrote %s, %s and %d plots", metrics_path, report_path, len(plots))
    if model_card is not None:
        from meddx.model_card import refresh_card_metrics

        refresh_card_metrics(model_card, metrics)
    return EvaluationResult(metrics, metrics_path, report_path, plots)


def _with_progress(compute: Callable[[MetricSettings], dict], settings: MetricSettings, progress: bool) -> dict:
    """``compute(settings)`` under a bar over its bootstrap intervals, counted first by a pass without resamples."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from meddx.metrics import on_each_estimate

    if not progress or settings.n_resamples == 0:
        return compute(settings)
    counted: list[None] = []
    with on_each_estimate(lambda: counted.append(None)):
        compute(replace(settings, n_resamples=0))  # each metric once: a fraction of a second
    with tqdm(total=len(counted), desc="evaluate", unit="interval") as bar, on_each_estimate(bar.update):
        return compute(settings)
