"""FoundationBackbone: shapes for every subset of modalities, masking, withholding, modality dropout."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from model_batches import fitted_aligner, random_patient, tiny_backbone_config

from meddx.errors import ConfigError
from meddx.models import BackboneOutput, FoundationBackbone
from meddx.models.encoders.base import mask_like
from meddx.records import MODALITIES, Modality, collate

SUBSETS = [s for r in range(1, len(MODALITIES) + 1) for s in itertools.combinations(MODALITIES, r)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    aligner, patients = fitted_aligner()
    torch.manual_seed(0)
    backbone = FoundationBackbone.from_aligner(
        tiny_backbone_config(), aligner, cache_dir=tmp_path_factory.mktemp("text")
    ).eval()
    return aligner, patients, backbone


def _batch(aligner, modalities_per_patient, seed=0):
    spec = aligner.array_spec()
    items = [random_patient(spec, mods, seed + i, f"p{i}") for i, mods in enumerate(modalities_per_patient)]
    return collate(items, aligner.tensor_spec())


def test_sample_patients_give_one_embedding_each(setup) -> None:
    aligner, patients, backbone = setup
    batch = collate([aligner.transform(p) for p in patients], aligner.tensor_spec())
    with torch.no_grad():
        out = backbone(batch)
    assert isinstance(out, BackboneOutput)
    B, D = len(patients), backbone.config.d_model
    assert out.pooled.shape == (B, D)
    assert out.modality_embeddings.shape == (B, len(MODALITIES), D)
    assert torch.equal(out.modality_mask, batch.present)
    assert torch.equal(out.encoder_mask, batch.present)
    assert out.tokens.shape[:2] == out.token_mask.shape
    assert out.token_modality.shape == out.tokens.shape[1:2]
    assert torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(m.value for m in s))
def test_every_subset_of_modalities(setup, subset) -> None:
    aligner, _, backbone = setup
    batch = _batch(aligner, [subset, subset])
    D = backbone.config.d_model
    for modality in subset:
        tokens, mask, age = backbone.encoders[modality.value](batch.tensors[modality])
        assert tokens.shape[0] == 2
        assert tokens.shape[2] == D
        assert mask.shape == tokens.shape[:2] == age.shape
        assert mask.dtype == torch.bool
        assert mask.any(dim=1).all()
    with torch.no_grad():
        out = backbone(batch)
    expected = torch.tensor([m in subset for m in MODALITIES]).expand(2, -1)
    assert out.pooled.shape == (2, D)
    assert torch.isfinite(out.pooled).all()
    assert torch.equal(out.modality_mask, expected)
    assert torch.equal(out.encoder_mask, expected)
    assert (out.modality_embeddings[~expected] == 0).all()
    assert set(out.token_modality.unique().tolist()) == {MODALITIES.index(m) for m in subset}


def _perturb_masked(batch, spec):
    """Copies of the batch's tensors with every masked-out value replaced by NaN / other ids."""
    generator = torch.Generator().manual_seed(1)
    changed = 0
    tensors = {m: dict(arrays) for m, arrays in batch.tensors.items()}
    for modality, arrays in tensors.items():
        for name, field in spec[modality].items():
            if field.role not in ("mask", "token_mask"):
                continue
            for target in field.of:
                values = arrays[target]
                hidden = ~mask_like(arrays[name], field.axis, values)
                if values.dtype.is_floating_point:
                    noise = torch.full_like(values, float("nan"))
                else:
                    noise = torch.randint(1, 1000, values.shape, generator=generator)
                arrays[target] = torch.where(hidden, noise, values)
                changed += int(hidden.sum())
    return tensors, changed


def test_masked_inputs_cannot_change_the_output(setup) -> None:
    aligner, _, backbone = setup
    batch = _batch(aligner, [MODALITIES] * 3, seed=10)
    perturbed = _batch(aligner, [MODALITIES] * 3, seed=10)
    perturbed.tensors, changed = _perturb_masked(perturbed, aligner.array_spec())
    assert changed > 100  # masked lab values, padded chunks and tokens, masked slices, frames, samples
    with torch.no_grad():
        a, b = backbone(batch), backbone(perturbed)
    for field in ("pooled", "modality_embeddings", "encoder_embeddings", "tokens"):
        assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-6), field


def test_absent_modalities_and_other_patients_do_not_matter(setup) -> None:
    aligner, _, backbone = setup
    alone = _batch(aligner, [(Modality.EHR, Modality.AUDIO)], seed=20)
    spec = aligner.array_spec()
    others = collate(
        [random_patient(spec, (Modality.EHR, Modality.AUDIO), 20, "p0"), random_patient(spec, MODALITIES, 99, "x")],
        aligner.tensor_spec(),
    )
    with torch.no_grad():
        assert torch.allclose(backbone(alone).pooled[0], backbone(others).pooled[0], atol=1e-5)


def test_withholding_a_modality_equals_not_having_it(setup) -> None:
    aligner, _, backbone = setup
    full = _batch(aligner, [MODALITIES, (Modality.IMAGING, Modality.NOTES)], seed=30)
    spec = aligner.array_spec()
    without = collate(
        [
            random_patient(spec, MODALITIES, 30, "p0"),
            random_patient(spec, (Modality.IMAGING, Modality.NOTES), 31, "p1"),
        ],
        aligner.tensor_spec(),
    )
    del without.tensors[Modality.VIDEO]
    without.present[:, MODALITIES.index(Modality.VIDEO)] = False
    with torch.no_grad():
        held = backbone(full, withhold=["video"])
        absent = backbone(without)
        dropped = backbone(full, drop=torch.tensor([[False] * 5 + [True], [False] * 6]))
    assert not held.modality_mask[:, MODALITIES.index(Modality.VIDEO)].any()
    assert held.encoder_mask[0, MODALITIES.index(Modality.VIDEO)]  # still encoded: a pretraining target
    assert torch.allclose(held.pooled, absent.pooled, atol=1e-5)
    assert torch.allclose(dropped.pooled, absent.pooled, atol=1e-5)
    with pytest.raises(ConfigError, match="unknown modality"):
        backbone(full, withhold=["xray"])


def test_modality_dropout_hides_some_but_never_all(setup) -> None:
    _, _, backbone = setup
    torch.manual_seed(3)
    keep = torch.rand(500, len(MODALITIES)) < 0.5
    keep[:50] = False
    keep[:50, 2] = True  # patients with one modality keep it
    kept = backbone._modality_dropout(keep)
    assert not (kept & ~keep).any()  # never adds a modality
    assert (kept.any(dim=1) == keep.any(dim=1)).all()  # never empties a patient
    assert kept[:50, 2].all()
    assert kept.sum() < keep.sum()


def test_training_skips_the_encoders_of_hidden_modalities_except_cached_ones(setup) -> None:
    """Modality dropout is drawn before encoding: an uncached encoder never runs on a hidden row."""
    aligner, _, _ = setup
    batch = _batch(aligner, [MODALITIES] * 12, seed=60)
    torch.manual_seed(1)
    model = FoundationBackbone(tiny_backbone_config(modality_dropout=0.5), aligner.array_spec()).train()
    seen: dict[str, int] = {}
    for name, encoder in model.encoders.items():
        encoder.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.tokens.shape[0]))
    out = model(batch)
    used = out.modality_mask.sum(dim=0)  # (M,) rows whose modality reached the fusion
    for m, modality in enumerate(MODALITIES):
        if model.encoders[modality.value].frozen:  # the frozen text model: every row, to fill its cache
            assert seen[modality.value] == len(batch)
        else:
            assert seen.get(modality.value, 0) == int(used[m]) < len(batch)
    assert model.encoders["notes"].frozen
    assert not model.encoders["imaging"].frozen


def test_keeping_removes_rows_of_modalities_not_kept(setup) -> None:
    aligner, _, _ = setup
    batch = _batch(aligner, [MODALITIES, (Modality.EHR, Modality.VIDEO), (Modality.VIDEO,)], seed=70)
    keep = torch.ones(3, len(MODALITIES), dtype=torch.bool)
    v, e = MODALITIES.index(Modality.VIDEO), MODALITIES.index(Modality.EHR)
    keep[1, v] = False
    keep[:, e] = False
    kept = batch.keeping(keep)
    assert torch.equal(kept.present, batch.present & keep)
    assert Modality.EHR not in kept.tensors  # nobody keeps it
    frames = next(iter(batch.tensors[Modality.VIDEO].values()))
    kept_frames = next(iter(kept.tensors[Modality.VIDEO].values()))
    assert torch.equal(kept_frames, frames[[0, 2]])  # patients 0 and 2, in batch order
    assert torch.equal(kept.rows_with(Modality.VIDEO), torch.tensor([0, 2]))


def test_training_forward_is_deterministic_under_a_seed_and_trains(setup) -> None:
    aligner, _, _ = setup
    batch = _batch(aligner, [MODALITIES, (Modality.EHR,), (Modality.AUDIO, Modality.VIDEO)], seed=40)
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        model = FoundationBackbone(tiny_backbone_config(dropout=0.1), aligner.array_spec()).train()
        head = torch.nn.Linear(model.config.d_model, 1)
        optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
        target = torch.tensor([1.0, 0.0, 1.0])
        run = []
        for _step in range(3):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(model(batch).pooled).squeeze(1), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]
    assert model.encoders["notes"].text_model.training is False  # frozen text model stays in eval mode


def test_max_tokens_per_modality_keeps_the_first_real_tokens(setup) -> None:
    aligner, _, _ = setup
    torch.manual_seed(0)
    small = FoundationBackbone(tiny_backbone_config(max_tokens_per_modality=3), aligner.array_spec()).eval()
    batch = _batch(aligner, [MODALITIES, MODALITIES], seed=50)
    with torch.no_grad():
        out = small(batch)
    counts = torch.bincount(out.token_modality, minlength=len(MODALITIES))
    assert counts.max() <= 3
    assert out.token_mask.any()


def test_a_batch_modality_without_an_encoder_is_refused(setup) -> None:
    aligner, _, _ = setup
    spec = {m: s for m, s in aligner.array_spec().items() if m != Modality.AUDIO}
    backbone = FoundationBackbone(tiny_backbone_config(), spec).eval()
    with pytest.raises(ConfigError, match="no encoder for it"):
        backbone(_batch(aligner, [(Modality.AUDIO,)]))


def test_the_text_model_must_match_the_notes_tokenizer(setup, tmp_path) -> None:
    aligner, _, _ = setup
    with pytest.raises(ConfigError, match="set both to the same folder"):
        FoundationBackbone.from_aligner(tiny_backbone_config(text={"model": str(tmp_path)}), aligner)


def test_pooled_variants_equal_fusing_each_variant_alone(setup) -> None:
    aligner, _, backbone = setup
    mixes = [MODALITIES, (Modality.EHR, Modality.AUDIO), (Modality.NOTES,), MODALITIES[1:]]
    batch = _batch(aligner, mixes, seed=40)
    batch.tensors, _ = _perturb_masked(batch, aligner.array_spec())  # NaN under masks must not leak
    B = len(mixes)
    with torch.no_grad():
        encoded = backbone.encode(batch)
        rows, keep, expected = [], [], []
        for j in range(len(MODALITIES)):
            hide = torch.zeros(B, len(MODALITIES), dtype=torch.bool)
            hide[:, j] = True
            rows.append(torch.arange(B))
            keep.append(~hide)
            expected.append(backbone.fuse(encoded, drop=hide).pooled)
        rows.append(torch.arange(B))
        keep.append(torch.zeros(B, len(MODALITIES), dtype=torch.bool))  # nothing kept: the summary alone
        expected.append(backbone.fuse(encoded, drop=torch.ones(B, len(MODALITIES), dtype=torch.bool)).pooled)
        got = backbone.pooled_variants(encoded, torch.cat(rows), torch.cat(keep), max_rows=5)
    assert got.shape == (B * (len(MODALITIES) + 1), backbone.config.d_model)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, torch.cat(expected), atol=1e-5)


@pytest.mark.parametrize("head_input", ["summary", "summary+modalities"])
def test_batch_logits_withhold_each_present_modality_in_one_fusion(setup, head_input: str) -> None:
    from meddx.cohort import TaskSpec
    from meddx.models.diagnosis import DiagnosisModel

    aligner, _, backbone = setup
    tasks = {"d": TaskSpec("d", "binary", ("0", "1")), "s": TaskSpec("s", "multiclass", ("a", "b", "c"))}
    model = DiagnosisModel(backbone, tasks, head_input=head_input).eval()
    mixes = [MODALITIES, (Modality.EHR, Modality.AUDIO), (Modality.NOTES, Modality.VIDEO)]
    batch = _batch(aligner, mixes, seed=50)
    logits, withheld = model.batch_logits(batch)
    with torch.no_grad():
        full = model(batch, drop=torch.zeros(len(mixes), len(MODALITIES), dtype=torch.bool))
    for task in tasks:
        assert np.allclose(logits[task], full[task].numpy(), atol=1e-5)
    assert set(withheld) == set(MODALITIES)  # each is present in some row
    for j, modality in enumerate(MODALITIES):
        hide = torch.zeros(len(mixes), len(MODALITIES), dtype=torch.bool)
        hide[:, j] = True
        with torch.no_grad():
            expected = model(batch, drop=hide)
        for task in tasks:
            assert np.allclose(withheld[modality][task], expected[task].numpy(), atol=1e-5), (modality, task)
            lacking = [i for i, mix in enumerate(mixes) if modality not in mix]
            assert np.array_equal(withheld[modality][task][lacking], logits[task][lacking])  # nothing withheld
    plain, none = model.batch_logits(batch, ablations=False)
    assert none == {}
    assert all(np.allclose(plain[t], logits[t]) for t in tasks)
