"""Shared fixtures: a real Orthanc PACS with its DICOMweb plugin, on a free loopback port.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages provide it (``.ci/run`` installs
them); where they are absent, the tests that need the server are skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meddx.dicomweb.orthanc import OrthancServer, orthanc_available

NO_ORTHANC = (
    "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb);"
    " the PACS tests need a real server"
)


def _needs_orthanc() -> None:
    if not orthanc_available():
        pytest.skip(NO_ORTHANC)
    pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install dicomweb-client)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A running Orthanc shared by a test module; stopped after it."""
    _needs_orthanc()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[[], OrthancServer]]:
    """Start Orthanc servers of a test's own (to stop them in the test); all stopped after it."""
    _needs_orthanc()
    started: list[OrthancServer] = []

    def start() -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc{len(started)}").start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
