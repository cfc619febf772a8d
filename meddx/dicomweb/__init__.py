"""Imaging from a PACS over DICOMweb: ``dicomweb:`` references, the client, the series store and queries.

``ref`` is light and imported by the manifest reader; the others import ``dicomweb-client``
(a meddx dependency) only when a request is made.
"""

from meddx.dicomweb.ref import DicomWebRef, is_dicomweb_ref, parse_dicomweb_ref, server_id

__all__ = ["DicomWebRef", "is_dicomweb_ref", "parse_dicomweb_ref", "server_id"]
