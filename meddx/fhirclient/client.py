"""Talking to a FHIR server: URL, credentials, timeouts, retries, bounded answers, failures in plain words.

:class:`FhirClient` sends every request through one ``requests.Session`` and holds each
answer to what the config allows:

* **credentials** from the environment only: a bearer token from ``fhir.token_env``, else HTTP
  basic auth from ``fhir.username_env`` / ``fhir.password_env``; never in a log, an error, a
  cache key or an output. A URL holding credentials is refused (:class:`~meddx.config.FhirServerConfig`).
* **one server**: a ``next`` page link, a redirect or a Bulk status URL that points at another
  scheme, host or port is refused (the credentials would go with it), never followed.
* **bounded answers**: an answer whose ``Content-Length`` says more than ``fhir.max_response_mb``
  is refused before its body is read; a body that keeps coming past that size (no length given)
  is cut off and refused. An answer that is not JSON is an error naming what was asked.
* **retries**: connection errors and HTTP 408/429/500/502/503/504 are tried again
  ``fhir.retries`` times, waiting ``Retry-After`` when the server sends it (more than
  ``fhir.max_retry_after_s`` is an error, not a wait), else ``backoff_s * 2**(try - 1)``.
  A POST is retried only when it never reached the server, or is conditional
  (``If-None-Exist``), so a retry never writes twice.

Messages name the server by scheme, host, port and path, and a request by what it asked for
(``search Observation``); never a query string (it holds patient ids) nor a credential.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urljoin, urlsplit

from meddx.config import FhirServerConfig
from meddx.dicomweb.ref import display_url
from meddx.errors import ConfigError, MeddxError
from meddx.files import atomic_path

if TYPE_CHECKING:
    import requests

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
FHIR_JSON = "application/fhir+json"
_CHUNK = 1 << 16
MAX_REDIRECTS = 5


class FhirAuthError(ConfigError):
    """The FHIR server refused the credentials (HTTP 401/403): a configuration problem, reported once."""


class FhirRequestError(MeddxError):
    """One request to the FHIR server failed; the message says why (no credentials, no query strings).

    Attributes:
        status: the HTTP status of the answer, None when none came (unreachable, cut off, not JSON).
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keep the status when sent between worker processes
        return (type(self), (str(self), self.status))


def server_url(config: FhirServerConfig) -> str:
    """The configured base URL: ``fhir.url``, else the environment variable ``fhir.url_env``.

    Raises:
        ConfigError: neither is set, or the variable holds no usable URL (or one with credentials).

    Example:
        >>> server_url(FhirServerConfig(url="http://127.0.0.1:8103/fhir/R4/"))
        'http://127.0.0.1:8103/fhir/R4'
    """
    if config.url:
        return config.url.rstrip("/")
    value = os.environ.get(config.url_env, "").strip()
    if not value:
        raise ConfigError(
            "the manifest names fhir: sources but no FHIR server is configured; set fhir.url in the ingest config"
            f" (--config) or the environment variable {config.url_env}"
        )
    try:
        checked = FhirServerConfig(url=value)  # the same checks as a configured URL (no credentials in it)
    except ValueError:
        raise ConfigError(
            f"the environment variable {config.url_env} must hold an http(s) URL without credentials,"
            " like https://ehr.example.org/fhir/R4"
        ) from None
    return str(checked.url).rstrip("/")


def auth_headers(config: FhirServerConfig) -> dict[str, str]:
    """The ``Authorization`` header from the environment (bearer token wins over basic); empty when unset."""
    import base64

    token = os.environ.get(config.token_env, "").strip()
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get(config.username_env)
    if user:
        pair = f"{user}:{os.environ.get(config.password_env, '')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    return {}


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the default port filled in.

    Example:
        >>> origin_of("https://EHR.example.org/fhir")
        ('https', 'ehr.example.org', 443)
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    except ValueError:  # a port that is not a number
        port = -1
    return scheme, (parts.hostname or "").lower(), port


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, its body read whole (JSON requests) or written to a file (downloads)."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""

    def json(self, what: str, where: str) -> dict[str, Any]:
        """The body as a JSON object.

        Raises:
            FhirRequestError: the body is not a JSON object.
        """
        try:
            value = json.loads(self.body)
        except (ValueError, RecursionError):
            raise FhirRequestError(
                f"{what}: the FHIR server at {where} answered HTTP {self.status} with a body that is not JSON"
            ) from None
        if not isinstance(value, dict):
            raise FhirRequestError(f"{what}: the FHIR server at {where} answered JSON that is not an object")
        return value


class FhirClient:
    """A FHIR REST client held to one server and to the limits of ``config`` (see the module docstring).

    Args:
        config: the ``fhir`` section of the ingest config.
        url: the base URL; default :func:`server_url`.

    Example:
        >>> client = FhirClient(FhirServerConfig(url="http://127.0.0.1:8103/fhir/R4"))  # doctest: +SKIP
        >>> for page in client.search("Condition", {"subject": "Patient/p1"}):  # doctest: +SKIP
        ...     print(len(page.get("entry", [])))
    """

    def __init__(self, config: FhirServerConfig, url: str | None = None):
        try:
            import requests
        except ImportError:
            raise ConfigError("reading fhir: sources needs requests; pip install requests") from None
        self.config = config
        self.base = (url or server_url(config)).rstrip("/")
        self.where = display_url(self.base)
        self.origin = origin_of(self.base)
        self._auth = auth_headers(config)
        self._local = threading.local()  # one Session per thread: Session is not thread-safe
        self._requests = requests
        self._version: str | None

    # ------------------------------------------------------------------ plumbing

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._requests.Session()
            session.trust_env = False  # no proxy or .netrc credentials from the environment
            self._local.session = session
        return session

    def url(self, path: str) -> str:
        """An absolute URL on this server: ``path`` relative to the base, or an absolute URL checked to be on it.

        Raises:
            FhirRequestError: an absolute URL on another server (scheme, host or port).
        """
        if "://" not in path:
            return f"{self.base}/{path.lstrip('/')}"
        self.check_same_server(path, "a link")
        return path

    def check_same_server(self, url: str, what: str) -> None:
        """Refuse a URL (a page link, a redirect, a status or file URL) that leaves the configured server.

        Raises:
            FhirRequestError: it names another scheme, host or port.
        """
        if origin_of(url) != self.origin:
            raise FhirRequestError(
                f"{what} from the FHIR server at {self.where} points at another server"
                f" ({display_url(url.split('?')[0]) or 'an unreadable URL'}); refused, the credentials must not"
                " leave the configured server"
            )

    def _retry_wait(self, answer: requests.Response | None, attempt: int, what: str) -> float:
        """Seconds to wait before the next try: ``Retry-After`` when given, else the exponential backoff."""
        backoff = self.config.backoff_s * 2 ** (attempt - 1)
        value = answer.headers.get("Retry-After") if answer is not None else None
        if not value:
            return backoff
        value = value.strip()
        if value.isdigit():
            wait = float(value)
        else:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return backoff
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            wait = max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
        if wait > self.config.max_retry_after_s:
            status = answer.status_code if answer is not None else None
            raise FhirRequestError(
                f"{what}: the FHIR server at {self.where} asked to wait {wait:g} s (HTTP {status}, Retry-After),"
                f" more than fhir.max_retry_after_s ({self.config.max_retry_after_s:g} s)",
                status,
            )
        return wait

    def request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        sink: BinaryIO | None = None,
        auth: bool = True,
    ) -> Answer:
        """Send one request with retries; the answer's body read whole (or into ``sink``) within the size limit.

        Args:
            method: ``GET``, ``POST``, ``DELETE``.
            path: relative to the base URL, or an absolute URL on the same server.
            what: what is asked, for messages (``search Observation``); no identifiers.
            params: query parameters.
            body: a JSON-able body (sent as ``application/fhir+json``).
            headers: more headers.
            sink: write the body there instead of holding it (a Bulk file); the answer's body is empty.
            auth: send the credentials (a Bulk file with ``requiresAccessToken: false`` is fetched without).

        Raises:
            FhirAuthError: HTTP 401/403.
            FhirRequestError: unreachable, timed out, an error status after the retries, an answer too large.
        """
        url = self.url(path)
        sent = {"Accept": FHIR_JSON, **(self._auth if auth else {}), **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = FHIR_JSON
        retry_post = method == "GET" or "If-None-Exist" in sent or (body is not None and _conditional_only(body))
        attempts = self.config.retries + 1
        for attempt in range(1, attempts + 1):
            response = None
            try:
                response = self._send(method, url, params, data, sent, what)
            except self._requests.ConnectionError as exc:
                if attempt == attempts:
                    tried = f"{attempts} {'try' if attempts == 1 else 'tries'}"
                    raise FhirRequestError(
                        f"{what}: cannot reach the FHIR server at {self.where} ({tried}); check fhir.url and that the"
                        " server is running"
                    ) from None
                # a POST may have arrived when the connection broke mid-answer: retried only when harmless
                if method != "GET" and not retry_post and not isinstance(exc, self._requests.ConnectTimeout):
                    if "Connection refused" not in str(exc):
                        raise FhirRequestError(
                            f"{what}: the connection to the FHIR server at {self.where} broke; not sent again"
                        ) from None
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
                continue
            except self._requests.Timeout:
                if attempt == attempts or (method != "GET" and not retry_post):
                    raise FhirRequestError(
                        f"{what}: the FHIR server at {self.where} did not answer within {self.config.timeout_s:g} s"
                    ) from None
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
                continue
            status = response.status_code
            try:
                if status in (401, 403):
                    raise FhirAuthError(
                        f"the FHIR server at {self.where} refused the credentials (HTTP {status}); set the environment"
                        f" variable {self.config.token_env} (a bearer token) or {self.config.username_env} and"
                        f" {self.config.password_env} (basic auth)"
                    )
                if status in TRANSIENT_STATUS and attempt < attempts and (method == "GET" or retry_post):
                    wait = self._retry_wait(response, attempt, what)
                    logger.info("%s: HTTP %d from %s; trying again in %.1f s", what, status, self.where, wait)
                    time.sleep(wait)
                    continue
                if status >= 400:
                    detail = _outcome_text(self._read(response, what, None))
                    raise FhirRequestError(
                        f"{what}: the FHIR server at {self.where} answered HTTP {status}"
                        + (f" ({detail})" if detail else ""),
                        status,
                    )
                body_bytes = self._read(response, what, sink if status == 200 else None)
                return Answer(status, response.headers, body_bytes)  # a case-insensitive mapping
            finally:
                response.close()
        raise AssertionError("unreachable")  # the loop returns or raises

    def _send(
        self, method: str, url: str, params: Mapping[str, Any] | None, data: bytes | None, headers: dict, what: str
    ) -> requests.Response:
        """Send, following redirects only within this server."""
        for _ in range(MAX_REDIRECTS + 1):
            response = self.session.request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                timeout=(self.config.timeout_s, self.config.timeout_s),
                stream=True,
                allow_redirects=False,
            )
            if response.status_code not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                return response
            target = urljoin(url, response.headers["Location"])
            response.close()
            self.check_same_server(target, f"{what}: a redirect")
            url, params = target, None
            if response.status_code == 303:
                method, data = "GET", None
        raise FhirRequestError(f"{what}: the FHIR server at {self.where} redirected more than {MAX_REDIRECTS} times")

    def _read(self, response: requests.Response, what: str, sink: BinaryIO | None) -> bytes:
        """The body, held to ``fhir.max_response_mb`` (refused from its Content-Length, or cut off)."""
        limit = int(self.config.max_response_mb * 2**20)
        too_large = (
            f"{what}: the answer of the FHIR server at {self.where} is larger than fhir.max_response_mb"
            f" ({self.config.max_response_mb:g} MB); refused"
        )
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise FhirRequestError(too_large.replace("is larger", f"announces {int(declared):,} bytes, larger"))
        size = 0
        chunks: list[bytes] = []
        try:
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise FhirRequestError(too_large)
                if sink is not None:
                    sink.write(chunk)
                else:
                    chunks.append(chunk)
        except self._requests.RequestException as exc:
            kind = "timed out" if isinstance(exc, self._requests.Timeout) else "broke off"
            raise FhirRequestError(f"{what}: the answer of the FHIR server at {self.where} {kind} mid-body") from None
        return b"".join(chunks)

    # ------------------------------------------------------------------ FHIR interactions

    def get_json(self, path: str, what: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """GET a JSON resource (a read, a search page, a Bulk manifest)."""
        return self.request("GET", path, what, params=params).json(what, self.where)

    def search(self, resource_type: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The pages (searchset Bundles) of a search, following ``next`` links on this server.

        Raises:
            FhirRequestError: a page fails, is no Bundle, links to another server, repeats an
                earlier page, or the search runs past ``fhir.max_pages`` pages.
        """
        what = f"search {resource_type}"
        page = self.get_json(resource_type, what, params)
        seen: set[str] = set()
        for number in range(1, self.config.max_pages + 1):
            if page.get("resourceType") != "Bundle":
                raise FhirRequestError(
                    f"{what}: the FHIR server at {self.where} answered"
                    f" {page.get('resourceType') or 'JSON'}, not a Bundle"
                )
            yield page
            links = page.get("link")
            nxt = (
                next((lk.get("url") for lk in links if isinstance(lk, dict) and lk.get("relation") == "next"), None)
                if isinstance(links, list)
                else None
            )
            if not isinstance(nxt, str) or not nxt:
                return
            nxt = urljoin(self.base + "/", nxt)
            self.check_same_server(nxt, f"{what}: a next-page link")
            if nxt in seen:
                raise FhirRequestError(f"{what}: the FHIR server at {self.where} links a page it gave before (a loop)")
            seen.add(nxt)
            if number == self.config.max_pages:
                break
            page = self.get_json(nxt, what)
        raise FhirRequestError(
            f"{what}: the FHIR server at {self.where} gave more than fhir.max_pages ({self.config.max_pages}) pages"
        )

    def capability_version(self) -> str | None:
        """``fhirVersion`` of the server's CapabilityStatement (``GET metadata``); None when it gives none."""
        if not hasattr(self, "_version"):
            statement = self.get_json("metadata", "read the CapabilityStatement (metadata)")
            version = statement.get("fhirVersion")
            self._version = version if isinstance(version, str) and version.strip() else None
        return self._version

    def download(self, url: str, dest: Path, what: str, *, auth: bool = True) -> int:
        """Write the body of ``url`` (on this server) to ``dest`` atomically; returns its size in bytes."""
        with atomic_path(dest, suffix=".part") as tmp, open(tmp, "wb") as handle:
            self.request("GET", url, what, sink=handle, auth=auth, headers={"Accept": "application/fhir+ndjson"})
        return dest.stat().st_size


def _conditional_only(body: Any) -> bool:
    """Whether a transaction Bundle only holds conditional creates (safe to send twice)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return False
    requests = [e.get("request") if isinstance(e, dict) else None for e in body.get("entry") or []]
    return bool(requests) and all(
        isinstance(r, dict) and r.get("method") == "POST" and bool(r.get("ifNoneExist")) for r in requests
    )


def _outcome_text(body: bytes) -> str:
    """The first issue of an OperationOutcome body, cut short; empty when the body is none."""
    try:
        value = json.loads(body[:65536]) if body else None
    except (ValueError, RecursionError):
        return ""
    issues = value.get("issue") if isinstance(value, dict) else None
    if not isinstance(issues, list) or not issues or not isinstance(issues[0], dict):
        return ""
    issue = issues[0]
    text = (issue.get("details") or {}).get("text") if isinstance(issue.get("details"), dict) else None
    text = text or issue.get("diagnostics") or issue.get("code") or ""
    return " ".join(str(text).split())[:200]


_CLIENTS: dict[tuple[str, str], FhirClient] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(config: FhirServerConfig) -> FhirClient:
    """This process's client for ``config`` (made once, reused by every reader)."""
    key = (config.model_dump_json(), server_url(config))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = FhirClient(config, key[1])
        return _CLIENTS[key]


def check_server(config: FhirServerConfig) -> bool:
    """Preflight before a run: one small search that proves the server takes the credentials.

    Returns:
        True when the server answered; False when it cannot be reached now (logged once as a
        warning: rows whose record is cached still work, the others fail one by one with the reason).

    Raises:
        FhirAuthError: the server refused the credentials (HTTP 401/403); nothing was read.
        ConfigError: no server configured.
    """
    client = FhirClient(config)
    try:
        client.get_json("Patient", "a test search (Patient?_count=1)", {"_count": 1, "_elements": "id"})
    except FhirAuthError as exc:
        raise FhirAuthError(f"{exc}; nothing was read") from None
    except FhirRequestError as exc:
        logger.warning("FHIR preflight: %s; rows not in the cache will fail", exc)
        return False
    return True
