"""What the synthetic writers and the cohort share: modalities, view noise, label threshold, names, UTC times."""

from __future__ import annotations

from datetime import datetime, timezone

LABEL_NOISE = 0.3
LABEL_THRESHOLD = 0.265  # P(s + 0.3 e > 0.265) ~ 0.40

MODALITY_COLUMNS = ("imaging", "ehr", "notes", "device_logs", "audio", "video")

# Standard deviation of the nuisance each modality's view adds to the hidden severity.
# Tuned so that one simple feature per modality gives AUROC ~0.7-0.83 and all six ~0.88-0.92.
VIEW_NOISE: dict[str, float] = {
    "imaging": 1.0,
    "ehr": 1.15,
    "notes": 1.1,
    "device_logs": 1.1,
    "audio": 1.1,
    "video": 1.0,
}
MISSING_RATE = 0.10

FAMILY_NAMES = ("Okafor", "Lindqvist", "García", "Nakamura", "Dubois", "Kowalski", "Singh", "Brennan")
GIVEN_NAMES = ("Ada", "Björn", "Chen", "Dara", "Elif", "Femi", "Greta", "Hugo", "Inès", "Jonas")


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def label_from_severity(severity: float) -> int:
    return int(severity > LABEL_THRESHOLD)
