"""The interacting cohort: clinical context in one modality changes what another modality's evidence means.

``generate_cohort(..., interactions=True)`` keeps the additive model of :mod:`meddx.synth`
(hidden severity ``s ~ N(0, 1)``, label ``1{s + 0.3 e > 0.265}``, one view per modality
``v_m = s + VIEW_NOISE[m] * e_m``) and adds four pieces of context, each written where a
clinician finds it, that change how another modality's view relates to the severity. A view
under a context is ``v_m = offset + gain * s + noise * e`` (:class:`Interaction`), in place of
the additive view; the writers render it unchanged (crackle rate, lesion radius, spo2 ...):

1. **Heart failure** (prevalence 0.25; EHR: Condition SNOMED 84114007 and furosemide; the note's
   history line): pulmonary oedema gives opacities, hypoxia and tachypnoea whatever the
   infection, so the CT (``v_imaging = 1.5 + 0.8 e``) and the monitor's spo2/resp_rate
   (``v_device_logs = 1.5 + 0.8 e``) are raised and say nothing about the severity.
2. **COPD** (prevalence 0.3; EHR: Condition 13645005 and tiotropium; the note's history line):
   crackles and wheeze are chronic, and a severe infection quietens the chest (less air
   entry, a "silent chest"), so the lung sound's meaning reverses:
   ``v_audio = 0.5 - 1.0 s + 0.6 e``.
3. **A beta-blocker** (prevalence 0.3; EHR: MedicationRequest metoprolol; the note's history
   line): the heart rate no longer rises with the illness. In this cohort the heart rate has
   its own view, shared by the monitor's heart_rate channel and the EHR's heart-rate vital
   signs, ``v_hr = s + 1.1 e`` without, ``v_hr = -2.5 + 0.8 e`` with the drug.
4. **Old age** (age 75 or more, from the existing age draw; EHR: Patient.birthDate only):
   older patients present atypically, with fewer and vaguer symptoms, so the note says less:
   ``v_notes = -0.8 + 0.3 s + 1.1 e``.

The three drawn contexts are independent of the severity and of each other, drawn from a
stream of their own, so every additive draw (severity, label, the other views, missing
modalities, ages, splits) is the same as without interactions. A model sees a context only
through the files: heart failure, COPD and the beta-blocker in the EHR or the note (unknown
when both are missing), age in the EHR (unknown when it is missing).

:func:`bayes_ceiling` computes the AUROC of the exact posterior ``P(label | present views,
known context)`` by simulation, on a grid over the severity, with unknown context summed out
by its prevalence; it is the best any model can do on the files, which add nuisance of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from meddx.synth.common import LABEL_NOISE, LABEL_THRESHOLD, MISSING_RATE, MODALITY_COLUMNS, VIEW_NOISE

# Contexts drawn per patient (prevalence) and the age that counts as old.
CONTEXT_PREVALENCE: dict[str, float] = {"heart_failure": 0.25, "copd": 0.30, "beta_blocker": 0.30}
OLD_AGE = 75
AGE_RANGE = (22, 90)  # the default age draw: uniform whole years, both ends included
HEART_RATE_NOISE = 1.1  # the heart rate's own view without a beta-blocker: s + 1.1 e


@dataclass(frozen=True)
class Interaction:
    """Under ``context``, the view of ``modality`` is ``offset + gain * s + noise * e``."""

    context: str
    modality: str  # a manifest modality, or "heart_rate" (the monitor and EHR heart rate)
    offset: float
    gain: float
    noise: float


INTERACTIONS: tuple[Interaction, ...] = (
    Interaction("heart_failure", "imaging", 1.5, 0.0, 0.8),
    Interaction("heart_failure", "device_logs", 1.5, 0.0, 0.8),
    Interaction("copd", "audio", 0.5, -1.0, 0.6),
    Interaction("beta_blocker", "heart_rate", -2.5, 0.0, 0.8),
    Interaction("old", "notes", -0.8, 0.3, 1.1),
)
# Where each context is written: a model knows it when one of these modalities is present.
CONTEXT_SOURCES: dict[str, tuple[str, ...]] = {
    "heart_failure": ("ehr", "notes"),
    "copd": ("ehr", "notes"),
    "beta_blocker": ("ehr", "notes"),
    "old": ("ehr",),
}
# How the note's past-medical-history line states each drawn context.
NOTE_HISTORY: dict[str, str] = {
    "heart_failure": "heart failure on furosemide",
    "copd": "COPD on tiotropium",
    "beta_blocker": "atrial fibrillation on metoprolol",
}
# The views of the interacting cohort, in the order their noise is drawn (fixed: reordering
# would change the output). "heart_rate" is present when the monitor or the EHR is.
_NOISE_ORDER = ("imaging", "device_logs", "audio", "notes", "heart_rate")


def old_prevalence(ages: tuple[int, int] = AGE_RANGE) -> float:
    """The chance that a uniform whole-year age in ``ages`` is at least :data:`OLD_AGE`."""
    low, high = ages
    return max(0, high - max(low, OLD_AGE) + 1) / (high - low + 1)


def draw_context(rng: np.random.Generator, age: int) -> dict[str, bool]:
    """One patient's context: the three drawn flags (in a fixed order) and ``old`` from the age."""
    context = {name: bool(rng.random() < p) for name, p in CONTEXT_PREVALENCE.items()}
    context["old"] = age >= OLD_AGE
    return context


def interacting_views(
    severity: float, views: Mapping[str, float], context: Mapping[str, bool], rng: np.random.Generator
) -> dict[str, float]:
    """The views of the interacting cohort, with ``heart_rate`` added.

    ``views`` are the additive views (unchanged where no context applies); the noise of every
    view an interaction may replace is drawn whether or not its context holds, so one patient's
    draws do not depend on another context.
    """
    noise = {name: float(rng.normal()) for name in _NOISE_ORDER}
    out = dict(views)
    out["heart_rate"] = severity + HEART_RATE_NOISE * noise["heart_rate"]
    for rule in INTERACTIONS:
        if context[rule.context]:
            out[rule.modality] = rule.offset + rule.gain * severity + rule.noise * noise[rule.modality]
    return out


def _log_density(view: np.ndarray, mean: np.ndarray, sd: float) -> np.ndarray:
    """``log N(view; mean, sd^2)`` up to the constant every grid point shares."""
    z = (view - mean) / sd
    return -0.5 * z * z - np.log(sd)


def _view_model(modality: str, view_noise: Mapping[str, float]) -> tuple[float, float, float]:
    return 0.0, 1.0, (HEART_RATE_NOISE if modality == "heart_rate" else view_noise[modality])


def _with_reader(noise: float, modality: str, reader_noise: Mapping[str, float]) -> float:
    """A view's noise once a reader adds independent noise of its own: ``sqrt(noise^2 + reader^2)``."""
    return float(np.hypot(noise, reader_noise.get(modality, 0.0)))


def _check_reader_noise(reader_noise: Mapping[str, float]) -> None:
    known = (*MODALITY_COLUMNS, "heart_rate")
    for name, value in reader_noise.items():
        if name not in known:
            raise ValueError(f"reader_noise names {name!r}, which is not one of {known}")
        if not (np.isfinite(value) and 0.0 <= value <= 100.0):
            raise ValueError(f"reader_noise[{name!r}] must be a finite number in [0, 100], got {value}")


@dataclass(frozen=True)
class Simulation:
    """Patients simulated as the generator plans them, before any file is written.

    Attributes:
        label: ``(n,)`` int labels.
        views: the view of each modality (``heart_rate`` too with interactions), ``(n,)`` each.
        present: whether each view's modality is there (``heart_rate``: the EHR or the monitor).
        context: each context's truth (empty without interactions).
        known: whether a present file states each context.
    """

    label: np.ndarray
    views: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    context: dict[str, np.ndarray]
    known: dict[str, np.ndarray]


def simulate(
    n: int, seed: int = 0, *, interactions: bool = True, reader_noise: Mapping[str, float] | None = None
) -> Simulation:
    """Simulate ``n`` patients of the additive or the interacting cohort (deterministic for ``seed``).

    ``reader_noise`` (view -> standard deviation): add independent noise of that size to each
    named view after it is drawn, as a reader that recovers the view from the files only up to
    that noise would see it (from a stream of its own, so every other draw is unchanged).

    Example:
        >>> sim = simulate(1000, interactions=True)
        >>> sorted(sim.context), round(float(sim.context["copd"].mean()), 1)
        (['beta_blocker', 'copd', 'heart_failure', 'old'], 0.3)
    """
    if n < 100:
        raise ValueError(f"n must be at least 100, got {n}")
    rng = np.random.default_rng(seed)
    severity = rng.normal(size=n)
    label = (severity + LABEL_NOISE * rng.normal(size=n) > LABEL_THRESHOLD).astype(int)
    present = {m: rng.random(n) >= MISSING_RATE for m in MODALITY_COLUMNS}
    present["ehr"] |= ~np.any([present[m] for m in MODALITY_COLUMNS], axis=0)  # never all missing
    views = {m: severity + VIEW_NOISE[m] * rng.normal(size=n) for m in MODALITY_COLUMNS}
    context: dict[str, np.ndarray] = {}
    known: dict[str, np.ndarray] = {}
    if interactions:
        ages = rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1, size=n)
        context = {name: rng.random(n) < p for name, p in CONTEXT_PREVALENCE.items()}
        context["old"] = ages >= OLD_AGE
        present["heart_rate"] = present["ehr"] | present["device_logs"]
        views["heart_rate"] = severity + HEART_RATE_NOISE * rng.normal(size=n)
        for rule in INTERACTIONS:
            replaced = rule.offset + rule.gain * severity + rule.noise * rng.normal(size=n)
            views[rule.modality] = np.where(context[rule.context], replaced, views[rule.modality])
        known = {c: np.any([present[m] for m in sources], axis=0) for c, sources in CONTEXT_SOURCES.items()}
    if reader_noise:
        _check_reader_noise(reader_noise)
        extra = np.random.default_rng([seed, 1])
        views = {m: v + reader_noise.get(m, 0.0) * extra.normal(size=n) for m, v in views.items()}
    return Simulation(label, views, present, context, known)


def bayes_ceiling(
    n: int = 200_000,
    seed: int = 0,
    *,
    interactions: bool = True,
    posterior: str = "exact",
    reader_noise: Mapping[str, float] | None = None,
    chunk: int = 20_000,
) -> float:
    """The AUROC of the best possible model on a cohort of :mod:`meddx.synth`, by simulation.

    Simulates ``n`` patients exactly as the generator plans them (severity, label, views,
    about 10 % of each modality missing, context) and scores the posterior of the label given
    every present view and every context a present file states, computed on a grid of the
    severity (context a patient's files do not state is summed out by its prevalence).

    Args:
        n: simulated patients.
        seed: the simulation's seed (the result is deterministic for it).
        interactions: simulate the interacting cohort (True) or the additive one.
        posterior: ``"exact"`` (the model that generated the data) or ``"additive"``: the
            exact posterior of the additive model applied to the same views, reading every
            view as ``s + VIEW_NOISE * e`` whatever the context (what the best late fusion of
            per-modality evidence can do at most when it ignores context).
        reader_noise: view -> the standard deviation of the noise a reader adds when it recovers
            that view from the files (see :func:`simulate`); the posterior then knows each view
            only up to it. None: the error-free views (the files' own ceiling).
        chunk: patients per grid block (memory: ``chunk * 121`` floats a block).

    Example:
        >>> additive = bayes_ceiling(20_000, interactions=False)
        >>> 0.90 < additive < 0.95
        True
        >>> bayes_ceiling(20_000) > bayes_ceiling(20_000, posterior="additive")
        True
        >>> bayes_ceiling(20_000, reader_noise={"imaging": 1.0}) < bayes_ceiling(20_000)
        True
    """
    from meddx.metrics import auroc

    sim = simulate(n, seed, interactions=interactions, reader_noise=reader_noise)
    return float(auroc(sim.label, posterior_scores(sim, posterior=posterior, reader_noise=reader_noise, chunk=chunk)))


def posterior_scores(
    sim: Simulation,
    *,
    posterior: str = "exact",
    reader_noise: Mapping[str, float] | None = None,
    chunk: int = 20_000,
) -> np.ndarray:
    """``P(label = 1 | present views, stated context)`` of every patient of ``sim``, on a severity grid.

    ``sim`` may hold simulated patients (:func:`simulate`) or real ones whose views were read back
    from their files (``label`` is not used); the interacting model applies when ``sim.context``
    is not empty. ``posterior`` and ``reader_noise`` as in :func:`bayes_ceiling`.
    """
    from scipy.stats import norm

    if posterior not in ("exact", "additive"):
        raise ValueError(f"posterior must be 'exact' or 'additive', got {posterior!r}")
    reader_noise = dict(reader_noise or {})
    _check_reader_noise(reader_noise)
    views, present, context, known = sim.views, sim.present, sim.context, sim.known
    interactions = bool(context)
    n = len(sim.label)
    modalities = list(views)
    prior = dict(CONTEXT_PREVALENCE, old=old_prevalence())

    grid = np.linspace(-6.0, 6.0, 121)
    p_label = norm.sf((LABEL_THRESHOLD - grid) / LABEL_NOISE)
    scores = np.empty(n)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        log_post = np.tile(-0.5 * grid * grid, (rows.stop - rows.start, 1))
        plain = {}
        for modality in modalities:
            offset, gain, noise = _view_model(modality, VIEW_NOISE)
            noise = _with_reader(noise, modality, reader_noise)
            likelihood = _log_density(views[modality][rows, None], offset + gain * grid, noise)
            plain[modality] = np.where(present[modality][rows, None], likelihood, 0.0)
        rules = INTERACTIONS if interactions and posterior == "exact" else ()
        for name in dict.fromkeys(rule.context for rule in rules):  # each context: all the views it moves
            moved = [rule for rule in rules if rule.context == name]
            without = sum(plain.pop(rule.modality) for rule in moved)
            under = sum(
                np.where(
                    present[r.modality][rows, None],
                    _log_density(
                        views[r.modality][rows, None],
                        r.offset + r.gain * grid,
                        _with_reader(r.noise, r.modality, reader_noise),
                    ),
                    0.0,
                )
                for r in moved
            )
            p = prior[name]
            summed = np.logaddexp(np.log(p) + under, np.log(1 - p) + without)
            holds, stated = context[name][rows, None], known[name][rows, None]
            log_post += np.where(stated, np.where(holds, under, without), summed)
        log_post += sum(plain.values())
        weights = np.exp(log_post - log_post.max(axis=1, keepdims=True))
        scores[rows] = weights @ p_label / weights.sum(axis=1)
    return scores
