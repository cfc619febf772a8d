"""Batch diagnosis on Ray against the local engine: rows/s of each on the same cohort, and their ratio.

Generates ``--patients`` synthetic patients (seed 7, all six modalities in the real formats;
the cohort ``bench_diagnose.py`` uses) into ``benchmarks/out/`` (kept, so a second run skips it),
fine-tunes a small model on the first 200 (a tiny backbone, one epoch: speed, not quality, is
measured), diagnoses the cohort once with the local engine to fill the cache, then times, on that
warm cache:

- the **local engine** (``engine="local"``, its default workers);
- the **Ray engine** (``engine="ray"``, no address: it starts a local Ray sized to the machine
  and stops it, and that start-up is part of its time, as it is of a user's command).

Both read only cached records and aligned tensors, so the comparison is of the engines (the
streaming, the transport between ingestion and model, the start-up), not of a cold disk and
decoders that a first run pays for whichever engine makes it. Target: the Ray engine's time at
most 1.5x the local engine's on one machine, where Ray can only add cost.

Run: ``.venv/bin/python benchmarks/bench_ray.py [--patients 2000] [--chunk-size 256]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from bench_cohort import OUT, bench_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import pandas as pd

    from meddx.batch import diagnose
    from meddx.models import BackboneConfig
    from meddx.training import finetune

    start = time.perf_counter()
    manifest = bench_cohort(args.patients, seed=7)  # the cohort bench_diagnose.py uses
    cohort_dir = manifest.parent
    print(f"cohort of {args.patients} patients ready in {time.perf_counter() - start:.0f} s")
    first200 = cohort_dir / "manifest-first-200.csv"
    pd.read_csv(manifest, dtype=str, keep_default_na=False).head(200).to_csv(first200, index=False)
    runs = OUT / f"ray-runs-{args.patients}"
    shutil.rmtree(runs, ignore_errors=True)
    cache, model = runs / "cache", runs / "model"

    start = time.perf_counter()
    finetune(
        first200,
        model,
        mode="full",
        epochs=1,
        cache_dir=cache,
        workers=2,
        progress=False,
        backbone_config=BackboneConfig(d_model=32, n_layers=1, n_heads=4),
    )
    print(f"fine-tuned the benchmark model on 200 patients in {time.perf_counter() - start:.0f} s")
    settings = dict(cache_dir=cache, chunk_size=args.chunk_size, batch_size=args.batch_size, progress=False)
    start = time.perf_counter()
    diagnose(manifest, model, runs / "warm-up", **settings)
    print(f"warm-up (local engine, cold cache): {args.patients / (time.perf_counter() - start):.2f} rows/s")

    seconds = {}
    for engine in ("local", "ray"):
        start = time.perf_counter()
        result = diagnose(manifest, model, runs / engine, engine=engine, **settings)
        seconds[engine] = time.perf_counter() - start
        run = json.loads(result.run.read_text())
        print(
            f"{engine} engine, warm cache: {args.patients / seconds[engine]:.2f} rows/s "
            f"({seconds[engine]:.1f} s; settings {json.dumps(run['settings'], sort_keys=True)})"
        )
    local = pd.read_parquet(runs / "local" / "predictions.parquet")
    on_ray = pd.read_parquet(runs / "ray" / "predictions.parquet")
    worst = (local.probability - on_ray.probability).abs().max()
    print(
        f"same rows: {local[['patient_id', 'index_time', 'task']].equals(on_ray[['patient_id', 'index_time', 'task']])}"
        f"; largest probability difference {worst:.2e}"
    )
    print(f"Ray engine time / local engine time: {seconds['ray'] / seconds['local']:.2f} (target <= 1.5)")
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
