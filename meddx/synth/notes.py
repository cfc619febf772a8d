"""The synthetic clinician note: symptom phrases reported or negated with severity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# (positive phrase, negated phrase, offset): more severe patients report more symptoms.
_SYMPTOMS = (
    ("productive cough", "denies cough", 0.3),
    ("fever", "no fever", 0.0),
    ("shortness of breath", "denies shortness of breath", -0.3),
    ("pleuritic chest pain", "no chest pain", -0.8),
    ("chills", "denies chills", -0.4),
    ("fatigue", "no fatigue", 0.4),
)
_NOTE_FILLERS = (
    "Lives with spouse; independent in daily activities.",
    "Former smoker (20 pack-years), quit 2015.",
    "Never smoker.",
    "Allergies: penicillin → rash.",
    "History obtained with an interpreter – patient's daughter Zoë present.",
    "Works as a school teacher.",
    "Vaccinations up to date per patient.",
    "Drinks alcohol socially.",
)


def write_note(
    path: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    template: str = "ed",
    history: Sequence[str] | None = None,
) -> Path:
    """Write a UTF-8 clinician note whose symptom phrases depend on severity.

    Each symptom is reported with probability ``sigmoid(1.3 * severity + offset)``;
    otherwise it is written negated ("denies cough", "no fever") or not mentioned. The
    examination line reads "crackles" or "clear to auscultation" in the same way.
    ``template="ward"`` writes the same draws as a ward-round SOAP note (another site's
    template: other headings, "reports"/"negative for" phrasing); ``"ed"`` is the default.
    ``history`` (the interacting cohort's context, e.g. ``["COPD on tiotropium"]``) adds a
    past-medical-history line ("nil of note" when empty); None (the default) writes none.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     text = write_note(Path(folder, "note.txt"), severity=1.0, rng=np.random.default_rng(0)).read_text()
        >>> text.splitlines()[:3]
        ['EMERGENCY DEPARTMENT NOTE', '', 'Chief complaint: productive cough.']
    """
    if template not in ("ed", "ward"):
        raise ValueError(f"template must be 'ed' or 'ward', got {template!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    positives: list[str] = []
    negatives: list[str] = []
    for positive, negative, offset in _SYMPTOMS:
        p = 1.0 / (1.0 + math.exp(-(1.3 * severity + offset)))
        draw, mention = rng.random(), rng.random()
        if draw < p:
            positives.append(positive)
        elif mention < 0.7:
            negatives.append(negative)
    days = int(rng.integers(1, 8))
    if template == "ward":
        return _write_ward_note(path, positives, negatives, days, severity, rng, history)
    lines = ["EMERGENCY DEPARTMENT NOTE", ""]
    if positives:
        lines.append(f"Chief complaint: {positives[0]}.")
        hpi = f"HPI: Patient presents after {days} day(s) of {', '.join(positives)}."
    else:
        lines.append("Chief complaint: general malaise.")
        hpi = f"HPI: Patient presents feeling unwell for {days} day(s) without specific complaints."
    lines += ["", hpi]
    lines += [f"{n[0].upper()}{n[1:]}." for n in negatives]
    if history is not None:
        lines += ["", "Past medical history: " + ("; ".join(history) if history else "nil of note") + "."]
    fillers = rng.choice(len(_NOTE_FILLERS), size=int(rng.integers(1, 4)), replace=False)
    lines += ["", "Social history: " + " ".join(_NOTE_FILLERS[j] for j in sorted(fillers))]
    crackles = rng.random() < 1.0 / (1.0 + math.exp(-(1.3 * severity - 0.5)))
    side = str(rng.choice(["right", "left"]))
    lines += [
        "",
        "Exam: " + (f"crackles at the {side} lung base." if crackles else "lungs clear to auscultation bilaterally."),
        "",
        "Assessment/Plan: "
        + str(
            rng.choice(
                ["Labs and imaging ordered.", "Chest imaging and bloods sent.", "Observe; reassess after results."]
            )
        ),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_ward_note(
    path: Path,
    positives: list[str],
    negatives: list[str],
    days: int,
    severity: float,
    rng: np.random.Generator,
    history: Sequence[str] | None,
) -> Path:
    """The ward-round SOAP template: the same findings as the ED note, drawn in the same order."""
    fillers = rng.choice(len(_NOTE_FILLERS), size=int(rng.integers(1, 4)), replace=False)
    crackles = rng.random() < 1.0 / (1.0 + math.exp(-(1.3 * severity - 0.5)))
    side = str(rng.choice(["right", "left"]))
    plan = str(rng.choice(["Continue current management.", "Repeat bloods tomorrow.", "Review with consultant."]))
    negated = [n.replace("denies ", "").replace("no ", "") for n in negatives]
    lines = [f"WARD ROUND - DAY {days}", ""]
    lines.append("S: Reports " + (", ".join(positives) if positives else "feeling generally unwell") + ".")
    if negated:
        lines.append("   Negative for " + ", ".join(negated) + ".")
    if history is not None:
        lines.append("   PMH: " + ("; ".join(history) if history else "nil of note") + ".")
    lines.append("   SH: " + " ".join(_NOTE_FILLERS[j] for j in sorted(fillers)))
    chest = f"{side}-sided basal crepitations." if crackles else "good air entry, no added sounds."
    lines.append("O: Chest - " + chest)
    lines.append("A: " + ("Likely lower respiratory tract infection." if positives else "No clear focus."))
    lines.append("P: " + plan)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
