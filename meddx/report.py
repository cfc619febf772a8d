"""The evaluation report: PNG plots and one self-contained ``report.html``.

Plots per task: ROC curve, reliability diagram (before and after calibration), subgroup bars
(AUROC and coverage with their intervals, per availability group and ``--by`` value) and, when
present, modality-ablation bars. They are drawn with matplotlib's Agg canvas (no display, no
global backend switch), written as PNG files and embedded in the HTML as base64, so the report
opens from disk with no network: no external URL, no script, no stylesheet from elsewhere.
Every label is drawn as plain text (no mathtext, no TeX), whatever a task or subgroup is called.

The report says what it rests on: the model (name, folder, training rows), the rows of each
class per task, a warning when they are too few for the intervals to mean much, the mean set
size beside every coverage, the rows in each bin of the reliability diagram, and "n/a" with
the reason wherever a figure cannot be computed.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import numpy as np

from meddx.metrics import reliability_curve
from meddx.predictions import TaskRows

REPORT_FILE = "report.html"
METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "brier": "Brier", "ece": "ECE"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
.note { color: #666; font-style: italic; }
.warning { background: #fff4d6; border-left: 4px solid #d89c00; padding: 0.4em 0.8em; }
section.task { border-top: 2px solid #444; margin-top: 2em; }
"""


def slug(name: str) -> str:
    """A file- and id-safe form of a task name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"


def fmt(estimate: dict[str, Any] | None, digits: int = 3, why: bool = True) -> str:
    """``0.812 [0.781, 0.843]``; the value alone without an interval; ``n/a`` when undefined,
    followed by the reason (``n/a — only one class among the 12 rows``) unless ``why`` is false."""
    if not estimate or estimate.get("value") is None:
        reason = (estimate or {}).get("reason")
        return f"n/a — {reason}" if why and reason else "n/a"
    text = f"{estimate['value']:.{digits}f}"
    if estimate.get("low") is not None:
        text += f" [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"
    return text


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, axes


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})  # no URL in the file's metadata
    return path


def plot_roc(task: TaskRows, path: Path) -> Path:
    """ROC curve after calibration (and before, when raw probabilities exist); one-vs-rest per class."""
    from sklearn.metrics import roc_curve

    figure, (axis,) = _figure(5, 4.5)
    axis.plot([0, 1], [0, 1], color="#aaa", linestyle=":", linewidth=1)
    curves = [("calibrated", task.probabilities)]
    if task.raw_probabilities is not None:
        curves.append(("raw", task.raw_probabilities))
    for label, probabilities in curves:
        style = "-" if label == "calibrated" else "--"
        if task.kind == "binary":
            if len(np.unique(task.labels)) == 2:
                fpr, tpr, _ = roc_curve(task.labels, probabilities)
                axis.plot(fpr, tpr, linestyle=style, label=label)
        else:
            for c, name in enumerate(task.classes):
                positive = task.labels == c
                if label == "calibrated" and 0 < positive.sum() < len(positive):
                    fpr, tpr, _ = roc_curve(positive, probabilities[:, c])
                    axis.plot(fpr, tpr, label=f"{name} vs rest")
    axis.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC: {task.name}",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_reliability(task: TaskRows, metrics: dict[str, Any], n_bins: int, path: Path) -> Path:
    """Reliability diagrams side by side: before and after calibration."""
    panels = [("after calibration", task.probabilities, metrics["overall"]["after_calibration"])]
    if task.raw_probabilities is not None:
        panels.insert(0, ("before calibration", task.raw_probabilities, metrics["overall"]["before_calibration"]))
    figure, axes = _figure(4.5 * len(panels), 4.5, len(panels))
    which = "positive class" if task.kind == "binary" else "top label"
    for axis, (title, probabilities, table) in zip(axes, panels, strict=True):
        curve = reliability_curve(task.labels, probabilities, n_bins)
        centres = (curve.edges[:-1] + curve.edges[1:]) / 2
        filled = curve.count > 0
        axis.bar(
            centres[filled], curve.frequency[filled], width=1 / n_bins, edgecolor="#345", alpha=0.7, label="observed"
        )
        for x, y, count in zip(centres[filled], curve.frequency[filled], curve.count[filled], strict=True):
            axis.text(x, min(y, 0.93) + 0.015, str(count), ha="center", va="bottom", fontsize=7, color="#234")
        axis.plot(
            curve.confidence[filled], curve.confidence[filled], "o", color="#c33", markersize=3, label="mean confidence"
        )
        axis.plot([0, 1], [0, 1], color="#888", linestyle=":", linewidth=1)
        axis.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel=f"predicted probability ({which})",
            ylabel="observed frequency" if task.kind == "binary" else "accuracy",
            title=f"{title}: ECE {fmt(table['ece'], why=False)} (numbers: rows per bin)",
        )
        axis.title.set_fontsize("small")
        axis.legend(loc="upper left", fontsize="small")
    return _save(figure, path)


def _group_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    if metrics.get("availability"):
        rows += [(f"availability: {g}", t) for g, t in metrics["availability"]["groups"].items()]
    for column, groups in metrics["subgroups"].items():
        rows += [(f"{column} = {g}", t) for g, t in groups.items()]
    return rows


def _bars(axis, names: list[str], estimates: list[dict[str, Any] | None], title: str) -> None:
    values = np.array([e["value"] if e and e["value"] is not None else np.nan for e in estimates], dtype=float)
    pairs = list(zip(estimates, values, strict=True))
    low = np.array([e["low"] if e and e["low"] is not None else v for e, v in pairs], dtype=float)
    high = np.array([e["high"] if e and e["high"] is not None else v for e, v in pairs], dtype=float)
    positions = np.arange(len(names))
    shown = np.nan_to_num(values)
    axis.barh(positions, shown, color="#4a7", xerr=np.nan_to_num([shown - low, high - shown]), capsize=3)
    for position in positions[np.isnan(values)]:
        axis.text(0.01, position, "n/a", va="center", fontsize="small", color="#a33")
    axis.set_yticks(positions, names, fontsize="small")
    axis.invert_yaxis()
    axis.set(xlim=(0, 1), title=title)


def plot_subgroups(task: TaskRows, metrics: dict[str, Any], path: Path) -> Path | None:
    """Horizontal bars per availability group and subgroup: AUROC, and coverage when sets exist."""
    rows = _group_rows(metrics)
    if not rows:
        return None
    names = [f"{name} (n={table['n']})" for name, table in rows]
    with_sets = task.sets is not None
    figure, axes = _figure(5 * (2 if with_sets else 1) + 1, 1.2 + 0.35 * len(rows), 2 if with_sets else 1)
    _bars(axes[0], names, [t["after_calibration"]["auroc"] for _, t in rows], f"AUROC: {task.name}")
    if with_sets:
        _bars(axes[1], names, [t["conformal"]["coverage"] for _, t in rows], "conformal coverage")
        axes[1].set_yticks(np.arange(len(names)), [""] * len(names))
    return _save(figure, path)


def plot_ablation(task: TaskRows, metrics: dict[str, Any], path: Path) -> Path | None:
    """AUROC with all modalities against AUROC with each one withheld (rows where it was present)."""
    ablation = metrics.get("ablation")
    if not ablation:
        return None
    modalities = list(ablation)
    figure, (axis,) = _figure(6, 1.5 + 0.5 * len(modalities))
    positions = np.arange(len(modalities))
    full = [ablation[m]["full"]["auroc"]["value"] or 0.0 for m in modalities]
    withheld = [ablation[m]["withheld"]["auroc"]["value"] or 0.0 for m in modalities]
    axis.barh(positions - 0.2, full, height=0.4, color="#4a7", label="all modalities")
    axis.barh(positions + 0.2, withheld, height=0.4, color="#c84", label="modality withheld")
    axis.set_yticks(positions, [f"{m} (n={ablation[m]['n']})" for m in modalities], fontsize="small")
    axis.invert_yaxis()
    axis.set(xlim=(0, 1), xlabel="AUROC", title=f"modality ablation: {task.name}")
    axis.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


# --------------------------------------------------------------------------- HTML


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _class_counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _per_class(table: dict[str, Any], classes: list[str]) -> str:
    counts = table.get("class_counts") or []
    if classes == ["0", "1"] and len(counts) == 2:
        return f"{counts[1]} / {counts[0]}"
    return " / ".join(str(c) for c in counts)


def _group_table(groups: dict[str, dict[str, Any]], classes: list[str]) -> str:
    per_class = "positives / negatives" if classes == ["0", "1"] else "rows per class (" + " / ".join(classes) + ")"
    header = [
        "group",
        "n",
        per_class,
        *(f"{n} (calibrated)" for n in METRIC_NAMES.values()),
        "coverage",
        "mean set size",
    ]
    rows = []
    for name, table in groups.items():
        after = table["after_calibration"]
        conformal = table["conformal"] or {}
        rows.append(
            [
                name,
                str(table["n"]),
                _per_class(table, classes),
                *(fmt(after[k]) for k in METRIC_NAMES),
                fmt(conformal.get("coverage")),
                fmt(conformal.get("mean_set_size"), 2),
            ]
        )
    return _table(header, rows)


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h3>{html.escape(title)}</h3>{body}</section>'


def _bins_table(task: TaskRows, n_bins: int) -> str:
    """Rows, mean confidence and observed frequency per bin of the calibrated reliability diagram."""
    curve = reliability_curve(task.labels, task.probabilities, n_bins)
    rows = [
        [
            f"[{curve.edges[b]:.2f}, {curve.edges[b + 1]:.2f}{']' if b == n_bins - 1 else ')'}",
            str(int(curve.count[b])),
            "-" if curve.count[b] == 0 else f"{curve.confidence[b]:.3f}",
            "-" if curve.count[b] == 0 else f"{curve.frequency[b]:.3f}",
        ]
        for b in range(n_bins)
    ]
    observed = "observed frequency" if task.kind == "binary" else "accuracy"
    return "<h4>Rows per bin (after calibration)</h4>" + _table(["bin", "rows", "mean confidence", observed], rows)


def _task_html(task: TaskRows, metrics: dict[str, Any], plots: dict[str, Path | None], n_bins: int) -> str:
    s = slug(task.name)
    bins = _bins_table(task, n_bins)
    overall = metrics["overall"]
    before = overall["before_calibration"] or {}
    after = overall["after_calibration"]
    rows = [[label, fmt(before.get(key)), fmt(after[key])] for key, label in METRIC_NAMES.items()]
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in metrics["counts"].items())
    evaluated = f"Evaluated rows per class: {_class_counts_text(metrics['class_counts'])}."
    parts = [
        _section(
            f"{s}-overall",
            "Overall",
            f"<p>{html.escape(evaluated)}</p><p>{html.escape(counts)}</p>"
            + _table(["metric", "before calibration", "after calibration"], rows),
        ),
        _section(f"{s}-roc", "ROC curve", _image(plots["roc"], f"ROC curve of {task.name}")),
        _section(
            f"{s}-calibration",
            "Calibration (reliability diagram)",
            _image(plots["reliability"], f"reliability diagram of {task.name}") + bins,
        ),
    ]
    conformal = overall["conformal"]
    if conformal is None:
        body = _note("no prediction sets for this task")
    else:
        lines = [["overall", str(overall["n"]), fmt(conformal["coverage"]), fmt(conformal["mean_set_size"], 2)]]
        classes_in_sets = f"{len(task.classes)} classes: a set holding all of them always covers"
        for name, table in (metrics["availability"] or {}).get("groups", {}).items():
            lines.append(
                [
                    name,
                    str(table["n"]),
                    fmt(table["conformal"]["coverage"]),
                    fmt(table["conformal"]["mean_set_size"], 2),
                ]
            )
        body = _table(["rows", "n", "coverage", "mean set size"], lines) + _note(
            f"Read coverage beside the mean set size (of {classes_in_sets} the true class)."
        )
    parts.append(_section(f"{s}-conformal", "Conformal prediction sets", body))
    if metrics["availability"] is None:
        body = _note("no 'modalities' column: rows cannot be grouped by availability")
    else:
        used = ", ".join(metrics["availability"]["modalities"]) or "none"
        body = f"<p>Missing modalities are counted against those the rows use: {html.escape(used)}.</p>" + _group_table(
            metrics["availability"]["groups"], metrics["classes"]
        )
    parts.append(_section(f"{s}-availability", "Availability groups", body))
    if metrics["subgroups"]:
        body = "".join(
            f"<h4>{html.escape(column)}</h4>" + _group_table(groups, metrics["classes"])
            for column, groups in metrics["subgroups"].items()
        )
    else:
        body = _note("no subgroup columns were named (meddx evaluate --by COLUMN,...)")
    body += _image(plots["subgroups"], f"subgroup bars of {task.name}")
    parts.append(_section(f"{s}-subgroups", "Subgroups", body))
    ablation = metrics["ablation"]
    if ablation is None:
        body = _note(
            "No modality-ablation columns in the predictions (ablation:<modality>); "
            "a model that predicts with each present modality withheld fills them."
        )
    else:
        rows = [
            [
                m,
                str(a["n"]),
                fmt(a["full"]["auroc"]),
                fmt(a["withheld"]["auroc"]),
                fmt(a["auroc_drop"]),
                fmt(a["withheld"]["ece"]),
            ]
            for m, a in ablation.items()
        ]
        body = _table(
            ["withheld modality", "n (rows with it)", "AUROC all", "AUROC withheld", "AUROC drop", "ECE withheld"], rows
        ) + _image(plots["ablation"], f"modality ablation of {task.name}")
    parts.append(_section(f"{s}-ablation", "Modality ablation", body))
    notes = "".join(_warning(w) for w in metrics.get("warnings", [])) + "".join(_note(n) for n in metrics["notes"])
    title = f"Task {task.name} ({task.kind}: {', '.join(task.classes)})"
    return f'<section class="task" id="task-{s}"><h2>{html.escape(title)}</h2>{notes}{"".join(parts)}</section>'


def _warning(text: str) -> str:
    return f'<p class="warning">{html.escape(text)}</p>'


def _model_html(metrics: dict[str, Any]) -> str:
    """What the predictions rest on: the model's name, folder, hash and training rows."""
    model = metrics.get("model")
    if not model:
        notes = metrics.get("notes") or ["the model that made these predictions is not known"]
        return "<p>Model: unknown.</p>" + "".join(_note(n) for n in notes)
    rows = model.get("training_rows")
    trained = (
        ", ".join(f"{v} {k}" for k, v in rows.items()) + " rows"
        if rows
        else "not recorded (neither run.json nor the model folder's config.json says)"
    )
    lines = [
        ["name", model.get("name") or "-"],
        ["folder", model.get("path") or "-"],
        ["model.safetensors SHA-256", (model.get("sha256") or "-")[:16]],
        ["fine-tuned on", trained],
        ["described by", model.get("run") or "-"],
    ]
    return "<h3>Model</h3>" + _table(["", ""], lines)


def _stats_text(stats: Any) -> str:
    """One input fact over rows (meddx.data.summary): ``median [p05, p95] (n rows)`` or the counts per value."""
    if not isinstance(stats, dict) or not stats.get("n"):
        return "-"
    if isinstance(stats.get("counts"), dict):
        return ", ".join(f"{k}: {v}" for k, v in stats["counts"].items())
    return f"{stats['median']:.4g} [{stats['p05']:.4g}, {stats['p95']:.4g}] ({stats['n']} rows)"


def _inputs_html(metrics: dict[str, Any]) -> str:
    """The evaluated rows' per-modality inputs beside the training ones (``meddx evaluate --model-card``)."""
    inputs = metrics.get("inputs")
    if not isinstance(inputs, dict):
        return ""
    training: dict[str, Any] = inputs["training"] if isinstance(inputs.get("training"), dict) else {}
    batch: dict[str, Any] = inputs["batch"] if isinstance(inputs.get("batch"), dict) else {}
    rows = []
    for modality in dict.fromkeys([*training, *batch]):
        facts = {**(training.get(modality) or {}), **(batch.get(modality) or {})}
        for fact in facts:
            mine = _stats_text((training.get(modality) or {}).get(fact))
            theirs = _stats_text((batch.get(modality) or {}).get(fact))
            if mine != "-" or theirs != "-":
                rows.append([modality, fact, mine, theirs])
    of = html.escape(", ".join(inputs.get("training_of") or []))
    n = html.escape(str(inputs.get("batch_rows", "?")))
    note = "" if inputs.get("training") else _note("the model folder has no training_summary.json: no training side")
    return (
        "<h3>Inputs: training rows and these rows</h3>"
        f"<p>What the readers found in the model's training rows ({of}) and in the {n} rows evaluated here: "
        "median [5th, 95th percentile]. "
        "A difference says what changed (another scanner's spacing, another monitor's rate, another note template).</p>"
        + note
        + _table(["modality", "input", "training", "evaluated"], rows)
    )


def _shift_html(metrics: dict[str, Any]) -> str:
    """Out-of-distribution rows and the batch's shift per space (``metrics["shift"]``, meddx.evaluate.batch_shift)."""
    shift = metrics.get("shift")
    if not isinstance(shift, dict) or not shift:
        return ""
    rows = []
    for space, entry in shift.items():
        entry = entry if isinstance(entry, dict) else {}
        share = entry.get("flagged_share")
        p_value = entry.get("p_value")
        rows.append(
            [
                space,
                str(entry.get("rows", "-")),
                f"{share:.1%}" if isinstance(share, (int, float)) else "-",
                f"{entry['mmd']:.4g}" if isinstance(entry.get("mmd"), (int, float)) else "n/a",
                f"{p_value:.3g}" if isinstance(p_value, (int, float)) else "n/a",
            ]
        )
    return (
        "<h3>Out-of-distribution rows and batch shift</h3>"
        "<p>Per space (each modality's embedding, <code>summary</code> what the heads read, <code>fused</code> a row's "
        "worst), the share of these rows whose OOD score is over the threshold set on the validation rows "
        "(about the model's false-alarm rate, 5% by default, when nothing changed), and a two-sample test (MMD, "
        "permutation p-value) of these rows' embeddings against the training rows' (from meddx diagnose's "
        "run.json; n/a without it). A small p-value and a large share say this batch is unlike the training data.</p>"
        + _table(["space", "rows", "flagged", "MMD", "p-value"], rows)
    )


def write_report(out: Path, tasks: list[TaskRows], metrics: dict[str, Any]) -> tuple[Path, list[Path]]:
    """Write the PNG plots and ``report.html`` into ``out``; returns the report and the plots."""
    import matplotlib

    written: list[Path] = []
    sections = []
    n_bins = metrics["settings"]["n_bins"]
    for task in tasks:
        task_metrics = metrics["tasks"][task.name]
        s = slug(task.name)
        # Labels come from the data (task, class, subgroup names): never parse them as math or TeX.
        # Text artists read these settings when made and when drawn, so both happen inside.
        with matplotlib.rc_context({"text.usetex": False, "text.parse_math": False}):
            plots = {
                "roc": plot_roc(task, out / f"roc_{s}.png"),
                "reliability": plot_reliability(task, task_metrics, n_bins, out / f"reliability_{s}.png"),
                "subgroups": plot_subgroups(task, task_metrics, out / f"subgroups_{s}.png"),
                "ablation": plot_ablation(task, task_metrics, out / f"ablation_{s}.png"),
            }
        written += [p for p in plots.values() if p is not None]
        sections.append(_task_html(task, task_metrics, plots, n_bins))
    settings = metrics["settings"]
    summary_rows = [
        [
            name,
            t["kind"],
            str(t["overall"]["n"]),
            _class_counts_text(t["class_counts"]),
            fmt(t["overall"]["after_calibration"]["auroc"]),
            fmt(t["overall"]["after_calibration"]["ece"]),
            fmt((t["overall"]["conformal"] or {}).get("coverage")),
            fmt((t["overall"]["conformal"] or {}).get("mean_set_size"), 2),
            "small n: see the task" if any(w.startswith("Too few rows") for w in t.get("warnings", [])) else "",
        ]
        for name, t in metrics["tasks"].items()
    ]
    summary = (
        f"<p>Predictions: {html.escape(str(metrics.get('predictions', '')))}; manifest: "
        f"{html.escape(str(metrics.get('manifest', '')))}; meddx {html.escape(metrics['meddx_version'])}.</p>"
        f"<p>Intervals: {settings['confidence']:.0%} percentile bootstrap over {settings['n_resamples']} resamples "
        f"(seed {settings['seed']}); ECE with {n_bins} equal-width bins "
        "(binary: positive class; multiclass: top label).</p>"
        + _table(
            [
                "task",
                "kind",
                "n",
                "rows per class",
                "AUROC (calibrated)",
                "ECE (calibrated)",
                "coverage",
                "mean set size",
                "warning",
            ],
            summary_rows,
        )
        + _model_html(metrics)
        + _inputs_html(metrics)
        + _shift_html(metrics)
    )
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>meddx evaluation</title>'
        f"<style>{STYLE}</style></head><body><h1>meddx evaluation</h1>"
        f'<section id="summary"><h2>Summary</h2>{summary}</section>{"".join(sections)}</body></html>\n'
    )
    report = out / REPORT_FILE
    report.write_text(document, encoding="utf-8")
    return report, written
