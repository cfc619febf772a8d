"""Backbone speed with the default configs: forward and training patients/s, epochs over cached patients, memory.

1. Throughput: generates ``--patients`` synthetic patients (all six modalities, the real formats),
   ingests and aligns them once, collates in-memory batches of ``--batch`` patients, then times the
   default ``BackboneConfig`` on this machine's CPU (or CUDA when present, under bf16 autocast):
   forward in eval mode, first pass (the frozen text model runs) and second pass (its chunk
   embeddings come from the cache); training (backbone + a linear head on the cohort's label,
   AdamW, modality dropout on).
2. Epochs (``bench_epochs.py``): the first ``--epoch-patients`` patients of the shared benchmark
   cohort, prepared once, read through ``CohortDataset``; ``--repeats`` pairs of a first training
   epoch (the text model runs) and a second (its embeddings are cached), each pair from a fresh
   backbone, at ``meddx finetune``'s batch size. Target: the second epoch at least 3x faster than
   the first and under 60 s. ``--epoch-patients 0`` skips this part.
3. Peak memory of the process.

Run: ``.venv/bin/python benchmarks/bench_backbone.py [--patients 64] [--batch 32]
[--threads 1,2] [--epoch-patients 1800] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from meddx.align import Aligner
from meddx.cohort import load_cohort
from meddx.ingest.runner import ingest_cohort
from meddx.models import BackboneConfig, FoundationBackbone
from meddx.records import collate
from meddx.synth import generate_cohort


def _batches(patients: int, batch_size: int, root: Path):
    cohort = load_cohort(generate_cohort(root / "cohort", n_patients=patients, seed=7))
    report = ingest_cohort(cohort, root / "cache", workers=2, progress=False)
    records = list(report.patient_records())
    aligner = Aligner().fit(records)
    task = next(iter(cohort.tasks), None)
    tensors = []
    for row, record in zip(cohort, records, strict=True):
        item = aligner.transform(record)
        if task is not None and row.labels.get(task) is not None:
            item.labels = {task: int(row.labels[task])}
        tensors.append(item)
    spec = aligner.tensor_spec()
    batches = [collate(tensors[i : i + batch_size], spec) for i in range(0, len(tensors), batch_size)]
    return aligner, batches, task


def _measure(aligner, batches, task, patients: int, device: torch.device, cache_dir: Path, seed: int) -> None:
    torch.manual_seed(seed)
    backbone = FoundationBackbone.from_aligner(BackboneConfig(), aligner, cache_dir=cache_dir).to(device)
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    print(f"device {device}, torch threads {torch.get_num_threads()}, trainable parameters {trainable:,}")
    backbone.eval()
    for label in ("forward, text model runs", "forward, text embeddings cached"):
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                backbone(batch)
        seconds = time.perf_counter() - start
        print(f"  {label}: {patients / seconds:.1f} patients/s ({seconds:.2f} s)")
    head = torch.nn.Linear(backbone.config.d_model, 1).to(device)
    params = [p for p in [*backbone.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    backbone.train()
    start = time.perf_counter()
    for batch in batches:
        logits = head(backbone(batch).pooled).squeeze(1)
        if task is not None:
            known = batch.label_mask[task]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[known], batch.labels[task][known].float()
            )
        else:
            loss = logits.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    print(f"  training (backbone + linear head, AdamW): {patients / seconds:.1f} patients/s ({seconds:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", default="", help="comma-separated torch thread counts to time (default: torch's)")
    parser.add_argument("--epoch-patients", type=int, default=1800, help="cached patients per epoch (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of first and second epochs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        aligner, batches, task = _batches(args.patients, args.batch, root)
        print(
            f"cohort: {args.patients} patients generated, ingested and aligned in {time.perf_counter() - start:.1f} s"
        )
        batches = [b.to(device) for b in batches]
        for n, threads in enumerate([int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]):
            torch.set_num_threads(threads)
            _measure(aligner, batches, task, args.patients, device, root / f"text{n}", args.seed)
    if args.epoch_patients:
        from bench_epochs import prepared_first, print_training_epochs

        from meddx.training import DEFAULT_BATCH_SIZE

        print(f"epochs over cached patients, batch {DEFAULT_BATCH_SIZE}, torch threads {torch.get_num_threads()}:")
        dataset = prepared_first(args.epoch_patients)
        print_training_epochs(dataset, DEFAULT_BATCH_SIZE, args.repeats, device=str(device))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory: {peak_mib:.0f} MiB (process RSS)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
