"""Exports of meddx results to formats other systems read (FHIR)."""

from meddx.export.fhir import ModelProvenance, risk_assessment, risk_assessments

__all__ = ["ModelProvenance", "risk_assessment", "risk_assessments"]
