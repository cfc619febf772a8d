"""A frozen text encoder computes each chunk once: in memory, and across runs through the disk cache."""

from __future__ import annotations

import torch
from model_batches import fitted_aligner, random_patient, tiny_backbone_config

from meddx.models.encoders import NotesEncoder
from meddx.models.text_cache import TextEmbeddingCache
from meddx.records import Modality, collate


def _counting(encoder: NotesEncoder) -> list[int]:
    calls: list[int] = []
    encoder.text_model.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    return calls


def _notes(seeds):
    aligner, _ = fitted_aligner()
    spec = aligner.array_spec()
    batch = collate([random_patient(spec, [Modality.NOTES], s) for s in seeds], aligner.tensor_spec())
    return spec[Modality.NOTES], batch.tensors[Modality.NOTES]


def test_frozen_chunks_are_computed_once_then_read_from_disk(tmp_path) -> None:
    spec, arrays = _notes([1, 2])
    torch.manual_seed(0)
    encoder = NotesEncoder(tiny_backbone_config(), spec, cache_dir=tmp_path)
    calls = _counting(encoder)
    first = encoder(arrays)
    assert len(calls) == 1
    second = encoder(arrays)  # the second epoch
    assert len(calls) == 1
    assert torch.equal(first.tokens, second.tokens)
    assert list(tmp_path.rglob("*.safetensors"))  # persisted as safetensors
    torch.manual_seed(0)
    later = NotesEncoder(tiny_backbone_config(), spec, cache_dir=tmp_path)  # a later run
    later_calls = _counting(later)
    assert torch.equal(later(arrays).tokens, first.tokens)
    assert not later_calls
    _, more = _notes([1, 3])  # one patient seen, one new: only the new chunks reach the model
    computed = []
    later.text_model.register_forward_hook(
        lambda m, a, k, out: computed.append(k["input_ids"].shape[0]), with_kwargs=True
    )
    later(more)
    assert computed
    assert sum(computed) == int(more["chunk_mask"][1].sum())


def test_cached_embeddings_equal_fresh_ones(tmp_path) -> None:
    spec, arrays = _notes([4])
    torch.manual_seed(0)
    cached = NotesEncoder(tiny_backbone_config(), spec, cache_dir=tmp_path)
    cached(arrays)
    torch.manual_seed(0)
    trainable = NotesEncoder(tiny_backbone_config(text={"frozen": False}), spec).eval()
    calls = _counting(trainable)
    with torch.no_grad():
        assert torch.allclose(cached(arrays).tokens, trainable(arrays).tokens, atol=1e-5)
        trainable(arrays)
    assert len(calls) == 2
    assert trainable.cache is None  # a trainable encoder is never cached


def test_a_torn_cache_file_is_skipped(tmp_path) -> None:
    cache = TextEmbeddingCache(tmp_path, "v1")
    cache.put({"a": torch.ones(3)})
    (tmp_path / "v1" / "torn.safetensors").write_bytes(b"\x00\x01")
    again = TextEmbeddingCache(tmp_path, "v1")
    assert torch.equal(again.get(["a"])[0], torch.ones(3))
    assert len(again) == 1


def test_chunks_of_any_length_mix_embed_as_alone_and_repeats_are_computed_once(tmp_path) -> None:
    spec, arrays = _notes([5])
    torch.manual_seed(0)
    encoder = NotesEncoder(tiny_backbone_config(), spec, cache_dir=tmp_path)
    ids = torch.randint(1000, 2000, (5, 16))
    lengths = [16, 3, 9, 3, 1]
    mask = torch.arange(16)[None, :] < torch.tensor(lengths)[:, None]  # (5, 16) real tokens lead
    ids[3], mask[3] = ids[1], mask[1]  # chunk 3 repeats chunk 1
    with torch.no_grad():
        alone = torch.cat([encoder._embed(ids[n : n + 1], mask[n : n + 1]) for n in range(5)])
    seen: list[int] = []
    encoder.text_model.register_forward_hook(
        lambda m, a, k, out: seen.append(k["input_ids"].shape[0]), with_kwargs=True
    )
    together = encoder._chunk_embeddings(ids, mask)
    assert torch.allclose(together, alone, atol=1e-5)  # in the order given, whatever order they ran in
    assert sum(seen) == 4  # the repeat reached the model once
