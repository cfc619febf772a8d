"""The closing summary of ``meddx demo``: what was trained on how many rows, and what its figures mean.

The demo's figures come from a model trained from scratch on a synthetic cohort, so a reader
must be able to tell from the summary alone whether a figure shows learning or noise: it names
the rows each step used, gives the test AUROC with its bootstrap interval, and says how the
figure compares with chance and with the best any model can do on this generator.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["BEST_POSSIBLE_AUROC", "demo_summary"]

# The test AUROC of the exact posterior on cohorts from meddx.synth, by simulation
# (benchmarks/bench_finetune.py, bayes_ceiling): no model can expect more.
BEST_POSSIBLE_AUROC = 0.92


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(figure: dict[str, Any]) -> str:
    low, high = figure.get("low"), figure.get("high")
    if low is None or high is None:
        return "no interval"
    return f"95% bootstrap interval {_number(low)}-{_number(high)}"


def _trained(results: dict[str, Any]) -> list[str]:
    sample = next((r for k, r in results.items() if k.endswith("-sample-data")), None)
    model = next((r for k, r in results.items() if k.endswith("-finetune")), None)
    if model is None:
        return []
    info = model.training_info
    rows = info["rows"]
    config = model.backbone.config
    cohort = f" of the synthetic cohort in {sample.parent}" if sample is not None else ""
    how = {
        "full": "a new backbone, trained from scratch end to end",
        "lora": "LoRA adapters on the backbone",
        "head": "diagnostic heads on a frozen backbone",
    }[info["mode"]]
    return [
        f"trained: {how} (d_model {config.d_model}, {config.n_layers} fusion layers), on the "
        f"{rows['train']} labelled training rows{cohort}, {info['epochs_run']} epochs (best {info['best_epoch']}, "
        f"validation AUROC {_number(model.metrics['validation']['mean_auroc'])}); calibrated on "
        f"{rows['val']} validation rows; tested on the test split, which it never saw."
    ]


def _tested(name: str, task: dict[str, Any]) -> list[str]:
    after = task["overall"]["after_calibration"]
    conformal = task["overall"].get("conformal") or {}
    coverage = conformal.get("coverage", {})
    set_size = conformal.get("mean_set_size", {})
    auroc = after["auroc"]
    lines = [
        f"test split, {name}: AUROC {_number(auroc['value'])} ({_interval(auroc)}), n {task['overall']['n']} rows; "
        f"ECE {_number(after['ece']['value'])}; conformal coverage {_number(coverage.get('value'))}, "
        f"mean set size {_number(set_size.get('value'), 2)}"
    ]
    value, low = auroc.get("value"), auroc.get("low")
    if value is None:
        return lines
    verdict = (
        "the interval lies above 0.5: the model learned to rank these patients"
        if low is not None and low > 0.5
        else "the interval includes 0.5: on these rows the model cannot be told apart from chance"
    )
    lines.append(
        f"  what it means: AUROC is the chance that a patient with {name} gets a higher probability than "
        f"one without (0.5: a coin, 1: perfect; about {BEST_POSSIBLE_AUROC} is the best any model can do on "
        f"this generator, docs/training.md); {verdict}. It grows with labelled training rows: a few "
        f"dozen (meddx demo --patients 60) give 0.5 to 0.7, which a dozen test rows cannot tell from "
        f"chance; 360 (the default demo) about 0.83; 1800 about 0.89 (docs/training.md). A conformal "
        f"set holds the true label for about 90% of patients; '0|1' (size 2) means the model cannot "
        f"tell for that patient."
    )
    return lines


def demo_summary(results: dict[str, Any], seconds: float) -> str:
    """The lines ``meddx demo`` prints after the diagnose summary, ending with the demo's time.

    Args:
        results: :func:`meddx.pipelines.run_pipeline`'s, for the demo pipeline.
        seconds: wall-clock seconds from the start of the demo.

    Example:
        >>> print(demo_summary(results, 151.2))  # doctest: +SKIP
        trained: a new backbone, trained from scratch end to end (d_model 64, 2 fusion layers), ...
    """
    lines = _trained(results)
    evaluation = next(r for k, r in results.items() if k.endswith("-evaluate"))
    for name, task in json.loads(evaluation.metrics_path.read_text())["tasks"].items():
        lines += _tested(name, task)
    lines.append(f"report: {evaluation.report_path}")
    lines.append(f"demo time: {seconds:.0f} s (wall clock, generating the cohort to this summary)")
    return "\n".join(lines)
