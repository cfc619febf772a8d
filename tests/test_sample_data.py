"""The committed sample cohort is exactly what `make sample-data` regenerates."""

from __future__ import annotations

import hashlib
from pathlib import Path

from meddx.synth import generate_cohort

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_sample_data_regenerates_byte_for_byte(tmp_path: Path) -> None:
    generate_cohort(tmp_path / "sample_data", n_patients=60, seed=7)  # as in `make sample-data`
    assert digests(tmp_path / "sample_data") == digests(SAMPLE)
