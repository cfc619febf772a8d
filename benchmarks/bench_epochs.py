"""Epochs over 1800 cached patients: how much the second epoch saves over the first.

The first 1800 patients of the shared generated cohort (``bench_cohort.py``) are prepared once
(ingested, aligned, stored). Then, reading only the tensor store through ``CohortDataset`` and a
``DataLoader``, with the default ``BackboneConfig`` on this machine:

* **training epochs** (backbone + a linear head, AdamW, modality dropout): the first runs the frozen
  text model on every note chunk; the second finds the chunk embeddings in the text cache;
* **head-only epochs** (frozen backbone, ``meddx finetune --mode head``): the first computes every
  patient's embedding once (text model included); the second and later train the heads on the
  cached embeddings.

With ``--frozen-trunks`` the training epochs run with ``FoundationBackbone.freeze_trunks()`` (how
a pretrained backbone is fine-tuned end to end when its imaging and video CNNs are kept): the
first epoch also fills the frozen trunks' output cache, the second skips them.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_epochs.py [--patients 1800] [--frozen-trunks]``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from bench_cohort import OUT, bench_cohort, sub_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=None, help="default: meddx finetune's batch size")
    parser.add_argument("--frozen-trunks", action="store_true", help="train with frozen imaging/video trunks")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader

    from meddx.data import prepare_cohort
    from meddx.data.prefetch import prefetched
    from meddx.embeddings import compute_embeddings
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.heads import DiagnosisHeads

    from meddx.train import DEFAULT_BATCH_SIZE

    args.batch = args.batch or DEFAULT_BATCH_SIZE
    torch.set_num_threads(2)
    manifest = sub_manifest(bench_cohort(), f"first-{args.patients}", slice(0, args.patients), split="train")
    started = time.perf_counter()
    prepared = prepare_cohort(manifest, cache_dir=OUT / "cache", workers=2, progress=False)
    dataset = prepared.dataset().with_inputs()
    print(f"{len(dataset)} cached patients ready in {time.perf_counter() - started:.1f} s (prepared before: "
          f"{prepared.report is None})")
    task = next(iter(dataset.tasks))

    with tempfile.TemporaryDirectory() as text_cache:
        torch.manual_seed(0)
        backbone = FoundationBackbone.from_aligner(BackboneConfig(), prepared.aligner, cache_dir=Path(text_cache))
        if args.frozen_trunks:
            backbone.freeze_trunks()
        head = torch.nn.Linear(backbone.config.d_model, 1)
        optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad] + list(head.parameters()),
                                      lr=1e-3)
        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=dataset.collate,
                            generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(2):
            backbone.train()
            start = time.perf_counter()
            for batch in prefetched(loader):  # as meddx finetune reads them
                known = batch.label_mask[task]
                logits = head(backbone(batch).pooled).squeeze(-1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], batch.labels[task][known].float())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            times.append(time.perf_counter() - start)
        cached = "text and frozen trunks" if args.frozen_trunks else "text"
        print(f"training epoch 1: {times[0]:.1f} s ({len(dataset) / times[0]:.1f} patients/s; {cached} computed)")
        print(f"training epoch 2: {times[1]:.1f} s ({len(dataset) / times[1]:.1f} patients/s; {cached} cached); "
              f"{times[0] / times[1]:.2f}x faster")
    if args.frozen_trunks:
        print(f"peak memory (this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        return

    with tempfile.TemporaryDirectory() as text_cache:
        torch.manual_seed(0)
        backbone = FoundationBackbone.from_aligner(BackboneConfig(), prepared.aligner, cache_dir=Path(text_cache))
        heads = DiagnosisHeads(backbone.config.d_model, dataset.tasks)
        optimizer = torch.optim.AdamW(heads.parameters(), lr=3e-3)
        times = []
        embeddings = None
        for epoch in range(3):
            start = time.perf_counter()
            if embeddings is None:  # the first epoch computes every embedding once
                embeddings = compute_embeddings(backbone, dataset, batch_size=64)
            x, y = embeddings.pooled, embeddings.labels[task]
            order = torch.randperm(len(x))
            for begin in range(0, len(x), args.batch):
                rows = order[begin : begin + args.batch]
                known = y[rows] >= 0
                logits = heads(x[rows])[task]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], y[rows][known].float())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            times.append(time.perf_counter() - start)
        print(f"head-only epoch 1: {times[0]:.1f} s (embeddings computed once); epoch 2: {times[1]:.3f} s; "
              f"{times[0] / times[1]:.0f}x faster")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (this process): {peak:.0f} MiB")


if __name__ == "__main__":  # ingestion spawns worker processes
    main()
