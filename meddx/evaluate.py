"""``meddx evaluate``: metrics of a predictions file against its manifest's labels.

For each task: AUROC, AUPRC, Brier and ECE before and after calibration, conformal coverage
and mean set size, overall, per modality-availability group and per subgroup of each ``--by``
column, each with a percentile bootstrap interval; and, when the predictions carry
``ablation:<modality>`` columns, the same metrics with each modality withheld. Writes
``metrics.json``, ``report.html`` and PNG plots into one folder (see :mod:`meddx.report`).

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meddx import __version__
from meddx.calibration import availability_groups
from meddx.metrics import (
    DEFAULT_SETTINGS,
    MetricSettings,
    auroc,
    bootstrap,
    grouped_tables,
    metric_table,
    probability_metrics,
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
    table = {}
    for modality, withheld in task.ablation.items():
        rows = np.flatnonzero(~np.isnan(withheld.reshape(len(withheld), -1)).any(axis=1))
        labels, full, without = task.labels[rows], task.probabilities[rows], withheld[rows]
        table[modality] = {
            "n": len(rows),
            "full": probability_metrics(labels, full, settings),
            "withheld": probability_metrics(labels, without, settings),
            "auroc_drop": bootstrap(
                _auroc_drop(labels, full, without), len(rows), settings.n_resamples, settings.confidence, settings.seed
            ).to_dict(),
        }
    return table


def task_metrics(task: TaskRows, settings: MetricSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
    """Every table of one task, as written under ``tasks.<name>`` in ``metrics.json``."""
    common = (task.labels, task.probabilities, task.raw_probabilities, task.sets)
    result: dict[str, Any] = {
        "kind": task.kind,
        "classes": list(task.classes),
        "counts": task.counts,
        "overall": metric_table(*common, settings=settings),
        "notes": [],
    }
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


def evaluate(
    predictions: str | Path,
    manifest: str | Path,
    out: str | Path,
    by: Sequence[str] = (),
    settings: MetricSettings = DEFAULT_SETTINGS,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a predictions file and write ``metrics.json``, ``report.html`` and PNG plots.

    Args:
        predictions: ``predictions.parquet`` or ``.csv`` (the columns of the README's Predictions).
        manifest: the cohort manifest with the ``label:<task>`` columns (and subgroup columns).
        out: output folder (created).
        by: subgroup columns, e.g. ``["sex", "site"]``.
        settings: ECE bins, bootstrap resamples, interval level and seed.
        progress: show a progress bar over the bootstrap intervals (the long part).

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        PredictionsError, ManifestError, ConfigError: bad input; the message says what to fix.
    """
    from meddx.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = load_task_rows(predictions, manifest, by)
    sources: dict[str, Any] = {"predictions": str(predictions), "manifest": str(manifest), "by": list(by)}
    metrics = _with_progress(lambda s: compute_metrics(tasks, s, sources), settings, progress)
    metrics_path = out / METRICS_FILE
    metrics_path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")  # strict JSON
    report_path, plots = write_report(out, tasks, metrics)
    logger.info("wrote %s, %s and %d plots", metrics_path, report_path, len(plots))
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
