"""Monitor / device logs: per-channel values on a fixed time grid before the index time.

Accepted files (the format is chosen by the suffix, ``.csv``/``.tsv``/``.txt`` or
``.jsonl``/``.ndjson``/``.json``, optionally ``.gz``; other names are sniffed):

* **long CSV** ``timestamp,channel,value[,unit]``: one sample per row;
* **wide CSV** ``timestamp,<channel>,<channel>...``: one row per time, empty cells absent;
* **JSONL** with the same fields, one object per line (long when the objects have
  ``channel`` and ``value`` keys, wide otherwise).

Files over ``DeviceLogConfig.max_file_mb`` (the file is parsed whole; a ``.gz`` file is held to
it by what it decompresses to) and paths that are
not regular files (a FIFO, a device) are refused before reading; so is an index time
outside the years 1678-2261, which nanosecond timestamps cannot hold.

Header names are case-insensitive; the time column may be called ``timestamp``,
``time`` or ``datetime``. Timestamps are ISO 8601 with a time zone
(``2024-03-05T13:59:00Z``, ``...+01:00``) or epoch seconds. Zone-less ISO times are an
:class:`~meddx.errors.IngestError` (the default: a monitor's clock zone is a guess) unless
the config says what they mean: ``IngestConfig.site_timezone`` reads them in the site's
zone (daylight saving included; a wall time that happens twice is the later instant), and
``DeviceLogConfig.assume_utc`` reads them as UTC (for monitors that log UTC without saying
so; it wins over the site zone). ``meta["time_zone"]`` says which rule applied.

How samples become the grid:

* The grid has ``L = window_hours * 60 / step_minutes`` steps (360 by default) and ends
  at the index time: step ``k`` covers ``(index - (L-k) * step, index - (L-1-k) * step]``,
  so the last step holds the samples of the minute up to and including the index time.
* Rows after the index time are dropped by the shared leakage rule
  (:func:`meddx.records.is_available`: kept iff ``time <= index_time``, applied to all rows
  at once on integer nanoseconds); rows older than the window are dropped too.
* All samples of a channel that fall in one step, duplicate timestamps included, are
  combined by their **mean**. A step without a sample has ``mask`` False and value 0.
* Rows may come in any order: the result does not depend on it. A file mixing epoch
  seconds and ISO 8601 text is refused (the message names the first row of each kind).
* Channel names are canonicalised (:data:`KNOWN_CHANNELS`: ``HR``/``pulse`` ->
  ``heart_rate``, ``SpO2``/``SPO2`` -> ``spo2``...); other names are kept, lower-cased.
  Values of a known channel outside its physiological range (SpO2 above 100 or 0, a
  negative heart rate, a respiratory rate above 100...; the table is :data:`KNOWN_CHANNELS`)
  are masked, never clipped, and counted per channel in ``meta["n_implausible"]`` (samples
  in the window only). Non-finite values are masked the same way for every channel.
  Non-numeric values (``---``, ``error``) are counted in ``meta["n_unreadable"]``.
* In long files with a ``unit`` column, Fahrenheit temperatures and kPa pressures are
  converted to the canonical unit (:data:`UNIT_CONVERSIONS`); wide files carry no unit
  and are read in the canonical units.

The record holds ``values`` ``(C, L)`` float32 and ``mask`` ``(C, L)`` bool for the
``C`` channels with at least one sample in the window, named in ``meta["channels"]``;
``record.time`` is the time of the latest sample on the grid. A file with no usable
sample in the window gives None (nothing to use).

:class:`DeviceLogTensorizer` fits a channel vocabulary and per-channel normalisation on
training records and gives fixed ``(max_channels, L)`` arrays.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import pandas as pd

from meddx.config import DeviceLogConfig, IngestConfig
from meddx.errors import IngestError
from meddx.ingest.base import Ingestor, IngestRequest, register_ingestor
from meddx.ingest.device_tensorizer import DeviceLogTensorizer, grid_length
from meddx.ingest.file_checks import check_source
from meddx.records import Modality, ModalityRecord, wall_time_to_utc

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

_MODALITY = Modality.DEVICE_LOGS.value
_TIME_COLUMNS = ("timestamp", "time", "datetime")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_CSV_SUFFIXES = (".csv", ".tsv", ".txt")
_MAX_EPOCH_SECONDS = 9.2e9  # the year 2262, the end of nanosecond timestamps
_ZONELESS = (
    "timestamp has no time zone; write it like 2024-03-05T14:00:00Z, or set the config's site_timezone "
    "(or device_logs.assume_utc)"
)
_OUT_OF_RANGE = "a timestamp is outside the years 1678-2261; check the timestamp column"
# A time of day followed by a zone designator: "...T13:59:00Z", "...13:59+01:00", "...13:59:00.5-0500".
_ZONE_PATTERN = r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$"


@dataclass(frozen=True)
class Channel:
    """A monitor channel meddx knows: its canonical name, unit, plausible range and aliases.

    Values outside ``[low, high]`` cannot come from a living patient (or a working
    sensor) and are masked.
    """

    name: str
    unit: str
    low: float
    high: float
    aliases: tuple[str, ...] = ()


KNOWN_CHANNELS: tuple[Channel, ...] = (
    Channel("heart_rate", "/min", 0.0, 350.0, ("hr", "heartrate", "pulse", "pulse_rate", "ecg_hr")),
    # 0 % is what an oximeter logs with no signal; no living patient has it.
    Channel("spo2", "%", 1.0, 100.0, ("sp_o2", "o2sat", "o2_sat", "oxygen_saturation", "spo2_pct")),
    Channel("resp_rate", "/min", 0.0, 100.0, ("rr", "resp", "respiratory_rate", "breathing_rate")),
    Channel("temperature", "Cel", 25.0, 45.0, ("temp", "temp_c", "body_temp", "body_temperature")),
    Channel("sbp", "mm[Hg]", 0.0, 300.0, ("systolic", "systolic_bp", "nibp_sys", "abp_sys", "art_sys", "bp_sys")),
    Channel("dbp", "mm[Hg]", 0.0, 250.0, ("diastolic", "diastolic_bp", "nibp_dia", "abp_dia", "art_dia", "bp_dia")),
    Channel("map", "mm[Hg]", 0.0, 300.0, ("mean_bp", "nibp_mean", "abp_mean", "art_mean", "mean_arterial_pressure")),
    Channel("etco2", "mm[Hg]", 0.0, 150.0, ("et_co2", "end_tidal_co2")),
)
_BY_ALIAS: dict[str, Channel] = {a: c for c in KNOWN_CHANNELS for a in (c.name, *c.aliases)}

# (canonical channel, unit as written, lower-cased) -> (scale, offset) into the canonical unit.
_FAHRENHEIT = (5.0 / 9.0, -32.0 * 5.0 / 9.0)
_KPA = (7.500617, 0.0)
UNIT_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    **{("temperature", u): _FAHRENHEIT for u in ("[degf]", "degf", "°f", "f", "fahrenheit")},
    **{(c, "kpa"): _KPA for c in ("sbp", "dbp", "map", "etco2")},
}


def canonical_channel(name: str) -> str:
    """The canonical name of a channel as written in a file.

    Example:
        >>> canonical_channel(" SpO2 "), canonical_channel("Pulse"), canonical_channel("ICP mean")
        ('spo2', 'heart_rate', 'icp_mean')
    """
    key = "_".join(str(name).strip().lower().replace("-", " ").replace(".", " ").split())
    known = _BY_ALIAS.get(key)
    return known.name if known else key


# --------------------------------------------------------------------------- reading


def _file_type(path: Path) -> str:
    """``csv`` or ``jsonl``, by suffix, else by the first non-blank byte."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    opener: Callable[..., Any] = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return "jsonl" if head.startswith(b"{") else "csv"


def _table_from_frame(frame: pd.DataFrame) -> pa.Table:
    """An Arrow table of a JSON Lines frame; a column mixing numbers and text becomes text."""
    import pyarrow as pa

    columns = {}
    for name in frame.columns:
        try:
            columns[str(name)] = pa.array(frame[name], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[str(name)] = pa.array(frame[name].astype("string"), from_pandas=True)
    return pa.table(columns)


def _read_table(path: Path, fail: Callable[[str], NoReturn], max_file_mb: float | None = None) -> tuple[pa.Table, str]:
    """Read the whole file once; returns ``(table with lower-cased column names, file_type)``."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    check_source(path, _MODALITY, max_file_mb=max_file_mb, expected="one CSV or JSONL file")
    if path.stat().st_size == 0:
        fail("the file is empty")
    kind = _file_type(path)
    try:
        source: Any = path
        if path.name.lower().endswith(".gz"):  # the size limit holds for what it decompresses to
            source = io.BytesIO(_gunzip_capped(path, max_file_mb, fail))
        if kind == "jsonl":
            # dtype=False keeps timestamps as written, so zone-less times can be told apart.
            table = _table_from_frame(pd.read_json(source, lines=True, dtype=False))
        else:
            delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
            # Arrow's reader parses ISO 8601 timestamps natively (zone-aware ones to UTC) and is
            # faster than pandas' C engine, which leaves them as text; see benchmarks/bench_signals.py.
            # One thread: files are read in parallel by worker processes, more would oversubscribe.
            table = pa_csv.read_csv(
                source,
                read_options=pa_csv.ReadOptions(use_threads=False),
                parse_options=pa_csv.ParseOptions(delimiter=delimiter),
            )
    except (ValueError, OSError, UnicodeError, EOFError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        fail(f"not a readable {'JSON Lines' if kind == 'jsonl' else 'CSV'} file ({reason})")
    if table.num_columns == 0 or table.num_rows == 0:
        fail("the file has no data rows")
    names = [str(c).strip().lower() for c in table.column_names]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        fail(f"columns {duplicated} appear more than once (header names are case-insensitive)")
    return table.rename_columns(names), kind


def _gunzip_capped(path: Path, max_file_mb: float | None, fail: Callable[[str], NoReturn]) -> bytes:
    """The decompressed bytes of a gzip file, refused once they pass ``max_file_mb`` (a small file can
    decompress to gigabytes, and the log is parsed whole)."""
    limit = None if max_file_mb is None else int(max_file_mb * 2**20)
    with gzip.open(path, "rb") as handle:
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        fail(
            f"decompresses to more than the {max_file_mb:g} MB limit for {_MODALITY} files; "
            f"raise {_MODALITY}.max_file_mb if the file is genuine"
        )
    return data


def _epoch_ns(seconds: np.ndarray, fail: Callable[[str], NoReturn]) -> np.ndarray:
    bad = ~np.isfinite(seconds)
    if bad.any():
        fail(f"row {int(np.argmax(bad)) + 1}: missing or non-finite epoch timestamp")
    if np.abs(seconds).max() > _MAX_EPOCH_SECONDS:
        fail("epoch timestamps beyond the year 2262: are they milliseconds? write epoch seconds")
    return np.round(seconds * 1e9).astype(np.int64)


def parse_timestamps(
    column: pd.Series, fail: Callable[[str], NoReturn], assume_utc: bool = False, zone: tzinfo | None = None
) -> np.ndarray:
    """Timestamps of a log column written as text, as int64 UTC epoch nanoseconds.

    Accepts ISO 8601 with a zone (mixed offsets allowed) and epoch seconds. ``fail(reason)``
    is called (and must raise) for a missing, unparseable or zone-less value, naming the
    1-based data row; zone-less values pass with ``assume_utc`` (read as UTC) or a ``zone``
    (read in it).

    Example:
        >>> def fail(reason): raise ValueError(reason)
        >>> parse_timestamps(pd.Series(["2024-03-05T15:00:00+01:00", "2024-03-05T14:00:00Z"]), fail)
        array([1709647200000000000, 1709647200000000000])
    """
    text = column.astype("string").str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    if numbers.notna().all():
        return _epoch_ns(numbers.to_numpy(dtype=np.float64, na_value=np.nan), fail)
    parsed = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
    is_number = numbers.notna().to_numpy()
    is_iso = parsed.notna().to_numpy()
    if is_number.any() and is_iso.any():
        # Both kinds are valid alone; name the first row of each, not an arbitrary one.
        fail(
            f"timestamps mix epoch seconds (first in row {int(np.argmax(is_number)) + 1}) and ISO 8601 text "
            f"(first in row {int(np.argmax(is_iso)) + 1}); write every timestamp the same way"
        )
    bad = ~is_iso
    if bad.any():
        fail(f"row {int(np.argmax(bad)) + 1}: timestamp is not ISO 8601 or epoch seconds")
    if not assume_utc:
        zoneless = ~text.str.contains(_ZONE_PATTERN, regex=True).to_numpy(dtype=bool, na_value=False)
        if zoneless.any():
            if zone is None:
                fail(f"row {int(np.argmax(zoneless)) + 1}: {_ZONELESS}")
            # utc=True read them as UTC wall times: read them again in the site zone
            walls = pd.to_datetime(text[zoneless], format="ISO8601", errors="coerce")
            try:
                local = _localize_ns(walls, zone)
            except pd.errors.OutOfBoundsDatetime:
                fail(_OUT_OF_RANGE)
            parsed = parsed.copy()
            parsed[zoneless] = pd.to_datetime(local, unit="ns", utc=True)
    try:
        return parsed.dt.as_unit("ns").to_numpy(dtype="datetime64[ns]").view(np.int64)
    except pd.errors.OutOfBoundsDatetime:
        fail(_OUT_OF_RANGE)


def _localize_ns(walls: pd.Series, zone: tzinfo) -> np.ndarray:
    """Zone-less wall times read in ``zone``, as int64 UTC nanoseconds (the later instant when two fit)."""
    walls = pd.Series(walls).dt.tz_localize(None) if getattr(walls.dt, "tz", None) else pd.Series(walls)
    # ambiguous=False takes the standard-time reading, the later instant of a repeated hour;
    # skipped wall times come back NaT and are read one by one, as meddx.records.wall_time_to_utc does.
    local = walls.dt.tz_localize(zone, ambiguous=np.zeros(len(walls), dtype=bool), nonexistent="NaT")
    out = local.dt.tz_convert("UTC").dt.as_unit("ns")
    gaps = out.isna().to_numpy() & walls.notna().to_numpy()
    if gaps.any():
        out = out.copy()
        out[gaps] = [pd.Timestamp(wall_time_to_utc(w.to_pydatetime(), zone)) for w in walls[gaps]]
    return out.to_numpy(dtype="datetime64[ns]").view(np.int64)


def _times_ns(
    column: pa.ChunkedArray, fail: Callable[[str], NoReturn], assume_utc: bool, zone: tzinfo | None = None
) -> np.ndarray:
    """The timestamp column as int64 UTC epoch nanoseconds, whatever type the reader gave it.

    ``zone`` reads zone-less times (None refuses them, unless ``assume_utc``).
    """
    import pyarrow as pa

    kind = column.type
    if pa.types.is_timestamp(kind):  # parsed by the CSV reader
        if column.null_count:
            fail(f"row {int(np.argmax(column.is_null().to_numpy())) + 1}: missing timestamp")
        if kind.tz is None and not assume_utc and zone is None:
            fail(f"row 1: {_ZONELESS}")
        try:  # the stored values are UTC instants (wall times when zone-less)
            ns = column.cast(pa.timestamp("ns", tz=kind.tz)).cast(pa.int64()).to_numpy()
            if kind.tz is None and not assume_utc and zone is not None:
                ns = _localize_ns(pd.Series(pd.to_datetime(ns, unit="ns")), zone)
            return ns
        except (pa.ArrowInvalid, pd.errors.OutOfBoundsDatetime):
            fail(_OUT_OF_RANGE)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return _epoch_ns(column.cast(pa.float64()).to_numpy(), fail)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return parse_timestamps(column.to_pandas(), fail, assume_utc, zone)
    if pa.types.is_null(kind):
        fail("row 1: missing timestamp")
    fail(f"the timestamp column holds {kind} values; write ISO 8601 with a time zone or epoch seconds")


def _floats(column: pa.ChunkedArray) -> tuple[np.ndarray, int, bool]:
    """``(values with NaN where empty, number of non-empty cells that are not numbers, is_text)``."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind):
        return column.cast(pa.float64()).to_numpy(), 0, False  # nulls become NaN
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):  # nested JSON, dates...
        return np.full(len(column), np.nan), len(column) - column.null_count, True
    text = column.to_pandas().str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    present = text.ne("").to_numpy(dtype=bool, na_value=False)
    return values, int((present & np.isnan(values)).sum()), True


# A block is one channel (or one channel index per row) with one value per row, NaN where absent.
_Block = tuple["int | np.ndarray", np.ndarray]


def _long_blocks(table: pa.Table) -> tuple[list[_Block], list[str], int, dict[str, list[str]] | None]:
    """``timestamp,channel,value[,unit]`` -> one block; also names, unreadable count, units seen."""
    import pyarrow as pa
    import pyarrow.compute as pc

    raw = table.column("channel")
    if not (pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type)):
        raw = raw.cast(pa.string())
    # Arrow's dictionary encoding is ~2x faster than pandas.factorize here; code -1 = empty cell.
    encoded = pc.dictionary_encode(raw).combine_chunks()
    codes = pc.fill_null(encoded.indices, -1).to_numpy() if encoded.indices.null_count else encoded.indices.to_numpy()
    canonical = [canonical_channel(n) for n in encoded.dictionary.to_pylist()]
    names = list(dict.fromkeys(canonical))  # first-seen order; the caller sorts the output
    to_channel = [names.index(c) for c in canonical]
    if to_channel == list(range(len(names))):  # no two spellings of one channel: codes are channels
        channel = codes
    else:  # one extra -1 at the end, so that code -1 (no channel) maps to -1
        channel = np.array(to_channel + [-1], dtype=np.int64)[codes]
    value, n_unreadable, _ = _floats(table.column("value"))
    unnamed = channel < 0
    n_unreadable += int((unnamed & ~np.isnan(value)).sum())
    units: dict[str, list[str]] | None = None
    if "unit" in table.column_names:
        value = value.copy()  # converted in place below; the reader's buffer may be read-only
        unit = table.column("unit").cast(pa.string()).to_pandas().str.strip().str.lower()
        pairs = pd.DataFrame({"channel": channel, "unit": unit}).dropna().drop_duplicates()
        units = {}
        for c, u in pairs[pairs["channel"] >= 0].itertuples(index=False):
            units.setdefault(names[c], []).append(str(u))
            conversion = UNIT_CONVERSIONS.get((names[c], str(u)))
            if conversion is not None:
                hit = (channel == c) & unit.eq(u).to_numpy(dtype=bool, na_value=False)
                value[hit] = value[hit] * conversion[0] + conversion[1]
        units = {name: sorted(found) for name, found in sorted(units.items())}
    return [(channel, value)], names, n_unreadable, units


def _wide_blocks(table: pa.Table, time_column: str) -> tuple[list[_Block], list[str], int, list[str]]:
    """``timestamp,<channel>...`` -> one block per column; also names, unreadable count, text columns."""
    columns, ignored = [], []
    n_unreadable = 0
    for name in table.column_names:
        if name == time_column:
            continue
        values, bad, is_text = _floats(table.column(name))
        if is_text and np.isnan(values).all():
            ignored.append(name)  # a text column (a bed or device id...), not a channel
            continue
        columns.append((canonical_channel(name), values))
        n_unreadable += bad
    names = list(dict.fromkeys(c for c, _ in columns))  # first-seen order; the caller sorts the output
    return [(names.index(c), values) for c, values in columns], names, n_unreadable, ignored


@dataclass
class _Grid:
    """Sums and counts of usable samples per (channel, step), and what was dropped."""

    sums: np.ndarray  # (C, L) float64
    counts: np.ndarray  # (C, L) int64
    n_implausible: np.ndarray  # (C,)
    n_after_index: int = 0
    n_before_window: int = 0
    last_ns: int | None = None


def _accumulate(
    t_ns: np.ndarray, blocks: list[_Block], names: list[str], index_ns: int, step_ns: int, length: int
) -> _Grid:
    """Place every usable sample of every block on the grid (see the module docstring)."""
    n_channels = len(names)
    low = np.array([_BY_ALIAS[n].low if n in _BY_ALIAS else -np.inf for n in names])
    high = np.array([_BY_ALIAS[n].high if n in _BY_ALIAS else np.inf for n in names])
    grid = _Grid(
        np.zeros((n_channels, length)), np.zeros((n_channels, length), np.int64), np.zeros(n_channels, np.int64)
    )
    # The leakage rule of meddx.records.is_available (time <= index_time), vectorised: both
    # sides are exact UTC instants in integer nanoseconds, so this is the same comparison.
    available = t_ns <= index_ns
    # Step k covers (index - (L-k) step, index - (L-1-k) step]; the window starts after index - L step.
    in_window = available & (t_ns > index_ns - length * step_ns)
    for channel, values in blocks:
        present = ~np.isnan(values)
        per_row = isinstance(channel, np.ndarray)
        if per_row:
            present &= channel >= 0  # rows without a channel name (counted as unreadable)
        n_present = int(np.count_nonzero(present))
        n_available = int(np.count_nonzero(present & available))
        rows = np.flatnonzero(present & in_window)  # later steps work on the window only
        grid.n_after_index += n_present - n_available
        grid.n_before_window += n_available - rows.size
        value, t = values[rows], t_ns[rows]
        which = channel[rows] if isinstance(channel, np.ndarray) else channel  # isinstance: per_row, for mypy
        plausible = (value >= low[which]) & (value <= high[which]) & np.isfinite(value)
        if isinstance(which, np.ndarray):
            grid.n_implausible += np.bincount(which[~plausible], minlength=n_channels)
            which = which[plausible]
        else:
            grid.n_implausible[channel] += int(rows.size - np.count_nonzero(plausible))
        value, t = value[plausible], t[plausible]
        if t.size == 0:
            continue
        step = length - 1 - (index_ns - t) // step_ns
        if per_row:
            flat = which * length + step
            size = n_channels * length
            grid.counts += np.bincount(flat, minlength=size).reshape(n_channels, length)
            grid.sums += np.bincount(flat, weights=value, minlength=size).reshape(n_channels, length)
        else:
            grid.counts[channel] += np.bincount(step, minlength=length)
            grid.sums[channel] += np.bincount(step, weights=value, minlength=length)
        last = int(t.max())
        grid.last_ns = last if grid.last_ns is None else max(grid.last_ns, last)
    return grid


def _index_ns(index_time: datetime, fail: Callable[[str], NoReturn]) -> int:
    """The index time in UTC epoch nanoseconds; one outside 1678-2261 cannot be compared with log rows."""
    try:
        return int(pd.Timestamp(index_time).as_unit("ns").value)
    except (pd.errors.OutOfBoundsDatetime, OverflowError, ValueError):
        fail(
            f"the row's index_time {index_time.isoformat()} is outside the years 1678-2261 that timestamps "
            "can hold; check the manifest's index_time"
        )


# ---------------------------------------------------------------------------- ingestor


@register_ingestor
class DeviceLogIngestor(Ingestor):
    """Reads a monitor/device log onto a fixed grid before the index time.

    Example:
        >>> from meddx.records import parse_time
        >>> reader = DeviceLogIngestor()
        >>> request = IngestRequest("P0002", parse_time("2024-11-06T23:20:00Z"),
        ...                         {Modality.DEVICE_LOGS: Path("sample_data/patients/P0002/vitals.csv")})
        >>> record = reader.read(request)
        >>> record.arrays["values"].shape, record.meta["channels"]
        ((3, 360), ['heart_rate', 'resp_rate', 'spo2'])
    """

    modality = Modality.DEVICE_LOGS
    tensorizer_class = DeviceLogTensorizer

    def __init__(self, config: IngestConfig | None = None):
        super().__init__(config)
        grid_length(self.config.device_logs)  # a bad grid is a ConfigError now, not at the first file

    def read(self, request: IngestRequest) -> ModalityRecord | None:
        path = Path(request.paths[self.modality])
        return read_device_log(path, request.index_time, self.config.device_logs, self.config.site_zone())


def read_device_log(
    path: Path, index_time: datetime, config: DeviceLogConfig, site_zone: tzinfo | None = None
) -> ModalityRecord | None:
    """Read one log file onto the grid ending at ``index_time`` (see the module docstring).

    ``site_zone`` reads zone-less timestamps (see the module docstring); None refuses them
    unless ``config.assume_utc``.

    Raises:
        IngestError: the file is missing, empty, not CSV/JSONL, lacks the needed columns,
            or holds a missing, unparseable or zone-less timestamp.

    Example:
        >>> from meddx.records import parse_time
        >>> record = read_device_log(Path("sample_data/patients/P0002/vitals.csv"),
        ...                          parse_time("2024-11-06T23:20:00Z"), DeviceLogConfig())
        >>> record.arrays["values"].shape  # (channels, minutes of the look-back window)
        (3, 360)
    """

    def fail(reason: str) -> NoReturn:
        raise IngestError(path, _MODALITY, reason)

    length = grid_length(config)
    step_ns = int(round(config.step_minutes * 60e9))
    index_ns = _index_ns(index_time, fail)
    table, kind = _read_table(path, fail, config.max_file_mb)
    columns = table.column_names

    time_column = next((c for c in _TIME_COLUMNS if c in columns), None)
    if time_column is None:
        fail(f"no timestamp column; expected one of {list(_TIME_COLUMNS)}, found {columns[:20]}")
    t_ns = _times_ns(table.column(time_column), fail, config.assume_utc, site_zone)  # (N,)
    ignored: list[str] = []
    units: dict[str, list[str]] | None = None
    if "channel" in columns or "value" in columns:
        missing = [c for c in ("channel", "value") if c not in columns]
        if missing:
            fail(f"a long-format log needs timestamp, channel and value columns; missing {missing}")
        layout = "long"
        blocks, names, n_unreadable, units = _long_blocks(table)
    else:
        if len(columns) < 2:
            fail("no channel columns besides the timestamp (wide format: timestamp,<channel>,...)")
        layout = "wide"
        blocks, names, n_unreadable, ignored = _wide_blocks(table, time_column)

    grid = _accumulate(t_ns, blocks, names, index_ns, step_ns, length)
    order = sorted(range(len(names)), key=names.__getitem__)  # channels in name order
    names = [names[i] for i in order]
    grid.sums, grid.counts, grid.n_implausible = grid.sums[order], grid.counts[order], grid.n_implausible[order]
    meta: dict[str, Any] = {
        "file_type": kind,
        "layout": layout,
        "channels": [],
        "step_minutes": config.step_minutes,
        "window_hours": config.window_hours,
        "length": length,
        "n_rows": int(table.num_rows),
        "n_samples": int(grid.counts.sum()),
        "n_after_index": grid.n_after_index,
        "n_before_window": grid.n_before_window,
        "n_unreadable": n_unreadable,
        "n_implausible": {names[c]: int(n) for c, n in enumerate(grid.n_implausible) if n},
        "time_zone": "assumed UTC" if config.assume_utc else ("site" if site_zone is not None else "required"),
    }
    if ignored:
        meta["ignored_columns"] = ignored
    if units is not None:
        meta["units"] = units
    if grid.last_ns is None:
        logger.debug("device log %s: no usable sample in the %g h window (meta %s)", path, config.window_hours, meta)
        return None

    counts, sums = grid.counts, grid.sums
    observed = counts.sum(axis=1) > 0
    mask = counts[observed] > 0  # (C, L)
    values = np.zeros(mask.shape, dtype=np.float32)
    values[mask] = (sums[observed][mask] / counts[observed][mask]).astype(np.float32)
    meta["channels"] = [n for n, keep in zip(names, observed, strict=True) if keep]
    warnings = []
    if meta["n_implausible"]:
        warnings.append(f"masked physiologically impossible values: {meta['n_implausible']}")
    last = pd.Timestamp(grid.last_ns, unit="ns", tz="UTC").to_pydatetime()
    return ModalityRecord(
        modality=Modality.DEVICE_LOGS,
        source=str(path),
        arrays={"values": values, "mask": mask},
        time=last,
        meta=meta,
        warnings=warnings,
    )
