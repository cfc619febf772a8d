"""The interacting cohort (``generate_cohort(..., interactions=True)``) and its Bayes ceiling.

The option must change only what it says: the same patients, labels, splits and missing cells,
byte-identical files where no context applies; each interaction must show in the files as
meddx's readers return them; the ceiling must be deterministic and above what a posterior
that ignores the context can do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from meddx.ingest.audio import AudioIngestor
from meddx.ingest.base import IngestRequest
from meddx.ingest.device_logs import DeviceLogIngestor
from meddx.ingest.fhir import FhirIngestor
from meddx.ingest.notes import NotesIngestor
from meddx.records import Modality, parse_time
from meddx.synth import (
    INTERACTIONS,
    LABEL_NOISE,
    LABEL_THRESHOLD,
    MISSING_RATE,
    OLD_AGE,
    VIEW_NOISE,
    bayes_ceiling,
    cohort_truth,
    generate_cohort,
)
from meddx.synth.interactions import posterior_scores, simulate

COPD, HEART_FAILURE, METOPROLOL = "13645005", "84114007", "866924"
SYMPTOMS = ("productive cough", "fever", "shortness of breath", "pleuritic chest pain", "chills", "fatigue")


def _digest(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files if f.is_file())).hexdigest()


def _context(ehr: Path) -> dict[str, bool]:
    text = ehr.read_text(encoding="utf-8")
    return {"copd": COPD in text, "heart_failure": HEART_FAILURE in text, "beta_blocker": METOPROLOL in text}


def test_interactions_keep_the_additive_draws_and_change_only_what_context_moves(tmp_path: Path) -> None:
    plain = pd.read_csv(generate_cohort(tmp_path / "a", n_patients=14, seed=5), dtype=str, keep_default_na=False)
    manifest = generate_cohort(tmp_path / "b", n_patients=14, seed=5, interactions=True)
    mixed = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(plain, mixed)  # patients, labels, splits, missing cells, ages
    # without its context a file is byte-identical; with it, it was drawn from another view
    # (a Poisson crackle count can still come out the same, so only "some differ" is required)
    seen = {"copd": 0, "heart_failure": 0, "no copd": 0, "no heart failure": 0}
    for _, row in mixed.iterrows():
        a, b = tmp_path / "a", tmp_path / "b"
        if row.video:
            assert _digest(a / row.video) == _digest(b / row.video)
        if not row.ehr:
            continue
        context = _context(b / row.ehr)
        if row.audio:  # COPD moves the lung sound only
            same = _digest(a / row.audio) == _digest(b / row.audio)
            assert same or context["copd"], row.patient_id
            seen["copd" if context["copd"] else "no copd"] += not same if context["copd"] else 1
        if row.imaging:  # heart failure moves the CT
            same = _digest(a / row.imaging) == _digest(b / row.imaging)
            assert same or context["heart_failure"], row.patient_id
            seen["heart_failure" if context["heart_failure"] else "no heart failure"] += (
                not same if context["heart_failure"] else 1
            )
        if row.notes:  # the note gains its history line; its findings change only for the old
            lines = (b / row.notes).read_text(encoding="utf-8").splitlines()
            history = [j for j, line in enumerate(lines) if line.startswith("Past medical history: ")]
            assert len(history) == 1
            stated = lines[history[0]]
            assert ("COPD on tiotropium" in stated) == context["copd"]
            assert ("metoprolol" in stated) == context["beta_blocker"]
            if int(row.age) < OLD_AGE:
                del lines[history[0] - 1 : history[0] + 1]
                assert lines == (a / row.notes).read_text(encoding="utf-8").splitlines()
    assert min(seen.values()) >= 1, seen  # both sides of both contexts were seen


@pytest.fixture(scope="module")
def read_back(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """One row per patient of an interacting cohort, every value read by meddx's readers."""
    root = tmp_path_factory.mktemp("interacting")
    manifest = pd.read_csv(
        generate_cohort(root, n_patients=110, seed=3, interactions=True), dtype=str, keep_default_na=False
    )
    readers = {
        Modality.EHR: FhirIngestor(),
        Modality.NOTES: NotesIngestor(),
        Modality.AUDIO: AudioIngestor(),
        Modality.DEVICE_LOGS: DeviceLogIngestor(),
    }
    rows = []
    for _, row in manifest.iterrows():
        paths = {m: root / row[str(m)] for m in readers if row[str(m)]}
        if Modality.EHR not in paths:
            continue
        request = IngestRequest(row.patient_id, parse_time(row.index_time), paths)
        ehr = readers[Modality.EHR].read(request)
        assert ehr is not None
        codes = " ".join(event.code for event in ehr.events)
        out = {
            "label": int(row["label:disease"]),
            "old": int(row.age) >= OLD_AGE,
            "copd": COPD in codes,
            "heart_failure": HEART_FAILURE in codes,
            "beta_blocker": METOPROLOL in codes,
        }
        if Modality.AUDIO in paths:  # crackles: broadband bursts above the breath sound's band
            mel = readers[Modality.AUDIO].read(request).arrays["log_mel"]
            half = mel.shape[0] // 2
            out["crackles"] = float(mel[half:].mean() - mel[:half].mean())
        if Modality.DEVICE_LOGS in paths:
            monitor = readers[Modality.DEVICE_LOGS].read(request)
            channels = monitor.meta["channels"]
            for name in ("heart_rate", "spo2"):
                j = channels.index(name)
                out[name] = float(monitor.arrays["values"][j][monitor.arrays["mask"][j]].mean())
        if Modality.NOTES in paths:
            text = " ".join(e.text or "" for e in readers[Modality.NOTES].read(request).events if e.code != "fhir")
            out["symptoms"] = sum(f"{s}." in text or f"{s}," in text for s in SYMPTOMS)
        rows.append(out)
    return pd.DataFrame(rows)


def _auroc(frame: pd.DataFrame, column: str) -> float:
    frame = frame[frame[column].notna()]
    return float(roc_auc_score(frame["label"], frame[column]))


@pytest.mark.slow  # the shared fixture generates and reads 110 patients (~15-30 s)
def test_copd_in_the_ehr_reverses_what_the_lung_sound_says(read_back: pd.DataFrame) -> None:
    with_copd = _auroc(read_back[read_back.copd], "crackles")
    without = _auroc(read_back[~read_back.copd], "crackles")
    # the same sound feature points one way without COPD and the other way with it
    assert (with_copd - 0.5) * (without - 0.5) < 0, (with_copd, without)
    assert abs(with_copd - without) > 0.25, (with_copd, without)


@pytest.mark.slow  # the shared fixture generates and reads 110 patients (~15-30 s)
def test_a_beta_blocker_in_the_ehr_blunts_the_monitor_heart_rate(read_back: pd.DataFrame) -> None:
    blocked, free = read_back[read_back.beta_blocker], read_back[~read_back.beta_blocker]
    assert blocked.heart_rate.mean() < free.heart_rate.mean() - 8
    assert _auroc(free, "heart_rate") > 0.65  # without the drug the heart rate rises with the illness


@pytest.mark.slow  # the shared fixture generates and reads 110 patients (~15-30 s)
def test_heart_failure_lowers_spo2_whatever_the_infection(read_back: pd.DataFrame) -> None:
    healthy = read_back[read_back.label == 0]
    failing = healthy[healthy.heart_failure].spo2.mean()
    assert failing < healthy[~healthy.heart_failure].spo2.mean() - 0.5


@pytest.mark.slow  # the shared fixture generates and reads 110 patients (~15-30 s)
def test_old_patients_notes_state_fewer_symptoms_at_the_same_label(read_back: pd.DataFrame) -> None:
    sick = read_back[(read_back.label == 1) & read_back.symptoms.notna()]
    assert sick[sick.old].symptoms.mean() < sick[~sick.old].symptoms.mean() - 0.5


def _closed_form_additive_ceiling(n: int, seed: int) -> float:
    """The additive model's posterior is Gaussian: the formula benchmarks/bench_finetune.py used."""
    rng = np.random.default_rng(seed)
    severity = rng.normal(size=n)
    label = severity + LABEL_NOISE * rng.normal(size=n) > LABEL_THRESHOLD
    precision, weighted = np.ones(n), np.zeros(n)
    for noise in VIEW_NOISE.values():
        present = rng.random(n) > MISSING_RATE
        view = severity + noise * rng.normal(size=n)
        precision += present / noise**2
        weighted += present * view / noise**2
    posterior = norm.sf((LABEL_THRESHOLD - weighted / precision) / np.sqrt(1 / precision + LABEL_NOISE**2))
    return float(roc_auc_score(label, posterior))


def test_bayes_ceiling_is_deterministic_and_sensible() -> None:
    additive = bayes_ceiling(20_000, seed=1, interactions=False)
    assert additive == bayes_ceiling(20_000, seed=1, interactions=False)
    # the grid posterior agrees with the Gaussian closed form of the additive model
    assert abs(additive - _closed_form_additive_ceiling(20_000, seed=2)) < 0.008
    exact = bayes_ceiling(20_000, seed=1)
    assert exact == bayes_ceiling(20_000, seed=1)
    ignoring_context = bayes_ceiling(20_000, seed=1, posterior="additive")
    assert 0.5 < ignoring_context < exact - 0.02 < 0.98
    assert bayes_ceiling(20_000, seed=1, interactions=False, posterior="additive") == additive
    with pytest.raises(ValueError, match="posterior"):
        bayes_ceiling(1000, posterior="late")


def test_cohort_truth_is_what_the_generator_wrote(tmp_path: Path) -> None:
    manifest = pd.read_csv(
        generate_cohort(tmp_path, n_patients=12, seed=5, interactions=True), dtype=str, keep_default_na=False
    )
    truth = pd.DataFrame(cohort_truth(12, seed=5, interactions=True))
    assert list(truth.patient_id) == list(manifest.patient_id)
    assert list(truth.label.astype(str)) == list(manifest["label:disease"])
    assert list(truth["context:old"]) == [int(age) >= OLD_AGE for age in manifest.age]
    for _, row in manifest[manifest.ehr != ""].iterrows():  # the drawn context is the one the EHR states
        stated = _context(tmp_path / row.ehr)
        held = truth.set_index("patient_id").loc[row.patient_id]
        assert stated["copd"] == held["context:copd"]
        assert stated["heart_failure"] == held["context:heart_failure"]
    plain = pd.DataFrame(cohort_truth(12, seed=5))
    assert "view:heart_rate" not in plain
    assert not any(c.startswith("context:") for c in plain)
    np.testing.assert_array_equal(plain.severity, truth.severity)  # the same patients either way


def test_reader_noise_lowers_the_ceiling_and_is_checked() -> None:
    error_free = bayes_ceiling(20_000, seed=2)
    assert bayes_ceiling(20_000, seed=2, reader_noise={"imaging": 0.0}) == error_free
    noisy = bayes_ceiling(20_000, seed=2, reader_noise={"imaging": 2.0, "audio": 2.0})
    noisier = bayes_ceiling(20_000, seed=2, reader_noise={"imaging": 4.0, "audio": 4.0, "heart_rate": 2.0})
    assert noisier < noisy < error_free - 0.005
    sim = simulate(20_000, seed=2, reader_noise={"video": 1.0})
    plain = simulate(20_000, seed=2)
    np.testing.assert_array_equal(sim.views["audio"], plain.views["audio"])  # other views untouched
    extra = sim.views["video"] - plain.views["video"]
    assert abs(float(extra.std()) - 1.0) < 0.05
    with pytest.raises(ValueError, match="xray"):
        bayes_ceiling(1000, reader_noise={"xray": 1.0})
    with pytest.raises(ValueError, match="finite"):
        simulate(1000, reader_noise={"audio": float("nan")})


def test_posterior_scores_are_probabilities_that_rank_as_the_ceiling_says() -> None:
    sim = simulate(20_000, seed=6)
    scores = posterior_scores(sim)
    assert scores.shape == (20_000,)
    assert float(scores.min()) >= 0.0
    assert float(scores.max()) <= 1.0
    assert roc_auc_score(sim.label, scores) == pytest.approx(bayes_ceiling(20_000, seed=6))
    # calibrated: the mean posterior is the prevalence
    assert abs(float(scores.mean()) - float(sim.label.mean())) < 0.01
    with pytest.raises(ValueError, match="posterior"):
        posterior_scores(sim, posterior="late")


def test_simulate_follows_the_interaction_equations() -> None:
    sim = simulate(20_000, seed=4)
    for rule in INTERACTIONS:
        held = sim.context[rule.context]
        view = sim.views[rule.modality][held]
        # with no gain the view says nothing of the label; with a negative gain it points the other way
        auc = roc_auc_score(sim.label[held], view)
        if rule.gain == 0:
            assert abs(auc - 0.5) < 0.03, rule
        elif rule.gain < 0:
            assert auc < 0.35, rule
        assert abs(float(view.mean()) - rule.offset) < 0.15, rule
        assert roc_auc_score(sim.label[~held], sim.views[rule.modality][~held]) > 0.7, rule
    assert not simulate(200, interactions=False).context
    np.testing.assert_array_equal(simulate(500, seed=4).views["audio"], simulate(500, seed=4).views["audio"])


def test_every_interaction_names_a_drawn_or_derived_context() -> None:
    assert {rule.context for rule in INTERACTIONS} == {"heart_failure", "copd", "beta_blocker", "old"}
    assert all(rule.noise > 0 for rule in INTERACTIONS)
