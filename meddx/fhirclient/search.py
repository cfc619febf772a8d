"""One patient's EHR from a FHIR server: the searches, their pages, and a cache of the answers.

For ``fhir:Patient/<id>`` the reader needs that patient's resources of the types the
tensorizer uses. :func:`patient_resources` reads the Patient and searches each type by
``subject=Patient/<id>``, following ``next`` links, ``fhir.max_concurrency`` searches at once.
(``subject``, not ``patient``: every type read here names its patient in ``subject``, as the
Bundle reader matches them, and ``patient`` asks the server to resolve each reference.)

**Leaving out what is dated after the index time.** Where a type's date search parameter
covers the element the reader places it by first (:data:`DATE_SEARCHES`), the search asks for
``<param>=le<index time + 1 day>`` (the day of slack covers dates the server reads in
another zone than ``site_timezone``). The reader places a resource no earlier than that element
(a period from its end, never before its start; a later ``issued`` only moves it later), so
nothing left out could have been kept. Where the reader falls back to another element when
that one is missing (an Observation without ``effective[x]`` is placed by ``issued``), a second
search asks for ``<param>:missing=true``. Everything returned still goes through the same
leakage rule as a Bundle. The record's counts of what was dropped (``dropped_after_index``,
``dropped_undated``, ``dropped_by_status``) cover only what the server returned.

**The cache.** Each search's answer (all its pages, as the list of resources) is kept as JSON
under ``fhir.cache_dir/<server>/``, keyed by the server (a hash of its URL, never
credentials), the patient, the index time and the search's parameters. A second run, or the
notes reader after the EHR reader, asks the server nothing. The cache is of answers already
filtered by date: it holds nothing the index time did not allow to be asked for.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from meddx.config import FhirServerConfig
from meddx.dicomweb.ref import server_id
from meddx.fhirclient.client import FhirClient, FhirRequestError, client_for
from meddx.fhirclient.ref import FhirRef
from meddx.files import write_atomic

# resource type -> (its date search parameter, whether the reader falls back to another element
# when the parameter's element is missing: then resources without it are searched for as well)
DATE_SEARCHES: dict[str, tuple[str, bool]] = {
    "Observation": ("date", True),  # effective[x]; else issued
    "Condition": ("onset-date", True),  # onset[x]; else recordedDate
    "Procedure": ("date", True),  # performed[x] (R5 occurrence[x]); else recorded (R5)
    "MedicationRequest": ("authoredon", False),  # authoredOn: the only element it is placed by
    "MedicationStatement": ("effective", True),  # effective[x]; else dateAsserted
    "Encounter": ("date", False),  # period (R5 actualPeriod)
    "DocumentReference": ("date", False),  # date: the only element a document is placed by
}
DATE_SLACK = timedelta(days=1)
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Search:
    """One search of one patient's resources of one type."""

    resource_type: str
    params: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        return f"{self.resource_type}?{'&'.join(f'{k}={v}' for k, v in self.params)}"


def searches_for(ref: FhirRef, index_time: datetime, types: set[str], page_size: int) -> list[Search]:
    """The searches that find the patient's resources of ``types`` (Patient excluded) at ``index_time``.

    Example:
        >>> [s.describe() for s in searches_for(FhirRef("p1"), datetime(2024, 3, 5, tzinfo=timezone.utc),
        ...                                     {"Encounter"}, 100)]
        ['Encounter?subject=Patient/p1&date=le2024-03-06T00:00:00Z&_count=100']
    """
    bound = (index_time + DATE_SLACK).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    found = []
    for kind in sorted(types - {"Patient"}):
        patient = ("subject", f"Patient/{ref.patient_id}")
        count = ("_count", str(page_size))
        date = DATE_SEARCHES.get(kind)
        if date is None:
            found.append(Search(kind, (patient, count)))
            continue
        param, fallback = date
        found.append(Search(kind, (patient, (param, f"le{bound}"), count)))
        if fallback:
            found.append(Search(kind, (patient, (f"{param}:missing", "true"), count)))
    return found


class AnswerCache:
    """Search answers on disk under ``root/<server id>/`` (see the module docstring)."""

    def __init__(self, root: str | Path, base_url: str):
        self.folder = Path(root) / server_id(base_url)

    def _path(self, ref: FhirRef, index_time: datetime, search: Search) -> Path:
        payload = json.dumps(
            {
                "format": CACHE_FORMAT,
                "patient": ref.patient_id,
                "index_time": index_time.isoformat(),
                "search": [search.resource_type, list(search.params)],
            },
            sort_keys=True,
        )
        key = hashlib.sha256(payload.encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.json"

    def get(self, ref: FhirRef, index_time: datetime, search: Search) -> list[dict[str, Any]] | None:
        path = self._path(ref, index_time, search)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        resources = data.get("resources") if isinstance(data, dict) else None
        return resources if isinstance(resources, list) else None

    def put(self, ref: FhirRef, index_time: datetime, search: Search, resources: list[dict[str, Any]]) -> None:
        path = self._path(ref, index_time, search)
        write_atomic(path, json.dumps({"resources": resources}))

    def get_version(self) -> tuple[bool, str | None]:
        """(known, fhirVersion) of the server's CapabilityStatement, as asked before."""
        try:
            data = json.loads((self.folder / "capability.json").read_bytes())
        except (OSError, ValueError):
            return False, None
        return True, data.get("fhirVersion") if isinstance(data, dict) else None

    def put_version(self, version: str | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "capability.json").write_text(json.dumps({"fhirVersion": version}))


def _run_search(client: FhirClient, search: Search) -> list[dict[str, Any]]:
    resources = []
    for page in client.search(search.resource_type, dict(search.params)):
        for entry in page.get("entry") or []:
            if not isinstance(entry, dict):
                continue
            mode = (entry.get("search") or {}).get("mode") if isinstance(entry.get("search"), dict) else None
            resource = entry.get("resource")
            if isinstance(resource, dict) and mode in (None, "match"):
                resources.append(resource)
    return resources


def _read_patient(client: FhirClient, ref: FhirRef) -> list[dict[str, Any]]:
    """The Patient, as a one-item list; empty when the server has no such Patient (HTTP 404/410)."""
    try:
        return [client.get_json(f"Patient/{ref.patient_id}", "read Patient")]
    except FhirRequestError as exc:
        if exc.status in (404, 410):
            return []
        raise


@dataclass
class PatientAnswer:
    """What the server gave for one patient: the resources (Patient first), its FHIR version, requests made."""

    resources: list[dict[str, Any]]
    fhir_version: str | None
    requests: int


def patient_resources(config: FhirServerConfig, ref: FhirRef, index_time: datetime, types: set[str]) -> PatientAnswer:
    """The patient's resources of ``types`` that the server holds up to ``index_time`` (module docstring).

    Args:
        config: the ``fhir`` section (``cache_dir`` set: answers are cached there).
        ref: the patient.
        index_time: searches leave out what is dated after it (plus one day of slack).
        types: resource types to find (the Patient is always read).

    Raises:
        FhirAuthError, FhirRequestError: a request failed (nothing is cached for a failed search).
        ConfigError: no server configured.
    """
    client = client_for(config)
    cache = AnswerCache(config.cache_dir, client.base) if config.cache_dir else None
    searches: list[Search | None] = [None, *searches_for(ref, index_time, types, config.page_size)]
    answers: dict[int, list[dict[str, Any]]] = {}
    todo = []
    for number, search in enumerate(searches):
        key = search or Search("Patient", (("_id", ref.patient_id),))
        hit = cache.get(ref, index_time, key) if cache is not None else None
        if hit is not None:
            answers[number] = hit
        else:
            todo.append(number)

    def run(number: int) -> list[dict[str, Any]]:
        search = searches[number]
        return _read_patient(client, ref) if search is None else _run_search(client, search)

    if todo:
        workers = max(1, min(config.max_concurrency, len(todo)))
        with ThreadPoolExecutor(workers, thread_name_prefix="meddx-fhir") as pool:
            for number, found in zip(todo, pool.map(run, todo), strict=True):
                answers[number] = found
                if cache is not None:
                    search = searches[number]
                    cache.put(ref, index_time, search or Search("Patient", (("_id", ref.patient_id),)), found)
    known, version = cache.get_version() if cache is not None else (False, None)
    requests = len(todo)
    if not known:
        version = client.capability_version()
        requests += 1
        if cache is not None:
            cache.put_version(version)
    resources: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for number in range(len(searches)):
        for resource in answers[number]:
            name = (str(resource.get("resourceType")), str(resource.get("id")))
            if resource.get("id") is not None and name in seen:
                continue
            seen.add(name)
            resources.append(resource)
    return PatientAnswer(resources, version, requests)
