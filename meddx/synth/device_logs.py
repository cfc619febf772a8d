"""The synthetic monitor log: a long ``timestamp,channel,value`` CSV with gaps, artefacts and leaks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from meddx.synth.common import iso, label_from_severity

_DEVICE_CHANNELS = ("heart_rate", "spo2", "resp_rate")


def write_device_log(
    path: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    index_time: datetime,
    hours: float = 8.0,
    label: int | None = None,
    post_index_minutes: int = 30,
    interval_s: int = 60,
    offset: float = 0.0,
    heart_rate_severity: float | None = None,
) -> Path:
    """Write a long monitor log CSV ``timestamp,channel,value`` ending after ``index_time``.

    One row per channel (heart_rate, spo2, resp_rate) per minute over ``hours`` before the
    index time, with missing stretches (all channels or one), impossible values (spo2 0 or
    127, heart_rate -1, resp_rate 0), a few rows out of order, and ``post_index_minutes``
    of rows after the index time whose values give ``label`` away (an ingestor must drop
    them). Severity lowers spo2 and raises resp_rate a little. ``interval_s`` samples every
    that many seconds instead of each minute (gaps and artefacts then count in samples);
    ``offset`` is a calibration offset added to every value (spo2 still capped at 100).
    ``heart_rate_severity`` drives the heart rate instead of ``severity`` (the interacting
    cohort gives the heart rate a view of its own, which a beta-blocker blunts).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_device_log(Path(folder, "vitals.csv"), severity=0.5, rng=np.random.default_rng(0),
        ...         index_time=datetime(2024, 3, 5, 14, tzinfo=timezone.utc))
        ...     lines = path.read_text().splitlines()
        >>> lines[:2]
        ['timestamp,channel,value', '2024-03-05T06:00:00Z,heart_rate,86']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    label = label_from_severity(severity) if label is None else int(label)
    index_time = index_time.astimezone(timezone.utc).replace(second=0, microsecond=0)
    if interval_s < 1:
        raise ValueError(f"interval_s must be at least 1 second, got {interval_s}")
    n_before = int(round(hours * 3600 / interval_s))
    seconds = np.arange(-n_before, post_index_minutes * 60 // interval_s + 1) * interval_s
    n = len(seconds)

    def walk(scale: float) -> np.ndarray:  # slow drift, as physiology wanders
        steps = rng.normal(0.0, scale, size=n)
        return np.cumsum(steps) - np.cumsum(steps).mean()

    base_hr = 78 + 6 * (severity if heart_rate_severity is None else heart_rate_severity) + rng.normal(0.0, 7.0)
    base_spo2 = 97.0 - 0.9 * severity + rng.normal(0.0, 0.6)
    base_rr = 16.5 + 1.6 * severity + rng.normal(0.0, 1.6)
    values = {
        "heart_rate": base_hr + np.clip(walk(0.4), -12, 12) + rng.normal(0.0, 2.0, size=n),
        "spo2": np.minimum(100.0, base_spo2 + np.clip(walk(0.08), -1.5, 1.5) + rng.normal(0.0, 0.7, size=n)),
        "resp_rate": base_rr + np.clip(walk(0.1), -3, 3) + rng.normal(0.0, 1.2, size=n),
    }
    after = seconds > 0
    values["spo2"][after] = (86.0 if label else 99.0) + rng.normal(0.0, 0.5, size=int(after.sum()))
    values["heart_rate"][after] = (125.0 if label else 70.0) + rng.normal(0.0, 2.0, size=int(after.sum()))

    present = {c: np.ones(n, dtype=bool) for c in _DEVICE_CHANNELS}
    for _ in range(int(rng.integers(1, 4))):  # the monitor unplugged: every channel missing
        start, length = int(rng.integers(0, n)), int(rng.integers(10, 60))
        for c in _DEVICE_CHANNELS:
            present[c][start : start + length] = False
    for c in _DEVICE_CHANNELS:  # one probe off for a while
        if rng.random() < 0.5:
            start, length = int(rng.integers(0, n)), int(rng.integers(5, 40))
            present[c][start : start + length] = False
    for c in _DEVICE_CHANNELS:  # the leaking rows after the index time are always there
        present[c][after] = True

    if offset:
        for c in _DEVICE_CHANNELS:
            values[c] = values[c] + offset
        values["spo2"] = np.minimum(100.0, values["spo2"])

    artefacts = {"heart_rate": (-1.0, 0.0), "spo2": (0.0, 127.0), "resp_rate": (0.0,)}
    rows: list[tuple[int, str, str]] = []
    for c in _DEVICE_CHANNELS:
        v = np.rint(values[c])
        bad = rng.random(n) < 0.004
        v[bad] = rng.choice(artefacts[c], size=int(bad.sum()))
        rows += [(int(seconds[j]), c, str(int(v[j]))) for j in range(n) if present[c][j]]
    rows.sort(key=lambda r: (r[0], _DEVICE_CHANNELS.index(r[1])))
    for _ in range(int(rng.integers(2, 6))):  # late-arriving batches written out of order
        j = int(rng.integers(0, len(rows) - 12))
        k = int(rng.integers(0, len(rows)))
        block = rows[j : j + 6]
        del rows[j : j + 6]
        rows[k:k] = block

    lines = ["timestamp,channel,value"]
    lines += [f"{iso(index_time + timedelta(seconds=m))},{c},{v}" for m, c, v in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
