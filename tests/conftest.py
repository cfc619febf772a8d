"""Shared fixtures: a real Orthanc PACS with its DICOMweb plugin, on a free loopback port.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages provide it (``.ci/run`` installs
them); where they are absent, the tests that need the server are skipped with that reason.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
NO_ORTHANC = (
    "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb);"
    " the PACS tests need a real server"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OrthancServer:
    """One Orthanc process with authentication on, storing in ``folder``; :meth:`stop` ends it."""

    user = "meddx-test"
    password = "pacs-secret-7"

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        self.process: subprocess.Popen | None = None

    def start(self) -> OrthancServer:
        import requests

        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "meddx-test",
            "HttpPort": self.port,
            "DicomPort": _free_port(),
            "DicomServerEnabled": False,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 (kept open for the process)
        self.process = subprocess.Popen([str(ORTHANC), str(config_path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start; see {self.folder / 'orthanc.log'}")
            try:
                answer = requests.get(f"{self.url}/studies", auth=(self.user, self.password), timeout=1)
                if answer.status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within 30 s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self, password: str | None = None):
        """A dicomweb-client for uploading test data (the library's own client is under test elsewhere)."""
        import requests
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.auth = (self.user, password or self.password)
        return DICOMwebClient(self.url, session=session)


def _needs_orthanc() -> None:
    if ORTHANC is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip(NO_ORTHANC)
    pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install 'meddx[pacs]')")


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
