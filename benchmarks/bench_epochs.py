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

Each of ``--repeats`` pairs of training epochs starts from a fresh backbone and an empty text cache;
with more than one the median ratio is printed too (on a shared machine one pair can be 15% off).
``bench_backbone.py`` prints the same training epochs next to its throughput figures.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_epochs.py [--patients 1800] [--repeats 3] [--frozen-trunks]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

from bench_cohort import OUT, bench_cohort, sub_manifest


def prepared_first(patients: int):
    """The first ``patients`` of the shared cohort, prepared once (ingested, aligned, stored): its dataset."""
    from meddx.data import prepare_cohort

    manifest = sub_manifest(bench_cohort(), f"first-{patients}", slice(0, patients), split="train")
    started = time.perf_counter()
    prepared = prepare_cohort(manifest, cache_dir=OUT / "cache", workers=2, progress=False)
    dataset = prepared.dataset().with_inputs()
    print(
        f"{len(dataset)} cached patients ready in {time.perf_counter() - started:.1f} s (prepared before: "
        f"{prepared.report is None})"
    )
    return dataset


def training_epochs(
    dataset, batch_size: int, frozen_trunks: bool = False, seed: int = 0, device: str = "cpu"
) -> tuple[float, float]:
    """Seconds of a first and a second training epoch of a fresh default backbone (own, empty text cache)."""
    import torch
    from torch.utils.data import DataLoader

    from meddx.data.prefetch import prefetched
    from meddx.models import BackboneConfig, FoundationBackbone

    task = next(iter(dataset.tasks))
    with tempfile.TemporaryDirectory() as text_cache:
        torch.manual_seed(seed)
        backbone = FoundationBackbone.from_aligner(BackboneConfig(), dataset.aligner, cache_dir=Path(text_cache))
        if frozen_trunks:
            backbone.freeze_trunks()
        backbone.to(device)
        head = torch.nn.Linear(backbone.config.d_model, 1).to(device)
        optimizer = torch.optim.AdamW(
            [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-3
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            collate_fn=dataset.collate,
            generator=torch.Generator().manual_seed(seed),
        )
        times = []
        for _ in range(2):
            backbone.train()
            start = time.perf_counter()
            for batch in prefetched(loader):  # as meddx finetune reads them
                batch = batch.to(device)
                known = batch.label_mask[task]
                logits = head(backbone(batch).pooled).squeeze(-1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits[known], batch.labels[task][known].float()
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            times.append(time.perf_counter() - start)
    return times[0], times[1]


def print_training_epochs(
    dataset, batch_size: int, repeats: int, frozen_trunks: bool = False, device: str = "cpu"
) -> None:
    """Time ``repeats`` pairs of first and second epochs (each with a fresh backbone) and print them."""
    cached = "text and frozen trunks" if frozen_trunks else "text"
    ratios = []
    for repeat in range(repeats):
        first, second = training_epochs(dataset, batch_size, frozen_trunks, seed=repeat, device=device)
        ratios.append(first / second)
        print(
            f"training epoch 1: {first:.1f} s ({len(dataset) / first:.1f} patients/s; {cached} computed); "
            f"epoch 2: {second:.1f} s ({len(dataset) / second:.1f} patients/s; {cached} cached); "
            f"{first / second:.2f}x faster"
        )
    if repeats > 1:
        print(
            f"second epoch faster than the first: median {statistics.median(ratios):.2f}x "
            f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x over {repeats} pairs)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=None, help="default: meddx finetune's batch size")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of first and second training epochs")
    parser.add_argument("--frozen-trunks", action="store_true", help="train with frozen imaging/video trunks")
    args = parser.parse_args()

    import torch

    from meddx.embeddings import compute_embeddings
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.heads import DiagnosisHeads
    from meddx.training import DEFAULT_BATCH_SIZE

    args.batch = args.batch or DEFAULT_BATCH_SIZE
    torch.set_num_threads(2)
    dataset = prepared_first(args.patients)
    task = next(iter(dataset.tasks))
    print_training_epochs(dataset, args.batch, args.repeats, args.frozen_trunks)
    if args.frozen_trunks:
        print(f"peak memory (this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        return

    with tempfile.TemporaryDirectory() as text_cache:
        torch.manual_seed(0)
        backbone = FoundationBackbone.from_aligner(BackboneConfig(), dataset.aligner, cache_dir=Path(text_cache))
        heads = DiagnosisHeads(backbone.config.d_model, dataset.tasks)
        optimizer = torch.optim.AdamW(heads.parameters(), lr=3e-3)
        times = []
        embeddings = None
        for _ in range(3):
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
        print(
            f"head-only epoch 1: {times[0]:.1f} s (embeddings computed once); epoch 2: {times[1]:.3f} s; "
            f"{times[0] / times[1]:.0f}x faster"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (this process): {peak:.0f} MiB")


if __name__ == "__main__":  # ingestion spawns worker processes
    main()
