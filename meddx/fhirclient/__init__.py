"""The EHR from a FHIR server: ``fhir:Patient/<id>`` references, the REST client, patient searches.

``ref`` is light and imported by the manifest reader; the client imports ``requests`` only
when a request is made.
"""

from meddx.fhirclient.ref import FhirRef, is_fhir_ref, parse_fhir_ref

__all__ = ["FhirRef", "is_fhir_ref", "parse_fhir_ref"]
