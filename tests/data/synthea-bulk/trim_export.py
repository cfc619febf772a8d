"""Trim a Synthea Bulk FHIR export to a few patients (how this folder was made).

Usage: ``python trim_export.py SOURCE_FOLDER TARGET_FOLDER PATIENT_ID...``

Every ``*.ndjson`` file of SOURCE is written to TARGET, keeping:

* the lines that refer to one of the patients (``Patient/<id>`` or the Patient line itself);
* of the resources that belong to no patient (Organization, Location, Practitioner), the
  lines whose ``id`` or an ``identifier`` value the kept lines mention, and the
  PractitionerRole lines of the kept Practitioners.

Lines are copied byte for byte, in their original order; ``log.ndjson``, LICENSE and
NOTICE are copied as they are.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

UNOWNED = ("Organization", "Location", "Practitioner", "PractitionerRole")


def trim(source: Path, target: Path, patients: list[str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    kept_text: list[str] = []
    unowned: list[Path] = []
    for path in sorted(source.glob("*.ndjson")):
        kind = path.name.split(".")[0]
        if path.name == "log.ndjson":
            continue
        if kind in UNOWNED:
            unowned.append(path)
            continue
        with open(path) as handle:
            lines = [line for line in handle if any(pid in line for pid in patients)]
        kept_text += lines
        (target / path.name).write_text("".join(lines))
    mentioned = "".join(kept_text)
    for path in unowned:
        kept = []
        with open(path) as handle:
            for line in handle:
                resource = json.loads(line)
                if resource["resourceType"] == "PractitionerRole":  # a role of a kept Practitioner
                    keys = [resource.get("practitioner", {}).get("identifier", {}).get("value", "")]
                else:
                    keys = [resource["id"]] + [i.get("value", "") for i in resource.get("identifier", [])]
                if any(key and key in mentioned for key in keys):
                    kept.append(line)
        (target / path.name).write_text("".join(kept))
    for name in ("log.ndjson", "LICENSE", "NOTICE"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)


if __name__ == "__main__":
    trim(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
