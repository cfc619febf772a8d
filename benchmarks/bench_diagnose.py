"""Batch diagnosis: throughput end to end, of ingestion alone and of the model alone, and peak memory.

Generates ``--patients`` synthetic patients (seed 7, all six modalities in the real formats)
into ``benchmarks/out/`` and fine-tunes a small model on the first 200 (a tiny backbone, one
epoch: the speed of the model, not its quality, is measured); both are kept, so a second run
skips them. Then it prints rows per second of:

- **ingestion alone**: the streaming feeder (ingest + align every row into the store, chunks of
  ``--chunk-size``) with 2 worker processes and no model, on a cold cache;
- **the model alone**: what the main process does per chunk in ``diagnose`` (read the tensors
  from the store, forward with contributions, prediction rows, FHIR RiskAssessments made and
  validated), on the chunks ingestion alone made ready, nothing ingested; the notes meet the
  frozen text model for the first time (a cold text-embedding cache), as in a cold ``diagnose``.
  It runs with the faster of torch's default threads and one thread, chosen on the first
  ``--small`` rows (each on a cold text cache): the model's best on this machine;
- **end to end**: ``meddx.batch.diagnose`` with 1 and with 2 ingestion workers, each in a
  fresh process on a cold cache (ingest cache, aligned store and text embeddings), timed from
  the call to its return (writing the parts and assembling the final files included);

each also in CPU milliseconds per row (user + system, of the process and its workers, start-up
included): what a row costs whatever else the machine runs, so that ``cores / CPU per row``
bounds what an idle machine can do. Last, the peak resident memory (VmHWM) of the ``diagnose``
process and of its largest worker in the 2-worker end-to-end run on all rows and in the same
run on the first ``--small`` rows.
Targets: end to end at least 0.7x the slower of ingestion alone and the model alone; peak
memory at all rows at most 1.3x that at ``--small`` rows.

Run (under the shared lock on a shared machine):
``flock /tmp/meddx-bench.lock .venv/bin/python benchmarks/bench_diagnose.py [--patients 2000] [--small 200]``
(at 2000 patients on 2 cores: about 5 minutes to generate the cohort and 3 to fine-tune, once;
then four cold ingestions of the cohort: an estimated 25 minutes, not yet timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_cohort import OUT, bench_cohort

# diagnose in a fresh process; prints its own peak RSS (VmHWM: per address space, new at exec,
# unlike ru_maxrss, which Linux carries over from the parent through fork and exec)
_CHILD = """
import json, sys, time
from meddx.batch import diagnose
def hwm():
    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))
    return int(line.split()[1]) / 1024
if __name__ == '__main__':
    manifest, model, out, cache, workers, chunk, batch = sys.argv[1:8]
    start = time.perf_counter()
    r = diagnose(manifest, model, out, cache_dir=cache, workers=int(workers), chunk_size=int(chunk),
                 batch_size=int(batch), progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({'main_mib': hwm(), 'rows': r.counts['rows'], 'seconds': seconds, 'timings': r.timings}))
"""


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of its children that have been waited for."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def _hwm_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next(line for line in status if line.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``: the children of each of its threads (the feeder thread starts the workers)."""
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children += [int(c) for c in handle.read().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return children + [d for c in children for d in _descendants(c)]


def _diagnose_child(manifest: Path, model: Path, out: Path, cache: Path, workers: int, args) -> dict:
    """A cold ``diagnose`` in a fresh process: rows/s, timings, its peak RSS and its largest worker's.

    The workers' peaks are read from /proc every 0.2 s while they live (VmHWM only grows, so the
    last reading is at most 0.2 s of work short of their true peak).
    """
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(manifest), str(model), str(out), str(cache), str(workers), str(args.chunk_size), str(args.batch_size)]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peaks: dict[int, float] = {}
    _, children_before = _cpu_seconds()

    def watch() -> None:
        while child.poll() is None:
            for pid in _descendants(child.pid):
                peaks[pid] = max(peaks.get(pid, 0.0), _hwm_mib(pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = child.communicate()
    watcher.join()
    if child.returncode != 0:
        raise RuntimeError(f"diagnose failed ({child.returncode}):\n{stderr[-3000:]}")
    found = json.loads(stdout.strip().splitlines()[-1])
    found["cpu_seconds"] = _cpu_seconds()[1] - children_before  # the process and its workers, start-up included
    found["worker_mib"] = max(peaks.values(), default=0.0)
    found["rate"] = found["rows"] / found["seconds"]
    return found


def _model_pass(
    model_dir: Path, ready_chunks, store, text_cache: Path, batch_size: int, threads: int | None
) -> tuple[float, float]:
    """Seconds and CPU seconds of the main process's per-chunk work on ready chunks (cold text cache)."""
    import torch

    from meddx.batch.options import ChunkSettings
    from meddx.batch.predict import predict_chunk
    from meddx.batch.run_folder import chunk_table, provenance_of
    from meddx.export.fhir import risk_assessments
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.models.folder import check_model_folder

    shutil.rmtree(text_cache, ignore_errors=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        model = DiagnosisModel.from_pretrained(model_dir, cache_dir=text_cache).eval()
        provenance = provenance_of(check_model_folder(model_dir, fingerprint=True))
        settings = ChunkSettings(batch_size, True, "cpu")
        start, cpu = time.perf_counter(), _cpu_seconds()[0]
        for ready in ready_chunks:
            predictions = predict_chunk(model, ready, store, settings)
            chunk_table(ready, predictions, list(model.tasks))
            list(risk_assessments(predictions, provenance))
        return time.perf_counter() - start, _cpu_seconds()[0] - cpu
    finally:
        torch.set_num_threads(before)


def _rows_prefix(ready_chunks, n: int):
    """The ready chunks cut to their first ``n`` rows."""
    from meddx.streaming import ReadyChunk

    out, left = [], n
    for ready in ready_chunks:
        if left <= 0:
            break
        out.append(ReadyChunk(ready.number, ready.rows[:left], ready.ingest_seconds))
        left -= len(out[-1].rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--small", type=int, default=200, help="rows of the smaller memory run")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import pandas as pd
    import torch

    from meddx.cohort import load_cohort
    from meddx.models import BackboneConfig
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.streaming import ChunkFeeder
    from meddx.training import finetune

    load = os.getloadavg()
    print(f"{os.cpu_count()} cores; load average at the start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    start = time.perf_counter()
    manifest = bench_cohort(args.patients, seed=7)
    cohort_dir = manifest.parent
    print(f"cohort of {args.patients} patients ready in {time.perf_counter() - start:.0f} s")
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    small = cohort_dir / f"manifest-first-{args.small}.csv"
    rows.head(args.small).to_csv(small, index=False)
    model_dir = cohort_dir / "model-first-200"
    if not (model_dir / "model.safetensors").is_file():
        first200 = cohort_dir / "manifest-first-200.csv"
        rows.head(200).to_csv(first200, index=False)
        start = time.perf_counter()
        finetune(
            first200,
            model_dir,
            mode="full",
            epochs=1,
            cache_dir=cohort_dir / "cache-model",
            workers=2,
            progress=False,
            backbone_config=BackboneConfig(d_model=32, n_layers=1, n_heads=4),
        )
        seconds = time.perf_counter() - start
        print(f"fine-tuned the benchmark model on the first {min(200, len(rows))} patients in {seconds:.0f} s")
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)

    # ingestion alone (then the model alone on what it made ready)
    model = DiagnosisModel.from_pretrained(model_dir, cache_dir=runs / "unused-text-cache")
    cohort = load_cohort(manifest)
    n = len(cohort)
    chunks = [(k, cohort.rows[i : i + args.chunk_size]) for k, i in enumerate(range(0, n, args.chunk_size))]
    ready_chunks = []
    start, cpu = time.perf_counter(), sum(_cpu_seconds())
    with ChunkFeeder(cohort, chunks, model.aligner, runs / "cache-ingest", workers=2, task_timeout=600) as feeder:
        for ready in feeder:
            ready_chunks.append(ready)
        store = feeder.store
    ingest_rate = n / (time.perf_counter() - start)
    ingest_cpu = (sum(_cpu_seconds()) - cpu) / n  # the workers were joined when the feeder closed
    print(f"ingestion alone (2 workers, cold cache): {ingest_rate:.2f} rows/s; {ingest_cpu * 1000:.0f} CPU ms/row")

    text_cache = runs / "text-embeddings-model-alone"
    head = _rows_prefix(ready_chunks, args.small)
    trial = {
        threads: _model_pass(model_dir, head, store, text_cache, args.batch_size, threads)[0]
        for threads in sorted({torch.get_num_threads(), 1})
    }
    threads = min(trial, key=trial.__getitem__)
    print(
        "model alone on the first {} rows: {} (seconds by torch threads); all rows with {} thread(s)".format(
            args.small, ", ".join(f"{t}: {s:.1f}" for t, s in trial.items()), threads
        )
    )
    seconds, cpu = _model_pass(model_dir, ready_chunks, store, text_cache, args.batch_size, threads)
    model_rate = n / seconds
    print(
        f"model alone (read, forward + contributions, rows, FHIR; batches of {args.batch_size}): "
        f"{model_rate:.2f} rows/s; {cpu / n * 1000:.0f} CPU ms/row"
    )
    del ready_chunks, head

    slower = min(ingest_rate, model_rate)
    end_to_end = {}
    for workers in (1, 2):
        found = _diagnose_child(
            manifest, model_dir, runs / f"e2e-{workers}", runs / f"cache-e2e-{workers}", workers, args
        )
        end_to_end[workers] = found
        print(
            f"end to end, {workers} ingestion worker(s), cold cache: {found['rate']:.2f} rows/s "
            f"({found['rate'] / slower:.2f}x the slower stage); {found['cpu_seconds'] / n * 1000:.0f} CPU ms/row; "
            "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in found["timings"].items())
        )
    best = max(found["rate"] for found in end_to_end.values())
    print(
        f"end to end (best of 1 and 2 workers) / slower of ingestion and model alone: {best / slower:.2f} "
        "(target >= 0.7)"
    )

    few = _diagnose_child(small, model_dir, runs / "e2e-small", runs / "cache-e2e-small", 2, args)
    every = end_to_end[2]
    for found in (few, every):
        print(
            f"peak memory, {found['rows']} rows (2 workers, cold cache): diagnose process "
            f"{found['main_mib']:.0f} MiB, largest worker {found['worker_mib']:.0f} MiB"
        )
    print(
        f"ratio, diagnose process: {every['main_mib'] / few['main_mib']:.2f}; largest worker: "
        f"{every['worker_mib'] / max(few['worker_mib'], 1e-9):.2f} (target <= 1.3)"
    )
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
