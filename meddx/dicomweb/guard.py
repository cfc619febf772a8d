"""Holding a DICOMweb server's answers to limits: size, an overall deadline, redirects.

A PACS that is broken or hostile must cost one row, never the run. What this module bounds:

* **Size.** A QIDO-RS answer is read up to ``dicomweb.max_json_mb`` and refused past it (a
  ``Content-Length`` over the limit is refused before a byte is read). WADO-RS answers are read
  chunk by chunk by :mod:`meddx.dicomweb.multipart`, which holds each instance and each series
  to ``max_instance_mb`` and ``max_series_mb``; nothing is held whole in memory.
* **Time.** ``timeout_s`` bounds each read; ``deadline_s`` bounds a whole request, its
  redirects, retries and body included. A watchdog thread shuts the request's socket down when
  the deadline passes, which wakes a read blocked on a server sending a byte now and then.
* **Redirects.** Followed only to the configured server's own origin (scheme, host and port),
  unless ``dicomweb.follow_other_origins`` is set; then credentials are not sent there.

Every refusal is an :class:`AnswerError` saying what the server did and which setting bounds it.
The watchdog reaches the socket through urllib3's connection classes (:class:`GuardedAdapter`
sets them on its pools, an extension point urllib3 provides); its deadline is per thread, so
concurrent retrievals each have their own.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from meddx.dicomweb.ref import display_url
from meddx.errors import MeddxError

if TYPE_CHECKING:
    from meddx.config import DicomWebConfig

MIB = 1024 * 1024
CHUNK = MIB  # bytes asked for per read of an answer's body
MAX_REDIRECTS = 5
JSON_TYPES = "application/dicom+json, application/json"


class AnswerError(MeddxError):
    """The server's answer broke a limit or was unusable (too large, too slow, redirected away, malformed)."""


class DeadlinePassed(AnswerError):
    """A request did not finish within ``dicomweb.deadline_s``."""


@dataclass(frozen=True)
class Limits:
    """What one server's answers are held to (from the ``dicomweb`` config section).

    Example:
        >>> from meddx.config import DicomWebConfig
        >>> Limits.of(DicomWebConfig(max_json_mb=1), "http://pacs:8042/dicom-web").json_bytes
        1048576
    """

    base_url: str
    timeout_s: float
    deadline_s: float
    instance_bytes: int
    series_bytes: int
    json_bytes: int
    follow_other_origins: bool

    @classmethod
    def of(cls, config: DicomWebConfig, url: str) -> Limits:
        return cls(
            base_url=url,
            timeout_s=config.timeout_s,
            deadline_s=config.deadline_s,
            instance_bytes=int(config.max_instance_mb * MIB),
            series_bytes=int(config.max_series_mb * MIB),
            json_bytes=int(config.max_json_mb * MIB),
            follow_other_origins=config.follow_other_origins,
        )

    @property
    def where(self) -> str:
        return display_url(self.base_url)


def megabytes(n: int) -> str:
    """``n`` bytes in MiB for a message.

    Example:
        >>> megabytes(3 * 1024 * 1024)
        '3 MB'
    """
    return f"{n / MIB:g} MB"


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the default port filled in.

    Example:
        >>> origin("https://PACS.example.org/dicom-web") == origin("https://pacs.example.org:443/x")
        True
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme, 0)


def _origin_text(url: str) -> str:
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}"


# ----------------------------------------------------------------- the deadline


class Deadline:
    """A request's overall time limit: when it passes, the sockets the request uses are shut down."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut_down(sock)

    def watch(self, connection: HTTPConnection) -> None:
        """Shut ``connection``'s socket down when the deadline passes (at once when it has passed).

        The socket itself is kept: ``http.client`` drops a connection's reference to it when
        the answer is read to the connection's close, while the answer still reads from it.
        """
        sock = getattr(connection, "sock", None)
        with self._lock:
            if not self.expired:
                if isinstance(sock, socket.socket):
                    self._sockets.append(sock)
                return
        if isinstance(sock, socket.socket):
            _shut_down(sock)
        raise DeadlinePassed(f"the request ran past its deadline of {self.seconds:g} s")

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    def cancel(self) -> None:
        self._timer.cancel()


def _shut_down(sock: socket.socket) -> None:
    try:  # the base class's method: wakes a thread blocked reading it, also under TLS
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


_local = threading.local()


def current_deadline() -> Deadline | None:
    """The deadline of the request this thread is making, if any."""
    return getattr(_local, "deadline", None)


@contextmanager
def deadline(seconds: float, where: str) -> Iterator[Deadline]:
    """Run a request (and the reading of its answer) under an overall deadline.

    A failure after the deadline passed (the socket was shut down under a read) is reported
    as :class:`DeadlinePassed`, whatever the library raised. Nested use keeps the outer deadline.

    Raises:
        DeadlinePassed: the deadline passed.
    """
    outer = current_deadline()
    if outer is not None:
        yield outer
        return
    watch = Deadline(seconds)
    _local.deadline = watch
    try:
        yield watch
    except Exception:
        if watch.expired:
            raise DeadlinePassed(
                f"the DICOMweb server at {where} did not finish its answer within {seconds:g} s (dicomweb.deadline_s)"
            ) from None
        raise
    finally:
        watch.cancel()
        _local.deadline = None


class _Watched:
    """Registers the connection's socket with the thread's deadline before each request and once connected."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        watch = current_deadline()
        if watch is not None:
            watch.watch(self)  # type: ignore[arg-type]
        super().request(*args, **kwargs)  # type: ignore[misc]

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        watch = current_deadline()
        if watch is not None:
            watch.watch(self)  # type: ignore[arg-type]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class DeadlineRetry(Retry):
    """urllib3's ``Retry`` whose wait for a ``Retry-After`` answer ends with the request's deadline."""

    def get_retry_after(self, response: Any) -> float | None:
        wait = super().get_retry_after(response)
        watch = current_deadline()
        if wait is None or watch is None:
            return wait
        return min(wait, watch.remaining())


class GuardedAdapter(HTTPAdapter):
    """``requests``' adapter whose connections the thread's :class:`Deadline` can shut down."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if proxy.lower().startswith(("http://", "https://")):
            manager.pool_classes_by_scheme = _POOLS
        return manager


# ----------------------------------------------------------------- the session


class GuardedSession(requests.Session):
    """A session whose requests keep to :class:`Limits`.

    Requests that read their whole answer (``stream=False``, as ``dicomweb-client``'s STOW-RS)
    run under the deadline; redirects ``requests`` follows for them are refused off the
    server's origin. meddx's own reads (:func:`open_answer`, :func:`get_json`) stream and
    follow redirects themselves, never reading a redirect's body.
    """

    def __init__(self, limits: Limits):
        super().__init__()
        self.limits = limits

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("stream"):
            return super().request(method, url, *args, **kwargs)
        with deadline(self.limits.deadline_s, self.limits.where):
            return super().request(method, url, *args, **kwargs)

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is not None:
            check_redirect(urljoin(resp.url, target), self.limits)
        return target


def check_redirect(target: str, limits: Limits) -> bool:
    """Whether a redirect stays on the server's origin; raises when it leaves it and that is not allowed.

    Raises:
        AnswerError: another origin, and ``dicomweb.follow_other_origins`` is off.
    """
    if origin(target) == origin(limits.base_url):
        return True
    if limits.follow_other_origins:
        return False
    raise AnswerError(
        f"the DICOMweb server at {limits.where} redirected to another origin ({_origin_text(target)}); not followed"
        " (set dicomweb.follow_other_origins to follow such redirects)"
    )


class _NoAuth(AuthBase):
    """Sends no credentials (a redirect to another origin must not receive the server's)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


@contextmanager
def open_answer(session: GuardedSession, url: str, accept: str) -> Iterator[requests.Response]:
    """GET ``url`` with its answer's body unread, under the deadline; the body is read inside the block.

    Redirects are followed by hand (at most 5, their bodies unread), only to the server's origin
    unless configured. An HTTP error status raises ``requests.HTTPError`` with the response.

    Raises:
        AnswerError: a redirect off the origin, too many redirects, or the deadline passed.
        requests.RequestException: the server cannot be reached, or answered an HTTP error.
    """
    limits = session.limits
    with deadline(limits.deadline_s, limits.where):
        auth: Any = None
        for _ in range(MAX_REDIRECTS + 1):
            response = session.get(
                url,
                headers={"Accept": accept},
                stream=True,
                timeout=limits.timeout_s,
                allow_redirects=False,
                auth=auth,
            )
            if not response.is_redirect:
                break
            target = urljoin(response.url, response.headers["location"])
            response.close()
            if not check_redirect(target, limits):
                auth = _NoAuth()
            url = target
        else:
            response.close()
            raise AnswerError(f"the DICOMweb server at {limits.where} redirected more than {MAX_REDIRECTS} times")
        try:
            response.raise_for_status()
            yield response
        finally:
            response.close()


def content_length(response: requests.Response) -> int | None:
    """The answer's ``Content-Length`` header as a number; None when absent or not a number."""
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def read_capped(response: requests.Response, cap: int, what: str, setting: str, where: str) -> Iterator[bytes]:
    """The answer's body chunk by chunk, refused once it passes ``cap`` bytes.

    Raises:
        AnswerError: the body (or its announced ``Content-Length``) is larger than ``cap``.
    """
    announced = content_length(response)
    too_large = f"more than {megabytes(cap)} for {what} ({setting}); refused"
    if announced is not None and announced > cap:
        raise AnswerError(f"the DICOMweb server at {where} announced {too_large}")
    n = 0
    for chunk in response.iter_content(chunk_size=CHUNK):
        n += len(chunk)
        if n > cap:
            raise AnswerError(f"the DICOMweb server at {where} sent {too_large}")
        yield chunk


def query_string(params: Mapping[str, Any]) -> str:
    """``?key=value&...`` as ``dicomweb-client`` writes it: a list value repeats its key.

    Example:
        >>> query_string({"includefield": ["PatientID", "StudyDate"], "limit": 5})
        '?includefield=PatientID&includefield=StudyDate&limit=5'
    """
    pairs = []
    for key, value in params.items():
        for one in value if isinstance(value, (list, tuple)) else [value]:
            pairs.append(f"{key}={quote_plus(str(one))}")
    return "?" + "&".join(pairs) if pairs else ""


def get_json(session: GuardedSession, url: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """A QIDO-RS answer: a list of DICOM JSON datasets, read up to ``dicomweb.max_json_mb``.

    An empty answer (HTTP 204, or no body) is an empty list.

    Raises:
        AnswerError: too large, too slow, redirected away, or not a JSON list of objects.
        requests.RequestException: the server cannot be reached, or answered an HTTP error.
    """
    limits = session.limits
    with open_answer(session, url + query_string(params or {}), JSON_TYPES) as response:
        chunks = read_capped(response, limits.json_bytes, "a QIDO-RS answer", "dicomweb.max_json_mb", limits.where)
        body = b"".join(chunks)
    if not body.strip():
        return []
    try:
        answer = json.loads(body)
    except ValueError:
        raise AnswerError(f"the DICOMweb server at {limits.where} sent a QIDO-RS answer that is not JSON") from None
    if isinstance(answer, dict):  # some servers send one dataset unwrapped
        answer = [answer]
    if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
        raise AnswerError(
            f"the DICOMweb server at {limits.where} sent a QIDO-RS answer that is not a list of DICOM JSON datasets"
        )
    return answer
