"""Do the cheaper encoder defaults cost accuracy? A short fine-tune, old settings against new.

On the first 1800 patients of the shared generated cohort (``bench_cohort.py``, prepared once),
trains the backbone + a linear head for ``--epochs`` on the first 1200 and reports test AUROC on
the other 600, for each case (``imaging`` or ``video`` alone: the other modalities withheld and
only patients with that modality scored; ``fused``: everything) and each variant:

* ``old``: no input pooling, attention dropout 0.1 (the defaults before ``input_pool``);
* ``new``: the defaults;
* ``nodrop``: the defaults with ``dropout`` 0 as well;
* ``frozen``: the defaults with the imaging and video CNNs frozen at their random initialisation.

One torch thread by default, so that the figures do not depend on what else the machine runs.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_encoder_defaults.py [--epochs 3] [--seeds 0]
[--cases imaging,video,fused] [--variants old,new]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_cohort import OUT, bench_cohort, sub_manifest

MODALITIES = ["imaging", "ehr", "notes", "device_logs", "audio", "video"]
VARIANTS = {
    "old": {"attention_dropout": 0.1, "imaging": {"input_pool": 1}, "video": {"input_pool": 1}},
    "new": {},
    "nodrop": {"dropout": 0.0},
    "frozen": {"imaging": {"frozen": True}, "video": {"frozen": True}},
}


def fine_tune(prepared, train, test, config, modality: str | None, seed: int, epochs: int, text_cache) -> tuple:
    """Test AUROC, scored rows and training seconds of one short fine-tune."""
    import torch
    from torch.utils.data import DataLoader

    from meddx.metrics import auroc
    from meddx.models import FoundationBackbone

    task = next(iter(train.tasks))
    withhold = None if modality is None else [m for m in MODALITIES if m != modality]

    def scored(batch):
        known = batch.label_mask[task]
        return known if modality is None else known & batch.present[:, MODALITIES.index(modality)]

    torch.manual_seed(seed)
    backbone = FoundationBackbone.from_aligner(config, prepared.aligner, cache_dir=text_cache)
    head = torch.nn.Linear(config.d_model, 1)
    optimizer = torch.optim.AdamW(
        [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-3
    )
    loader = DataLoader(
        train, batch_size=32, shuffle=True, collate_fn=train.collate, generator=torch.Generator().manual_seed(seed)
    )
    started = time.perf_counter()
    for _ in range(epochs):
        backbone.train()
        for batch in loader:
            known = scored(batch)
            if not known.any():
                continue
            logits = head(backbone(batch, withhold=withhold).pooled).squeeze(-1)
            target = batch.labels[task][known].float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    backbone.eval()
    labels, probabilities = [], []
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=64, collate_fn=test.collate):
            known = scored(batch)
            p = torch.sigmoid(head(backbone(batch, withhold=withhold).pooled).squeeze(-1))
            labels.append(batch.labels[task][known].numpy())
            probabilities.append(p[known].numpy())
    y = np.concatenate(labels)
    return auroc(y, np.concatenate(probabilities)), len(y), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cases", default="imaging,video,fused")
    parser.add_argument("--variants", default="old,new")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from meddx.data import prepare_cohort
    from meddx.models import BackboneConfig

    torch.set_num_threads(args.threads)
    manifest = sub_manifest(bench_cohort(), "first-1800", slice(0, 1800), split="train")
    prepared = prepare_cohort(manifest, cache_dir=OUT / "cache", workers=2, progress=False)
    rows = prepared.dataset().with_inputs().rows
    train = prepared.dataset(rows=rows[:1200]).with_inputs()
    test = prepared.dataset(rows=rows[1200:]).with_inputs()
    with tempfile.TemporaryDirectory() as text_cache:  # the text model runs once for all the fine-tunes
        for case in args.cases.split(","):
            for seed in args.seeds:
                for variant in args.variants.split(","):
                    config = BackboneConfig.from_dict(VARIANTS[variant])
                    modality = None if case == "fused" else case
                    auc, n, seconds = fine_tune(
                        prepared, train, test, config, modality, seed, args.epochs, Path(text_cache)
                    )
                    print(
                        f"{case:8s} seed {seed} {variant:7s} test AUROC {auc:.3f} (n={n}); training {seconds:.0f} s",
                        flush=True,
                    )


if __name__ == "__main__":  # ingestion spawns worker processes
    main()
