"""Batch ingest throughput: a generated cohort through `ingest_cohort`, cold and cached.

Generates ``--patients`` synthetic patients (all six modalities, the real formats), ingests
them with ``--workers`` worker processes into a fresh cache (cold: worker start-up,
imports and reading included), then again into the same cache (warm: every record is a
cache hit, so this is the cost of hashing sources and scheduling), and prints wall time,
files and patients per second, and the parent's peak memory.

Run: ``.venv/bin/python benchmarks/bench_ingest.py [--patients 60] [--workers 2]``
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from meddx.cohort import load_cohort
from meddx.ingest.runner import ingest_cohort
from meddx.synth import generate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cohort = load_cohort(generate_cohort(root / "cohort", n_patients=args.patients, seed=7))
        for label in ("cold", "warm"):
            start = time.perf_counter()
            report = ingest_cohort(cohort, root / "cache", workers=args.workers, progress=False)
            seconds = time.perf_counter() - start
            n_files = len(report.outcomes)
            print(
                f"{label}: {args.patients} patients, {n_files} files, {args.workers} workers: {seconds:.1f} s, "
                f"{n_files / seconds:.1f} files/s, {args.patients / seconds:.1f} patients/s, "
                f"{len(report.errors)} errors, {sum(o.cached for o in report.outcomes)} cache hits"
            )
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"parent peak memory: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
