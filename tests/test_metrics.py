"""Metrics agree with scikit-learn and torchmetrics; bootstrap intervals behave."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meddx.metrics import (
    MetricSettings,
    auprc,
    auroc,
    bootstrap,
    brier,
    coverage,
    ece,
    grouped_tables,
    mean_set_size,
    metric_table,
    reliability_curve,
)


def _binary(rng: np.random.Generator, n: int, rounded: bool = False):
    probabilities = rng.random(n)
    if rounded:  # many ties, as a coarse model gives
        probabilities = np.round(probabilities, 1)
    labels = (rng.random(n) < probabilities**1.5).astype(int)
    return labels, probabilities


def _multiclass(rng: np.random.Generator, n: int, n_classes: int = 4):
    logits = rng.normal(0, 2, (n, n_classes))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.asarray([rng.choice(n_classes, p=p) for p in probabilities])
    return labels, probabilities


@pytest.mark.parametrize("rounded", [False, True])
def test_binary_auroc_and_auprc_equal_scikit_learn(rounded: bool) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels, probabilities = _binary(np.random.default_rng(0), 700, rounded)
    assert auroc(labels, probabilities) == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-12)
    assert auprc(labels, probabilities) == pytest.approx(average_precision_score(labels, probabilities), abs=1e-12)


def test_multiclass_auroc_and_auprc_equal_scikit_learn_macro_one_vs_rest() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.preprocessing import label_binarize

    labels, probabilities = _multiclass(np.random.default_rng(1), 600)
    expected_auroc = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    expected_auprc = average_precision_score(label_binarize(labels, classes=range(4)), probabilities, average="macro")
    assert auroc(labels, probabilities) == pytest.approx(expected_auroc, abs=1e-12)
    assert auprc(labels, probabilities) == pytest.approx(expected_auprc, abs=1e-12)


def test_brier_equals_scikit_learn_for_binary_and_sums_classes_for_multiclass() -> None:
    from sklearn.metrics import brier_score_loss

    labels, probabilities = _binary(np.random.default_rng(2), 300)
    assert brier(labels, probabilities) == pytest.approx(brier_score_loss(labels, probabilities), abs=1e-12)
    # A binary task written as two classes: the multiclass Brier sums both, so it is twice as large.
    two_class = np.stack([1 - probabilities, probabilities], axis=1)
    assert brier(labels, two_class) == pytest.approx(2 * brier(labels, probabilities))


def test_ece_agrees_with_torchmetrics() -> None:
    import torch
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    rng = np.random.default_rng(3)
    labels, probabilities = _binary(rng, 2000)
    expected = binary_calibration_error(torch.tensor(probabilities), torch.tensor(labels), n_bins=10, norm="l1")
    assert ece(labels, probabilities) == pytest.approx(float(expected), abs=1e-6)
    labels, probabilities = _multiclass(rng, 2000)
    expected = multiclass_calibration_error(
        torch.tensor(probabilities), torch.tensor(labels), num_classes=4, n_bins=15, norm="l1"
    )
    assert ece(labels, probabilities, n_bins=15) == pytest.approx(float(expected), abs=1e-6)


def test_ece_is_small_for_calibrated_and_large_for_overconfident_probabilities() -> None:
    rng = np.random.default_rng(4)
    probabilities = rng.random(20000)
    labels = (rng.random(20000) < probabilities).astype(int)
    assert ece(labels, probabilities) < 0.015
    overconfident = np.clip((probabilities - 0.5) * 3 + 0.5, 0, 1)
    assert ece(labels, overconfident) > 0.1
    curve = reliability_curve(labels, probabilities)
    assert curve.count.sum() == 20000
    assert len(curve.confidence) == 10
    np.testing.assert_allclose(curve.frequency, curve.confidence, atol=0.03)


def test_coverage_and_set_size() -> None:
    sets = np.array([[True, False], [True, True], [False, False], [False, True]])
    labels = np.array([0, 1, 0, 0])
    assert coverage(labels, sets) == 0.5
    assert mean_set_size(sets) == 1.0


def test_bootstrap_interval_is_seeded_and_brackets_the_value() -> None:
    labels, probabilities = _binary(np.random.default_rng(5), 400)

    def statistic(rows: np.ndarray) -> float:
        return auroc(labels[rows], probabilities[rows])

    first = bootstrap(statistic, 400, n_resamples=300, seed=1)
    assert first == bootstrap(statistic, 400, n_resamples=300, seed=1)
    assert first.low < first.value < first.high
    assert first.n_resamples == 300
    assert bootstrap(statistic, 400, n_resamples=300, seed=2) != first
    wider = bootstrap(statistic, 400, n_resamples=300, confidence=0.99, seed=1)
    assert wider.low < first.low
    assert wider.high > first.high


def test_bootstrap_leaves_out_resamples_with_one_class() -> None:
    labels = np.zeros(40, int)
    labels[:2] = 1  # two positives: many resamples hold none
    probabilities = np.linspace(0, 1, 40)
    estimate = bootstrap(lambda rows: auroc(labels[rows], probabilities[rows]), 40, n_resamples=400, seed=0)
    assert estimate.value is not None
    assert 0 < estimate.n_resamples < 400
    undefined = bootstrap(lambda rows: auroc(np.zeros(len(rows), int), probabilities[rows]), 40, n_resamples=50)
    assert undefined.value is None
    assert undefined.low is None
    assert undefined.high is None
    assert math.isnan(auroc(np.zeros(5, int), np.linspace(0, 1, 5)))


def test_metric_table_and_groups() -> None:
    rng = np.random.default_rng(6)
    labels, probabilities = _binary(rng, 300)
    raw = probabilities**0.5  # monotone: same ranking, other calibration
    sets = np.stack([probabilities < 0.9, probabilities > 0.1], axis=1)
    settings = MetricSettings(n_resamples=50)
    table = metric_table(labels, probabilities, raw, sets, settings)
    assert table["n"] == 300
    assert set(table["after_calibration"]) == {"auroc", "auprc", "brier", "ece"}
    assert table["after_calibration"]["auroc"]["value"] == pytest.approx(table["before_calibration"]["auroc"]["value"])
    assert table["conformal"]["coverage"]["value"] == pytest.approx(coverage(labels, sets))
    assert metric_table(labels, probabilities, settings=settings)["conformal"] is None
    groups = np.where(rng.random(300) < 0.5, "F", "M").astype(object)
    groups[:3] = None
    tables = grouped_tables(groups, labels, probabilities, raw, sets, settings)
    assert set(tables) == {"F", "M", "(missing)"}
    assert sum(t["n"] for t in tables.values()) == 300
