"""The fast training path: prepare a generated cohort, reopen it, and iterate it with a DataLoader.

Generates ``--patients`` synthetic patients (all six modalities, the real formats) and
prints:

- the wall time of the first ``prepare_cohort`` (ingest with ``--workers`` processes, fit the
  aligner on the train rows, align every row into the store, write the index);
- the wall time of a second ``prepare_cohort`` on the same manifest (found in the index:
  no ingest, no hashing of sources, no alignment);
- shuffled epochs of ``DataLoader(batch_size=32, collate_fn=dataset.collate)`` with 0 and
  2 loader workers (two of each), over the cohort repeated ``--repeat`` times (``ConcatDataset``), so the epoch
  covers a few thousand cached rows (the same files: a warm page cache);
- patients per second, and peak RSS of this process and of its children (loader and ingest workers).

Run: ``.venv/bin/python benchmarks/bench_dataset.py [--patients 300] [--workers 2] [--repeat 10]``
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    parser.add_argument("--repeat", type=int, default=10, help="passes over the cohort in one measured epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    from meddx.data import prepare_cohort
    from meddx.synth import generate_cohort

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        manifest = generate_cohort(root / "cohort", n_patients=args.patients, seed=7)
        print(f"generated {args.patients} patients in {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        prepared = prepare_cohort(manifest, cache_dir=root / "cache", workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        print(
            f"prepare (ingest {args.workers} workers + fit + align + index): {seconds:.1f} s, "
            f"{args.patients / seconds:.1f} patients/s, {len(prepared.report.errors)} ingest errors"
        )

        start = time.perf_counter()
        again = prepare_cohort(manifest, cache_dir=root / "cache", workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        if again.report is not None or again.index_path != prepared.index_path:
            raise SystemExit("the second prepare_cohort did not find the index")
        print(f"prepare again (from the index): {seconds * 1000:.0f} ms")

        dataset = again.dataset()
        store_mib = sum(p.stat().st_size for p in dataset.store.root.rglob("*.safetensors")) / 2**20
        print(
            f"store: {store_mib:.0f} MiB, {store_mib / len(dataset) * 1024:.0f} KiB per row; "
            f"index: {again.index_path.stat().st_size / 1024:.0f} KiB"
        )
        epoch = ConcatDataset([dataset] * args.repeat)
        torch.set_num_threads(1)  # as a training process on 2 cores would leave one for the loader
        for loader_workers in (0, 0, 2, 2):  # each twice: the first pass may still meet the store's writeback
            loader = DataLoader(
                epoch, batch_size=args.batch_size, shuffle=True, num_workers=loader_workers, collate_fn=dataset.collate
            )
            start = time.perf_counter()
            rows = sum(len(batch) for batch in loader)
            seconds = time.perf_counter() - start
            print(
                f"epoch of {rows} rows, batch {args.batch_size}, {loader_workers} loader workers: "
                f"{seconds:.2f} s, {rows / seconds:.0f} patients/s"
            )
        self_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        children_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak RSS: this process {self_mib:.0f} MiB, largest child {children_mib:.0f} MiB")


if __name__ == "__main__":
    main()
