"""Speed and memory of the Bulk FHIR (NDJSON) reader on a population of ~100k resources.

The trimmed Synthea export in ``tests/data/synthea-bulk`` (4 patients, 675 resources)
is replicated ``--replicas`` times into a temporary folder, each copy with its patient ids
rewritten (``r003-<uuid>``), so the folder holds many distinct patients in the same files,
as a real Bulk export does. Figures printed:

* **index**: one scan of the folder (``BulkIndex.build``: ``json.loads`` per line, no
  validation), in lines per second over every line of every ``.ndjson`` file, and the
  index's own size (tracemalloc, a second scan);
* **fetch**: seek + read + ``json.loads`` of a sample of patients' lines (no validation);
* **read**: ``FhirIngestor.read_patient`` of the same patients: validation with
  ``fhir.resources`` (R4B), time placement, extraction, the leakage filter. The gap
  between fetch and read is the cost of validation and extraction;
* peak resident memory of the process (``resource.getrusage`` maxrss) after each step.

Run: ``.venv/bin/python benchmarks/bench_ehr.py [--replicas 150] [--sample 40] [--all] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

from meddx.config import IngestConfig
from meddx.ingest.fhir import USED_TYPES, FhirIngestor
from meddx.ingest.fhir_bulk import BulkIndex
from meddx.records import parse_time

SYNTHEA = Path(__file__).resolve().parents[1] / "tests" / "data" / "synthea-bulk"
INDEX_TIME = parse_time("2020-01-01T00:00:00Z")


def maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def replicate(source: Path, out: Path, replicas: int) -> tuple[list[str], int]:
    """Write ``replicas`` copies of every NDJSON file with new patient ids; returns (ids, lines)."""
    with open(source / "Patient.000.ndjson") as handle:
        originals = [json.loads(line)["id"] for line in handle]
    ids: list[str] = []
    lines = 0
    files = sorted(p for p in source.glob("*.ndjson") if p.name != "log.ndjson")
    for path in files:
        text = path.read_text()
        with open(out / path.name, "w") as target:
            for k in range(replicas):
                copy = text
                for pid in originals:
                    copy = copy.replace(pid, f"r{k:03d}-{pid}")
                target.write(copy)
                lines += copy.count("\n")
    for k in range(replicas):
        ids += [f"r{k:03d}-{pid}" for pid in originals]
    return ids, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=150, help="copies of the 4-patient export (150 = ~100k lines)")
    parser.add_argument("--sample", type=int, default=40, help="patients read (random, seeded)")
    parser.add_argument("--all", action="store_true", help="read every patient instead of a sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    figures: dict[str, float | int] = {"maxrss_start_mib": round(maxrss_mib(), 1)}
    tmp = Path(tempfile.mkdtemp(prefix="meddx-bench-ehr-"))
    try:
        ids, n_lines = replicate(SYNTHEA, tmp, args.replicas)
        size_mib = sum(p.stat().st_size for p in tmp.glob("*.ndjson")) / 2**20
        figures.update(patients=len(ids), lines=n_lines, folder_mib=round(size_mib, 1))

        reader = FhirIngestor(IngestConfig())
        start = time.perf_counter()
        index = reader.bulk_index(tmp)
        seconds = time.perf_counter() - start
        figures.update(
            index_s=round(seconds, 2),
            index_lines_per_s=round(n_lines / seconds),
            indexed_lines=index.n_lines,
            maxrss_after_index_mib=round(maxrss_mib(), 1),
        )
        tracemalloc.start()
        again = BulkIndex.build(tmp, set(USED_TYPES))
        current, peak = tracemalloc.get_traced_memory()  # `again` is alive: current = the index's size
        tracemalloc.stop()
        del again
        figures.update(index_size_mib=round(current / 2**20, 1), index_build_peak_mib=round(peak / 2**20, 1))

        chosen = ids if args.all else random.Random(args.seed).sample(ids, min(args.sample, len(ids)))
        start = time.perf_counter()
        fetched = 0
        for pid in chosen:
            for line in index.lines(pid):
                json.loads(line.raw)
                fetched += 1
        seconds = time.perf_counter() - start
        figures.update(fetch_resources=fetched, fetch_resources_per_s=round(fetched / seconds))

        reader.read_patient(tmp, chosen[0], INDEX_TIME)  # warm-up: model classes are built on first use
        start = time.perf_counter()
        parsed = kept = 0
        for pid in chosen:
            record = reader.read_patient(tmp, pid, INDEX_TIME)
            kept += sum(record.meta["resources"].values())
            parsed += sum(record.meta["resources"].values()) + record.meta["dropped_after_index"]
        seconds = time.perf_counter() - start
        figures.update(
            read_patients=len(chosen),
            read_resources=parsed,
            read_resources_per_s=round(parsed / seconds),
            read_ms_per_patient=round(1000 * seconds / len(chosen), 1),
            kept_at_index_time=kept,
            maxrss_end_mib=round(maxrss_mib(), 1),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
