"""Building blocks of the synthetic FHIR resources: code systems, codings, quantities, documents."""

from __future__ import annotations

import base64
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np

from meddx.synth.common import iso

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def categories(code: str, system: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": code}]}]


OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VERIFY = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"

COMORBIDITIES = (
    ("38341003", "Hypertensive disorder, systemic arterial (disorder)", ("314076", "lisinopril 10 MG Oral Tablet")),
    ("44054006", "Diabetes mellitus type 2 (disorder)", ("861007", "metformin hydrochloride 500 MG Oral Tablet")),
    ("195967001", "Asthma (disorder)", ("745679", "albuterol 0.09 MG/ACTUAT Metered Dose Inhaler")),
    ("55822004", "Hyperlipidemia (disorder)", ("617312", "atorvastatin 20 MG Oral Tablet")),
    (
        "13645005",
        "Chronic obstructive lung disease (disorder)",
        ("896209", "tiotropium 0.0025 MG/ACTUAT Inhalation Spray"),
    ),
)
COPD_SNOMED = "13645005"
# What the interacting cohort writes for its contexts (a heart failure with its diuretic; a
# beta-blocker, prescribed for atrial fibrillation); COPD is the entry of COMORBIDITIES above.
CONTEXT_CONDITIONS = {
    "heart_failure": ("84114007", "Heart failure (disorder)", ("310429", "furosemide 20 MG Oral Tablet")),
    "beta_blocker": (
        "49436004",
        "Atrial fibrillation (disorder)",
        ("866924", "metoprolol succinate 50 MG 24HR Extended Release Oral Tablet"),
    ),
}


def birth_date(index_time: datetime, age: int, rng: np.random.Generator) -> date:
    anchor = index_time.date()
    try:
        anchor = anchor.replace(year=anchor.year - age)
    except ValueError:  # 29 February
        anchor = anchor.replace(year=anchor.year - age, day=28)
    return anchor - timedelta(days=int(rng.integers(0, 365)))


def document(doc_id: str, subject: dict[str, str], when: datetime, title: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "status": "current",
        "type": {"coding": [coding(LOINC, "34111-5", "Emergency department Note")], "text": title},
        "subject": subject,
        "date": iso(when),
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "language": "en",
                    "title": title,
                    "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                }
            }
        ],
    }
