"""Which out-of-distribution score tells shifted rows apart? Mahalanobis vs kNN vs the logits' energy.

A generated cohort (``meddx.synth.generate_cohort``, default 240 patients, its split column:
about 60/20/20) fine-tunes a tiny model (``full``, d_model 16); the OOD scorers are fitted on the
training rows' embeddings and thresholded on the validation rows at 5% (what ``finetune`` does).
The test rows are then scored as they are, and again with one modality shifted the way sites
differ, strongly:

* ``audio-tone``: every lung sound replaced by a loud 3 kHz tone (another device);
* ``imaging-bright``: every CT series' HU raised by 400 (another reconstruction / calibration);

Per scorer and shift: the AUROC of the row score at telling the shifted test rows from the
unshifted ones (rows that have the modality), the share of shifted rows flagged (fused ``ood`` > 1),
the share of unshifted test rows flagged (the false-alarm rate, target 0.05), and how often the
flag names the shifted modality.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_ood.py [--patients 240] [--epochs 3] [--reuse]``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np


def shift_audio(folder: Path) -> None:
    import soundfile

    for wav in folder.glob("patients/*/*.wav"):
        info = soundfile.info(wav)
        t = np.arange(info.frames) / info.samplerate
        tone = 0.8 * np.sin(2 * np.pi * min(3000.0, 0.4 * info.samplerate) * t)
        soundfile.write(wav, np.stack([tone] * info.channels, axis=1) if info.channels > 1 else tone, info.samplerate)


def shift_imaging(folder: Path) -> None:
    import pydicom

    for path in folder.glob("patients/*/ct/*"):
        ds = pydicom.dcmread(path)
        ds.RescaleIntercept = float(getattr(ds, "RescaleIntercept", 0)) + 400.0
        ds.save_as(path)


SHIFTS = {"audio-tone": ("audio", shift_audio), "imaging-bright": ("imaging", shift_imaging)}


def embeddings_of(model, manifest: Path, split: str, cache: Path):
    from meddx.data import prepare_cohort
    from meddx.training.ood_fit import dataset_embeddings
    from meddx.training.validation import dataset_outputs

    dataset = prepare_cohort(manifest, cache_dir=cache, aligner=model.aligner, workers=2, progress=False).dataset(
        split=split
    )
    x, have, labels = dataset_embeddings(model, dataset)
    logits, _, _ = dataset_outputs(model, dataset, 64, "cpu")
    return x, have, labels, logits


def main() -> None:
    from meddx.metrics import auroc
    from meddx.models import BackboneConfig
    from meddx.models.ood import SUMMARY, energy_score, fit_ood
    from meddx.synth import generate_cohort
    from meddx.training import finetune

    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="/tmp/meddx-bench-ood")
    parser.add_argument("--reuse", action="store_true", help="score with OUT/model if it is there")
    args = parser.parse_args()
    out = Path(args.out)
    cache = out / "cache"
    base = generate_cohort(out / "base", n_patients=args.patients, seed=7)
    started = time.perf_counter()
    if args.reuse and (out / "model" / "ood.json").is_file():
        from meddx.models.diagnosis import DiagnosisModel

        model = DiagnosisModel.from_pretrained(out / "model")
    else:
        model = finetune(
            base,
            out / "model",
            mode="full",
            epochs=args.epochs,
            seed=0,
            cache_dir=cache,
            workers=2,
            progress=False,
            backbone_config=BackboneConfig(d_model=16, n_layers=1, n_heads=2),
        )
    print(f"model on {model.training_info['rows']} rows in {time.perf_counter() - started:.0f} s")
    kind = next(iter(model.tasks.values())).kind
    train = embeddings_of(model, base, "train", cache)
    val = embeddings_of(model, base, "val", cache)
    test = embeddings_of(model, base, "test", cache)
    shifted = {}
    for name, (modality, shift) in SHIFTS.items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(out / "base", folder)
        shift(folder)
        shifted[name] = (modality, embeddings_of(model, folder / "manifest.csv", "test", cache))

    print("| scorer | shift | AUROC shifted vs unshifted | flagged (shifted) | flagged (unshifted) | names it |")
    print("|---|---|---|---|---|---|")
    for method in ("mahalanobis", "knn"):
        spaces = [s for s in train[0] if s in val[0]]
        ood = fit_ood(
            {s: train[0][s] for s in spaces},
            train[2],
            {s: val[0][s] for s in spaces},
            train_present={s: train[1][s] for s in spaces},
            val_present={s: val[1][s] for s in spaces},
            method=method,
        )
        _, fused_test = ood.score(test[0], test[1])
        for name, (modality, data) in shifted.items():
            ratios, fused = ood.score(data[0], data[1])
            have = data[1][modality]
            y = np.r_[np.zeros(have.sum()), np.ones(have.sum())]
            value = auroc(y, np.r_[fused_test[have], fused[have]])
            names = np.mean(ratios[modality][have & (fused > 1)] > 1) if (have & (fused > 1)).any() else float("nan")
            print(
                f"| {method} | {name} | {value:.3f} | {np.mean(fused[have] > 1):.2f} | "
                f"{np.mean(fused_test > 1):.2f} | {names:.2f} |"
            )
    print()
    print("| scorer | false alarm on unshifted rows, mean (min-max) over 50 random val/test re-splits |")
    print("|---|---|")
    both = {s: np.concatenate([val[0][s], test[0][s]]) for s in val[0] if s in test[0]}
    both_have = {s: np.concatenate([val[1][s], test[1][s]]) for s in both}
    rng = np.random.default_rng(0)
    for method in ("mahalanobis", "knn"):
        rates = []
        for _ in range(50):
            half = rng.permutation(len(both[SUMMARY])) < len(val[0][SUMMARY])
            ood = fit_ood(
                {s: train[0][s] for s in both},
                train[2],
                {s: v[half] for s, v in both.items()},
                train_present={s: train[1][s] for s in both},
                val_present={s: v[half] for s, v in both_have.items()},
                method=method,
            )
            _, fused = ood.score({s: v[~half] for s, v in both.items()}, {s: v[~half] for s, v in both_have.items()})
            rates.append(np.mean(fused > 1))
        print(f"| {method} | {np.mean(rates):.3f} ({np.min(rates):.2f}-{np.max(rates):.2f}) |")
    print()
    energy_test = energy_score(test[3][next(iter(model.tasks))], kind)
    energy_val = energy_score(val[3][next(iter(model.tasks))], kind)
    from meddx.models.ood import conformal_quantile

    threshold = conformal_quantile(energy_val, 0.05)
    for name, (modality, data) in shifted.items():
        have = data[1][modality]
        energy = energy_score(data[3][next(iter(model.tasks))], kind)
        y = np.r_[np.zeros(have.sum()), np.ones(have.sum())]
        value = auroc(y, np.r_[energy_test[have], energy[have]])
        print(
            f"| energy | {name} | {value:.3f} | {np.mean(energy[have] > threshold):.2f} | "
            f"{np.mean(energy_test > threshold):.2f} | n/a |"
        )


if __name__ == "__main__":
    main()
