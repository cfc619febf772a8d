"""Temperature scaling, isotonic calibration and Mondrian split-conformal sets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meddx.calibration import (
    ConformalClassifier,
    IsotonicCalibrator,
    TemperatureScaler,
    availability_groups,
    calibrator_from_dict,
    conformal_threshold,
)
from meddx.errors import ConfigError, NotFittedError


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _overconfident(rng: np.random.Generator, n: int, temperature: float, n_classes: int = 2):
    """Labels drawn from true logits; the model reports true logits times `temperature`."""
    if n_classes == 2:
        true = rng.normal(0.0, 2.0, n)
        labels = (rng.random(n) < 1 / (1 + np.exp(-true))).astype(int)
    else:
        true = rng.normal(0.0, 2.0, (n, n_classes))
        cumulative = _softmax(true).cumsum(axis=1)
        labels = (rng.random((n, 1)) > cumulative).sum(axis=1)
    return true * temperature, labels


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(n_classes: int, true_temperature: float) -> None:
    logits, labels = _overconfident(np.random.default_rng(1), 20000, true_temperature, n_classes)
    scaler = TemperatureScaler().fit(logits, labels)
    assert scaler.temperature_ == pytest.approx(true_temperature, rel=0.06)
    assert scaler.nll_after_ < scaler.nll_before_
    assert scaler.n_fitted_ == 20000
    probabilities = scaler.transform(logits)
    expected_shape = (20000,) if n_classes == 2 else (20000, n_classes)
    assert probabilities.shape == expected_shape
    if n_classes > 2:
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_temperature_scaling_keeps_the_ranking() -> None:
    logits, labels = _overconfident(np.random.default_rng(2), 500, 3.0)
    probabilities = TemperatureScaler().fit(logits, labels).transform(logits)
    assert np.array_equal(np.argsort(probabilities, kind="stable"), np.argsort(logits, kind="stable"))


def test_isotonic_matches_scikit_learn_and_calibrates() -> None:
    from sklearn.isotonic import IsotonicRegression

    logits, labels = _overconfident(np.random.default_rng(3), 4000, 3.0)
    calibrator = IsotonicCalibrator().fit(logits, labels)
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(1 / (1 + np.exp(-logits)), labels)
    test_logits = np.random.default_rng(4).normal(0, 8, 300)
    np.testing.assert_allclose(
        calibrator.transform(test_logits), reference.predict(1 / (1 + np.exp(-test_logits))), atol=1e-12
    )


def test_isotonic_multiclass_rows_sum_to_one() -> None:
    logits, labels = _overconfident(np.random.default_rng(5), 3000, 2.0, n_classes=3)
    probabilities = IsotonicCalibrator().fit(logits, labels).transform(logits[:100])
    assert probabilities.shape == (100, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_calibrators_round_trip_through_json() -> None:
    logits, labels = _overconfident(np.random.default_rng(6), 800, 2.0, n_classes=3)
    for calibrator in (TemperatureScaler().fit(logits, labels), IsotonicCalibrator().fit(logits, labels)):
        saved = json.loads(json.dumps(calibrator.to_dict()))
        assert saved["n_fitted"] == 800
        restored = calibrator_from_dict(saved)
        np.testing.assert_array_equal(restored.transform(logits), calibrator.transform(logits))


def test_calibrators_refuse_bad_input_and_use_before_fit() -> None:
    with pytest.raises(NotFittedError, match="fit"):
        TemperatureScaler().transform(np.zeros(3))
    with pytest.raises(ConfigError, match="labels must lie in 0..1"):
        TemperatureScaler().fit(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="NaN"):
        IsotonicCalibrator().fit(np.zeros(3), np.array([0, 1, np.nan]))
    with pytest.raises(ConfigError, match="format"):
        calibrator_from_dict({"type": "temperature", "format": 99})


# --------------------------------------------------------------------------- conformal


def test_availability_groups_from_masks_counts_mappings_and_functions() -> None:
    mask = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0]], bool)
    assert availability_groups(mask).tolist() == [
        "all present",
        "one missing",
        "two or more missing",
        "two or more missing",
    ]
    assert availability_groups(np.array([0, 1, 2, 3])).tolist() == availability_groups(mask).tolist()
    assert availability_groups(np.array([0, 1, 4]), {0: "full", 1: "partial"}).tolist() == [
        "full",
        "partial",
        "partial",
    ]
    assert availability_groups(mask, lambda m: np.where(m[:, 0], "imaging", "no imaging")).tolist() == [
        "imaging",
        "imaging",
        "no imaging",
        "no imaging",
    ]
    assert availability_groups(np.array(["a", "b"])).tolist() == ["a", "b"]
    with pytest.raises(ConfigError, match="key 0"):
        availability_groups(np.array([1]), {1: "x"})


def test_conformal_threshold_is_the_finite_sample_quantile() -> None:
    scores = np.arange(1, 20) / 20  # n = 19: rank ceil(20 * 0.9) = 18
    assert conformal_threshold(scores, 0.1) == pytest.approx(18 / 20)
    assert conformal_threshold(scores[:5], 0.1) == np.inf  # rank 6 > 5 rows: every class is in the set


def _grouped_rows(rng: np.random.Generator, n: int, n_classes: int = 3):
    """Rows whose model is sharper the more modalities it has: noise grows with the number missing."""
    n_missing = rng.choice([0, 1, 2, 3], size=n, p=[0.4, 0.3, 0.2, 0.1])
    true = rng.normal(0.0, 2.0, (n, n_classes))
    probabilities = _softmax(true)
    cumulative = probabilities.cumsum(axis=1)
    labels = (rng.random((n, 1)) > cumulative).sum(axis=1)
    noise = rng.normal(0.0, 1.0, (n, n_classes)) * (0.3 + 1.2 * n_missing)[:, None]
    reported = _softmax(true * 1.5 + noise)  # overconfident and worse with missing modalities
    return reported, labels, n_missing


def test_conformal_sets_reach_coverage_overall_and_per_group() -> None:
    rng = np.random.default_rng(7)
    mondrian_coverage: dict[str, list[float]] = {}
    pooled_coverage: dict[str, list[float]] = {}
    for _ in range(20):  # average over calibration draws: the guarantee is marginal over them
        probs, labels, missing = _grouped_rows(rng, 1500)
        val, test = slice(0, 1000), slice(1000, None)
        mondrian = ConformalClassifier(alpha=0.1).fit(probs[val], labels[val], availability=missing[val])
        pooled = ConformalClassifier(alpha=0.1).fit(probs[val], labels[val])
        groups = availability_groups(missing[test])
        for name, conformal, store in (("m", mondrian, mondrian_coverage), ("p", pooled, pooled_coverage)):
            sets = conformal.predict_set(probs[test], availability=missing[test] if name == "m" else None)
            covered = sets[np.arange(len(sets)), labels[test]]
            store.setdefault("overall", []).append(covered.mean())
            for group in np.unique(groups):
                store.setdefault(group, []).append(covered[groups == group].mean())
    for group, values in mondrian_coverage.items():
        assert 0.895 <= np.mean(values) <= 0.94, (group, np.mean(values))
    # Without Mondrian thresholds the rows missing most modalities fall short of 1 - alpha.
    assert np.mean(pooled_coverage["two or more missing"]) < 0.88
    assert np.mean(pooled_coverage["all present"]) > 0.92


@pytest.mark.parametrize("n_classes", [2, 4])
def test_conformal_sets_agree_with_crepes(n_classes: int) -> None:
    from crepes import ConformalClassifier as CrepesClassifier
    from crepes.extras import hinge

    rng = np.random.default_rng(8)
    # Group sizes where alpha * (n + 1) is not an integer: there crepes' "p >= alpha" and the
    # quantile rule "score <= q" give the same sets (they differ only at that exact tie).
    sizes = {0: 301, 1: 207, 2: 150}
    missing = np.concatenate([np.full(size, k) for k, size in sizes.items()])
    probs, labels, _ = _grouped_rows(rng, len(missing), n_classes)
    if n_classes == 2:
        probs = probs[:, 1]  # the binary form: positive-class probability
    test_probs, _, test_missing = _grouped_rows(rng, 2000, n_classes)
    test_missing = np.minimum(test_missing, 2)
    if n_classes == 2:
        test_probs = test_probs[:, 1]
    ours = ConformalClassifier(alpha=0.1, min_group_size=1).fit(probs, labels, availability=missing)
    matrix = np.stack([1 - probs, probs], 1) if n_classes == 2 else probs
    test_matrix = np.stack([1 - test_probs, test_probs], 1) if n_classes == 2 else test_probs
    classes = np.arange(n_classes)
    reference = CrepesClassifier().fit(hinge(matrix, classes, labels), bins=missing)
    expected = reference.predict_set(hinge(test_matrix), bins=test_missing, confidence=0.9, smoothing=False)
    got = ours.predict_set(test_probs, availability=test_missing)
    np.testing.assert_array_equal(got, expected.astype(bool))
    pooled = CrepesClassifier().fit(hinge(matrix, classes, labels))
    np.testing.assert_array_equal(
        ConformalClassifier(alpha=0.1).fit(probs, labels).predict_set(test_probs),
        pooled.predict_set(hinge(test_matrix), confidence=0.9, smoothing=False).astype(bool),
    )


def test_small_and_unseen_groups_fall_back_to_the_pooled_threshold() -> None:
    probs, labels, missing = _grouped_rows(np.random.default_rng(9), 600)
    conformal = ConformalClassifier(alpha=0.1, min_group_size=200).fit(probs, labels, availability=missing)
    assert conformal.group_pooled_ == {"all present": False, "one missing": True, "two or more missing": True}
    for name, size in conformal.group_sizes_.items():
        assert (size < 200) is conformal.group_pooled_[name]
        if conformal.group_pooled_[name]:
            assert conformal.group_thresholds_[name] == conformal.threshold_
        else:
            assert conformal.group_thresholds_[name] != conformal.threshold_
    assert conformal.thresholds_for(np.array(["never seen"])).tolist() == [conformal.threshold_]


def test_conformal_round_trips_through_json_with_counts() -> None:
    probs, labels, missing = _grouped_rows(np.random.default_rng(10), 400)
    conformal = ConformalClassifier(alpha=0.2, min_group_size=30).fit(probs, labels, availability=missing)
    saved = json.loads(json.dumps(conformal.to_dict()))
    assert saved["n_fitted"] == 400
    assert saved["alpha"] == 0.2
    assert sum(g["n_fitted"] for g in saved["groups"].values()) == 400
    restored = ConformalClassifier.from_dict(saved)
    np.testing.assert_array_equal(
        restored.predict_set(probs, availability=missing), conformal.predict_set(probs, availability=missing)
    )
    tiny = ConformalClassifier(alpha=0.1).fit(probs[:5], labels[:5])
    saved = json.loads(json.dumps(tiny.to_dict()))
    assert saved["threshold"] is None  # too few rows: every class in every set
    assert ConformalClassifier.from_dict(saved).predict_set(probs[:3]).all()


def test_conformal_refuses_bad_alpha_and_mismatched_rows() -> None:
    probs, labels, missing = _grouped_rows(np.random.default_rng(11), 50)
    with pytest.raises(ConfigError, match="alpha"):
        ConformalClassifier(alpha=1.5).fit(probs, labels)
    with pytest.raises(ConfigError, match="rows"):
        ConformalClassifier().fit(probs, labels, availability=missing[:10])
    with pytest.raises(NotFittedError):
        ConformalClassifier().predict_set(probs)


def test_calibration_file_round_trip_and_refusals(tmp_path) -> None:
    from meddx.calibration import TaskCalibration, load_calibration, save_calibration
    from meddx.errors import ModelError

    logits, labels = _overconfident(np.random.default_rng(12), 500, 2.0)
    scaler = TemperatureScaler().fit(logits, labels)
    missing = np.random.default_rng(13).integers(0, 3, 500)
    conformal = ConformalClassifier(alpha=0.1, min_group_size=100).fit(scaler.transform(logits), labels, missing)
    path = save_calibration(tmp_path, {"disease": TaskCalibration(("0", "1"), scaler, conformal)})
    assert path.name == "calibration.json"
    loaded = load_calibration(tmp_path)["disease"]
    assert loaded.classes == ("0", "1")
    assert loaded.calibrator.n_fitted_ == 500
    np.testing.assert_array_equal(
        loaded.conformal.predict_set(loaded.calibrator.transform(logits), missing),
        conformal.predict_set(scaler.transform(logits), missing),
    )
    path.write_text(json.dumps({"format": 7, "tasks": {}}))
    with pytest.raises(ModelError, match="format 7"):
        load_calibration(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        load_calibration(tmp_path / "nowhere")
