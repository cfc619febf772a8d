"""The foundation backbone: modality encoders and the fusion transformer.

``from meddx.models import FoundationBackbone, BackboneConfig, BackboneOutput``. The config imports
without torch; the modules that need torch load on first use, so the CLI does not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meddx.models.config import BackboneConfig

if TYPE_CHECKING:  # static checkers see the real classes; at run time __getattr__ loads them
    from meddx.models.backbone import BackboneOutput, EncodedBatch, FoundationBackbone
    from meddx.models.diagnosis import DiagnosisModel

__all__ = ["BackboneConfig", "BackboneOutput", "DiagnosisModel", "EncodedBatch", "FoundationBackbone"]


def __getattr__(name: str) -> Any:
    if name in ("FoundationBackbone", "BackboneOutput", "EncodedBatch"):
        from meddx.models import backbone

        return getattr(backbone, name)
    if name == "DiagnosisModel":
        from meddx.models.diagnosis import DiagnosisModel

        return DiagnosisModel
    raise AttributeError(f"module 'meddx.models' has no attribute {name!r}")
