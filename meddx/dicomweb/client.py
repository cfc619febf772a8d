"""Connecting to a DICOMweb server: URL, credentials, timeouts, retries, limits, and failures in plain words.

:func:`open_session` builds a ``requests.Session`` (:class:`~meddx.dicomweb.guard.GuardedSession`)
that carries HTTP basic auth from the environment variables the config names
(``MEDDX_DICOMWEB_USER`` / ``MEDDX_DICOMWEB_PASSWORD`` by default), a timeout on every read,
an overall deadline per request, redirects kept to the server's origin, and retries with
exponential backoff on connection errors and transient HTTP answers (408, 429, 500, 502,
503, 504), done by urllib3's ``Retry`` on the session (a ``Retry-After`` wait ends with the
deadline). meddx's own reads (QIDO-RS, WADO-RS) go through it with the size limits of
:mod:`meddx.dicomweb.guard`. :func:`connect` puts a ``dicomweb_client.DICOMwebClient`` on
such a session (for STOW-RS and other uses); ``dicomweb-client``'s own retrying is switched
off: it also retries on every exception, which makes a stopped server cost half a minute
per request.

:func:`describe_failure` turns what ``requests`` raised, or a refused answer, into one
sentence that says what to fix; it names the server by scheme, host, port and path only.
Credentials never appear in a message, a log line or a cache key.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from meddx.config import DicomWebConfig
from meddx.dicomweb.ref import display_url
from meddx.errors import ConfigError

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

    from meddx.dicomweb.guard import GuardedSession

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
INSTALL_HINT = "install meddx's dependencies (pip install dicomweb-client highdicom)"


class DicomWebAuthError(ConfigError):
    """The DICOMweb server refused the credentials (HTTP 401/403): a configuration problem, reported once."""


def server_url(config: DicomWebConfig) -> str:
    """The configured base URL: ``dicomweb.url``, else the environment variable ``dicomweb.url_env``.

    Raises:
        ConfigError: neither is set, or the variable holds no usable URL.

    Example:
        >>> server_url(DicomWebConfig(url="http://127.0.0.1:8042/dicom-web"))
        'http://127.0.0.1:8042/dicom-web'
    """
    if config.url:
        return config.url.rstrip("/")
    value = os.environ.get(config.url_env, "").strip()
    if not value:
        raise ConfigError(
            f"the manifest names dicomweb: sources but no DICOMweb server is configured; set dicomweb.url in the"
            f" ingest config (--config) or the environment variable {config.url_env}"
        )
    try:
        checked = DicomWebConfig(url=value)  # the same checks as a configured URL (no credentials in it)
    except ValueError:
        raise ConfigError(
            f"the environment variable {config.url_env} must hold an http(s) URL without credentials,"
            " like https://pacs.example.org/dicom-web"
        ) from None
    return str(checked.url).rstrip("/")


def credentials(config: DicomWebConfig) -> tuple[str, str] | None:
    """``(user, password)`` from the environment variables the config names; None when the user is unset."""
    user = os.environ.get(config.username_env)
    if not user:
        return None
    return user, os.environ.get(config.password_env, "")


def open_session(config: DicomWebConfig, url: str | None = None) -> GuardedSession:
    """A session with basic auth from the environment, timeouts, the deadline, redirect checks and retries.

    Args:
        config: the ``dicomweb`` section of the ingest config.
        url: the base URL; default :func:`server_url`.

    Raises:
        ConfigError: no server configured.

    Example:
        >>> session = open_session(DicomWebConfig(url="http://127.0.0.1:8042/dicom-web"))
        >>> session.limits.deadline_s
        900.0
    """
    from meddx.dicomweb.guard import DeadlineRetry, GuardedAdapter, GuardedSession, Limits

    url = url or server_url(config)
    session = GuardedSession(Limits.of(config, url))
    auth = credentials(config)
    if auth is not None:
        session.auth = auth
    retry = DeadlineRetry(
        total=config.retries,
        connect=config.retries,
        read=config.retries,
        status=config.retries,
        backoff_factor=config.backoff_s,
        status_forcelist=TRANSIENT_STATUS,
        allowed_methods=frozenset({"GET", "HEAD"}),  # a STOW-RS POST is retried only when it never left
        raise_on_status=False,  # the last answer comes back and is reported with its status
    )
    adapter = GuardedAdapter(max_retries=retry, pool_maxsize=max(10, config.max_concurrency))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def connect(config: DicomWebConfig, url: str | None = None) -> DICOMwebClient:
    """A ``DICOMwebClient`` on :func:`open_session`'s session (auth, timeouts, deadline, retries).

    Args:
        config: the ``dicomweb`` section of the ingest config.
        url: the base URL; default :func:`server_url`.

    Raises:
        ConfigError: no server configured, or ``dicomweb-client`` is not installed.

    Example:
        >>> client = connect(DicomWebConfig(url="http://127.0.0.1:8042/dicom-web"))  # doctest: +SKIP
        >>> client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"})  # doctest: +SKIP
    """
    try:
        from dicomweb_client import DICOMwebClient
    except ImportError:
        raise ConfigError(f"reading dicomweb: sources needs dicomweb-client; {INSTALL_HINT}") from None

    url = url or server_url(config)
    client = DICOMwebClient(url, session=open_session(config, url), timeout=config.timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a ``requests`` error that carries a response, else None."""
    response: Any = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def describe_failure(exc: BaseException, config: DicomWebConfig, url: str) -> str:
    """One sentence on why a DICOMweb request failed and what to do (no credentials, no query strings).

    Example:
        >>> import requests
        >>> describe_failure(requests.ConnectionError("refused"), DicomWebConfig(retries=0), "http://h:1/dw")
        'cannot reach the DICOMweb server at http://h:1/dw (1 try); check dicomweb.url and that the server is running'
    """
    import requests

    from meddx.dicomweb.guard import AnswerError

    if isinstance(exc, AnswerError):  # already says what the server did and which setting bounds it
        return str(exc)
    where = display_url(url)
    tries = config.retries + 1
    tried = f"{tries} {'try' if tries == 1 else 'tries'}"
    status = http_status(exc)
    if status in (401, 403):
        return (
            f"the DICOMweb server at {where} refused the credentials (HTTP {status}); set the environment variables"
            f" {config.username_env} and {config.password_env} (dicomweb.username_env, dicomweb.password_env)"
        )
    if status == 404:
        return f"not found on the DICOMweb server at {where} (HTTP 404); check the StudyInstanceUID/SeriesInstanceUID"
    if status is not None:
        return f"the DICOMweb server at {where} answered HTTP {status} ({tried})"
    if isinstance(exc, requests.Timeout):
        return f"the DICOMweb server at {where} did not answer within {config.timeout_s:g} s ({tried})"
    if isinstance(exc, requests.ConnectionError):
        return (
            f"cannot reach the DICOMweb server at {where} ({tried}); check dicomweb.url and that the server is running"
        )
    return f"unexpected answer from the DICOMweb server at {where}: {type(exc).__name__}"


def check_server(config: DicomWebConfig) -> bool:
    """Preflight before a run: one QIDO-RS request that proves the server takes the credentials.

    Returns:
        True when the server answered; False when it cannot be reached now (logged once as a
        warning: rows still in the cache work, the others fail one by one with the reason).

    Raises:
        DicomWebAuthError: the server refused the credentials (HTTP 401/403); nothing was read.
        ConfigError: no server configured, or ``dicomweb-client`` is missing.

    Example:
        >>> check_server(DicomWebConfig(url="http://127.0.0.1:8042/dicom-web"))  # doctest: +SKIP
        True
    """
    import requests

    from meddx.dicomweb.guard import AnswerError, get_json

    url = server_url(config)
    session = open_session(config, url)
    try:
        get_json(session, f"{url}/studies", {"limit": 1})
    except (requests.RequestException, AnswerError) as exc:
        reason = describe_failure(exc, config, url)
        if http_status(exc) in (401, 403):
            raise DicomWebAuthError(f"{reason}; nothing was read") from None
        logger.warning("DICOMweb preflight: %s; rows not in the cache will fail", reason)
        return False
    return True
