"""Does self-supervised pretraining help when labels are few?

On the shared generated cohort (``bench_cohort.py``): rows 1-1000 pretrain the backbone with no
labels; rows 1001-1060 are the 60 labelled patients; rows 1201-1800 (600) are the test set.
For each of 3 seeds it reports the test AUROC of

* **pretrained + linear head**: the pretrained backbone, frozen, and a logistic regression on
  its pooled embeddings of the 60 labelled patients;
* **scratch + linear head**: the same architecture with fresh weights, frozen, same probe;
* **scratch, trained end to end**: the same architecture with fresh weights and a linear head,
  all trained on the 60 labelled patients (the fair "from scratch" baseline).

The tensorizers are fitted on the pretraining rows for all three, so only the weights differ.

Run: ``.venv/bin/python benchmarks/bench_pretrain.py [--epochs 8] [--seeds 0 1 2]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from bench_cohort import OUT, bench_cohort, sub_manifest


def probe_auroc(train, test, task: str = "disease") -> float:
    """Test AUROC of a logistic regression on standardised pooled embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y_train, y_test = train.labels[task].numpy(), test.labels[task].numpy()
    known_train, known_test = y_train >= 0, y_test >= 0
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    probe.fit(train.pooled.numpy()[known_train], y_train[known_train])
    scores = probe.predict_proba(test.pooled.numpy()[known_test])[:, 1]
    return float(roc_auc_score(y_test[known_test], scores))


def end_to_end_auroc(backbone, train_set, test_set, seed: int, epochs: int = 30, task: str = "disease") -> float:
    """Train backbone + linear head on the labelled rows; test AUROC."""
    import torch
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader

    from meddx.embeddings import compute_embeddings

    torch.manual_seed(seed)
    head = torch.nn.Linear(backbone.config.d_model, 1)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    loader = DataLoader(
        train_set,
        batch_size=16,
        shuffle=True,
        collate_fn=train_set.collate,
        generator=torch.Generator().manual_seed(seed),
    )
    backbone.train()
    for _ in range(epochs):
        for batch in loader:
            known = batch.label_mask[task]
            if not known.any():
                continue
            logits = head(backbone(batch).pooled).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[known], batch.labels[task][known].float()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = compute_embeddings(backbone, test_set)
    with torch.no_grad():
        scores = head(test.pooled).squeeze(-1).numpy()
    y = test.labels[task].numpy()
    return float(roc_auc_score(y[y >= 0], scores[y >= 0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="pretraining epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="ingestion workers")
    args = parser.parse_args()

    import torch

    from meddx.data import prepare_cohort
    from meddx.embeddings import compute_embeddings
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.training import pretrain

    torch.set_num_threads(2)
    manifest = bench_cohort()
    unlabelled = sub_manifest(manifest, "pretrain-1000", slice(0, 1000), keep_labels=False)
    labelled = sub_manifest(manifest, "labelled-60", slice(1000, 1060), split="train")
    test = sub_manifest(manifest, "test-600", slice(1200, 1800), split="test")
    cache = OUT / "cache"

    started = time.perf_counter()
    base = prepare_cohort(unlabelled, cache_dir=cache, workers=args.workers, progress=False)
    train_set = prepare_cohort(
        labelled, cache_dir=cache, aligner=base.aligner, workers=args.workers, progress=False
    ).dataset()
    test_set = prepare_cohort(
        test, cache_dir=cache, aligner=base.aligner, workers=args.workers, progress=False
    ).dataset()
    print(f"prepared 1000 + 60 + 600 patients in {time.perf_counter() - started:.0f} s")

    rows = []
    for seed in args.seeds:
        folder = OUT / f"pretrained-seed{seed}"
        done = folder / "pretraining.json"
        if done.is_file() and len(json.loads(done.read_text())["epochs"]) == args.epochs:
            epochs = json.loads(done.read_text())["epochs"]  # this pretraining ran already: reuse it
        else:
            epochs = pretrain(
                unlabelled, folder, epochs=args.epochs, seed=seed, cache_dir=cache, workers=args.workers, progress=False
            ).epochs
        pretrain_s = sum(e["seconds"] for e in epochs)
        pretrained = FoundationBackbone.from_pretrained(folder)
        pretrained_auc = probe_auroc(
            compute_embeddings(pretrained, train_set), compute_embeddings(pretrained, test_set)
        )

        torch.manual_seed(seed)
        scratch = FoundationBackbone.from_aligner(BackboneConfig(), base.aligner)
        scratch_probe = probe_auroc(compute_embeddings(scratch, train_set), compute_embeddings(scratch, test_set))
        scratch_e2e = end_to_end_auroc(scratch, train_set, test_set, seed)
        last = epochs[-1]
        rows.append((seed, pretrained_auc, scratch_probe, scratch_e2e))
        print(
            f"seed {seed}: pretrained+probe {pretrained_auc:.3f} | scratch+probe {scratch_probe:.3f} | "
            f"scratch end-to-end {scratch_e2e:.3f} | pretraining {pretrain_s:.0f} s, last epoch losses "
            f"masked {last['masked']:.3f} contrastive {last['contrastive']:.3f}"
        )

    table = np.array([r[1:] for r in rows])
    mean = table.mean(axis=0)
    print()
    print(f"test AUROC, mean over seeds {args.seeds} (600 test patients, 60 labelled, 1000 unlabelled):")
    print(f"  pretrained + linear head      {mean[0]:.3f}")
    print(f"  scratch + linear head         {mean[1]:.3f}   gap {mean[0] - mean[1]:+.3f}")
    print(f"  scratch, trained end to end   {mean[2]:.3f}   gap {mean[0] - mean[2]:+.3f}")


if __name__ == "__main__":  # ingestion spawns worker processes
    main()
