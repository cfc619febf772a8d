"""EHR ingest from a FHIR server (Medplum's engine on loopback) against the same resources as Bulk NDJSON on disk.

``--patients`` synthetic patients (``meddx.synth.write_fhir_bundle``: a Patient, an Encounter,
LOINC Observations, Conditions, MedicationRequests and DocumentReferences, some dated after the
index time) are written as a Bulk export folder (one NDJSON file per type) and loaded into the
test FHIR server (tests/fhir_server, ``npm ci --prefix tests/fhir_server``). The same cohort is
ingested with ``ingest_cohort`` (``--workers`` processes, the EHR and the notes read from it):

* cold: each source into a fresh cache (no record, no cached answer; the disk run builds its
  Bulk index, the server run makes its searches);
* cached: the same again into the now-filled cache (the server is asked nothing).

Targets: cold server time <= 3x cold disk time; cached server run <= 1.2x cached disk run.
Wall times on a shared machine are inflated by other load: CPU seconds (this process and its
workers) are printed too.

Run: ``.venv/bin/python benchmarks/bench_fhir.py [--patients 500] [--workers 2]``
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fhir_test_server import FhirTestServer, skip_reason  # noqa: E402

from meddx.cohort import load_cohort  # noqa: E402
from meddx.config import FhirServerConfig, IngestConfig  # noqa: E402
from meddx.ingest.runner import ingest_cohort  # noqa: E402
from meddx.synth import write_fhir_bundle  # noqa: E402

INDEX = datetime(2024, 3, 5, 14, tzinfo=timezone.utc)


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cohort(root: Path, patients: int) -> tuple[list[dict[str, Any]], list[str]]:
    rng = np.random.default_rng(11)
    resources: list[dict[str, Any]] = []
    ids = []
    for n in range(patients):
        pid = f"bench-{n:05d}"
        path = write_fhir_bundle(
            root / "bundle.json",
            patient_id=pid,
            severity=float(rng.random()),
            rng=rng,
            index_time=INDEX - timedelta(hours=int(rng.integers(0, 240))),
            sex="F" if n % 2 else "M",
            age=int(rng.integers(20, 90)),
            label=int(rng.random() < 0.3),
        )
        for k, entry in enumerate(json.loads(path.read_text())["entry"]):
            entry["resource"].setdefault("id", f"{pid}-{k}")
            resources.append(entry["resource"])
        ids.append(pid)
    return resources, ids


def _run(manifest: Path, cache: Path, config: IngestConfig, workers: int) -> tuple[float, float, int]:
    cpu, start = _cpu(), time.perf_counter()
    report = ingest_cohort(load_cohort(manifest), cache, config, workers=workers, progress=False)
    wall, used = time.perf_counter() - start, _cpu() - cpu
    ok = sum(o.status == "ok" for o in report.outcomes)
    if report.errors:
        print(f"  {len(report.errors)} errors, e.g. {report.errors[0].error}")
    return wall, used, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    reason = skip_reason()
    if reason is not None:
        sys.exit(f"bench_fhir: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tick = time.perf_counter()
        resources, ids = _cohort(root, args.patients)
        bulk = root / "bulk"
        bulk.mkdir()
        by_type: dict[str, list[str]] = {}
        for r in resources:
            by_type.setdefault(r["resourceType"], []).append(json.dumps(r))
        for kind, lines in by_type.items():
            (bulk / f"{kind}.000.ndjson").write_text("\n".join(lines) + "\n")
        server = FhirTestServer()
        try:
            server.load(resources, chunk=500)
            size = sum(p.stat().st_size for p in bulk.iterdir()) / 2**20
            print(
                f"{args.patients} patients, {len(resources)} resources ({size:.1f} MiB NDJSON),"
                f" set up in {time.perf_counter() - tick:.0f} s; {args.workers} workers"
            )
            disk = root / "disk.csv"
            remote = root / "server.csv"
            times = [INDEX.isoformat()] * len(ids)
            pd.DataFrame({"patient_id": ids, "index_time": times, "ehr": str(bulk)}).to_csv(disk, index=False)
            pd.DataFrame({"patient_id": ids, "index_time": times, "ehr": [f"fhir:Patient/{p}" for p in ids]}).to_csv(
                remote, index=False
            )
            config = IngestConfig(fhir=FhirServerConfig(url=server.base))
            figures = {}
            for name, manifest in (("disk", disk), ("server", remote)):
                cache = root / f"cache-{name}"
                figures[name, "cold"] = _run(manifest, cache, config, args.workers)
                figures[name, "cached"] = _run(manifest, cache, config, args.workers)
        finally:
            server.stop()
    for (name, run), (wall, cpu, ok) in figures.items():
        print(f"{name:6s} {run:6s}: {wall:7.2f} s wall, {cpu:7.2f} s CPU, {ok} records")
    cold = figures["server", "cold"][0] / figures["disk", "cold"][0]
    cached = figures["server", "cached"][0] / figures["disk", "cached"][0]
    print(f"cold: server / disk = {cold:.2f}x (target <= 3x) {'PASS' if cold <= 3 else 'MISS'}")
    print(f"cached: server / disk = {cached:.2f}x (target <= 1.2x) {'PASS' if cached <= 1.2 else 'MISS'}")


if __name__ == "__main__":
    main()
