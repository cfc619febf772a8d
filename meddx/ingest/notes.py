"""The notes ingestor: clinician notes → token chunks for the text encoder.

**Where notes come from.** The row's ``notes`` path (one text file, or a folder whose
non-hidden regular files are all text, read in name order), and the ``text/plain``
DocumentReference attachments of the row's ``ehr`` source (read through
:class:`~meddx.ingest.fhir.FhirIngestor`, so Bundles and Bulk exports work the same and
the same leakage rule applies: a DocumentReference counts at its ``date``).

**Files.** Text is UTF-8 (with or without a BOM), or UTF-16/UTF-32 with a byte order mark,
or UTF-16 without one when its NUL bytes show the byte order; anything else with NUL
bytes is refused as binary. A note file over ``NotesConfig.max_file_mb`` (32 MiB by
default), and anything that is not a regular file (a FIFO, a device), is refused before
it is read. A broken ``ehr`` source does not fail notes that also come from files: the
record is built from the files, with a warning naming the EHR file; without note files
the error names the EHR file.

**Time.** A date inside the text may be the date of a past event, so a text file is dated
only where a date is written for that purpose (:func:`note_file_time`):

* **in its name**, as ``YYYY-MM-DD`` or ``YYYYMMDD``, optionally followed by ``T`` and a
  time ``HHMM[SS]`` (or ``HH-MM[-SS]``) and a zone (``Z``, ``+0100``), anywhere in the name
  but not inside a longer number: ``2024-03-01_discharge.txt``, ``20240301T0930_triage.txt``,
  ``note_20240301T093000Z.txt``;
* **in a header on its first non-blank line**: ``Date:`` (or ``Note date:``, ``Datetime:``,
  ``Date/Time:``, ``Date of service:``; any case) followed by an ISO 8601 date or date and
  time: ``Date: 2024-03-01T09:30``, ``Date: 2024-03-01 09:30:00+01:00``, ``Date: 2024-03-01``.

When both are there, the later one counts (a note is never placed earlier than either says).
A date without a time is the end of that day; times without a zone, and those days, are
read in ``IngestConfig.site_timezone`` when it is set, else in UTC. A dated file after the
index time is dropped (:func:`meddx.records.keep_available`).

**Undated files.** A file named directly in the manifest is taken as available at the
index time, as the manifest contract says of undated files (the user vouched for that one
file). Files found in a **folder** are not vouched for one by one, and a folder may collect
notes written after the index time (a discharge summary), so ``NotesConfig.undated`` decides:
``"drop"`` (the default: leakage is the error that looks like success; the drop is counted
and warned about), ``"keep"`` (taken as available at the index time), or ``"error"`` (an
:class:`~meddx.errors.IngestError` naming the file). ``record.meta`` counts
``files_dated``, ``files_undated``, ``files_dropped_undated`` and ``files_dropped_after_index``.

DocumentReference notes keep their dates. Notes are kept in time order; undated ones count
as written at the index time (the newest). Each used note keeps its time in
``record.events`` (None for undated ones) and ``meta["note_times"]``; ``meta["chunk_note"]``
gives the note of each chunk (an index into ``record.events``) and
the array ``chunk_age_hours`` how long before the index time it was written (0 when undated).

**Tokens and chunks.** Each note is tokenised with the text encoder's own tokenizer
(the bundled all-MiniLM-L6-v2 unless ``NotesConfig.text_model`` names another Hugging
Face folder), without truncation, then cut into chunks of ``max_length`` tokens
including the model's special tokens ([CLS] ... [SEP]). A chunk never spans two notes.
When the notes need more than ``max_chunks`` chunks, the most recent notes win: notes
are taken newest first, each from its beginning, until the chunks are used up; the kept
chunks are then laid out oldest first, so padding is at the end. Only as much of a long
note is tokenised as the kept chunks need (see :meth:`NotesIngestor._windows`).
"""

from __future__ import annotations

import codecs
import logging
import re
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

import numpy as np

from meddx.config import IngestConfig, NotesConfig
from meddx.errors import ConfigError, IngestError
from meddx.fhirclient.ref import FhirRef
from meddx.ingest.base import ArrayTensorizer, Ingestor, IngestRequest, register_ingestor
from meddx.ingest.fhir import FhirIngestor
from meddx.ingest.file_checks import check_source, regular_files
from meddx.records import Event, Modality, ModalityRecord, keep_available, wall_time_to_utc
from meddx.specs import ArrayField, ArraySpec
from meddx.text_model import BUNDLED_MODEL_PACKAGE, bundled_text_model

logger = logging.getLogger(__name__)

# a date (and time) in a file name; both dashes or none, not inside a longer number
_NAME_DATE = re.compile(
    r"(?<!\d)(?P<y>\d{4})(?P<sep>-?)(?P<m>\d{2})(?P=sep)(?P<d>\d{2})"
    r"(?:[Tt](?P<H>\d{2})-?(?P<M>\d{2})(?:-?(?P<S>\d{2}))?(?P<z>Z|[+-]\d{2}:?\d{2})?)?(?!\d)"
)
_HEADER = re.compile(
    r"^\s*(?:date|note date|datetime|date/time|date of service)\s*:\s*(?P<value>.*?)\s*$", re.IGNORECASE
)


def load_tokenizer(config: NotesConfig) -> Any:
    """The notes tokenizer, loaded offline; a :class:`ConfigError` when the config cannot work.

    Checks that ``config.text_model`` (or the bundled model) has a tokenizer on disk and that
    ``max_length`` fits it. ``meddx ingest`` calls this before reading any file.

    Example:
        >>> load_tokenizer(NotesConfig(max_length=32)).model_max_length
        512
    """
    from transformers import AutoTokenizer

    folder = config.text_model or str(bundled_text_model())
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"notes.text_model {folder!r} has no tokenizer that loads offline ({exc}); "
            "name a local Hugging Face model folder"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # GPT-style vocabularies
        tokenizer.pad_token = tokenizer.eos_token
    limit = tokenizer.model_max_length
    if config.max_length > limit:
        raise ConfigError(f"notes.max_length is {config.max_length} but the tokenizer of {folder} allows {limit}")
    if config.max_length <= tokenizer.num_special_tokens_to_add(pair=False):
        raise ConfigError(f"notes.max_length {config.max_length} leaves no room for text after special tokens")
    return tokenizer


def read_text_file(path: Path, modality: str = "notes", max_file_mb: float | None = None) -> str:
    """A note file's text, or an IngestError naming the file.

    UTF-8 (a BOM is allowed), and UTF-16 or UTF-32 with a byte order mark, or UTF-16
    without one when its NUL bytes say which byte order it is (what Windows tools write as
    "Unicode"). The file must be a regular file of at most ``max_file_mb`` MiB.

    Example:
        >>> read_text_file(Path("sample_data/patients/P0001/note.txt")).splitlines()[:3]
        ['EMERGENCY DEPARTMENT NOTE', '', 'Chief complaint: productive cough.']
    """
    check_source(path, modality, max_file_mb=max_file_mb, expected="a UTF-8 text file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IngestError(path, modality, f"cannot read it: {exc.strerror or exc}") from None
    return decode_text(data, path, modality)


# Byte order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _utf16_without_bom(data: bytes) -> str | None:
    """``utf-16-le``/``-be`` when the NUL bytes sit in one byte position of each pair, as in UTF-16 text."""
    if len(data) < 2 or len(data) % 2:
        return None
    even, odd = data[0::2].count(0), data[1::2].count(0)
    pairs = len(data) // 2
    # Latin text in UTF-16 has a NUL in (nearly) every pair, always on the same side.
    if odd >= 0.5 * pairs and even == 0:
        return "utf-16-le"
    if even >= 0.5 * pairs and odd == 0:
        return "utf-16-be"
    return None


def decode_text(data: bytes, path: Path, modality: str = "notes") -> str:
    """Decode a note's bytes (see :func:`read_text_file`); the error says what the bytes are.

    Example:
        >>> decode_text("Husten".encode("utf-16"), Path("note.txt"))
        'Husten'
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                name = codec.replace("-sig", "").upper()
                raise IngestError(
                    path,
                    modality,
                    f"starts with a {name} byte order mark but is not valid {name} "
                    f"(invalid bytes at offset {exc.start}); re-save it as UTF-8",
                ) from None
    if b"\x00" in data:
        guess = _utf16_without_bom(data)
        if guess is not None:
            try:
                text = data.decode(guess)
            except UnicodeDecodeError:
                text = None
            if text is not None and "\x00" not in text:
                logger.debug("%s: read as %s without a byte order mark", path.name, guess)
                return text
        raise IngestError(
            path, modality, "holds NUL bytes and is neither UTF-8 nor UTF-16/32 text: a binary file, not a text note"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IngestError(
            path, modality, f"is not UTF-8 text (invalid byte at offset {exc.start}); re-save it as UTF-8"
        ) from None


def _zone_of(text: str | None) -> tzinfo | None:
    if not text:
        return None
    if text == "Z":
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))


def _to_utc(on: date, clock: time | None, zone: tzinfo | None, site_zone: tzinfo | None) -> datetime:
    wall = datetime.combine(on, clock if clock is not None else time.max)  # a date alone: the end of that day
    if zone is not None:
        return wall.replace(tzinfo=zone).astimezone(timezone.utc)
    return wall_time_to_utc(wall, site_zone or timezone.utc)


def _name_time(name: str, site_zone: tzinfo | None) -> datetime | None:
    for match in _NAME_DATE.finditer(name):
        try:
            on = date(int(match["y"]), int(match["m"]), int(match["d"]))
            clock = None
            if match["H"] is not None:
                clock = time(int(match["H"]), int(match["M"]), int(match["S"] or 0))
            return _to_utc(on, clock, _zone_of(match["z"]), site_zone)
        except ValueError:  # 20241399: a number, not a date; look further
            continue
    return None


def _header_time(text: str, site_zone: tzinfo | None) -> tuple[datetime | None, str | None]:
    """The time in a first-line ``Date:`` header, and a problem with it (an unreadable value)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    match = _HEADER.match(first)
    if not match:
        return None, None
    value = match["value"]
    try:
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        return None, f"its first line is a date header, but {value[:40]!r} is not an ISO 8601 date or time"
    if re.fullmatch(r"\d{4}-?\d{2}-?\d{2}", value):  # a date alone
        return _to_utc(parsed.date(), None, None, site_zone), None
    return _to_utc(parsed.date(), parsed.time(), parsed.tzinfo, site_zone), None


def note_file_time(path: Path, text: str, site_zone: tzinfo | None = None) -> tuple[datetime | None, str | None]:
    """When a note file was written, from its name or its first-line header (module docstring).

    Returns:
        ``(time in UTC or None when undated, a warning or None)``.

    Example:
        >>> note_file_time(Path("2024-03-01_discharge.txt"), "Discharge summary")[0].isoformat()
        '2024-03-01T23:59:59.999999+00:00'
        >>> note_file_time(Path("triage.txt"), "Date: 2024-03-01T09:30+01:00\\nCough.")[0].isoformat()
        '2024-03-01T08:30:00+00:00'
    """
    by_name = _name_time(path.name, site_zone)
    by_header, problem = _header_time(text, site_zone)
    found = [t for t in (by_name, by_header) if t is not None]
    return (max(found) if found else None), problem


class NotesTensorizer(ArrayTensorizer):
    """Token chunks as read: ``input_ids`` and ``attention_mask`` (max_chunks, max_length), ``chunk_mask``."""

    modality = Modality.NOTES

    def spec(self) -> ArraySpec:
        cfg = self.config.notes
        return {
            "input_ids": ArrayField((cfg.max_chunks, cfg.max_length), "int64", "ids"),
            "attention_mask": ArrayField((cfg.max_chunks, cfg.max_length), "bool", "token_mask", of=("input_ids",)),
            "chunk_mask": ArrayField((cfg.max_chunks,), "bool", "token_mask", of=("input_ids",)),
            "chunk_age_hours": ArrayField((cfg.max_chunks,), "float32", "age_hours", of=("input_ids",)),
        }


@register_ingestor
class NotesIngestor(Ingestor):
    """Reads text notes and FHIR DocumentReference notes into fixed token chunks.

    The tokenizer is loaded once per instance, on first use, from local files only.

    Example:
        >>> from meddx.records import parse_time
        >>> reader = NotesIngestor()
        >>> record = reader.read(IngestRequest("P0001", parse_time("2024-12-03T08:27:00Z"),
        ...                                    {Modality.NOTES: Path("sample_data/patients/P0001/note.txt")}))
        >>> record.arrays["input_ids"].shape  # (chunks, tokens)
        (4, 128)
    """

    modality = Modality.NOTES
    tensorizer_class = NotesTensorizer

    def __init__(self, config: IngestConfig | None = None):
        super().__init__(config)
        self._fhir = FhirIngestor(self.config)  # shares the process-wide Bulk index with the EHR reader
        self._tokenizer: Any = None

    def wants(self, request: IngestRequest) -> bool:
        return Modality.NOTES in request.paths or Modality.EHR in request.paths or Modality.EHR in request.remote

    def sources(self, request: IngestRequest) -> list[Path | FhirRef]:
        found: list[Path | FhirRef] = [request.paths[m] for m in (Modality.NOTES, Modality.EHR) if m in request.paths]
        remote = request.remote.get(Modality.EHR)
        return [*found, remote] if isinstance(remote, FhirRef) else found

    # ------------------------------------------------------------------ tokenizer

    @property
    def tokenizer(self) -> Any:
        """The text encoder's tokenizer (loaded on first use, offline: :func:`load_tokenizer`)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.notes)
        return self._tokenizer

    def check(self) -> None:
        """Load the tokenizer now, so that an unusable text model stops a run before it starts."""
        self.tokenizer  # noqa: B018  (loading is the check)

    # ------------------------------------------------------------------ reading

    def read(self, request: IngestRequest) -> ModalityRecord | None:
        sections: list[Event] = []
        warnings: list[str] = []
        meta: dict[str, Any] = {
            "from_files": 0,
            "from_fhir": 0,
            "dropped_after_index": 0,
            "files_dated": 0,
            "files_undated": 0,
            "files_dropped_undated": 0,
            "files_dropped_after_index": 0,
        }
        notes_path = request.paths.get(Modality.NOTES)
        remote = request.remote.get(Modality.EHR)
        ehr_path: Path | FhirRef | None = request.paths.get(Modality.EHR) or (
            remote if isinstance(remote, FhirRef) else None
        )
        if notes_path is not None:
            files = self._text_sections(Path(notes_path), request.index_time, meta, warnings)
            meta["from_files"] = len(files)
            sections += files
        if ehr_path is not None:
            try:
                ehr = self._fhir.read_patient(
                    ehr_path,
                    request.patient_id,
                    request.index_time,
                    resource_types={"DocumentReference"},
                    modality=Modality.NOTES,
                )
            except IngestError as exc:
                if notes_path is None:
                    raise
                warnings.append(f"no DocumentReference notes: {exc.path}: {exc.reason}")
            except Exception as exc:  # noqa: BLE001  # a broken EHR file must not fail the good note files
                reason = f"the FHIR reader failed on it ({type(exc).__name__}: {str(exc)[:200]})"
                if notes_path is None:
                    raise IngestError(str(ehr_path), Modality.NOTES.value, reason) from None
                warnings.append(f"no DocumentReference notes: {ehr_path}: {reason}")
            else:
                documents = [e for e in ehr.events if e.kind == "note"]
                meta["from_fhir"] = len(documents)
                meta["dropped_after_index"] += ehr.meta["dropped_after_index"]
                warnings += ehr.warnings
                sections = documents + sections  # FHIR notes before files of the same time
        sections = [s for s in sections if s.text and s.text.strip()]
        if not sections:
            return None
        index_time = request.index_time
        # time order, undated notes as written at the index time; stable, so files keep name order
        sections.sort(key=lambda s: s.time or index_time)
        arrays, used, cut, chunk_rows = self._chunk(sections)
        cfg = self.config.notes
        used_sections = [sections[i] for i in used]
        position = {i: k for k, i in enumerate(used)}
        chunk_note = [position[i] for i in chunk_rows]
        dated = [s.time for s in used_sections if s.time is not None]
        meta.update(
            n_notes=len(sections),
            n_notes_used=len(used_sections),
            n_chunks=int(arrays["chunk_mask"].sum()),
            truncated=cut or len(used_sections) < len(sections),
            text_model=cfg.text_model or BUNDLED_MODEL_PACKAGE,
            note_times=[s.time.isoformat() if s.time else None for s in used_sections],
            chunk_note=chunk_note,
        )
        # how old each chunk's note is (undated notes: written at the index time); padding rows stay 0
        ages = np.zeros(cfg.max_chunks, np.float32)
        for row, k in enumerate(chunk_note):
            ages[row] = max((index_time - (used_sections[k].time or index_time)).total_seconds() / 3600.0, 0.0)
        arrays["chunk_age_hours"] = ages
        return ModalityRecord(
            modality=Modality.NOTES,
            source=str(notes_path if notes_path is not None else ehr_path),
            arrays=arrays,
            events=used_sections,
            time=max(dated) if dated else None,
            meta=meta,
            warnings=warnings,
        )

    def _text_sections(
        self, path: Path, index_time: datetime, meta: dict[str, Any], warnings: list[str]
    ) -> list[Event]:
        """Dated and kept undated notes of a file or folder, counting what was dropped in ``meta``."""
        limit = self.config.notes.max_file_mb
        check_source(path, "notes", max_file_mb=limit, folder_ok=True, expected="a UTF-8 text file or a folder of them")
        in_folder = path.is_dir()
        if in_folder:
            files = regular_files(path)
            if not files:
                raise IngestError(path, "notes", "the folder holds no note files")
        else:
            files = [path]
        policy = self.config.notes.undated
        site_zone = self.config.site_zone()
        dated: list[Event] = []
        undated: list[Event] = []
        for file in files:
            text = read_text_file(file, max_file_mb=limit)
            when, problem = note_file_time(file, text, site_zone)
            if problem is not None:
                warnings.append(f"{file.name}: {problem}; the file is undated")
            event = Event(when, "note", f"file:{file.name}", text=text)
            if when is not None:
                dated.append(event)
                continue
            if in_folder and policy == "error":
                raise IngestError(
                    file,
                    "notes",
                    "has no date: put one in its name (2024-03-01_note.txt, 20240301T0930_note.txt) or on its "
                    "first line (Date: 2024-03-01T09:30), or set notes.undated to 'keep' or 'drop'",
                )
            if in_folder and policy == "drop":
                meta["files_dropped_undated"] += 1
                continue
            undated.append(event)  # taken as available at the index time (module docstring)
        kept, late = keep_available(dated, index_time)
        meta["files_dated"] = len(dated)
        meta["files_undated"] = len(files) - len(dated)
        meta["files_dropped_after_index"] = late
        meta["dropped_after_index"] += late
        meta["undated_rule"] = policy if in_folder else "named in the manifest: available at the index time"
        if meta["files_dropped_undated"]:
            warnings.append(
                f"{meta['files_dropped_undated']} undated note file(s) in the folder dropped (notes.undated='drop'): "
                "date them in the name (2024-03-01_note.txt) or on the first line (Date: 2024-03-01T09:30)"
            )
            logger.info("notes %s: %d undated file(s) dropped", path.name, meta["files_dropped_undated"])
        return kept + undated

    def _windows(self, text: str, room: int) -> list[tuple[list[int], list[int]]]:
        """The note's ``max_length`` token windows from its beginning: at least ``room + 1`` when it has them.

        Only a prefix of a long note is tokenised (cut at whitespace, so the tokens before
        the cut are those of the whole text), longer each time it gives too few windows:
        tokenising a whole 30 MB note to keep its first few hundred tokens would take
        gigabytes of memory.
        """
        cfg = self.config.notes
        chars = (room + 1) * cfg.max_length * 16  # ~4 characters per token in English text
        while True:
            cut = len(text) > chars
            prefix = text
            if cut:
                space = max(text.rfind(" ", 0, chars), text.rfind("\n", 0, chars))
                prefix = text[: space if space > 0 else chars]
            # the tokenizer's own overflow: consecutive max_length windows, each with [CLS] ... [SEP]
            encoded = self.tokenizer(
                prefix,
                max_length=cfg.max_length,
                truncation=True,
                padding="max_length",
                return_overflowing_tokens=True,
                return_attention_mask=True,
            )
            rows = list(zip(encoded["input_ids"], encoded["attention_mask"], strict=True))
            if rows and isinstance(rows[0][0], int):  # a tokenizer without overflow windows gives one row
                rows = [(encoded["input_ids"], encoded["attention_mask"])]
            if not cut or len(rows) > room:
                return rows
            chars *= 4

    def _chunk(self, sections: list[Event]) -> tuple[dict[str, np.ndarray], list[int], bool, list[int]]:
        """Token chunks of the newest notes.

        Returns the arrays, the indices of the notes used (oldest first), whether a used note
        was cut, and the note index of each chunk row.
        """
        cfg = self.config.notes
        tokenizer = self.tokenizer
        picked: list[tuple[int, list[tuple[list[int], list[int]]]]] = []
        room = cfg.max_chunks
        cut = False
        for i in range(len(sections) - 1, -1, -1):  # newest first
            if room == 0:
                break
            rows = self._windows(sections[i].text or "", room)
            cut = cut or len(rows) > room
            picked.append((i, rows[:room]))
            room -= len(picked[-1][1])
        picked.reverse()  # lay out oldest first
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = np.full((cfg.max_chunks, cfg.max_length), pad, np.int64)
        attention = np.zeros((cfg.max_chunks, cfg.max_length), bool)
        row = 0
        chunk_rows: list[int] = []
        for i, rows in picked:
            for ids, mask in rows:
                input_ids[row] = ids
                attention[row] = np.asarray(mask, bool)
                chunk_rows.append(i)
                row += 1
        chunk_mask = np.arange(cfg.max_chunks) < row
        return (
            {"input_ids": input_ids, "attention_mask": attention, "chunk_mask": chunk_mask},
            [i for i, _ in picked],
            cut,
            chunk_rows,
        )
