"""Batch diagnosis: throughput end to end, of ingestion alone and of the model alone, and peak memory.

Generates ``--patients`` synthetic patients (seed 7, all six modalities in the real formats)
into ``benchmarks/out/`` (kept, so a second run skips it), fine-tunes a small model on the
first 200 (a tiny backbone, one epoch: the speed of the model, not its quality, is measured),
then prints rows per second of:

- **ingestion alone**: the streaming feeder (ingest + align every row into the store, chunks of
  ``--chunk-size``) with 2 worker processes and no model, on a cold cache;
- **the model alone**: forward passes with contributions on ready batches (tensors read from
  the store), predictions rows and FHIR RiskAssessments made, nothing ingested;
- **end to end** (``meddx.diagnose.diagnose``) with 1 and with 2 ingestion workers, each on a
  cold cache;

and the peak resident memory of a ``diagnose`` process (warm cache, 2 workers; the process
itself and, separately, its largest worker) on the first ``--small`` rows and on all rows.
Targets: end to end at least 0.7x the slower of ingestion alone and the model alone; peak
memory at all rows at most 1.3x that at ``--small`` rows.

Run: ``.venv/bin/python benchmarks/bench_diagnose.py [--patients 2000] [--small 200]``
(about an hour at 2000 patients on 2 cores: three cold ingestions of the cohort).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def _child_memory(manifest: Path, model: Path, out: Path, cache: Path) -> dict:
    """Run diagnose in a fresh process; its own peak RSS and that of its largest worker, in MiB.

    The peak is VmHWM (per address space, new at exec), not ``ru_maxrss``, which Linux carries
    over from the parent through fork and exec. Workers report theirs when they exit.
    """
    code = (
        "import json, sys\n"
        "from meddx.diagnose import diagnose\n"
        "def hwm():\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "if __name__ == '__main__':\n"
        "    r = diagnose(sys.argv[1], sys.argv[2], sys.argv[3], cache_dir=sys.argv[4], workers=2, progress=False)\n"
        "    print(json.dumps({'main_mib': hwm(), 'rows': r.counts['rows']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(manifest), str(model), str(out), str(cache)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--small", type=int, default=200, help="rows of the smaller memory run")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--memory-only", action="store_true", help="only the memory runs, on a previous run's model")
    args = parser.parse_args()

    import pandas as pd

    from meddx.cohort import load_cohort
    from meddx.diagnose import chunk_frames, diagnose
    from meddx.export.fhir import risk_assessments
    from meddx.models import BackboneConfig
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.streaming import ChunkFeeder
    from meddx.synth import generate_cohort
    from meddx.train import finetune

    OUT.mkdir(parents=True, exist_ok=True)
    cohort_dir = OUT / f"cohort-{args.patients}-seed7"
    manifest = cohort_dir / "manifest.csv"
    if not manifest.is_file():
        start = time.perf_counter()
        generate_cohort(cohort_dir, n_patients=args.patients, seed=7)
        print(f"generated {args.patients} patients in {time.perf_counter() - start:.0f} s")
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    small = cohort_dir / f"manifest-first-{args.small}.csv"
    rows.head(args.small).to_csv(small, index=False)
    first200 = cohort_dir / "manifest-first-200.csv"
    rows.head(200).to_csv(first200, index=False)
    runs = OUT / "runs"
    if args.memory_only:
        _memory(small, manifest, runs)
        return
    shutil.rmtree(runs, ignore_errors=True)
    caches = {name: runs / f"cache-{name}" for name in ("model", "ingest", "e2e-1", "e2e-2")}

    start = time.perf_counter()
    finetune(first200, runs / "model", mode="full", epochs=1, cache_dir=caches["model"], workers=2, progress=False,
             backbone_config=BackboneConfig(d_model=32, n_layers=1, n_heads=4))
    print(f"fine-tuned the benchmark model on 200 patients in {time.perf_counter() - start:.0f} s")
    model = DiagnosisModel.from_pretrained(runs / "model", cache_dir=caches["ingest"] / "text-embeddings")
    cohort = load_cohort(manifest)
    n = len(cohort)
    chunks = [(k, cohort.rows[i : i + args.chunk_size]) for k, i in enumerate(range(0, n, args.chunk_size))]

    # ingestion alone (then the model alone on what it made ready)
    ready_chunks = []
    start = time.perf_counter()
    with ChunkFeeder(cohort, chunks, model.aligner, caches["ingest"], workers=2, task_timeout=600) as feeder:
        for ready in feeder:
            ready_chunks.append(ready)
        store = feeder.store
    ingest_rate = n / (time.perf_counter() - start)
    print(f"ingestion alone (2 workers, cold cache): {ingest_rate:.2f} rows/s")

    classes = {t: tuple(s.classes) for t, s in model.tasks.items()}
    from meddx.diagnose import file_sha256, model_provenance

    provenance = model_provenance(model, runs / "model", file_sha256(runs / "model" / "model.safetensors"))
    spec = model.aligner.tensor_spec()
    start = time.perf_counter()
    for ready in ready_chunks:
        frame, _ = chunk_frames(model, ready, store, spec, args.batch_size, True, "cpu")
        list(risk_assessments(frame.to_dict("records"), classes, provenance))
    model_rate = n / (time.perf_counter() - start)
    print(f"model alone (forward + contributions + FHIR, ready batches of {args.batch_size}): {model_rate:.2f} rows/s")

    rates = {}
    for workers in (1, 2):
        start = time.perf_counter()
        diagnose(manifest, runs / "model", runs / f"e2e-{workers}", cache_dir=caches[f"e2e-{workers}"],
                 workers=workers, chunk_size=args.chunk_size, batch_size=args.batch_size, progress=False)
        rates[workers] = n / (time.perf_counter() - start)
        print(f"end to end, {workers} ingestion worker(s), cold cache: {rates[workers]:.2f} rows/s")
    slower = min(ingest_rate, model_rate)
    print(f"end to end (2 workers) / slower of ingestion and model alone: {rates[2] / slower:.2f} (target >= 0.7)")

    _memory(small, manifest, runs)


def _memory(small: Path, manifest: Path, runs: Path) -> None:
    """Peak memory of diagnose on the small and the whole cohort (warm cache from the end-to-end run)."""
    memory_small = _child_memory(small, runs / "model", runs / "memory-small", runs / "cache-e2e-2")
    memory_all = _child_memory(manifest, runs / "model", runs / "memory-all", runs / "cache-e2e-2")
    print(f"peak memory of the diagnose process, {memory_small['rows']} rows: {memory_small['main_mib']:.0f} MiB")
    print(f"peak memory of the diagnose process, {memory_all['rows']} rows: {memory_all['main_mib']:.0f} MiB")
    print(f"ratio: {memory_all['main_mib'] / memory_small['main_mib']:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
