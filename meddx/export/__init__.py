"""Exports of predictions to hospital systems (DICOM Structured Reports for the PACS)."""
