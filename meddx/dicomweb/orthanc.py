"""A local Orthanc PACS (with its DICOMweb plugin) for tests and benchmarks.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages provide the server. :class:`OrthancServer`
starts one on a free loopback port (127.0.0.1 only, remote access off) with a storage folder of
its own and basic authentication on, and stops it. Not used by meddx itself.

Example:
    >>> server = OrthancServer(Path("/tmp/orthanc")).start()  # doctest: +SKIP
    >>> server.url  # doctest: +SKIP
    'http://127.0.0.1:41234/dicom-web'
    >>> server.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import BinaryIO

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT = 300.0  # seconds Orthanc may take to answer after its start (only a broken install takes this long)


def orthanc_available() -> bool:
    """Whether the Orthanc binary and its DICOMweb plugin are installed."""
    return ORTHANC is not None and DICOMWEB_PLUGIN.is_file()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OrthancServer:
    """One Orthanc process with authentication on, storing in ``folder``; :meth:`stop` ends it.

    Args:
        folder: where its configuration, storage and log go.
    """

    user = "meddx-test"
    password = "pacs-secret-7"

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        self.process: subprocess.Popen | None = None
        self._log: BinaryIO | None = None

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
        if not orthanc_available():
            raise RuntimeError(
                "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
            )
        self._log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 (open while the server runs)
        self.process = subprocess.Popen([str(ORTHANC), str(config_path)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start; see {self.folder / 'orthanc.log'}")
            try:
                answer = requests.get(f"{self.url}/studies", auth=(self.user, self.password), timeout=5)
                if answer.status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or a loaded machine
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT:g} s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self, password: str | None = None):
        """A plain dicomweb-client logged in as the test user (for uploading data)."""
        import requests
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.auth = (self.user, password or self.password)
        return DICOMwebClient(self.url, session=session)
