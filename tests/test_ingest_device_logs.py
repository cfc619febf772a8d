"""Device-log ingestor: formats, the grid, gaps, leakage, impossible values, bad files, tensorizer."""

from __future__ import annotations

import gzip
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meddx.config import DeviceLogConfig, IngestConfig
from meddx.errors import ConfigError, IngestError, NotFittedError
from meddx.ingest.base import IngestRequest
from meddx.ingest.device_logs import (
    DeviceLogIngestor,
    DeviceLogTensorizer,
    canonical_channel,
    grid_length,
    read_device_log,
)
from meddx.ingest.registry import registered_ingestors
from meddx.records import Modality, PatientRecord, is_available, parse_time
from meddx.synth import write_device_log

INDEX = parse_time("2024-03-05T14:00:00Z")
CONFIG = DeviceLogConfig()  # 1-minute steps over 6 h: 360 steps ending at INDEX
L = 360


def _iso(t: pd.Series) -> pd.Series:
    return t.dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def vitals(seed: int = 0, hours: float = 7.0) -> pd.DataFrame:
    """Long rows, one sample per channel per minute, ending at INDEX, with a heart-rate gap.

    The gap: no heart_rate sample in the 60 minutes before INDEX - 2 h.
    """
    rng = np.random.default_rng(seed)
    minutes = np.arange(-int(hours * 60) + 1, 1)  # ..., -1, 0 (0 = the index time itself)
    frames = []
    for channel, mean in (("heart_rate", 80.0), ("spo2", 94.0), ("resp_rate", 16.0)):
        values = np.round(mean + rng.normal(0, 1.5, minutes.size), 1)  # well inside the plausible ranges
        keep = ~((channel == "heart_rate") & (minutes > -180) & (minutes <= -120))
        frames.append(pd.DataFrame({"minute": minutes[keep], "channel": channel, "value": values[keep]}))
    rows = pd.concat(frames, ignore_index=True)
    rows["time"] = pd.Timestamp(INDEX) + pd.to_timedelta(rows["minute"], unit="min")
    return rows


def write_long(rows: pd.DataFrame, path: Path) -> Path:
    out = pd.DataFrame({"timestamp": _iso(rows["time"]), "channel": rows["channel"], "value": rows["value"]})
    out.to_csv(path, index=False)
    return path


def read(path: Path, config: DeviceLogConfig = CONFIG, index=INDEX):
    return read_device_log(path, index, config)


def grid_of(record) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        name: (record.arrays["values"][i], record.arrays["mask"][i]) for i, name in enumerate(record.meta["channels"])
    }


def assert_same_grid(a, b) -> None:
    assert a.meta["channels"] == b.meta["channels"]
    np.testing.assert_array_equal(a.arrays["mask"], b.arrays["mask"])
    np.testing.assert_allclose(a.arrays["values"], b.arrays["values"], rtol=1e-6)
    assert a.time == b.time


# ------------------------------------------------------------------------------ the grid


def test_long_csv_gives_the_grid_with_gaps_masked(tmp_path: Path) -> None:
    rows = vitals()
    record = read(write_long(rows, tmp_path / "monitor.csv"))
    assert record.modality is Modality.DEVICE_LOGS
    assert record.source.endswith("monitor.csv")
    assert record.arrays["values"].shape == (3, L)
    assert record.arrays["values"].dtype == np.float32
    assert record.arrays["mask"].shape == (3, L)
    assert record.arrays["mask"].dtype == bool
    assert record.meta["channels"] == ["heart_rate", "resp_rate", "spo2"]
    grid = grid_of(record)
    # step k holds minute k - (L - 1): the last step is the index time itself
    minute_of_step = np.arange(L) - (L - 1)
    hr_values, hr_mask = grid["heart_rate"]
    in_gap = (minute_of_step > -180) & (minute_of_step <= -120)
    assert not hr_mask[in_gap].any()
    assert hr_mask[~in_gap].all()
    assert (hr_values[in_gap] == 0).all()
    assert grid["spo2"][1].all()
    assert grid["resp_rate"][1].all()
    expected = rows[rows["channel"] == "spo2"].set_index("minute")["value"]
    np.testing.assert_allclose(grid["spo2"][0], expected.loc[minute_of_step].to_numpy(), rtol=1e-6)
    assert record.time == INDEX  # the sample at the index time is kept (time <= index_time)
    assert record.meta["n_before_window"] == 3 * 60
    assert record.meta["n_after_index"] == 0


def test_unsorted_rows_give_the_same_grid(tmp_path: Path) -> None:
    rows = vitals()
    shuffled = rows.sample(frac=1.0, random_state=3)
    assert_same_grid(read(write_long(rows, tmp_path / "a.csv")), read(write_long(shuffled, tmp_path / "b.csv")))


def test_rows_after_the_index_time_are_dropped(tmp_path: Path) -> None:
    rows = vitals()
    late = pd.DataFrame(
        {
            "minute": [0, 1, 30],
            "channel": ["heart_rate", "heart_rate", "spo2"],
            "value": [300.0, 333.0, 42.0],
            "time": [
                pd.Timestamp(INDEX) + timedelta(seconds=1),
                pd.Timestamp(INDEX) + timedelta(minutes=1),
                pd.Timestamp(INDEX) + timedelta(minutes=30),
            ],
        }
    )
    clean = read(write_long(rows, tmp_path / "clean.csv"))
    leaky = read(write_long(pd.concat([late, rows]), tmp_path / "leaky.csv"))
    assert_same_grid(clean, leaky)
    assert not np.isin(leaky.arrays["values"], [300.0, 333.0, 42.0]).any()
    assert leaky.meta["n_after_index"] == 3
    assert leaky.time == INDEX
    PatientRecord("p1", INDEX).add(leaky)  # the record passes the leakage check


def test_the_leakage_boundary_is_the_shared_rule(tmp_path: Path) -> None:
    times = [
        "2024-03-05T13:59:59.999999Z",
        "2024-03-05T14:00:00Z",
        "2024-03-05T15:00:00+01:00",
        "2024-03-05T14:00:00.000001Z",
        "2024-03-05T14:00:01Z",
    ]
    lines = ["timestamp,channel,value"] + [f"{t},hr,{60 + i}" for i, t in enumerate(times)]
    (tmp_path / "edge.csv").write_text("\n".join(lines) + "\n")
    record = read(tmp_path / "edge.csv")
    kept = [60 + i for i, t in enumerate(times) if is_available(parse_time(t), INDEX)]
    assert kept == [60, 61, 62]
    assert record.arrays["values"][0, -1] == pytest.approx(np.mean(kept))
    assert record.meta["n_after_index"] == len(times) - len(kept)
    assert record.time == INDEX


def test_a_synthetic_log_reads_as_if_its_post_index_rows_were_never_written(tmp_path: Path) -> None:
    path = write_device_log(tmp_path / "synth.csv", severity=1.0, rng=np.random.default_rng(5), index_time=INDEX)
    table = pd.read_csv(path)
    times = pd.to_datetime(table["timestamp"], utc=True)
    assert (times > pd.Timestamp(INDEX)).any()  # the generator does write rows after the index time
    table[times <= pd.Timestamp(INDEX)].to_csv(tmp_path / "trimmed.csv", index=False)
    full, trimmed = read(path), read(tmp_path / "trimmed.csv")
    assert_same_grid(full, trimmed)
    assert full.meta["n_after_index"] == int((times > pd.Timestamp(INDEX)).sum())
    assert set(full.meta["channels"]) == {"heart_rate", "spo2", "resp_rate"}
    assert full.arrays["values"].shape == (3, L)
    assert not full.arrays["mask"].all()  # the generator unplugs the monitor for a while
    hr = grid_of(full)["heart_rate"]
    assert (hr[0][hr[1]] >= 0).all()
    assert (grid_of(full)["spo2"][0] <= 100).all()


def test_duplicates_and_samples_within_a_step_are_averaged(tmp_path: Path) -> None:
    lines = [
        "timestamp,channel,value",
        "2024-03-05T13:59:00Z,hr,80",
        "2024-03-05T13:59:00Z,hr,90",  # duplicate timestamp
        "2024-03-05T13:58:30Z,hr,100",  # same step (13:58, 13:59]
        "2024-03-05T13:57:30Z,hr,70",  # the step before
    ]
    (tmp_path / "dup.csv").write_text("\n".join(lines) + "\n")
    values, mask = grid_of(read(tmp_path / "dup.csv"))["heart_rate"]
    assert mask[-2]
    assert not mask[-1]
    assert mask[-3]
    assert values[-2] == pytest.approx(90.0)
    assert values[-3] == pytest.approx(70.0)


def test_impossible_values_are_masked_and_counted_not_clipped(tmp_path: Path) -> None:
    rows = vitals()
    bad = pd.DataFrame(
        {
            "minute": [-10, -10, -20, -30],
            "channel": ["spo2", "heart_rate", "resp_rate", "spo2"],
            "value": [127.0, -5.0, 180.0, 0.0],
        }
    )
    bad["time"] = pd.Timestamp(INDEX) + pd.to_timedelta(bad["minute"], unit="min")
    replaced = rows.merge(bad[["minute", "channel"]], how="left", indicator=True)
    rows = pd.concat([rows[(replaced["_merge"] == "left_only").to_numpy()], bad], ignore_index=True)
    record = read(write_long(rows, tmp_path / "bad.csv"))
    grid = grid_of(record)
    step = {m: L - 1 + m for m in (-10, -20, -30)}
    assert not grid["spo2"][1][step[-10]]
    assert not grid["spo2"][1][step[-30]]
    assert not grid["heart_rate"][1][step[-10]]
    assert not grid["resp_rate"][1][step[-20]]
    assert grid["spo2"][1].sum() == L - 2
    assert grid["heart_rate"][1].sum() == L - 60 - 1
    assert record.meta["n_implausible"] == {"spo2": 2, "heart_rate": 1, "resp_rate": 1}
    assert grid["spo2"][0].max() <= 100.0
    assert not np.isin(record.arrays["values"], [127.0, 100.0, 180.0]).any()
    assert record.warnings  # the user hears about it


def test_a_step_with_a_good_and_an_impossible_sample_keeps_the_good_one(tmp_path: Path) -> None:
    (tmp_path / "mix.csv").write_text(
        "timestamp,channel,value\n2024-03-05T13:59:10Z,SpO2,97\n2024-03-05T13:59:20Z,SPO2,250\n"
    )
    record = read(tmp_path / "mix.csv")
    assert record.meta["channels"] == ["spo2"]
    assert record.arrays["values"][0, -1] == pytest.approx(97.0)
    assert record.meta["n_implausible"] == {"spo2": 1}


# --------------------------------------------------------------------- other layouts


def test_wide_csv_jsonl_epoch_and_offsets_give_the_same_grid_as_long_csv(tmp_path: Path) -> None:
    rows = vitals()
    reference = read(write_long(rows, tmp_path / "long.csv"))

    wide = rows.pivot(index="time", columns="channel", values="value").reset_index()
    wide.insert(0, "timestamp", _iso(wide.pop("time")))
    wide = wide.rename(columns={"heart_rate": "HR", "spo2": "SpO2", "resp_rate": "RR"})
    wide.to_csv(tmp_path / "wide.csv", index=False)  # heart-rate gap: empty cells
    assert_same_grid(reference, read(tmp_path / "wide.csv"))

    with open(tmp_path / "long.jsonl", "w") as handle:
        for t, c, v in zip(_iso(rows["time"]), rows["channel"], rows["value"], strict=True):
            handle.write(json.dumps({"timestamp": t, "channel": c, "value": v}) + "\n")
    assert_same_grid(reference, read(tmp_path / "long.jsonl"))

    with open(tmp_path / "wide.ndjson", "w") as handle:
        for _, row in wide.iterrows():
            item = {"timestamp": row["timestamp"], **{k: row[k] for k in ("HR", "SpO2", "RR") if pd.notna(row[k])}}
            handle.write(json.dumps(item) + "\n")
    assert_same_grid(reference, read(tmp_path / "wide.ndjson"))

    seconds = (rows["time"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    epoch = pd.DataFrame({"timestamp": seconds, "channel": rows["channel"], "value": rows["value"]})
    epoch.to_csv(tmp_path / "epoch.csv", index=False)
    assert_same_grid(reference, read(tmp_path / "epoch.csv"))
    epoch.to_json(tmp_path / "epoch.jsonl", orient="records", lines=True)
    assert_same_grid(reference, read(tmp_path / "epoch.jsonl"))

    offsets = rows["time"].dt.tz_convert("Europe/Paris").dt.strftime("%Y-%m-%dT%H:%M:%S%z")
    offsets.iloc[::2] = _iso(rows["time"]).iloc[::2]  # mixed: +01:00 and Z in one column
    pd.DataFrame({"Timestamp": offsets, "Channel": rows["channel"], "Value": rows["value"]}).to_csv(
        tmp_path / "offsets.csv", index=False
    )
    assert_same_grid(reference, read(tmp_path / "offsets.csv"))

    with gzip.open(tmp_path / "long.csv.gz", "wt") as handle:
        handle.write((tmp_path / "long.csv").read_text())
    assert_same_grid(reference, read(tmp_path / "long.csv.gz"))


def test_channel_aliases_merge_and_units_convert(tmp_path: Path) -> None:
    assert canonical_channel(" SpO2 ") == canonical_channel("SPO2") == "spo2"
    assert canonical_channel("Pulse") == canonical_channel("HR") == canonical_channel("heart-rate") == "heart_rate"
    assert canonical_channel("ICP mean") == "icp_mean"
    (tmp_path / "units.csv").write_text(
        "timestamp,channel,value,unit\n"
        "2024-03-05T13:59:30Z,Temp,98.6,degF\n"
        "2024-03-05T13:58:30Z,temperature,37.5,Cel\n"
        "2024-03-05T13:59:30Z,HR,80,/min\n"
        "2024-03-05T13:59:40Z,pulse,90,/min\n"
        "2024-03-05T13:59:40Z,ICP,12,mm[Hg]\n"
    )
    record = read(tmp_path / "units.csv")
    grid = grid_of(record)
    assert record.meta["channels"] == ["heart_rate", "icp", "temperature"]
    assert grid["temperature"][0][-1] == pytest.approx(37.0, abs=1e-3)
    assert grid["temperature"][0][-2] == pytest.approx(37.5)
    assert grid["heart_rate"][0][-1] == pytest.approx(85.0)
    assert record.meta["units"]["temperature"] == ["cel", "degf"]


def test_text_values_are_counted_and_text_columns_ignored(tmp_path: Path) -> None:
    (tmp_path / "wide.csv").write_text(
        "timestamp,hr,spo2,bed\n2024-03-05T13:58:30Z,80,---,B12\n2024-03-05T13:59:30Z,81,97,B12\n"
    )
    record = read(tmp_path / "wide.csv")
    assert record.meta["channels"] == ["heart_rate", "spo2"]
    assert record.meta["n_unreadable"] == 1
    assert record.meta["ignored_columns"] == ["bed"]
    assert record.arrays["mask"][:, -2:].tolist() == [[True, True], [False, True]]


def test_a_log_with_nothing_in_the_window_gives_none(tmp_path: Path) -> None:
    (tmp_path / "old.csv").write_text(
        "timestamp,channel,value\n2024-03-01T10:00:00Z,hr,80\n2024-03-06T10:00:00Z,hr,80\n"
    )
    assert read(tmp_path / "old.csv") is None


def test_zone_less_times_are_refused_unless_configured(tmp_path: Path) -> None:
    (tmp_path / "naive.csv").write_text("timestamp,hr\n2024-03-05T13:59:30,80\n")
    with pytest.raises(IngestError, match="no time zone"):
        read(tmp_path / "naive.csv")
    (tmp_path / "mixed.csv").write_text("timestamp,hr\n2024-03-05T13:58:30Z,80\n2024-03-05T13:59:30,81\n")
    with pytest.raises(IngestError, match="row 2: timestamp has no time zone"):
        read(tmp_path / "mixed.csv")
    record = read(tmp_path / "naive.csv", DeviceLogConfig(assume_utc=True))
    assert record.arrays["values"][0, -1] == pytest.approx(80.0)
    assert record.meta["time_zone"] == "assumed UTC"


def test_zone_less_times_are_read_in_the_site_time_zone(tmp_path: Path) -> None:
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")  # UTC+1 in March before the switch: 14:59:30 is 13:59:30Z
    (tmp_path / "naive.csv").write_text("timestamp,hr\n2024-03-05T14:59:30,80\n2024-03-05T15:30:00,99\n")
    (tmp_path / "naive.jsonl").write_text(
        '{"timestamp": "2024-03-05T14:59:30", "hr": 80}\n{"timestamp": "2024-03-05T13:58:10Z", "hr": 70}\n'
    )
    for name in ("naive.csv", "naive.jsonl"):  # Arrow's parsed timestamps and text timestamps
        record = read_device_log(tmp_path / name, INDEX, CONFIG, site_zone=berlin)
        assert record.time == parse_time("2024-03-05T13:59:30Z"), name
        assert record.arrays["values"][0, -1] == pytest.approx(80.0)
        assert record.meta["time_zone"] == "site"
    assert read_device_log(tmp_path / "naive.csv", INDEX, CONFIG, berlin).meta["n_after_index"] == 1
    # read as UTC, 14:59:30 is after the index time: nothing in the window
    assert read_device_log(tmp_path / "naive.csv", INDEX, DeviceLogConfig(assume_utc=True), berlin) is None
    # through the ingestor and the config; the hour the clocks go back is read as its later instant
    (tmp_path / "autumn.csv").write_text("timestamp,hr\n2024-10-27T02:30:00,75\n")
    index = parse_time("2024-10-27T01:30:00Z")
    request = IngestRequest("p1", index, {Modality.DEVICE_LOGS: tmp_path / "autumn.csv"})
    record = DeviceLogIngestor(IngestConfig(site_timezone="Europe/Berlin")).read(request)
    assert record.time == index
    assert (
        DeviceLogIngestor(IngestConfig(site_timezone="Europe/Berlin")).read(
            IngestRequest("p1", index - timedelta(seconds=1), request.paths)
        )
        is None
    )


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.csv", "", "empty"),
        ("blank.csv", "\n\n\n", "not a readable CSV file"),
        ("header.csv", "timestamp,channel,value\n", "no data rows"),
        ("novalue.csv", "timestamp,channel\n2024-03-05T13:59:00Z,hr\n", "missing \\['value'\\]"),
        ("notime.csv", "when,hr\n2024-03-05T13:59:00Z,80\n", "no timestamp column"),
        ("onlytime.csv", "timestamp\n2024-03-05T13:59:00Z\n", "no channel columns"),
        ("badtime.csv", "timestamp,hr\n2024-03-05T13:58:00Z,80\nyesterday,81\n", "row 2: timestamp is not ISO 8601"),
        ("notime2.csv", "timestamp,hr\n2024-03-05T13:58:00Z,80\n,81\n", "row 2"),
        ("ms.csv", "timestamp,hr\n1709647140000,80\n", "milliseconds"),
        ("ragged.csv", "timestamp,hr\n2024-03-05T13:58:00Z,80\n2024-03-05T13:59:00Z,81,5,6\n", "not a readable CSV"),
        ("truncated.csv", "timestamp,channel,value\n2024-03-05T13:58:00Z,hr,80\n2024-03-05T13:5", "not a readable CSV"),
        ("bad.jsonl", '{"timestamp": "2024-03-05T13:58:00Z", "hr": 80}\n{"timestamp": \n', "JSON Lines"),
        ("list.jsonl", "[1, 2]\n", "no timestamp column"),
    ],
)
def test_bad_files_raise_ingest_error_naming_the_file(tmp_path: Path, name: str, content: str, reason: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(IngestError, match=reason) as caught:
        read(path)
    assert caught.value.path == str(path)
    assert caught.value.modality == "device_logs"
    assert str(path) in str(caught.value)


def test_binary_garbage_and_missing_files_raise_ingest_error(tmp_path: Path) -> None:
    reader = registered_ingestors()[Modality.DEVICE_LOGS](IngestConfig())
    assert isinstance(reader, DeviceLogIngestor)
    garbage = tmp_path / "monitor.log"  # unknown suffix: sniffed
    garbage.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)))
    for path in (garbage, tmp_path / "missing.csv", tmp_path):
        with pytest.raises(IngestError) as caught:
            reader.read(IngestRequest("p1", INDEX, {Modality.DEVICE_LOGS: path}))
        assert caught.value.path == str(path)


def test_the_grid_length_must_divide_the_window() -> None:
    assert grid_length(DeviceLogConfig(step_minutes=5, window_hours=2)) == 24
    with pytest.raises(ConfigError, match="whole number"):
        grid_length(DeviceLogConfig(step_minutes=7, window_hours=1))
    with pytest.raises(ConfigError):
        grid_length(DeviceLogConfig(step_minutes=0))
    with pytest.raises(ConfigError, match="whole number"):
        DeviceLogIngestor(IngestConfig(device_logs=DeviceLogConfig(step_minutes=7, window_hours=1)))


def test_a_coarser_grid_averages_each_step(tmp_path: Path) -> None:
    rows = vitals()
    config = DeviceLogConfig(step_minutes=5, window_hours=1)
    record = read(write_long(rows, tmp_path / "monitor.csv"), config)
    assert record.arrays["values"].shape == (3, 12)
    spo2 = rows[rows["channel"] == "spo2"].set_index("minute")["value"]
    # the last step covers minutes (-5, 0]
    assert grid_of(record)["spo2"][0][-1] == pytest.approx(spo2.loc[-4:0].mean(), rel=1e-6)


# -------------------------------------------------------------------------- tensorizer


def test_tensorizer_fits_a_vocabulary_normalises_and_round_trips(tmp_path: Path) -> None:
    rows = vitals()
    records = [read(write_long(rows, tmp_path / "a.csv"))]
    (tmp_path / "b.csv").write_text(
        "timestamp,channel,value\n2024-03-05T13:59:00Z,hr,100\n2024-03-05T13:59:00Z,etco2,38\n"
    )
    records.append(read(tmp_path / "b.csv"))
    config = IngestConfig(device_logs=DeviceLogConfig(max_channels=3))
    tensorizer = DeviceLogTensorizer(config)
    with pytest.raises(NotFittedError, match="not fitted"):
        tensorizer.transform(records[0])
    tensorizer.fit(records)
    # hr is in 2 records; the rest in 1 with ties broken by sample count, then name: etco2 is dropped
    assert tensorizer.channels_ == ["heart_rate", "resp_rate", "spo2"]
    hr = np.concatenate([grid_of(r)["heart_rate"][0][grid_of(r)["heart_rate"][1]] for r in records])
    assert tensorizer.mean_[0] == pytest.approx(hr.mean(), rel=1e-6)
    assert tensorizer.std_[0] == pytest.approx(hr.std(), rel=1e-5)

    out = tensorizer.transform(records[1])
    assert set(out) == set(tensorizer.spec()) == {"values", "mask"}
    assert out["values"].shape == out["mask"].shape == (3, L)
    assert out["values"].dtype == np.float32
    assert out["mask"].dtype == bool
    assert out["mask"].sum() == 1
    assert out["mask"][0, -2]  # etco2 ignored, only hr at 13:59
    assert out["values"][0, -2] == pytest.approx((100 - tensorizer.mean_[0]) / tensorizer.std_[0], rel=1e-5)
    assert (out["values"][~out["mask"]] == 0).all()
    assert tensorizer.unknown_channels(records[1]) == ["etco2"]

    state = json.loads(json.dumps(tensorizer.state_dict()))
    restored = DeviceLogTensorizer(config).load_state_dict(state)
    for record in records:
        for name, array in tensorizer.transform(record).items():
            np.testing.assert_array_equal(restored.transform(record)[name], array)
    with pytest.raises(ConfigError):
        DeviceLogTensorizer(IngestConfig(device_logs=DeviceLogConfig(max_channels=2))).load_state_dict(state)
    with pytest.raises(ValueError, match="another config"):
        DeviceLogTensorizer(IngestConfig(device_logs=DeviceLogConfig(window_hours=1, max_channels=3))).fit(records)


def test_tensorizer_fitted_on_nothing_gives_empty_arrays(tmp_path: Path) -> None:
    tensorizer = DeviceLogTensorizer(IngestConfig()).fit([])
    record = read(write_long(vitals(), tmp_path / "a.csv"))
    out = tensorizer.transform(record)
    assert out["values"].shape == (8, L)
    assert not out["mask"].any()
