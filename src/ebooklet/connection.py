"""Talking to S3: the store of :mod:`.store` over signed and anonymous HTTP.

:class:`S3Connection` holds where a database lives and how to reach it, and implements
:class:`.store.Store` and :class:`.store.MaintenanceStore` (the layers above use those
verbs); its thread pool is a :class:`.workers.Workers` of its own. Every
request goes through one urllib3 connection pool: requests with credentials are
signed by :mod:`._sigv4` exactly as botocore's S3 signer would (tests compare the two;
boto3's own credential chain fills in missing keys), anonymous ones (public URLs)
are sent as they are. Skipping boto3's client pipeline saves about 1.5 ms a
request, which is most of the cost of a small GET against a nearby server, and
signing here rather than through botocore's per-request objects saves another
0.1 ms.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
import xml.etree.ElementTree as ET
from base64 import b64encode
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

import urllib3

from ._sigv4 import Signer, default_credentials
from .errors import (
    AuthError,
    IntegrityError,
    OfflineError,
    PreconditionFailed,
    RemoteError,
    RemoteNotFoundError,
)
from .format import check_suffix, md5
from .store import (
    PUBLIC_FIELDS,
    Fetched,
    IfMatch,
    MaintenanceStore,
    Mode,
    NotModified,
    ObjectVersion,
    Precondition,
)
from .workers import Workers

logger = logging.getLogger("ebooklet.http")

_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_RETRY_STATUSES = (429, 500, 502, 503, 504)
_CONDITIONAL_WRITES: dict[tuple[str | None, str | None], bool] = {}
"""Probe answers by ``(endpoint_url, bucket)``: whether conditional writes are honoured."""
CONNECT_TIMEOUT = 3.0
"""Default seconds to wait for a connection to be made (each try), see :class:`S3Connection`."""
_BACKOFF = 0.2
"""Seconds before the first retry of a failed request; doubled at each retry."""
RETRY_AFTER_MAX = 10.0
"""Seconds of a server's ``Retry-After`` honoured at most before a retry."""
_MIN_TRY = 0.01
"""Seconds a try of a request with a deadline gets at least (urllib3 refuses 0)."""
ERROR_BODY_MAX = 64 << 10
"""Bytes of an error answer's body read (for its S3 error code); the rest is never read:
the connection is closed instead."""
XML_BODY_MAX = 8 << 20
"""Bytes a successful answer read whole may have: a listing page (1000 entries of at
most about 2 KiB each: a key of up to 1024 bytes, escaped, and its other fields), a
multipart, copy or bulk-delete answer. A larger one is refused (``IntegrityError``)."""


@dataclass(frozen=True)
class ConnectionSpec:
    """Where a database lives and how to reach it, without credentials: what a connection
    may hand to another process (a pickle, a Dask task). :meth:`connect` there makes an
    :class:`S3Connection` that resolves its own credentials through boto3's chain
    (the environment, ``profile`` or the default profile, an instance role...), or, with
    only ``db_url``, reads anonymously. Get one from :meth:`S3Connection.spec`.

    Its fields are the :class:`S3Connection` arguments of the same names: ``db_key``,
    ``bucket``, ``endpoint_url``, ``db_url``, ``region``, ``profile``, ``threads``,
    ``retries``, ``timeout`` and ``connect_timeout``.
    """

    db_key: str | None = None
    bucket: str | None = None
    endpoint_url: str | None = None
    db_url: str | None = None
    region: str | None = None
    profile: str | None = None
    threads: int = 16
    retries: int = 3
    timeout: float = 30.0
    connect_timeout: float = CONNECT_TIMEOUT

    @property
    def writable(self) -> bool:
        """True when the connections made from it can write (bucket and key known)."""
        return self.db_key is not None

    def connect(self) -> S3Connection:
        """A new :class:`S3Connection` to the place this spec names.

        Raises:
            TypeError, ValueError: a field :class:`S3Connection` refuses.
        """
        return S3Connection(
            db_key=self.db_key, bucket=self.bucket, endpoint_url=self.endpoint_url,
            db_url=self.db_url, region=self.region, profile=self.profile,
            threads=self.threads, retries=self.retries, timeout=self.timeout,
            connect_timeout=self.connect_timeout,
        )


class Answer(NamedTuple):
    """A response read whole: its status, headers and (capped) body."""

    status: int
    headers: Any
    data: bytes


def _check_str(name: str, value: Any, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}.")
    if not value:
        raise ValueError(f"{name} must not be empty.")


def check_seconds(name: str, value: Any) -> None:
    """Refuse (``ValueError``) anything but a positive, finite number of seconds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}.")


class S3Connection:
    """Where a database lives in S3 and how to reach it: a :class:`.store.MaintenanceStore`.

    Args:
        access_key_id: the access key id; ``None`` with ``db_key`` and ``bucket``
            uses boto3's credential chain (environment, profile, SSO, role),
            refreshed before they expire, as boto3 does.
        access_key: the secret access key. Kept in memory only, never shown.
        session_token: the session token of temporary credentials (STS), if any.
        db_key: the object key of the database (its manifest) in the bucket.
        bucket: the bucket name.
        endpoint_url: the S3 endpoint (``http://127.0.0.1:9000``,
            ``https://<account>.r2.cloudflarestorage.com``); ``None`` means AWS.
        db_url: the public URL of the database's manifest. Given alone, the
            connection is read-only and anonymous. Derived from the endpoint
            when not given.
        region: the signing region (default ``us-east-1``).
        threads: how many requests run at once in parallel transfers.
        retries: how many times a failed request (connection error, 429, 5xx)
            is retried with backoff.
        timeout: seconds to wait for each answer of the server (the read timeout).
        connect_timeout: seconds to wait for a connection to be made, each try
            (kept short: an endpoint that cannot be reached is known quickly).
        profile: with no ``access_key_id``, the AWS config profile whose credentials
            boto3's chain resolves (``None``: the chain's default, ``AWS_PROFILE``).

    Raises:
        TypeError, ValueError: for arguments of the wrong type or value.
    """

    def __init__(
        self,
        access_key_id: str | None = None,
        access_key: str | None = None,
        db_key: str | None = None,
        bucket: str | None = None,
        endpoint_url: str | None = None,
        db_url: str | None = None,
        region: str | None = None,
        threads: int = 16,
        retries: int = 3,
        timeout: float = 30.0,
        session_token: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        profile: str | None = None,
    ):
        for name, value in (
            ("access_key_id", access_key_id),
            ("access_key", access_key),
            ("db_key", db_key),
            ("bucket", bucket),
            ("endpoint_url", endpoint_url),
            ("db_url", db_url),
            ("region", region),
            ("session_token", session_token),
            ("profile", profile),
        ):
            _check_str(name, value)
        if (db_key is None) != (bucket is None):
            raise ValueError("db_key and bucket go together: give both, or neither with a db_url.")
        if db_key is None and db_url is None:
            raise ValueError("Give db_key and bucket (and credentials), or a public db_url.")
        if (access_key_id is None) != (access_key is None):
            raise ValueError("access_key_id and access_key go together: give both or neither.")
        if session_token is not None and access_key_id is None:
            raise ValueError("session_token goes with access_key_id and access_key: give all three.")
        if profile is not None and (access_key_id is not None or db_key is None):
            raise ValueError(
                "profile names where boto3's chain finds credentials: give it with db_key and "
                "bucket, and without access_key_id and access_key."
            )
        if db_key is not None and (db_key.endswith("/") or db_key.startswith("/")):
            raise ValueError(f"db_key {db_key!r} must not start or end with '/'.")
        for name, url in (("endpoint_url", endpoint_url), ("db_url", db_url)):
            if url is not None and urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"{name} {url!r} must be an http:// or https:// URL.")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive int, not {threads!r}.")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}.")
        check_seconds("timeout", timeout)
        check_seconds("connect_timeout", connect_timeout)

        self.db_key = db_key
        self.bucket = bucket
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.region = region or "us-east-1"
        self.workers = Workers(threads)
        """The thread pool of parallel transfers, ``threads`` workers."""
        self.retries = retries
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.db_url = db_url or self._derive_db_url()
        self.profile = profile
        # botocore credentials: fixed ones, or those of boto3's chain (which refresh)
        self._credentials: Any = None
        self._signer = Signer(self.region)
        if access_key_id is not None:
            from botocore.credentials import Credentials

            self._credentials = Credentials(access_key_id, access_key, session_token)
        self.request_counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._http: urllib3.PoolManager | None = None
        self._init_lock = threading.Lock()

    # ------------------------------------------------------------ identity

    @property
    def threads(self) -> int:
        """How many requests run at once in parallel transfers (:attr:`workers`' size)."""
        return self.workers.threads

    @property
    def writable(self) -> bool:
        """True when the connection can write (it knows the bucket and key)."""
        return self.db_key is not None

    def _derive_db_url(self) -> str | None:
        if self.db_key is None:
            return None
        if self.endpoint_url is None:
            return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{quote(self.db_key)}"
        return f"{self.endpoint_url}/{self.bucket}/{quote(self.db_key)}"

    def __repr__(self) -> str:
        if self.writable:
            where = f"bucket={self.bucket!r}, db_key={self.db_key!r}, endpoint_url={self.endpoint_url!r}"
        else:
            where = f"db_url={self.db_url!r}"
        return f"S3Connection({where})"

    def __getstate__(self) -> dict:
        raise TypeError(
            "S3Connection is not picklable, so that credentials never leave memory; "
            "pass the parameters to the other process instead."
        )

    def copy(self, **changes: Any) -> S3Connection:
        """A new connection with the same parameters, some of them changed."""
        params = dict(
            db_key=self.db_key,
            bucket=self.bucket,
            endpoint_url=self.endpoint_url,
            db_url=self.db_url if "db_key" not in changes else None,
            region=self.region,
            threads=self.threads,
            retries=self.retries,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            profile=self.profile,
        )
        params.update(changes)
        copy = S3Connection(**params)
        if copy._credentials is None:
            copy._credentials = self._credentials  # the same keys (and their refreshes)
        return copy

    def spec(self) -> ConnectionSpec:
        """This connection's :class:`ConnectionSpec`: where it reaches and how, never its
        keys. Another process turns it into a connection that finds its own credentials."""
        return ConnectionSpec(
            db_key=self.db_key, bucket=self.bucket, endpoint_url=self.endpoint_url,
            db_url=self.db_url, region=self.region, profile=self.profile,
            threads=self.threads, retries=self.retries, timeout=self.timeout,
            connect_timeout=self.connect_timeout,
        )

    def public_params(self) -> dict[str, Any]:
        """The connection's location, without credentials (safe to write to disk): the
        attributes named by :data:`PUBLIC_FIELDS`."""
        return {field: getattr(self, field) for field in PUBLIC_FIELDS}

    def same_credentials(self, other: S3Connection) -> bool:
        """True when both connections sign with the same (known) keys; never reveals them."""
        keys = []
        for conn in (self, other):
            conn._client()  # fills in credentials from boto3's chain when none were given
            c = conn._credentials.get_frozen_credentials() if conn._credentials else None
            keys.append((getattr(c, "access_key", None), getattr(c, "secret_key", None)))
        return keys[0] == keys[1] and keys[0][0] is not None

    # ------------------------------------------------------------ plumbing

    def _client(self) -> urllib3.PoolManager:
        if self._http is None:
            with self._init_lock:
                if self._http is None:
                    if self.writable and self._credentials is None:
                        self._credentials = default_credentials(self.profile)
                    self._http = urllib3.PoolManager(
                        num_pools=4, maxsize=self.threads + 4, retries=False,
                        timeout=self._timeouts(self.timeout),
                    )
        return self._http

    def _timeouts(self, read: float) -> urllib3.Timeout:
        """urllib3's timeouts of one try: the connect timeout (at most ``read``), then ``read``."""
        return urllib3.Timeout(connect=min(self.connect_timeout, read), read=read)

    def _url(self, suffix: str, query: dict | None = None) -> str:
        """The URL of object ``db_key + suffix``; ``suffix`` must pass
        :func:`format.check_suffix`, so no URL leaves the database's objects."""
        check_suffix(suffix)
        if self.writable:
            key = quote(self.db_key + suffix, safe="/~")
            if self.endpoint_url is None:
                base = f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{key}"
            else:
                base = f"{self.endpoint_url}/{self.bucket}/{key}"
        else:
            base = self.db_url + quote(suffix, safe="/~")
        if query:
            base += "?" + urlencode(sorted(query.items()), quote_via=quote)
        return base

    def _bucket_url(self, query: dict) -> str:
        if self.endpoint_url is None:
            base = f"https://{self.bucket}.s3.{self.region}.amazonaws.com/"
        else:
            base = f"{self.endpoint_url}/{self.bucket}"
        return base + "?" + urlencode(sorted(query.items()), quote_via=quote)

    def _sign(self, method: str, url: str, headers: dict, body: Any) -> dict:
        """``headers`` plus the SigV4 headers of the request (see :mod:`._sigv4`)."""
        return self._signer.sign(self._credentials, method, url, headers, body)

    def request(
        self,
        method: str,
        url: str,
        headers: dict | None = None,
        body: bytes | memoryview | None = None,
        wait: float | None = None,
    ) -> Answer:
        """Send one request (signed when the connection has credentials) and read its answer.

        The body of an error answer is read up to :data:`ERROR_BODY_MAX` bytes (enough
        for its error code), that of a success up to :data:`XML_BODY_MAX`.

        Args:
            wait: seconds the whole request may take, all tries and the body together
                (see :meth:`_request_within`); ``None``: each try may take up to
                ``connect_timeout`` plus ``timeout`` per read, and ``retries`` tries
                follow a failure.

        Raises:
            OfflineError: the endpoint cannot be reached (or did not answer in time).
            IntegrityError: a successful answer is larger than :data:`XML_BODY_MAX`.
        """
        reply = self.send(method, url, headers, body, wait)
        if reply.status >= 300:
            return reply.error_answer()
        try:
            data = _read_capped(reply, XML_BODY_MAX, f"The answer to {method} {urlsplit(url).path}")
        finally:
            reply.release_conn()
        return Answer(reply.status, reply.headers, data)

    def send(
        self,
        method: str,
        url: str,
        headers: dict | None = None,
        body: bytes | memoryview | None = None,
        wait: float | None = None,
    ) -> Reply:
        """Send one request (signed when the connection has credentials); its body is
        left to read from the :class:`Reply` (release or close it after).

        Args:
            wait: as for :meth:`request`: the deadline covers the reads of the body too.

        Raises:
            OfflineError: the endpoint cannot be reached (or did not answer in time).
        """
        headers = dict(headers or {})
        client = self._client()
        if self._credentials is not None:
            headers = self._sign(method, url, headers, body)
        with self._counts_lock:
            self.request_counts[method] += 1
        end = None if wait is None else time.monotonic() + wait
        try:
            response = self._request_within(client, end, method, url, headers, body)
        except urllib3.exceptions.HTTPError as exc:
            raise OfflineError(
                f"Cannot reach {urlsplit(url).netloc} ({type(exc).__name__}: {exc}); "
                "check the endpoint and your network, or work offline."
            ) from None
        return Reply(response, url, end, wait)

    def _request_within(
        self,
        client: urllib3.PoolManager,
        end: float | None,
        method: str,
        url: str,
        headers: dict,
        body: Any,
    ) -> urllib3.BaseHTTPResponse:
        """A request, tried again after a failure (connection error, 429, 5xx) up to
        ``retries`` times, whose tries all end by the time ``end`` (``time.monotonic()``;
        ``None``: no deadline); the :class:`Reply` made of the answer reads its body by
        then too.

        Each try may take the time left (its connection at most ``connect_timeout``,
        each read at most ``timeout``); a retry waits :data:`_BACKOFF` seconds, doubled
        each time, or the server's ``Retry-After`` (at most :data:`RETRY_AFTER_MAX`), and
        happens only while time is left for that pause. An endpoint that accepts
        connections and never answers thus costs ``wait`` seconds, not ``retries + 1``
        read timeouts. The body of a failed try is read up to :data:`ERROR_BODY_MAX`
        bytes, never drained whole; a stream ``body`` is rewound for each try.
        """
        backoff, retries = _BACKOFF, self.retries
        start = body.tell() if hasattr(body, "tell") else None
        while True:
            if start is not None:
                body.seek(start)  # a stream is sent again from its start
            left = self.timeout if end is None else end - time.monotonic()
            timeout = self._timeouts(min(self.timeout, max(left, _MIN_TRY)))
            pause = backoff
            began = time.monotonic()
            try:
                response = client.request(
                    method, url, headers=headers, body=body, redirect=False, retries=False,
                    timeout=timeout, preload_content=False, decode_content=False,
                )
            except urllib3.exceptions.HTTPError as exc:
                if not _may_retry(retries, pause, end):
                    raise
                failure = f"{type(exc).__name__}: {exc}"
            else:
                _log_answer(method, url, body, response, began)
                if response.status not in _RETRY_STATUSES:
                    return response
                pause = max(pause, _retry_after(response.headers))
                if not _may_retry(retries, pause, end):
                    return response
                Reply(response, url, end, None).error_answer()
                failure = f"status {response.status}"
            logger.info("retrying %s %s in %.2f s after %s", method, urlsplit(url).path, pause, failure)
            time.sleep(pause)
            backoff *= 2
            retries -= 1

    def _fail(self, response: Answer | Reply, what: str) -> RemoteError:
        """The typed error for a failed response (returned, for the caller to raise); a
        :class:`Reply`'s body is read up to :data:`ERROR_BODY_MAX` bytes."""
        if isinstance(response, Reply):
            response = response.error_answer()
        status = response.status
        code = _error_code(response.data)
        if status == 412:
            return PreconditionFailed(f"{what}: a concurrent writer changed it first (412).")
        if status == 404 and code == "NoSuchBucket":
            if not self.writable:  # an anonymous reader knows only the URL
                return RemoteNotFoundError(f"Bucket of {self.db_url} does not exist; check the URL.")
            return RemoteNotFoundError(
                f"Bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}; "
                "create it first or check its name."
            )
        if status == 404 or (status == 403 and not self.writable):
            hint = " or not public" if not self.writable else ""
            return RemoteNotFoundError(f"{what} was not found{hint} ({status} {code or ''}).")
        if status in (401, 403):
            return AuthError(
                f"{what}: access denied ({status} {code or ''}); check the access key id, "
                "secret key and the bucket's permissions."
            )
        return RemoteError(f"{what}: unexpected answer {status} {code or ''} from the server.")

    # ------------------------------------------------------------ object operations

    def get(
        self,
        suffix: str,
        etag: str | None = None,
        max_bytes: int | None = None,
        wait: float | None = None,
    ) -> Fetched | NotModified:
        """GET the object ``db_key + suffix``; conditional on ``etag`` when given.

        With ``max_bytes``, the body is streamed and the download stops as soon as it
        passes that many bytes (or at once, if the server announces more): a huge
        object never gets into memory. ``wait``: seconds the GET may take, all tries
        together (see :meth:`request`).

        Raises:
            RemoteNotFoundError: no such object (or not public, anonymously).
            IntegrityError: the object is larger than ``max_bytes``.
            OfflineError: the endpoint cannot be reached, or did not answer in time.
        """
        headers = {"If-None-Match": etag} if etag else None
        reply = self.send("GET", self._url(suffix), headers, wait=wait)
        try:
            if reply.status == 304:
                return NotModified(etag)
            if reply.status != 200:
                raise self._fail(reply, f"GET {self.describe(suffix)}")
            if max_bytes is None:
                data = _read_chunks(reply, sys.maxsize)
            else:
                data = _read_capped(reply, max_bytes, self.describe(suffix))
            return Fetched(data, reply.headers.get("ETag", ""))
        finally:
            reply.release_conn()

    def get_range(
        self, suffix: str, start: int, length: int, into: bytearray | None = None
    ) -> bytes | memoryview:
        """The ``length`` bytes of an object from ``start``: one new bytes object, or a
        view of the first ``length`` bytes of ``into`` when given (read into it a
        :data:`READ_CHUNK` at a time: a reused buffer costs no new memory)."""
        if length == 0:  # an empty value: no valid Range header exists for it
            return b""
        url = self._url(suffix)
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        reply = self.send("GET", url, headers)
        try:
            if reply.status == 416:  # the object ends before the range starts
                reply.error_answer()
                raise IntegrityError(
                    f"{self.describe(suffix)} is truncated: it ends before byte {start}."
                )
            if reply.status not in (200, 206):
                raise self._fail(reply, f"GET {self.describe(suffix)} (range)")
            if reply.status == 200 and start:
                raise RemoteError(f"{self.describe(suffix)}: the server ignored the Range header.")
            data = _read_exactly(reply, length, into)
            if len(data) != length:
                raise IntegrityError(
                    f"{self.describe(suffix)} is truncated: asked for {length} bytes "
                    f"at {start}, got {len(data)}."
                )
            return data
        finally:
            reply.release_conn()

    def put(
        self,
        suffix: str,
        data: bytes | memoryview | list[bytes | memoryview],
        *,
        precondition: Precondition = Mode.OVERWRITE,
        content_type: str = "application/octet-stream",
        content_md5: bytes | None = None,
    ) -> str:
        """PUT an object with ``Content-MD5`` if ``precondition`` holds. Returns its ETag.

        ``data`` may be a list of buffers: they are sent one after the other as one
        body, without being joined (a large value and its pack footer).
        ``content_md5`` is the body's md5 when the caller has it already.

        Raises:
            PreconditionFailed: the condition did not hold (412).
        """
        headers = {"Content-Type": content_type}
        if isinstance(data, list):
            data = _Concatenated(data)
            headers["Content-Length"] = str(len(data))  # else a stream would go chunked
        if content_md5 is None:
            content_md5 = data.md5() if isinstance(data, _Concatenated) else md5(data)
        headers["Content-MD5"] = b64encode(content_md5).decode()
        headers.update(_condition(precondition))
        response = self.request("PUT", self._url(suffix), headers, data)
        if response.status != 200:
            raise self._fail(response, f"PUT {self.describe(suffix)}")
        return response.headers.get("ETag", "")

    def delete(self, suffix: str, precondition: IfMatch | None = None) -> None:
        """DELETE an object (missing objects are fine), only if ``precondition`` holds.

        Raises:
            PreconditionFailed: the object's ETag is not the one of ``precondition`` (412).
        """
        headers = _condition(precondition) if precondition is not None else None
        response = self.request("DELETE", self._url(suffix), headers)
        if response.status not in (200, 204, 404):
            raise self._fail(response, f"DELETE {self.describe(suffix)}")

    def list(self, suffix_prefix: str) -> Iterator[tuple[str, int]]:
        """``(suffix, size)`` of every object whose key starts with ``db_key + suffix_prefix``."""
        query = {"list-type": "2", "prefix": self.db_key + suffix_prefix}
        while True:
            response = self.request("GET", self._bucket_url(query))
            if response.status != 200:
                raise self._fail(response, f"LIST {self.describe(suffix_prefix)}*")
            root = ET.fromstring(response.data)
            for item in root.iter(f"{_S3_NS}Contents"):
                listed = self._listed(query["prefix"], _find_text(item, "Key"), _find_text(item, "Size"))
                if listed is not None:
                    yield listed
            token = root.findtext(f"{_S3_NS}NextContinuationToken")
            if root.findtext(f"{_S3_NS}IsTruncated") != "true" or not token:
                return
            query["continuation-token"] = token

    def _listed(self, prefix: str, key: str, size: str) -> tuple[str, int] | None:
        """``(suffix, size)`` of a listed object, or ``None`` for an entry that is not
        under ``prefix`` or has no valid size (a listing names only what we asked for)."""
        if not key.startswith(prefix) or not size.isascii() or not size.isdigit():
            return None
        return key[len(self.db_key) :], int(size)

    def put_multipart(self, suffix: str, parts: Iterable[bytes | memoryview]) -> str:
        """Upload an object in parts (each ≥ 5 MiB but the last), in parallel.

        ``parts`` is consumed lazily, at most ``threads`` parts held at once.
        Every part carries its ``Content-MD5``. On failure the upload is aborted.
        """
        url = self._url(suffix, {"uploads": ""})
        response = self.request("POST", url)
        if response.status != 200:
            raise self._fail(response, f"start multipart upload of {self.describe(suffix)}")
        upload_id = ET.fromstring(response.data).findtext(f"{_S3_NS}UploadId")
        try:
            etags = self._upload_parts(suffix, upload_id, parts)
            return self._complete_multipart(
                suffix, upload_id, etags, f"multipart upload of {self.describe(suffix)}"
            )
        except BaseException:
            self.request("DELETE", self._url(suffix, {"uploadId": upload_id}))
            raise

    def _upload_parts(self, suffix: str, upload_id: str, parts: Iterable) -> list[str]:
        def upload(numbered: tuple[int, bytes]) -> str:
            number, data = numbered
            url = self._url(suffix, {"partNumber": str(number), "uploadId": upload_id})
            headers = {"Content-MD5": b64encode(md5(data)).decode()}
            response = self.request("PUT", url, headers, data)
            if response.status != 200:
                raise self._fail(response, f"upload part {number} of {self.describe(suffix)}")
            return response.headers.get("ETag", "")

        etags: list[str] = []
        batch: list[tuple[int, bytes]] = []
        for number, data in enumerate(parts, 1):
            batch.append((number, data))
            if len(batch) == self.threads:
                etags.extend(self.workers.map(upload, batch))
                batch = []
        etags.extend(self.workers.map(upload, batch))
        return etags

    def describe(self, suffix: str) -> str:
        """Where the object ``suffix`` is, for messages (``s3://bucket/key`` or its URL)."""
        if self.writable:
            return f"s3://{self.bucket}/{self.db_key}{suffix}"
        return f"{self.db_url}{suffix}"

    # ------------------------------------------------------------ capabilities

    def conditional_writes(self) -> bool:
        """Whether the server honours ``If-None-Match: *`` (probed once per bucket).

        Unless already known (from :meth:`probe_conditional_writes`, usually done by
        taking the write lock, or :meth:`remember_conditional_writes`), creates a
        throw-away object under ``D.ebk/`` to probe with, then deletes it. The answer
        is shared by every connection to the same bucket in this process.
        """
        if not self.knows_conditional_writes():
            from .format import new_commit_id

            probe = f".ebk/probe-{new_commit_id()}"
            self.put(probe, b"probe", precondition=Mode.CREATE)
            try:
                self.probe_conditional_writes(probe, b"probe")
            finally:
                self.delete(probe)
        return _CONDITIONAL_WRITES[(self.endpoint_url, self.bucket)]

    def knows_conditional_writes(self) -> bool:
        """True once the bucket's answer to :meth:`conditional_writes` is known."""
        return (self.endpoint_url, self.bucket) in _CONDITIONAL_WRITES

    def probe_conditional_writes(self, suffix: str, data: bytes) -> bool:
        """Learn :meth:`conditional_writes` from an object just created with
        ``If-None-Match: *`` (:attr:`Mode.CREATE`): PUT the same ``data`` again the same
        way. A server that accepts it ignores conditions (Backblaze B2 is reported to);
        the object is left as it was either way. One request."""
        try:
            self.put(suffix, data, precondition=Mode.CREATE)
            honoured = False
        except PreconditionFailed:
            honoured = True
        _CONDITIONAL_WRITES[(self.endpoint_url, self.bucket)] = honoured
        return honoured

    def remember_conditional_writes(self, honoured: bool) -> None:
        """Record a probe answer known from before (e.g. kept beside a local copy)."""
        _CONDITIONAL_WRITES.setdefault((self.endpoint_url, self.bucket), honoured)

    def close(self) -> None:
        """Release the connection pool and the thread pool."""
        self.workers.close()
        if self._http is not None:
            self._http.clear()
            self._http = None

    # ------------------------------------------------------------ maintenance operations
    # (tail reads; then server-side copy, object versions and bulk delete: the verbs
    # of store.MaintenanceStore)

    def copy_source(self, suffix: str) -> str:
        """The ``x-amz-copy-source`` header value naming the object ``db_key + suffix``."""
        if not self.writable:
            raise ValueError("A server-side copy needs a source connection with bucket and db_key.")
        return "/" + quote(f"{self.bucket}/{self.db_key}{check_suffix(suffix)}", safe="/~")

    def copy_object(
        self,
        source: MaintenanceStore,
        suffix: str,
        size: int,
        target_suffix: str | None = None,
        *,
        max_single: int | None = None,
        part_size: int | None = None,
    ) -> str:
        """Copy ``source``'s object ``source.db_key + suffix`` here, server-side.

        The object is written as ``db_key + target_suffix`` (default: the same
        suffix). Both connections must reach the same endpoint, with credentials
        that can read the source and write here; no byte passes through this
        machine. Objects over ``max_single`` bytes (5 GiB, CopyObject's limit) are
        copied by multipart ``UploadPartCopy`` in parts of ``part_size``.
        Returns the new object's ETag.

        Raises:
            RemoteNotFoundError, AuthError, RemoteError: the copy failed.
        """
        target = suffix if target_suffix is None else target_suffix
        header = source.copy_source(suffix)
        what = f"COPY {source.describe(suffix)} to {self.describe(target)}"
        max_single = COPY_SINGLE_MAX if max_single is None else max_single
        if size > max_single:
            return self._copy_multipart(header, what, target, size, part_size or COPY_PART_SIZE)
        response = self.request("PUT", self._url(target), {"x-amz-copy-source": header})
        return self._copied_etag(response, what)

    def _copied_etag(self, response: Answer, what: str) -> str:
        """The ETag a copy or a completion answered (S3 may report a failure as 200 + <Error>)."""
        if response.status != 200 or b"<Error>" in response.data:
            raise self._fail(response, what)
        return _find_text(ET.fromstring(response.data), "ETag")

    def _copy_multipart(self, header: str, what: str, target: str, size: int, part_size: int) -> str:
        response = self.request("POST", self._url(target, {"uploads": ""}))
        if response.status != 200:
            raise self._fail(response, f"start multipart {what}")
        upload_id = _find_text(ET.fromstring(response.data), "UploadId")

        def copy_part(numbered: tuple[int, int]) -> str:
            number, start = numbered
            end = min(start + part_size, size) - 1
            url = self._url(target, {"partNumber": str(number), "uploadId": upload_id})
            headers = {"x-amz-copy-source": header, "x-amz-copy-source-range": f"bytes={start}-{end}"}
            answer = self.request("PUT", url, headers)
            return self._copied_etag(answer, f"part {number} of {what}")

        try:
            etags = list(self.workers.map(copy_part, enumerate(range(0, size, part_size), 1)))
            return self._complete_multipart(target, upload_id, etags, what)
        except BaseException:
            self.request("DELETE", self._url(target, {"uploadId": upload_id}))
            raise

    def _complete_multipart(self, suffix: str, upload_id: str, etags: list[str], what: str) -> str:
        body = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
            for n, etag in enumerate(etags, 1)
        )
        xml = f'<CompleteMultipartUpload xmlns="{_S3_NS[1:-1]}">{body}</CompleteMultipartUpload>'
        url = self._url(suffix, {"uploadId": upload_id})
        response = self.request("POST", url, body=xml.encode())
        return self._copied_etag(response, f"complete {what}")

    def get_tail(self, suffix: str, length: int) -> tuple[bytes, int]:
        """The last ``length`` bytes of an object (fewer if it is smaller) and its size.

        One suffix-range GET; works anonymously (no HEAD, no listing).
        """
        reply = self.send("GET", self._url(suffix), {"Range": f"bytes=-{length}"})
        try:
            if reply.status not in (200, 206):
                raise self._fail(reply, f"GET {self.describe(suffix)} (tail)")
            if reply.status == 200:
                return _read_tail(reply, length)
            total = reply.headers.get("Content-Range", "").rpartition("/")[2]
            if not total.isdigit():
                raise RemoteError(f"{self.describe(suffix)}: the server sent no object size.")
            data = _read_capped(reply, length, f"the tail of {self.describe(suffix)}")
            if len(data) > int(total):
                raise IntegrityError(
                    f"{self.describe(suffix)}: the server sent more than its size."
                )
            return data, int(total)
        finally:
            reply.release_conn()

    def list_versions(self, suffix_prefix: str, exact: bool = False) -> Iterator[ObjectVersion]:
        """Every version and delete marker of the objects starting with ``db_key + suffix_prefix``.

        S3's ``ListObjectVersions``; an unversioned bucket answers with one version
        ``"null"`` per object. With ``exact``, only the object ``db_key + suffix_prefix``
        itself, without paging through the keys that merely start with it.

        Raises:
            RemoteError: the server does not support listing versions.
        """
        query = {"versions": "", "prefix": self.db_key + suffix_prefix}
        while True:
            response = self.request("GET", self._bucket_url(query))
            if response.status != 200:
                raise self._fail(response, f"LIST VERSIONS {self.describe(suffix_prefix)}*")
            root = ET.fromstring(response.data)
            for item in root:
                kind = item.tag.rpartition("}")[2]
                key = _find_text(item, "Key")
                listed = self._listed(query["prefix"], key, _find_text(item, "Size") or "0")
                if kind not in ("Version", "DeleteMarker") or (exact and key != query["prefix"]):
                    continue
                if listed is None:
                    continue
                yield ObjectVersion(
                    listed[0],
                    _find_text(item, "VersionId") or None,
                    listed[1],
                    _find_text(item, "IsLatest") == "true",
                    kind == "DeleteMarker",
                )
            if _find_text(root, "IsTruncated") != "true":
                return
            if exact and _find_text(root, "NextKeyMarker") != query["prefix"]:
                return  # keys are listed in order: the exact key is behind us
            query["key-marker"] = _find_text(root, "NextKeyMarker")
            query["version-id-marker"] = _find_text(root, "NextVersionIdMarker")

    def delete_version(self, suffix: str, version_id: str | None) -> None:
        """Delete one version of an object for good (``None``: the plain DELETE)."""
        query = {"versionId": version_id} if version_id else None
        response = self.request("DELETE", self._url(suffix, query))
        if response.status not in (200, 204, 404):
            raise self._fail(response, f"DELETE {self.describe(suffix)} version {version_id}")

    def delete_objects(self, items: Iterable[tuple[str, str | None]]) -> int:
        """Delete many ``(suffix, version id or None)`` objects, 1000 per request.

        Uses ``DeleteObjects`` and falls back to one DELETE each (in parallel) on
        servers without it. Returns how many were deleted.

        Raises:
            RemoteError: some objects could not be deleted (their keys are named).
        """
        from xml.sax.saxutils import escape

        items = list(items)
        for start in range(0, len(items), 1000):
            batch = items[start : start + 1000]
            objects = "".join(
                f"<Object><Key>{escape(self.db_key + suffix)}</Key>"
                + (f"<VersionId>{escape(version)}</VersionId>" if version else "")
                + "</Object>"
                for suffix, version in batch
            )
            body = f'<Delete xmlns="{_S3_NS[1:-1]}"><Quiet>true</Quiet>{objects}</Delete>'.encode()
            headers = {"Content-MD5": b64encode(md5(body)).decode(), "Content-Type": "application/xml"}
            response = self.request("POST", self._bucket_url({"delete": ""}), headers, body)
            if response.status in (400, 501) and _error_code(response.data) in (
                "NotImplemented", "MalformedXML", "InvalidRequest", None
            ):
                list(self.workers.map(lambda item: self.delete_version(*item), batch))
                continue
            if response.status != 200:
                raise self._fail(response, f"DELETE {len(batch)} objects under {self.describe('')}")
            failed = [
                f"{_find_text(e, 'Key')} ({_find_text(e, 'Code')})"
                for e in ET.fromstring(response.data)
                if e.tag.rpartition("}")[2] == "Error"
            ]
            if failed:
                raise RemoteError(f"Could not delete {len(failed)} object(s): {', '.join(failed[:10])}.")
        return len(items)


#: Bytes read at a time (:meth:`S3Connection.get_range`): memory for a body grows by at
#: most this much ahead of the bytes that arrived, whatever size was asked for.
READ_CHUNK = 1 << 20


class Reply:
    """An answer whose body is read as it arrives, undecoded (the bytes the md5 covers,
    whatever ``Content-Encoding`` the server names).

    Every read turns urllib3's errors (a body cut short, a stall, a broken stream) into
    :class:`OfflineError`. With a deadline (``end``, on ``time.monotonic()``), no read
    starts after it and each returns what arrived within the time left, so a server
    sending a byte now and then cannot hold a read past the deadline.
    """

    def __init__(
        self, response: urllib3.BaseHTTPResponse, url: str, end: float | None, wait: float | None
    ):
        self._response = response
        self._where = urlsplit(url).netloc
        self._end = end
        self._wait = wait
        self.status: int = response.status
        self.headers: Any = response.headers

    def read(self, amt: int) -> bytes:
        """Up to ``amt`` bytes of the body (``b""`` at its end).

        Raises:
            OfflineError: the body broke off, stalled, or the deadline passed.
        """
        with self._reading():
            if self._end is None:
                return self._response.read(amt)
            self._limit_wait()
            return self._response.read1(amt)

    def readinto(self, buffer: memoryview) -> int:
        """Read into ``buffer`` (its length at most); the number of bytes read.

        Raises:
            OfflineError: as :meth:`read`.
        """
        if self._end is not None:
            data = self.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        with self._reading():
            return self._response.readinto(buffer)

    def error_answer(self) -> Answer:
        """The answer with at most :data:`ERROR_BODY_MAX` bytes of its body (enough for
        an error code); the connection is closed rather than the rest read."""
        try:
            data = _read_chunks(self, ERROR_BODY_MAX + 1)
        except OfflineError:
            data = b""
        if len(data) > ERROR_BODY_MAX:
            self.close()
        self.release_conn()
        return Answer(self.status, self.headers, data[:ERROR_BODY_MAX])

    def close(self) -> None:
        """Close the connection (the rest of the body is never read)."""
        self._response.close()

    def release_conn(self) -> None:
        """Give the connection back to the pool."""
        self._response.release_conn()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """The one place where urllib3's errors while reading a body become OfflineError."""
        try:
            yield
        except urllib3.exceptions.HTTPError as exc:
            self.close()
            raise OfflineError(
                f"{self._where} stopped sending its answer ({type(exc).__name__}: {exc}); "
                "check the endpoint and your network, or work offline."
            ) from None

    def _limit_wait(self) -> None:
        """Refuse to read past the deadline; let the next read wait at most the time left."""
        left = self._end - time.monotonic()
        if left <= 0:
            self.close()
            raise OfflineError(
                f"{self._where} did not send its whole answer within {self._wait:g} s; "
                "check the endpoint and your network, or work offline."
            )
        connection = self._response.connection
        if connection is not None and connection.sock is not None:
            connection.sock.settimeout(left)


def _read_exactly(response: Reply, length: int, into: bytearray | None) -> bytes | memoryview:
    """Up to ``length`` bytes of a response body (fewer if it ends first).

    Read a :data:`READ_CHUNK` at a time: a claimed ``length`` (from an index entry) is
    never allocated before the bytes arrive. ``into`` is a buffer to read into; when
    shorter than ``length`` it grows as the bytes come (it must then have no views).
    """
    if into is None:
        return _read_chunks(response, length)
    done = 0
    while done < length:
        step = min(READ_CHUNK, length - done)
        if len(into) < done + step:
            into.extend(bytes(done + step - len(into)))
        with memoryview(into) as whole, whole[done : done + step] as part:
            n = response.readinto(part)
        if not n:
            break
        done += n
    return memoryview(into)[:done]


def _read_chunks(response: Reply, length: int) -> bytes:
    """Up to ``length`` bytes of a response body, read a :data:`READ_CHUNK` at a time."""
    chunks = []
    done = 0
    while done < length:
        chunk = response.read(min(READ_CHUNK, length - done))
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_capped(response: Reply, max_bytes: int, what: str) -> bytes:
    """A whole response body of at most ``max_bytes`` bytes.

    Raises:
        IntegrityError: the server announces or sends more (the connection is closed
            rather than drained).
    """
    announced = response.headers.get("Content-Length", "")
    too_big = announced.isdigit() and int(announced) > max_bytes
    data = b"" if too_big else _read_chunks(response, max_bytes + 1)
    if too_big or len(data) > max_bytes:
        response.close()
        raise IntegrityError(
            f"{what} is larger than {max_bytes:,} bytes, the most ebooklet accepts for it: it is "
            "not an ebooklet object or it is damaged. Run ebooklet.check() on the remote."
        )
    return data


def _read_tail(response: Reply, length: int) -> tuple[bytes, int]:
    """The last ``length`` bytes of a response body and the body's size, holding no more
    than about that much (a server that ignores the Range header sends the whole object)."""
    tail = b""
    size = 0
    while chunk := response.read(READ_CHUNK):
        size += len(chunk)
        tail = (tail + chunk)[-length:]
    return tail, size


class _Concatenated:
    """Buffers read as one seekable stream without copying them, so that a body made of
    several (a large value and its pack footer) is signed and sent as one.

    Reads are short at the buffers' boundaries, as a raw stream's may be.
    """

    def __init__(self, buffers: list[bytes | memoryview]):
        self._views = [memoryview(b).cast("B") for b in buffers]
        self._size = sum(v.nbytes for v in self._views)
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def md5(self) -> bytes:
        """The md5 of all the bytes."""
        hasher = hashlib.md5(usedforsecurity=False)
        for view in self._views:
            hasher.update(view)
        return hasher.digest()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = (0, self._pos, self._size)[whence] + offset
        return self._pos

    def read(self, size: int = -1) -> memoryview:
        start = self._pos
        for view in self._views:
            if start < view.nbytes:
                end = view.nbytes if size < 0 else min(view.nbytes, start + size)
                self._pos += end - start
                return view[start:end]
            start -= view.nbytes
        return memoryview(b"")


def _log_answer(method: str, url: str, body: Any, response: Any, began: float) -> None:
    """One DEBUG line per answer: method, object path, status, bytes each way, time.
    Never headers or query strings (they may carry credentials)."""
    if logger.isEnabledFor(logging.DEBUG):
        sent = len(body) if isinstance(body, (bytes, bytearray, memoryview)) else 0
        logger.debug(
            "%s %s -> %d (%d B up, %s B down, %.1f ms)", method, urlsplit(url).path,
            response.status, sent, response.headers.get("Content-Length", "?"),
            (time.monotonic() - began) * 1000,
        )


def _may_retry(retries: int, pause: float, end: float | None) -> bool:
    """Whether a failed try is retried: tries are left, and time for the pause before it."""
    return retries > 0 and (end is None or end - time.monotonic() > pause)


def _retry_after(headers: Any) -> float:
    """A ``Retry-After`` of whole seconds, at most :data:`RETRY_AFTER_MAX` (0 when absent
    or a date)."""
    value = headers.get("Retry-After", "").strip()
    return min(float(value), RETRY_AFTER_MAX) if value.isascii() and value.isdigit() else 0.0


def _condition(precondition: Precondition) -> dict[str, str]:
    """The headers of a precondition (:class:`IfMatch` with an empty ETag has none)."""
    if isinstance(precondition, IfMatch):
        return {"If-Match": precondition.etag} if precondition.etag else {}
    if precondition is Mode.CREATE:
        return {"If-None-Match": "*"}
    if precondition is Mode.OVERWRITE:
        return {}
    raise TypeError(f"precondition must be a Mode or an IfMatch, not {precondition!r}.")


def _error_code(body: bytes | None) -> str | None:
    if not body or not body.lstrip().startswith(b"<"):
        return None
    try:
        return ET.fromstring(body).findtext("Code")
    except ET.ParseError:
        return None


def connection_from(remote: S3Connection | str | None, timeout: float | None = None) -> S3Connection | None:
    """Normalize what :func:`ebooklet.open` accepts as ``remote``; a URL string's
    connection takes ``timeout`` (when given) as its :class:`S3Connection` ``timeout``."""
    if remote is None or isinstance(remote, S3Connection):
        return remote
    if isinstance(remote, str):
        return S3Connection(db_url=remote) if timeout is None else S3Connection(db_url=remote, timeout=timeout)
    raise TypeError(
        f"remote must be an S3Connection, a public URL string or None, not {type(remote).__name__}."
    )


# ---------------------------------------------------------------- maintenance helpers

COPY_SINGLE_MAX = 5 << 30
"""The largest object one server-side ``CopyObject`` may copy (5 GiB)."""
COPY_PART_SIZE = 512 << 20
"""Part size of a multipart server-side copy (``UploadPartCopy``)."""


def _find_text(element: ET.Element, tag: str) -> str:
    """The text of child ``tag`` with or without the S3 namespace (``""`` if absent)."""
    found = element.findtext(f"{_S3_NS}{tag}")
    if found is None:
        found = element.findtext(tag)
    return found or ""
