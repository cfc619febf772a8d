"""The fast training path: the aligned-tensor store, the manifest index and CohortDataset.

Every test works on a copy of part of ``sample_data/`` (real DICOM, FHIR, WAV, MP4... files)
plus a row whose only file is broken; the ingest cache is shared by the whole module.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from meddx.align import Aligner
from meddx.cache import RecordCache
from meddx.config import IngestConfig
from meddx.data import CohortDataset, TensorStore, aligner_hash, prepare_cohort
from meddx.data import prepare as prepare_module
from meddx.errors import ConfigError, ModelError
from meddx.records import MODALITIES, UNKNOWN_LABEL, Modality, PatientRecord

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
N_SAMPLE_ROWS = 8
STAGES = ["mild", "severe", ""]  # a multiclass task with unknown cells


def write_cohort(folder: Path) -> Path:
    """Eight sample patients, a multiclass label column, and a row whose only file is broken."""
    rows = pd.read_csv(SAMPLE / "manifest.csv", dtype=str, keep_default_na=False).head(N_SAMPLE_ROWS)
    for patient in rows["patient_id"]:
        shutil.copytree(SAMPLE / "patients" / patient, folder / "patients" / patient)
    rows["label:stage"] = [STAGES[i % 3] for i in range(len(rows))]
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    broken = {c: "" for c in rows.columns} | {
        "patient_id": "X0001",
        "index_time": "2024-06-01T00:00:00Z",
        "split": "train",
        "audio": "broken.wav",
        "sex": "F",
        "age": "50",
    }
    rows = pd.concat([rows, pd.DataFrame([broken])], ignore_index=True)
    manifest = folder / "manifest.csv"
    rows.to_csv(manifest, index=False)
    return manifest


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_cache):
    manifest = write_cohort(tmp_path_factory.mktemp("cohort"))
    return prepare_cohort(manifest, cache_dir=shared_cache, workers=0, progress=False)


@pytest.fixture()
def cohort_copy(tmp_path: Path) -> Path:
    """A fresh copy of the cohort files that a test may move or change (the ingest cache is shared)."""
    return write_cohort(tmp_path / "cohort")


def all_items(dataset: CohortDataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def test_index_rows_labels_splits_and_errors(prepared) -> None:
    assert prepared.report is not None
    assert len(prepared.report.errors) == 1  # the broken WAV
    assert set(prepared.tasks) == {"disease", "stage"}
    assert prepared.tasks["stage"].classes == ("mild", "severe")
    everything = prepared.dataset()
    assert len(everything) == N_SAMPLE_ROWS + 1
    assert everything.rows == list(range(1, N_SAMPLE_ROWS + 2))
    manifest = pd.read_csv(prepared.report.cohort.path, dtype=str, keep_default_na=False)
    for item, (_, line) in zip(all_items(everything), manifest.iterrows(), strict=True):
        assert item.patient_id == line["patient_id"]
        disease = int(line["label:disease"]) if line["label:disease"] else UNKNOWN_LABEL
        stage = ("mild", "severe").index(line["label:stage"]) if line["label:stage"] else UNKNOWN_LABEL
        assert item.labels == {"disease": disease, "stage": stage}
        named = {m for m in MODALITIES if line[m.value]}
        assert set(item.tensors) <= named
    broken = everything[N_SAMPLE_ROWS]
    assert broken.patient_id == "X0001"
    assert broken.tensors == {}
    table = everything.table()
    assert table.loc[N_SAMPLE_ROWS, "modality_errors"] == "audio"
    assert table.loc[0, "sex"] == manifest.loc[0, "sex"]
    train = prepared.dataset(split="train", tasks=["stage"])
    assert all(line.split == "train" for line in train.index.rows if line.row in train.rows)
    assert len(train) == (manifest["split"] == "train").sum()
    assert set(train[0].labels) == {"stage"}
    assert set(train.tasks) == {"stage"}


def test_items_equal_what_the_aligner_makes_from_the_ingest_cache(prepared) -> None:
    dataset = prepared.dataset()
    cache = RecordCache(prepared.report.cache_dir)
    by_row = {}
    for outcome in prepared.report.outcomes:
        by_row.setdefault(outcome.row, []).append(outcome)
    for item, row in zip(all_items(dataset), prepared.report.cohort, strict=True):
        record = PatientRecord(row.patient_id, row.index_time)
        for outcome in by_row.get(row.row, []):
            if outcome.status == "ok":
                record.add(cache.get(outcome.key))
        expected = prepared.aligner.transform(record)
        assert list(item.tensors) == list(expected.tensors)
        assert item.index_time == row.index_time
        for modality, named in expected.tensors.items():
            assert set(item.tensors[modality]) == set(named)
            for name, tensor in named.items():
                assert item.tensors[modality][name].dtype == tensor.dtype
                assert torch.equal(item.tensors[modality][name], tensor), (row.row, modality, name)


def test_shapes_and_dtypes_follow_the_array_spec_and_batches_collate(prepared) -> None:
    dataset = prepared.dataset()
    assert dataset.array_spec == prepared.aligner.array_spec()
    assert dataset.tensor_spec == prepared.aligner.tensor_spec()
    batch = dataset.collate(all_items(dataset))
    assert batch.rows.tolist() == dataset.rows
    assert batch.present.shape == (len(dataset), len(MODALITIES))
    for modality, named in batch.tensors.items():
        for name, field in dataset.array_spec[modality].items():
            assert tuple(named[name].shape) == (len(batch.rows_with(modality)), *field.shape)
    assert not batch.present[N_SAMPLE_ROWS].any()  # the row whose only file was broken
    assert batch.label_mask["stage"].tolist() == [s != "" for s in (STAGES * 3)[:N_SAMPLE_ROWS]] + [False]


def test_the_fast_path_reads_no_source_file(cohort_copy: Path, shared_cache: Path, monkeypatch) -> None:
    first = prepare_cohort(cohort_copy, cache_dir=shared_cache, workers=0, progress=False)
    before = [(item.row, item.labels, item.tensors) for item in all_items(first.dataset())]
    folder = cohort_copy.parent
    (folder / "patients").rename(folder.parent / "moved_away")  # every source file is gone
    (folder / "broken.wav").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("the prepared cohort was ingested or aligned again")

    monkeypatch.setattr(prepare_module, "ingest_cohort", forbidden)
    monkeypatch.setattr(prepare_module, "load_cohort", forbidden)
    monkeypatch.setattr(Aligner, "transform", forbidden)
    again = prepare_cohort(cohort_copy, cache_dir=shared_cache, workers=0, progress=False)
    assert again.index_path == first.index_path
    assert again.report is None
    assert aligner_hash(again.aligner) == aligner_hash(first.aligner)
    assert again.tasks == first.tasks

    dataset = again.dataset()
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=2, collate_fn=dataset.collate)
    batches = list(loader)
    assert torch.cat([b.rows for b in batches]).tolist() == [row for row, _, _ in before]
    position = 0
    for batch in batches:
        for b in range(len(batch)):
            _, labels, tensors = before[position]
            position += 1
            assert {t: int(v[b]) for t, v in batch.labels.items()} == labels
            for modality, named in tensors.items():
                at = batch.rows_with(modality).tolist().index(b)
                for name, tensor in named.items():
                    assert torch.equal(batch.tensors[modality][name][at], tensor)
    restored = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert torch.equal(restored[0].tensors[Modality.NOTES]["input_ids"], before[0][2][Modality.NOTES]["input_ids"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning memory needs an accelerator")
def test_batches_pin_memory(prepared) -> None:
    dataset = prepared.dataset()
    batch = next(iter(DataLoader(dataset, batch_size=4, pin_memory=True, collate_fn=dataset.collate)))
    assert batch.present.is_pinned()
    assert all(t.is_pinned() for d in batch.tensors.values() for t in d.values())


def test_a_changed_source_rebuilds_only_its_row(cohort_copy: Path, shared_cache: Path, monkeypatch) -> None:
    first = prepare_cohort(cohort_copy, cache_dir=shared_cache, workers=0, progress=False)
    keys = {row.row: row.key for row in first.dataset().index.rows}
    note = cohort_copy.parent / "patients" / "P0003" / "note.txt"
    note.write_text(note.read_text() + "\nNew finding: bilateral effusions.\n")
    transformed = []
    transform = Aligner.transform
    monkeypatch.setattr(Aligner, "transform", lambda self, p: transformed.append(p.patient_id) or transform(self, p))
    again = prepare_cohort(cohort_copy, cache_dir=shared_cache, workers=0, progress=False)
    assert again.report is not None  # the change was noticed
    new_keys = {row.row: row.key for row in again.dataset().index.rows}
    # Notes fit nothing, so the aligner is the same and only row 3 (P0003) is aligned again.
    assert aligner_hash(again.aligner) == aligner_hash(first.aligner)
    assert {row for row in keys if keys[row] != new_keys[row]} == {3}
    assert transformed == ["P0003"]


def test_a_given_aligner_finds_the_same_index(prepared, shared_cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(prepare_module, "ingest_cohort", lambda *a, **k: pytest.fail("ingested again"))
    manifest = prepared.report.cohort.path
    given = Aligner.from_state_dict(json.loads(json.dumps(prepared.aligner.state_dict())))
    again = prepare_cohort(manifest, cache_dir=shared_cache, aligner=given, progress=False)
    assert again.index_path == prepared.index_path
    assert again.aligner is given
    with pytest.raises(ConfigError, match="aligner's"):
        prepare_cohort(manifest, cache_dir=shared_cache, aligner=given, config=IngestConfig.gpu())
    with pytest.raises(ModelError, match="not fitted"):
        prepare_cohort(manifest, cache_dir=shared_cache, aligner=Aligner())


def test_without_a_split_column_the_aligner_fits_on_every_row(prepared, shared_cache: Path, monkeypatch) -> None:
    manifest = pd.read_csv(prepared.report.cohort.path, dtype=str, keep_default_na=False)
    folder = prepared.report.cohort.path.parent
    unsplit = folder / "unsplit.csv"
    manifest.drop(columns=["split"]).to_csv(unsplit, index=False)
    fitted_on = []
    fit = Aligner.fit
    monkeypatch.setattr(Aligner, "fit", lambda self, records: fitted_on.append(len(list(records))) or fit(self, []))
    result = prepare_cohort(unsplit, cache_dir=shared_cache, workers=0, progress=False)
    assert fitted_on == [len(manifest)]
    assert len(result.dataset(split="train")) == 0
    assert len(result.dataset()) == len(manifest)


def test_dataset_refuses_unknown_tasks_rows_and_damaged_indexes(prepared, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no label column for task"):
        prepared.dataset(tasks=["sepsis"])
    with pytest.raises(ConfigError, match="not in"):
        prepared.dataset(split="test", rows=[3])  # row 3 is a train row
    assert prepared.dataset(rows=[4, 2]).rows == [4, 2]
    damaged = tmp_path / "index.json"
    damaged.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelError, match="not a meddx cohort index"):
        CohortDataset(damaged)
    with pytest.raises(ModelError, match="cannot read the cohort index"):
        CohortDataset(tmp_path / "absent.json")


def test_a_pruned_store_is_rebuilt(cohort_copy: Path, shared_cache: Path) -> None:
    first = prepare_cohort(cohort_copy, cache_dir=shared_cache, workers=0, progress=False)
    dataset = first.dataset()
    key = dataset.index.rows[0].key
    dataset.store.path(key).unlink()
    with pytest.raises(ModelError, match="prepare_cohort again"):
        dataset[0]
    again = prepare_cohort(cohort_copy, cache_dir=shared_cache, workers=0, progress=False)
    assert again.report is not None
    assert key in again.dataset().store


def test_store_round_trip_is_safetensors_and_atomic(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    tensors = {
        Modality.VIDEO: {"frames": torch.rand(2, 1, 3, 3), "frame_mask": torch.tensor([True, False])},
        Modality.EHR: {"code_ids": torch.arange(4)},
    }
    path = store.put("ab" * 32, tensors)
    assert path.read_bytes()[8:9] == b"{"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    back = store.get("ab" * 32)
    assert list(back) == [Modality.EHR, Modality.VIDEO]  # modality order, whatever the file order
    for modality, named in tensors.items():
        for name, tensor in named.items():
            assert torch.equal(back[modality][name], tensor)
            assert back[modality][name].dtype == tensor.dtype
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(ModelError, match="cannot be read"):
        store.get("ab" * 32)


def test_store_reader_gives_what_safetensors_gives_and_refuses_damaged_files(tmp_path: Path) -> None:
    from safetensors.torch import load, save_file

    from meddx.cache import read_safetensors

    tensors = {
        "volume": torch.rand(3, 4, 5),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(6).reshape(2, 3),
        "half": torch.rand(4).half(),
        "empty": torch.zeros(0, 7),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    path = tmp_path / "row.safetensors"
    save_file(tensors, str(path), metadata={"format": "test"})
    expected, got = load(path.read_bytes()), read_safetensors(path)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    got["volume"] += 1  # writable views: a model may modify its batch in place
    data = path.read_bytes()
    for damaged in (data[:5], data[:20], data[:-1], b"\xff" * 8 + data[8:], data[:8] + b"[" + data[9:]):
        path.write_bytes(damaged)
        with pytest.raises(ValueError):
            read_safetensors(path)
