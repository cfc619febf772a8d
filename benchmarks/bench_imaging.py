"""Imaging ingest speed against plain decoding of the same files (video: bench_signals.py).

Imaging: a 64-slice 512x512 CT series written by ``meddx.synth.write_ct_series`` (shuffled
file names) is read by the imaging ingestor (default config: sort, HU, window, resize to
``spatial_size``) and, for comparison, by plain ``pydicom.dcmread(f).pixel_array`` over the
same files. Both warm (files cached, libraries imported, one untimed run of each); the
two are timed in alternation, 3 rounds, and the best wall time of each is compared
(alternating keeps load from other processes on a shared machine from favouring one side).
Process CPU time is printed too. Target: <= 2.0x.

Run: ``.venv/bin/python benchmarks/bench_imaging.py`` (prints the figures).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom

from meddx.config import IngestConfig
from meddx.ingest.base import IngestRequest
from meddx.ingest.dicom import ImagingIngestor
from meddx.records import Modality
from meddx.synth import write_ct_series

INDEX = datetime(2024, 3, 6, tzinfo=timezone.utc)


Timing = tuple[float, float]  # best (wall s, CPU s)


def compare(plain: Callable[[], object], ingest: Callable[[], object], rounds: int = 3) -> tuple[Timing, Timing]:
    """Best wall and CPU times of ``plain`` and ``ingest``, timed in alternation after a warm-up."""
    plain(), ingest()  # warm: page cache, imports, allocator
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "ingest": []}
    for _ in range(rounds):
        for name, fn in (("plain", plain), ("ingest", ingest)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            results[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    best = {name: (min(w for w, _ in runs), min(c for _, c in runs)) for name, runs in results.items()}
    return best["plain"], best["ingest"]


def report(label: str, plain: Timing, ingest: Timing, baseline: str, target: float) -> None:
    print(
        f"{label}: {baseline} {plain[0] * 1000:.1f} ms (CPU {plain[1] * 1000:.1f} ms), "
        f"meddx ingest {ingest[0] * 1000:.1f} ms (CPU {ingest[1] * 1000:.1f} ms), "
        f"ratio {ingest[0] / plain[0]:.2f}x wall, {ingest[1] / plain[1]:.2f}x CPU (target <= {target}x)"
    )


def bench_imaging(root: Path) -> tuple[Timing, Timing]:
    folder = root / "ct"
    files = write_ct_series(
        folder,
        severity=1.0,
        rng=np.random.default_rng(0),
        acquisition_time=datetime(2024, 3, 5, 9, tzinfo=timezone.utc),
        patient_id="BENCH",
        n_slices=64,
        size=512,
    )
    reader = ImagingIngestor(IngestConfig())
    request = IngestRequest("BENCH", INDEX, {Modality.IMAGING: folder})

    def plain() -> list[np.ndarray]:
        return [pydicom.dcmread(f).pixel_array for f in sorted(folder.iterdir())]

    def ingest() -> object:
        return reader.read(request)

    assert len(files) == 64
    return compare(plain, ingest)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report("imaging 64x512x512 CT", *bench_imaging(root), "pydicom dcmread+pixel_array", 2.0)


if __name__ == "__main__":
    main()
