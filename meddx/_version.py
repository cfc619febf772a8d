"""The version of meddx, in a module of its own so any layer can read it without loading the package's names."""

from __future__ import annotations

__version__ = "0.1.0"
