"""Exports of meddx results to formats other systems read: FHIR RiskAssessments (``fhir``) and
DICOM Structured Reports for the PACS (``sr``, imported on use: it needs highdicom)."""

from meddx.export.fhir import ModelProvenance, risk_assessment, risk_assessments

__all__ = ["ModelProvenance", "risk_assessment", "risk_assessments"]
