"""Imaging ingest from a PACS (Orthanc over DICOMweb on loopback) against the same files from disk.

``N_SERIES`` CT series (``meddx.synth.write_ct_series``, 48 slices of 256x256, shuffled file
names) are written to disk and stored in a local Orthanc (``meddx.dicomweb.orthanc``). The same
cohort is then ingested twice per round with ``ingest_cohort`` in this process (``workers=0``,
default imaging config), each time into a fresh cache (cold: no cached record, no stored
series): once with ``imaging`` naming the folders, once naming ``dicomweb:studies/<uid>``
(preflight, QIDO-RS, WADO-RS into the series store, then the same reader). The two are timed
in alternation, 3 rounds, and the best wall time of each is compared. The disk files are in
the page cache, as they are after a first read. Target: PACS time <= 2.0x disk time.

Needs Debian's ``orthanc`` and ``orthanc-dicomweb`` and ``dicomweb-client``.
Run: ``.venv/bin/python benchmarks/bench_pacs.py`` (prints the figures).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from meddx.cohort import load_cohort
from meddx.config import DicomWebConfig, IngestConfig
from meddx.dicomweb.orthanc import OrthancServer, orthanc_available
from meddx.ingest.runner import ingest_cohort
from meddx.synth import write_ct_series

N_SERIES = 8
ACQUIRED = datetime(2024, 3, 5, 9, tzinfo=timezone.utc)


def main() -> None:
    if not orthanc_available():
        sys.exit(
            "bench_pacs: Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = OrthancServer(root / "orthanc").start()
        try:
            run(root, server)
        finally:
            server.stop()


def run(root: Path, server: OrthancServer) -> None:
    disk_rows, pacs_rows = [], []
    client = server.client()
    for i in range(N_SERIES):
        folder = root / "data" / f"p{i}"
        files = write_ct_series(
            folder,
            severity=0.0,
            rng=np.random.default_rng(i),
            acquisition_time=ACQUIRED,
            patient_id=f"P{i}",
            n_slices=48,
            size=256,
        )
        datasets = [pydicom.dcmread(f) for f in files]
        client.store_instances(datasets)
        index_time = (ACQUIRED + timedelta(days=1)).isoformat()
        disk_rows.append({"patient_id": f"P{i}", "index_time": index_time, "imaging": str(folder)})
        pacs_rows.append(
            {
                "patient_id": f"P{i}",
                "index_time": index_time,
                "imaging": f"dicomweb:studies/{datasets[0].StudyInstanceUID}",
            }
        )
    pd.DataFrame(disk_rows).to_csv(root / "disk.csv", index=False)
    pd.DataFrame(pacs_rows).to_csv(root / "pacs.csv", index=False)
    disk, pacs = load_cohort(root / "disk.csv"), load_cohort(root / "pacs.csv")
    os.environ["MEDDX_DICOMWEB_USER"], os.environ["MEDDX_DICOMWEB_PASSWORD"] = server.user, server.password
    config = IngestConfig(dicomweb=DicomWebConfig(url=server.url))

    def timed(cohort, name: str, n: int) -> float:
        start = time.perf_counter()
        report = ingest_cohort(cohort, root / f"cache-{name}-{n}", config, workers=0, progress=False)
        elapsed = time.perf_counter() - start
        if any(o.status != "ok" for o in report.outcomes):
            raise SystemExit(f"bench_pacs: {name} ingest failed: {report.errors[0].error}")
        return elapsed

    timed(disk, "warm-disk", 0), timed(pacs, "warm-pacs", 0)  # imports, page cache, server warm
    best = {"disk": float("inf"), "pacs": float("inf")}
    for n in range(1, 4):
        best["disk"] = min(best["disk"], timed(disk, "disk", n))
        best["pacs"] = min(best["pacs"], timed(pacs, "pacs", n))
    ratio = best["pacs"] / best["disk"]
    print(f"imaging ingest, {N_SERIES} CT series of 48x256x256, cold cache, best of 3 (in-process):")
    print(f"  disk folders       {best['disk']:.3f} s   {N_SERIES / best['disk']:.1f} series/s")
    print(f"  Orthanc DICOMweb   {best['pacs']:.3f} s   {N_SERIES / best['pacs']:.1f} series/s")
    print(f"  PACS / disk        {ratio:.2f}x   (target <= 2.0x: {'met' if ratio <= 2.0 else 'NOT met'})")


if __name__ == "__main__":
    main()
