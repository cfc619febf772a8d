"""The model card: ``README.md`` in a model folder, in the Hugging Face model-card layout.

``finetune`` writes ``training_summary.json`` (what the model was trained on:
:mod:`meddx.data.summary`) and then the card. The card is made only from the folder's own
files, so it always says what the folder holds:

* YAML front matter: ``library_name: meddx``, tags (the modalities trained on), and a
  ``model-index`` with each task's metrics (validation; the test split once evaluated);
* ``## Intended use and tasks``: the tasks, their classes, what the outputs are and are not for;
* ``## Training data``: rows per split, sites, the months of the index times, modality
  availability, label prevalence, subgroup counts, per-modality input summaries;
* ``## Metrics``: the validation figures of ``metrics.json``; after ``meddx evaluate --model-card
  DIR`` the test split's figures with their intervals and the subgroup tables. Only this section
  (between ``<!-- meddx:metrics -->`` markers) and the front matter's ``model-index`` change then;
* ``## Calibration and conformal settings`` (``calibration.json``);
* ``## Out-of-distribution thresholds`` (``ood.json`` when present, read defensively);
* ``## Known limits``: what the figures above imply (few rows, one site, missing modalities...);
* ``## meddx version and config``: the version and the training and backbone settings.

Example:
    >>> card = write_model_card("runs/model")  # doctest: +SKIP
    >>> refresh_card_metrics("runs/model", evaluation.metrics)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from meddx.calibration import CALIBRATION_FILE
from meddx.errors import ModelError
from meddx.files import write_atomic
from meddx.models.checkpoint import CONFIG_FILE
from meddx.models.folder import (
    METRICS_FILE,
    TRAINING_SUMMARY_FILE,
    TRAINING_SUMMARY_FORMAT,
    check_model_folder,
    check_training_summary,
)

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
OOD_FILE = "ood.json"  # written by the out-of-distribution fit (meddx.models.ood) when it ran
METRICS_BEGIN = "<!-- meddx:metrics:begin -->"
METRICS_END = "<!-- meddx:metrics:end -->"
MAX_OOD_BYTES = 1 << 20
FEW_ROWS = 100  # fewer validation or test rows than this: the card says the figures are rough
RARE_MODALITY = 0.5  # a modality present in fewer training rows than this share is a known limit
SECTIONS = (
    "Intended use and tasks",
    "Training data",
    "Metrics",
    "Calibration and conformal settings",
    "Out-of-distribution thresholds",
    "Known limits",
    "meddx version and config",
)


# --------------------------------------------------------------------------- small formatters


def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.{digits}f}"


def _estimate(figure: Any) -> str:
    """``0.714 [0.370, 1.000]`` from a metrics.json estimate (value with its interval), else ``n/a (reason)``."""
    if not isinstance(figure, dict):
        return "n/a"
    value = figure.get("value")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        reason = figure.get("reason")
        return f"n/a ({reason})" if reason else "n/a"
    low, high = figure.get("low"), figure.get("high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"{value:.3f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _read_json(path: Path, limit: int = 16 << 20) -> Any:
    """A JSON file, or None when absent, too big or unreadable (the card says it is missing)."""
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- training summary


def write_training_summary(folder: str | Path, figures: dict[str, Any]) -> Path:
    """Write ``training_summary.json`` from :func:`meddx.data.summary.cohort_summary`'s figures; returns it."""
    path = Path(folder) / TRAINING_SUMMARY_FILE
    document = {"format": TRAINING_SUMMARY_FORMAT, **figures}
    write_atomic(path, json.dumps(document, indent=2, sort_keys=False, allow_nan=False) + "\n")
    check_training_summary(path)  # what we write must load
    return path


def describe_training(folder: str | Path, index: Any, cache_root: str | Path, tasks: Iterable[str]) -> Path:
    """After fine-tuning: ``training_summary.json`` from the prepared cohort, then the card; returns the card.

    Args:
        folder: the model folder just saved.
        index: the prepared cohort's :class:`~meddx.data.index.CohortIndex` (``dataset.index``).
        cache_root: the ingest cache its records are in.
        tasks: the tasks trained.
    """
    from meddx.cache import RecordCache
    from meddx.data.summary import cohort_summary

    write_training_summary(folder, cohort_summary(index, RecordCache(cache_root), list(tasks)))
    return write_model_card(folder)


# --------------------------------------------------------------------------- sections


def _front_matter(config: dict[str, Any], summary: dict[str, Any], metrics: dict, evaluation: dict | None) -> str:
    import yaml

    tasks = _dict(_dict(config.get("diagnosis")).get("tasks"))
    modalities = [m for m, n in _dict(_dict(summary.get("modalities")).get("train")).items() if n]
    results = []
    per_task = _dict(_dict(metrics.get("validation")).get("per_task"))
    tested = _dict(_dict(evaluation).get("tasks"))
    for task in tasks:
        figures = []
        val = _dict(per_task.get(task)).get("auroc")
        if isinstance(val, (int, float)) and math.isfinite(val):
            figures.append({"type": "roc_auc", "value": round(float(val), 4), "name": "validation AUROC"})
        after = _dict(_dict(_dict(tested.get(task)).get("overall")).get("after_calibration"))
        for key, name in (("auroc", "roc_auc"), ("ece", "ece"), ("brier", "brier")):
            value = _dict(after.get(key)).get("value")
            if isinstance(value, (int, float)) and math.isfinite(value):
                figures.append({"type": name, "value": round(float(value), 4), "name": f"test {key.upper()}"})
        if figures:
            results.append({"task": {"type": "multimodal-diagnosis", "name": task}, "metrics": figures})
    front = {
        "library_name": "meddx",
        "tags": ["meddx", "medical", "multimodal", "diagnosis", "calibrated", "conformal-prediction", *modalities],
        "model-index": [{"name": "meddx diagnosis model", "results": results}],
    }
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n"


def _intended_use(config: dict[str, Any], summary: dict[str, Any]) -> str:
    tasks = _dict(_dict(config.get("diagnosis")).get("tasks"))
    rows = [
        (name, _dict(t).get("kind", "?"), ", ".join(map(str, _dict(t).get("classes", [])))) for name, t in tasks.items()
    ]
    modalities = [m for m, n in _dict(_dict(summary.get("modalities")).get("train")).items() if n]
    return (
        "## Intended use and tasks\n\n"
        "Decision support: for each patient at an index time this model gives a calibrated probability per task "
        "and a conformal prediction set, from the modalities present "
        f"({', '.join(modalities) or 'see Training data'}). It is meant for research and for review by clinicians "
        "on patients like those under Training data; it is not a diagnosis by itself and was not cleared for "
        "clinical use. Rows unlike the training data should be flagged (Out-of-distribution thresholds) and read "
        "with care.\n\n" + _table(("task", "kind", "classes"), rows) + "\n"
    )


def _stats_cell(stats: dict[str, Any]) -> tuple[str, str, str]:
    if "counts" in stats:
        counts = ", ".join(f"{k}: {v}" for k, v in _dict(stats.get("counts")).items())
        return str(stats.get("n", 0)), counts or "n/a", ""
    if "distinct" in stats:
        return str(stats.get("n", 0)), f"{stats['distinct']} distinct values", ""
    if not stats.get("n"):
        return "0", "n/a", ""
    spread = f"{_f(stats.get('p05'))} to {_f(stats.get('p95'))}"
    if "min" in stats and "max" in stats:
        spread += f" (min {_f(stats.get('min'))}, max {_f(stats.get('max'))})"
    return str(stats["n"]), _f(stats.get("median")), spread


def input_table(inputs: dict[str, Any], other: dict[str, Any] | None = None, names: tuple[str, str] = ("", "")) -> str:
    """Per-modality input summaries as a markdown table; with ``other``, the two side by side."""
    rows = []
    for modality, facts in _dict(inputs).items():
        for fact, stats in _dict(facts).items():
            n, median, spread = _stats_cell(_dict(stats))
            row = [modality, fact, n, median, spread]
            if other is not None:
                o_n, o_median, o_spread = _stats_cell(_dict(_dict(_dict(other).get(modality)).get(fact)))
                row += [o_n, o_median, o_spread]
            if any(cell != "0" for cell in row[2::3]):  # a fact no reader gave on either side is left out
                rows.append(row)
    header = ["modality", "input", "rows", "median (or counts)", "5th to 95th percentile"]
    if other is not None:
        header = ["modality", "input"] + [f"{h} ({names[i]})" for i in (0, 1) for h in header[2:]]
    return _table(header, rows)


def _training_data(summary: dict[str, Any]) -> str:
    if not summary:
        return (
            "## Training data\n\nThis model folder has no training_summary.json (written by meddx finetune), "
            "so what it was trained on is not known to this card.\n"
        )
    parts = ["## Training data"]
    rows = _dict(summary.get("rows"))
    parts.append(
        "Rows per split (with at least one readable modality): "
        + ", ".join(f"{s} {n}" for s, n in rows.items())
        + f"; rows with nothing readable: {summary.get('rows_without_inputs', 0)}."
    )
    months = _dict(summary.get("index_months"))
    if months:
        parts.append(f"Index times from {months.get('first')} to {months.get('last')} (months).")
    sites = summary.get("sites")
    if isinstance(sites, dict):
        parts.append(
            "Sites per split:\n\n"
            + _table(
                ("split", "rows per site"),
                [(s, ", ".join(f"{k}: {v}" for k, v in _dict(c).items())) for s, c in sites.items()],
            )
        )
    else:
        parts.append("Sites: the manifest has no `site` column, so the sites are not known.")
    availability = _dict(summary.get("modalities"))
    modalities = list(dict.fromkeys(m for split in availability.values() for m in _dict(split)))
    parts.append(
        "Modality availability (rows with the modality):\n\n"
        + _table(
            ("split", *modalities),
            [
                (s, *(f"{_dict(c).get(m, 0)} ({_dict(c).get(m, 0) / max(rows.get(s, 0), 1):.0%})" for m in modalities))
                for s, c in availability.items()
            ],
        )
    )
    label_rows = []
    for task, splits in _dict(summary.get("labels")).items():
        for split, figures in _dict(splits).items():
            labelled = _dict(figures).get("labelled", 0)
            classes = _dict(_dict(figures).get("classes"))
            prevalence = ", ".join(f"{c}: {n} ({n / max(labelled, 1):.0%})" for c, n in classes.items())
            label_rows.append((task, split, labelled, prevalence))
    parts.append("Label prevalence:\n\n" + _table(("task", "split", "labelled rows", "rows per class"), label_rows))
    subgroups = _dict(summary.get("subgroups"))
    if subgroups:
        sub_rows = []
        for column, stats in subgroups.items():
            n, middle, spread = _stats_cell(_dict(stats))
            sub_rows.append((column, n, middle, spread, _dict(stats).get("missing", 0)))
        parts.append(
            "Subgroups (the manifest's other columns, every split):\n\n"
            + _table(("column", "rows", "median (or counts)", "5th to 95th percentile", "missing"), sub_rows)
        )
    of = ", ".join(map(str, summary.get("inputs_of") or []))
    inputs = input_table(_dict(summary.get("inputs")))
    parts.append(f"Inputs, as the readers found them (rows of {of or 'training'}):\n\n{inputs}")
    return "\n\n".join(parts) + "\n"


def _metrics_section(metrics: dict[str, Any], evaluation: dict[str, Any] | None) -> str:
    parts = [METRICS_BEGIN, "## Metrics"]
    validation = _dict(metrics.get("validation"))
    per_task = _dict(validation.get("per_task"))
    parts.append(
        f"Validation (the rows calibration was fitted on; mean AUROC of the best epoch "
        f"{_f(validation.get('mean_auroc'))}):\n\n"
        + _table(
            ("task", "validation rows", "AUROC", "ECE before calibration", "ECE after calibration"),
            [
                (
                    t,
                    _dict(f).get("val_rows", "n/a"),
                    _f(_dict(f).get("auroc")),
                    _f(_dict(f).get("ece_before")),
                    _f(_dict(f).get("ece_after")),
                )
                for t, f in per_task.items()
            ],
        )
    )
    if evaluation is None:
        parts.append(
            "Test split: not evaluated yet. Run `meddx diagnose` on the test split and then "
            "`meddx evaluate PREDICTIONS --manifest MANIFEST --out DIR --model-card THIS_FOLDER` to fill this in."
        )
    else:
        settings = _dict(evaluation.get("settings"))
        level = settings.get("confidence", 0.95)
        parts.append(
            f"Test split (meddx evaluate of {Path(str(evaluation.get('predictions', '?'))).name}, "
            f"{_f(100 * level if isinstance(level, (int, float)) else None, 0)}% bootstrap intervals, "
            f"{settings.get('n_resamples', '?')} resamples):"
        )
        for task, figures in _dict(evaluation.get("tasks")).items():
            parts.append(_task_table(task, _dict(figures)))
        inputs = _dict(evaluation.get("inputs"))
        if inputs.get("batch"):
            parts.append(
                "Inputs of the evaluated rows beside the training rows' (what changed):\n\n"
                + input_table(_dict(inputs.get("training")), _dict(inputs.get("batch")), ("training", "evaluated"))
            )
    parts.append(METRICS_END)
    return "\n\n".join(parts) + "\n"


def _metric_row(name: str, table: dict[str, Any]) -> tuple[str, ...]:
    after, conformal = _dict(table.get("after_calibration")), _dict(table.get("conformal"))
    return (
        name,
        str(table.get("n", "n/a")),
        _estimate(after.get("auroc")),
        _estimate(after.get("auprc")),
        _estimate(after.get("brier")),
        _estimate(after.get("ece")),
        _estimate(conformal.get("coverage")),
        _estimate(conformal.get("mean_set_size")),
    )


def _task_table(task: str, figures: dict[str, Any]) -> str:
    header = ("rows", "n", "AUROC", "AUPRC", "Brier", "ECE", "coverage", "mean set size")
    rows = [_metric_row("all", _dict(figures.get("overall")))]
    for column, groups in _dict(figures.get("subgroups")).items():
        rows += [_metric_row(f"{column} = {value}", _dict(t)) for value, t in _dict(groups).items()]
    for group, table in _dict(_dict(figures.get("availability")).get("groups")).items():
        rows.append(_metric_row(f"modalities: {group}", _dict(table)))
    text = f"Task `{task}` (after calibration):\n\n" + _table(header, rows)
    warnings = [w for w in figures.get("warnings") or [] if isinstance(w, str)]
    if warnings:
        text += "\n\n" + "\n".join(f"> {w}" for w in warnings)
    return text


def _calibration(calibration: Any) -> str:
    rows = []
    for task, entry in _dict(_dict(calibration).get("tasks")).items():
        calibrator, conformal = _dict(_dict(entry).get("calibrator")), _dict(_dict(entry).get("conformal"))
        kind = calibrator.get("type", "none")
        detail = f"temperature {_f(calibrator.get('temperature'))}" if kind == "temperature" else kind
        grouping = _dict(conformal.get("grouping"))
        rows.append(
            (
                task,
                detail,
                calibrator.get("n_fitted", "n/a"),
                _f(conformal.get("alpha")),
                _f(conformal.get("threshold")),
                f"{grouping.get('by', 'none')} (own threshold from {conformal.get('min_group_size', 'n/a')} rows)",
            )
        )
    if not rows:
        return "## Calibration and conformal settings\n\nNo task is calibrated (too few validation labels).\n"
    return (
        "## Calibration and conformal settings\n\nFitted on the validation rows only. A conformal set holds the true "
        "class about 1 - alpha of the time on rows like the validation rows.\n\n"
        + _table(("task", "calibrator", "rows fitted", "alpha", "threshold", "Mondrian groups"), rows)
        + "\n"
    )


def _ood(ood: Any) -> str:
    """``ood.json`` (meddx.models.ood: method, false_alarm_rate, thresholds, fused_threshold, rows, dims)."""
    head = "## Out-of-distribution thresholds\n\n"
    if not isinstance(ood, dict):
        return head + (
            "This model folder holds no readable ood.json, so its predictions carry no out-of-distribution "
            "scores and no row is flagged: check by hand that new patients resemble the training data.\n"
        )
    rows = _dict(ood.get("rows"))
    train, val = _dict(rows.get("train")), _dict(rows.get("val"))
    dims, reference = _dict(ood.get("dims")), _dict(ood.get("reference_rows"))
    table = [
        (m, _f(t), train.get(m, ""), val.get(m, ""), dims.get(m, ""), reference.get(m, ""))
        for m, t in _dict(ood.get("thresholds")).items()
    ]
    if "fused_threshold" in ood:
        table.append(("fused (the row as a whole)", _f(ood.get("fused_threshold")), "", "", "", ""))
    return head + (
        f"Method: {ood.get('method', 'n/a')}; thresholds set on the validation rows so that a share "
        f"{_f(ood.get('false_alarm_rate'))} of them is flagged. A row scoring above a modality's threshold is "
        "flagged for that modality; above the fused one, as a whole (diagnose then abstains unless told not "
        "to).\n\n"
        + _table(("space", "threshold", "train rows", "validation rows", "embedding dims", "reference rows"), table)
        + "\n"
        + _acquisition(_dict(ood.get("input_ranges")))
    )


def _acquisition(ranges: dict[str, Any]) -> str:
    """``ood.json``'s ``input_ranges`` (meddx.models.input_ranges): the acquisition a row is checked against."""
    table = []
    for modality, facts in ranges.items():
        for name, bounds in _dict(facts).items():
            bounds = _dict(bounds)
            if "seen" in bounds and isinstance(bounds["seen"], list):
                table.append((modality, name, ", ".join(str(v) for v in bounds["seen"])))
            elif "low" in bounds and "high" in bounds:
                table.append((modality, name, f"{_f(bounds['low'])} to {_f(bounds['high'])}"))
    if not table:
        return ""
    return (
        "\nAcquisition ranges of the training and validation rows: a row acquired beyond one (by more than "
        "10% of its width) is flagged for that modality and named in `ood_inputs`, whatever its embedding "
        "scores.\n\n" + _table(("modality", "fact", "training range"), table) + "\n"
    )


def _known_limits(summary: dict[str, Any], ood: Any) -> str:
    """What the training data implies; the test split's own warnings go with its figures (Metrics)."""
    limits = [
        "A model carries the biases of the patients, sites, devices and note templates it was trained on; "
        "its figures hold for patients like those under Training data and nowhere else."
    ]
    rows = _dict(summary.get("rows"))
    if summary and rows.get("val", 0) < FEW_ROWS:
        limits.append(
            f"Only {rows.get('val', 0)} validation rows: the calibration, the conformal thresholds and the validation "
            "figures are rough."
        )
    if not summary:
        limits.append("What the model was trained on is not recorded (no training_summary.json).")
    elif not isinstance(summary.get("sites"), dict):
        limits.append("The sites are not recorded (no `site` column): performance at another site is unknown.")
    elif len(_dict(_dict(summary.get("sites")).get("train"))) <= 1:
        limits.append("Trained on one site: performance at another site is unknown.")
    train_rows = max(rows.get("train", 0), 1)
    for modality, n in _dict(_dict(summary.get("modalities")).get("train")).items():
        if isinstance(n, int) and n / train_rows < RARE_MODALITY:
            limits.append(f"{modality} was present in only {n} of {train_rows} training rows.")
    months = _dict(summary.get("index_months"))
    if months:
        limits.append(f"Index times span {months.get('first')} to {months.get('last')}; later practice may differ.")
    age = _dict(_dict(_dict(summary.get("inputs")).get("ehr")).get("age_years"))
    if age.get("n"):
        limits.append(
            f"Ages (from the EHR) mostly {_f(age.get('p05'), 0)} to {_f(age.get('p95'), 0)} years (5th to 95th "
            "percentile); younger or older patients are outside what it saw."
        )
    if not isinstance(ood, dict):
        limits.append("No out-of-distribution thresholds: unusual rows are not flagged.")
    return "## Known limits\n\n" + "\n".join(f"- {line}" for line in limits) + "\n"


def _version_and_config(config: dict[str, Any]) -> str:
    diagnosis = _dict(config.get("diagnosis"))
    settings = {
        "meddx": diagnosis.get("meddx", config.get("meddx_version")),
        "training": diagnosis.get("training"),
        "head_input": diagnosis.get("head_input"),
        "head_dropout": diagnosis.get("head_dropout"),
        "adapter": diagnosis.get("adapter"),
        "backbone": config.get("backbone"),
        "text_model": config.get("text_model_package"),
    }
    import yaml

    text = yaml.safe_dump(json.loads(json.dumps(settings, default=str)), sort_keys=False, default_flow_style=None)
    return (
        "## meddx version and config\n\n"
        f"Made by meddx {settings['meddx']}. The settings (config.json holds them all, with the ingest config):\n\n"
        "```yaml\n" + text + "```\n"
    )


# --------------------------------------------------------------------------- the card


def _parts(folder: Path, evaluation: dict[str, Any] | None) -> dict[str, str]:
    checked = check_model_folder(folder)  # a card is written only for a folder that loads
    config = _read_json(folder / CONFIG_FILE) or {}
    summary = checked.training_summary or {}
    metrics = _dict(_read_json(folder / METRICS_FILE))
    ood = _read_json(folder / OOD_FILE, MAX_OOD_BYTES)
    return {
        "front": _front_matter(config, summary, metrics, evaluation),
        "title": f"# {folder.resolve().name}: a meddx diagnosis model\n\nThis card was written by meddx from the "
        "files of this folder (config.json, metrics.json, calibration.json, training_summary.json, ood.json).\n",
        "intended": _intended_use(config, summary),
        "data": _training_data(summary),
        "metrics": _metrics_section(metrics, evaluation),
        "calibration": _calibration(_read_json(folder / CALIBRATION_FILE)),
        "ood": _ood(ood),
        "limits": _known_limits(summary, ood),
        "version": _version_and_config(config),
    }


def write_model_card(folder: str | Path, evaluation: dict[str, Any] | None = None) -> Path:
    """Write ``README.md`` into a model folder from its files; returns its path.

    Args:
        folder: a fine-tuned model folder.
        evaluation: ``meddx evaluate``'s metrics on the test split (its ``metrics.json``), if any.

    Raises:
        ModelError: the folder does not load (:func:`~meddx.models.folder.check_model_folder`).
    """
    folder = Path(folder)
    parts = _parts(folder, evaluation)
    path = folder / CARD_FILE
    write_atomic(path, "\n".join(parts.values()))
    logger.info("wrote the model card %s", path)
    return path


def refresh_card_metrics(folder: str | Path, evaluation: dict[str, Any]) -> Path:
    """Replace the card's metrics section (and the front matter's metrics) with ``evaluation``'s figures.

    The rest of the card is left as it is. A folder without a card (or whose card lost its
    markers) gets a whole new one.
    """
    folder = Path(folder)
    path = folder / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} cannot be read ({exc}); delete it and evaluate again to write a new card") from None
    pattern = re.compile(re.escape(METRICS_BEGIN) + r".*?" + re.escape(METRICS_END) + r"\n?", re.DOTALL)
    if not text.startswith("---\n") or len(pattern.findall(text)) != 1:
        return write_model_card(folder, evaluation)
    parts = _parts(folder, evaluation)
    body = text.split("\n---\n", 1)[1] if "\n---\n" in text else text
    body = pattern.sub(lambda _: parts["metrics"], body, count=1)
    write_atomic(path, parts["front"] + body)
    logger.info("refreshed the metrics of the model card %s", path)
    return path


def card_sections(text: str) -> dict[str, str]:
    """A card's ``## `` sections by title (the text under each heading), for tests and readers."""
    found: dict[str, str] = {}
    for block in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title, _, rest = block.partition("\n")
        found[title.strip()] = rest.replace(METRICS_END, "").strip()
    return found
