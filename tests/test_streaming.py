"""ChunkFeeder: chunks of manifest rows ingested and aligned one ahead of the model, in order,
each row's failures named, its tensors in the store, the bar fed per row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SAMPLE_MANIFEST
from model_batches import fitted_aligner

from meddx.cohort import load_cohort
from meddx.records import Modality
from meddx.streaming import ChunkFeeder, store_items

MODALITY_COLUMNS = ["imaging", "ehr", "notes", "device_logs", "audio", "video"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five sample rows by absolute path: row 2 with a broken audio file, row 4 naming only that file."""
    folder = tmp_path_factory.mktemp("feeder")
    broken = folder / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00not really a wave file")
    rows = pd.read_csv(SAMPLE_MANIFEST, dtype=str, keep_default_na=False).head(5).reset_index(drop=True)
    for column in MODALITY_COLUMNS:
        rows[column] = [str(SAMPLE_MANIFEST.parent / v) if v else "" for v in rows[column]]
    rows.loc[1, "audio"] = str(broken)
    for column in MODALITY_COLUMNS:
        rows.loc[3, column] = str(broken) if column == "audio" else ""
    rows.to_csv(folder / "manifest.csv", index=False)
    return load_cohort(folder / "manifest.csv"), folder


def test_chunks_come_ready_in_order_with_failures_named_and_tensors_stored(cohort) -> None:
    cohort, folder = cohort
    aligner, _ = fitted_aligner()
    rows = list(cohort.rows)
    chunks = [(0, rows[:2]), (1, rows[2:4]), (2, rows[4:])]
    read: list[int] = []
    with ChunkFeeder(cohort, chunks, aligner, folder / "cache", 0, None, on_read=read.append) as feeder:
        ready = list(feeder)
        assert [c.number for c in ready] == [0, 1, 2]
        assert [[r.row.row for r in c.rows] for c in ready] == [
            [r.row for r in rows[:2]],
            [r.row for r in rows[2:4]],
            [r.row for r in rows[4:]],
        ]
        assert sum(read) == 5  # every row counted once, as its last file came back
        by_row = {r.row.row: r for c in ready for r in c.rows}
        one_bad, all_bad = by_row[rows[1].row], by_row[rows[3].row]
        assert one_bad.key is not None
        assert one_bad.modality_errors == ["audio"]
        assert all_bad.key is None
        assert all_bad.modality_errors == ["audio"]
        assert "no modality could be read" in all_bad.error
        good = [r for r in by_row.values() if r.key is not None]
        items = store_items(feeder.store, good)
        assert Modality.AUDIO not in items[good.index(one_bad)].tensors
        assert [i.patient_id for i in items] == [r.row.patient_id for r in good]
        for item, r in zip(items, good, strict=True):
            read_ok = {o.modality for o in r.outcomes if o.status == "ok"}
            assert item.tensors
            assert set(item.tensors) <= read_ok
            assert all(torch.is_tensor(t) for arrays in item.tensors.values() for t in arrays.values())


def test_leaving_early_stops_the_feeder(cohort) -> None:
    cohort, folder = cohort
    aligner, _ = fitted_aligner()
    rows = list(cohort.rows)
    chunks = [(k, rows[k : k + 1]) for k in range(len(rows))]
    with ChunkFeeder(cohort, chunks, aligner, folder / "cache-early", 0, None) as feeder:
        first = next(iter(feeder))
    assert first.number == 0
    assert not feeder._thread.is_alive()


def test_a_cache_that_cannot_be_written_is_refused_before_any_file_is_read(cohort, tmp_path: Path) -> None:
    from meddx.errors import ConfigError

    cohort, _ = cohort
    aligner, _ = fitted_aligner()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError):
        ChunkFeeder(cohort, [(0, list(cohort.rows))], aligner, blocker / "cache", 0, None)
