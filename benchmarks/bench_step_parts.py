"""Where one training step's time goes: data path and each part of the backbone, old settings against new.

On a batch of ``--batch`` cached patients of the shared cohort (``bench_cohort.py``, first 1800
prepared once):

* the data path: reading the rows from the tensor store and ``collate``, with 1 and 2 torch threads;
* forward + backward of the imaging encoder, the video encoder, the fusion transformer (on the
  encoders' detached tokens) and the whole backbone, for the ``old`` settings (no input pooling,
  attention dropout 0.1), the defaults with the earlier ``dropout`` 0.1 (``drop0.1``) and the defaults (``new``).
  The variants are interleaved in one process and the best of ``--reps`` is kept, so that other
  jobs on the machine bias them alike; one torch thread by default keeps the figures stable then.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_step_parts.py [--reps 6] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from bench_cohort import OUT, bench_cohort, sub_manifest

VARIANTS = {
    "old": {"dropout": 0.1, "attention_dropout": 0.1, "imaging": {"input_pool": 1}, "video": {"input_pool": 1}},
    "drop0.1": {"dropout": 0.1},  # the defaults before dropout went to 0
    "new": {},
}
PARTS = ("imaging", "video", "fusion", "whole")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import tempfile

    import torch

    from meddx.data import prepare_cohort
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.backbone import EncodedBatch
    from meddx.records import Modality

    manifest = sub_manifest(bench_cohort(), "first-1800", slice(0, 1800), split="train")
    dataset = prepare_cohort(manifest, cache_dir=OUT / "cache", workers=2, progress=False).dataset().with_inputs()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        reads, stacks = [], []
        for rep in range(args.reps):
            rows = range(rep * args.batch, (rep + 1) * args.batch)
            start = time.perf_counter()
            items = [dataset[i] for i in rows]
            reads.append(time.perf_counter() - start)
            start = time.perf_counter()
            dataset.collate(items)
            stacks.append(time.perf_counter() - start)
        print(
            f"data, {threads} torch thread(s): read {1000 * min(reads):.0f} ms, collate {1000 * min(stacks):.0f} ms "
            f"per batch of {args.batch}"
        )

    torch.set_num_threads(args.threads)
    batch = dataset.collate([dataset[i] for i in range(args.batch)])
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as text_cache:
        models = {}
        for name, overrides in VARIANTS.items():
            torch.manual_seed(0)
            models[name] = FoundationBackbone.from_aligner(
                BackboneConfig.from_dict(overrides), dataset.aligner, cache_dir=text_cache
            ).train()
            models[name](batch)  # the text model runs once, then its embeddings are cached

        def timed(key: tuple[str, str], step: Callable[[], None]) -> None:
            start = time.perf_counter()
            step()
            times.setdefault(key, []).append(time.perf_counter() - start)

        for _ in range(args.reps):
            for name, backbone in models.items():
                for modality in (Modality.IMAGING, Modality.VIDEO):
                    arrays = batch.tensors[modality]
                    encoder = backbone.encoders[modality.value]
                    timed((name, modality.value), lambda e=encoder, a=arrays: e(a).tokens.sum().backward())
                encoded = backbone.encode(batch)
                detached = EncodedBatch(
                    {m: t.detach().requires_grad_() for m, t in encoded.tokens.items()},
                    encoded.token_mask,
                    encoded.token_age_hours,
                    encoded.present,
                    encoded.encoder_embeddings.detach(),
                )
                timed((name, "fusion"), lambda b=backbone, d=detached: b.fuse(d).pooled.sum().backward())
                timed((name, "whole"), lambda b=backbone: b(batch).pooled.sum().backward())
    print(f"forward + backward, {args.threads} torch thread(s), best of {args.reps}:")
    for name in VARIANTS:
        print(f"  {name:7s} " + "  ".join(f"{part} {1000 * min(times[(name, part)]):.0f} ms" for part in PARTS))


if __name__ == "__main__":  # ingestion spawns worker processes
    main()
