"""What every synthetic writer and the cohort share: the label threshold, fake names, UTC times."""

from __future__ import annotations

from datetime import datetime, timezone

LABEL_NOISE = 0.3
LABEL_THRESHOLD = 0.265  # P(s + 0.3 e > 0.265) ~ 0.40

FAMILY_NAMES = ("Okafor", "Lindqvist", "García", "Nakamura", "Dubois", "Kowalski", "Singh", "Brennan")
GIVEN_NAMES = ("Ada", "Björn", "Chen", "Dara", "Elif", "Femi", "Greta", "Hugo", "Inès", "Jonas")


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def label_from_severity(severity: float) -> int:
    return int(severity > LABEL_THRESHOLD)
