"""Shared pytest fixtures: where the tests' S3 lives and how to reach it.

By default the session starts one local ``moto_server`` (:class:`ebooklet.server.LocalS3Server`)
with a public-read bucket. To run the same suite against a real S3-compatible store, set:

``EBOOKLET_TEST_ENDPOINT``
    the S3 endpoint URL (e.g. ``https://<account>.r2.cloudflarestorage.com``);
``EBOOKLET_TEST_ACCESS_KEY_ID`` / ``EBOOKLET_TEST_ACCESS_KEY``
    credentials allowed to read, write, list and delete in the bucket;
``EBOOKLET_TEST_BUCKET``
    an existing bucket; every test works under its own prefix ``tests/<name>-<uuid>/``
    and deletes it afterwards (set ``EBOOKLET_TEST_KEEP=1`` to keep the objects);
``EBOOKLET_TEST_REGION`` (optional)
    the region name (``auto`` for R2);
``EBOOKLET_TEST_PUBLIC_URL`` (optional)
    the base URL where the bucket's objects are publicly readable
    (e.g. ``https://pub-xxx.r2.dev``); without it, public-URL tests are skipped.
``EBOOKLET_TEST_FRESH_SERVER`` (optional)
    ``seaweedfs``: tests that kill or freeze a server of their own (``fresh_server``)
    start a private SeaweedFS (``tests/seaweedfs.py``); unset, they are skipped
    when ``EBOOKLET_TEST_ENDPOINT`` is set.
``EBOOKLET_TEST_TARGET_ONLY`` (optional)
    ``1``: run only the tests that talk to the S3 target (those using ``s3_server`` or
    ``fresh_server``); the others (local files, signing, a private server of their own)
    do not depend on it. ``.ci/run`` sets it for its second pass, after the moto pass
    has run everything.

``python tests/seaweedfs.py -- python -m pytest`` runs the suite against a SeaweedFS
server it starts on loopback, with all of these set.

Fixtures (see each docstring): ``s3_server``, ``boto3_client``, ``db_key``, ``conn``,
``make_conn``, ``public_url``, ``reader``, ``fresh_server``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Run from a plain checkout too: fall back to ./src when ebooklet is not installed.
_SRC = Path(__file__).resolve().parent.parent / "src"
if importlib.util.find_spec("ebooklet") is None and (_SRC / "ebooklet").is_dir():
    sys.path.insert(0, str(_SRC))

if TYPE_CHECKING:
    from ebooklet.server import LocalS3Server

LOCAL_BUCKET = "ebooklet-test"
LOCAL_REGION = "us-east-1"

try:  # S3 round trips make hypothesis' default 200 ms deadline flaky.
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ebooklet",
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ebooklet"))
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def make_boto3_client(
    endpoint_url: str | None,
    access_key_id: str,
    access_key: str,
    region: str | None,
) -> Any:
    """A boto3 S3 client with the ``when_required`` checksum settings and path-style URLs."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=access_key,
        region_name=region,
        config=Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if endpoint_url else None,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


@dataclass
class S3Target:
    """Where the tests' remote databases live.

    Attributes:
        endpoint_url: the S3 endpoint (``None`` would mean AWS).
        access_key_id, access_key: credentials (``access_key`` hidden from repr).
        bucket: an existing bucket.
        region: the region name, or ``None``.
        public_base_url: base URL where ``{public_base_url}/{key}`` reads object ``key``
            anonymously, or ``None`` when the bucket is not public.
        is_local: ``True`` for a moto_server started by the tests.
        server: the server the tests started: a :class:`~ebooklet.server.LocalS3Server`,
            or a ``tests/seaweedfs.py`` ``SeaweedFS`` for ``fresh_server`` (``None`` when external),
            e.g. to ``kill()``/``pause()`` it or read ``request_counts()``.
    """

    endpoint_url: str | None
    access_key_id: str
    access_key: str = field(repr=False)
    bucket: str
    region: str | None
    public_base_url: str | None
    is_local: bool
    server: LocalS3Server | None = field(default=None, repr=False, compare=False)
    _client: Any = field(default=None, init=False, repr=False, compare=False)

    def client(self) -> Any:
        """A raw boto3 S3 client for this target (cached)."""
        if self._client is None:
            self._client = make_boto3_client(
                self.endpoint_url, self.access_key_id, self.access_key, self.region
            )
        return self._client

    def public_url(self, key: str) -> str | None:
        """The anonymous URL of object ``key``, or ``None`` when there is none."""
        if self.public_base_url is None:
            return None
        return f"{self.public_base_url}/{key}"

    def connection(self, db_key: str, **kw: Any) -> Any:
        """An ``ebooklet.S3Connection`` to ``db_key`` in this bucket; ``kw`` overrides."""
        import ebooklet

        params: dict[str, Any] = {"endpoint_url": self.endpoint_url, "region": self.region}
        params.update(kw)
        access_key_id = params.pop("access_key_id", self.access_key_id)
        access_key = params.pop("access_key", self.access_key)
        bucket = params.pop("bucket", self.bucket)
        return ebooklet.S3Connection(access_key_id, access_key, db_key, bucket, **params)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; return how many."""
        client = self.client()
        deleted = 0
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [obj["Key"] for obj in page.get("Contents", [])]
            if not keys:
                continue
            try:
                client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
                )
            except Exception:  # some S3-compatible servers lack DeleteObjects
                for k in keys:
                    client.delete_object(Bucket=self.bucket, Key=k)
            deleted += len(keys)
        return deleted


def folder_blocks_create(target: S3Target, prefix: str) -> bool:
    """Whether the store refuses to create object ``K`` with ``If-None-Match: *`` when
    objects ``K/...`` exist (path-based stores such as SeaweedFS do; AWS and moto do
    not). Probed under ``prefix``, cleaned up after."""
    client = target.client()
    key = f"{prefix}/folder-probe"
    client.put_object(Bucket=target.bucket, Key=f"{key}/child", Body=b"")
    try:
        client.put_object(Bucket=target.bucket, Key=key, Body=b"", IfNoneMatch="*")
    except client.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] != "PreconditionFailed":
            raise
        return True
    finally:
        target.delete_prefix(key)
    return False


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


def _start_local_target() -> S3Target:
    from ebooklet.server import LocalS3Server

    server = LocalS3Server(region=LOCAL_REGION).start()
    try:
        server.create_bucket(LOCAL_BUCKET, public=True)
    except BaseException:
        server.stop()
        raise
    return S3Target(
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key_id,
        access_key=server.access_key,
        bucket=LOCAL_BUCKET,
        region=LOCAL_REGION,
        public_base_url=server.public_url(LOCAL_BUCKET),
        is_local=True,
        server=server,
    )


def _external_target() -> S3Target | None:
    endpoint = _env("EBOOKLET_TEST_ENDPOINT")
    if endpoint is None:
        return None
    missing = [
        name
        for name in (
            "EBOOKLET_TEST_ACCESS_KEY_ID",
            "EBOOKLET_TEST_ACCESS_KEY",
            "EBOOKLET_TEST_BUCKET",
        )
        if _env(name) is None
    ]
    if missing:
        raise pytest.UsageError(
            f"EBOOKLET_TEST_ENDPOINT is set but {', '.join(missing)} is not; "
            "unset EBOOKLET_TEST_ENDPOINT to test against a local moto_server"
        )
    public = _env("EBOOKLET_TEST_PUBLIC_URL")
    return S3Target(
        endpoint_url=endpoint.rstrip("/"),
        access_key_id=_env("EBOOKLET_TEST_ACCESS_KEY_ID") or "",
        access_key=_env("EBOOKLET_TEST_ACCESS_KEY") or "",
        bucket=_env("EBOOKLET_TEST_BUCKET") or "",
        region=_env("EBOOKLET_TEST_REGION"),
        public_base_url=public.rstrip("/") if public else None,
        is_local=False,
    )


TARGET_FIXTURES = {"s3_server", "fresh_server"}
"""The fixtures through which a test talks to the S3 target under test."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``EBOOKLET_TEST_TARGET_ONLY=1``, deselect the tests that never reach the target."""
    if _env("EBOOKLET_TEST_TARGET_ONLY") != "1":
        return
    keep, drop = [], []
    for item in items:
        uses_target = TARGET_FIXTURES & set(getattr(item, "fixturenames", ()))
        (keep if uses_target else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    endpoint = _env("EBOOKLET_TEST_ENDPOINT")
    if endpoint is None:
        return "ebooklet S3 target: local moto_server (set EBOOKLET_TEST_ENDPOINT for another)"
    public = _env("EBOOKLET_TEST_PUBLIC_URL") or "none (public-URL tests skipped)"
    return (
        f"ebooklet S3 target: {endpoint} bucket={_env('EBOOKLET_TEST_BUCKET')} public_url={public}"
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Target]:
    """The session's :class:`S3Target`: the external endpoint if configured, else moto."""
    target = _external_target()
    if target is not None:
        try:
            target.client().head_bucket(Bucket=target.bucket)
        except Exception as exc:
            raise RuntimeError(
                f"EBOOKLET_TEST_BUCKET={target.bucket!r} is not reachable at "
                f"{target.endpoint_url}: {exc}"
            ) from exc
        yield target
        return
    target = _start_local_target()
    try:
        yield target
    finally:
        assert target.server is not None
        target.server.stop()


@pytest.fixture(scope="session")
def boto3_client(s3_server: S3Target) -> Any:
    """A raw boto3 S3 client for the session's target (to inspect or corrupt objects)."""
    return s3_server.client()


def _test_slug(request: pytest.FixtureRequest) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-.")
    return slug[:60] or "test"


@pytest.fixture
def db_key(request: pytest.FixtureRequest, s3_server: S3Target) -> Iterator[str]:
    """A database key unique to this test: ``tests/<testname>-<uuid8>/db``.

    Everything under ``tests/<testname>-<uuid8>/`` is deleted after the test
    (unless ``EBOOKLET_TEST_KEEP`` is set).
    """
    prefix = f"tests/{_test_slug(request)}-{uuid.uuid4().hex[:8]}/"
    yield prefix + "db"
    if _env("EBOOKLET_TEST_KEEP") is None:
        try:
            s3_server.delete_prefix(prefix)
        except Exception as exc:  # cleanup must not turn a pass into an error
            print(f"warning: could not delete s3 prefix {prefix!r}: {exc}", file=sys.stderr)


@pytest.fixture
def make_conn(s3_server: S3Target, db_key: str) -> Iterator[Callable[..., Any]]:
    """Factory ``make_conn(db_key=None, **kw) -> ebooklet.S3Connection``.

    ``db_key`` defaults to this test's ``db_key``; ``kw`` is passed to ``S3Connection``
    and may override ``endpoint_url``, ``region``, ``access_key_id``, ``access_key``,
    ``bucket``, ``threads``... Connections are closed after the test.
    """
    made: list[Any] = []
    default_key = db_key

    def factory(db_key: str | None = None, **kw: Any) -> Any:
        conn = s3_server.connection(db_key if db_key is not None else default_key, **kw)
        made.append(conn)
        return conn

    yield factory
    for conn in made:
        _close(conn)


@pytest.fixture
def conn(make_conn: Callable[..., Any]) -> Any:
    """A read-write ``ebooklet.S3Connection`` to this test's ``db_key``."""
    return make_conn()


@pytest.fixture
def public_url(s3_server: S3Target, db_key: str) -> str:
    """The anonymous URL of this test's database (skips when the bucket is not public)."""
    url = s3_server.public_url(db_key)
    if url is None:
        pytest.skip("the S3 target has no public URL (set EBOOKLET_TEST_PUBLIC_URL)")
    return url


class Reader:
    """Callable ``reader(conn_or_key=None, **kw)`` returning a read-side ``remote``.

    ``conn_or_key`` is an ``S3Connection`` (its ``db_key`` is used), a db key, or
    ``None`` for this test's ``db_key``. Depending on :attr:`kind` the result is a
    fresh ``S3Connection`` to the same database (``"connection"``; ``kw`` is passed
    on) or its public URL string (``"public_url"``; ``kw`` is ignored).
    """

    def __init__(
        self, kind: str, target: S3Target, default_key: str, make_conn: Callable[..., Any]
    ) -> None:
        self.kind = kind
        self._target = target
        self._default_key = default_key
        self._make_conn = make_conn

    def __call__(self, conn_or_key: Any = None, **kw: Any) -> Any:
        if conn_or_key is None:
            key = self._default_key
        elif isinstance(conn_or_key, str):
            key = conn_or_key
        else:
            key = conn_or_key.db_key
        if self.kind == "connection":
            return self._make_conn(db_key=key, **kw)
        url = self._target.public_url(key)
        assert url is not None
        return url

    def __repr__(self) -> str:
        return f"<Reader {self.kind}>"


@pytest.fixture(params=["connection", "public_url"])
def reader(
    request: pytest.FixtureRequest,
    s3_server: S3Target,
    db_key: str,
    make_conn: Callable[..., Any],
) -> Reader:
    """Every way of reaching a remote for reading: credentials, then the public URL.

    ``remote = reader(conn)`` gives a fresh ``S3Connection`` to ``conn``'s database or
    its public URL; the ``public_url`` variant is skipped when the target has none.
    """
    if request.param == "public_url" and s3_server.public_base_url is None:
        pytest.skip("the S3 target has no public URL (set EBOOKLET_TEST_PUBLIC_URL)")
    return Reader(request.param, s3_server, db_key, make_conn)


def _start_seaweedfs_target() -> S3Target:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from seaweedfs import SeaweedFS

    server = SeaweedFS().start()
    return S3Target(
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key_id,
        access_key=server.access_key,
        bucket=server.bucket,
        region=server.region,
        public_base_url=server.public_url(server.bucket),
        is_local=False,
        server=server,  # type: ignore[arg-type]
    )


@pytest.fixture
def fresh_server() -> Iterator[S3Target]:
    """A private server for this test alone, with a public bucket: a moto_server, or
    a SeaweedFS when ``EBOOKLET_TEST_FRESH_SERVER=seaweedfs`` (``tests/seaweedfs.py``
    sets it).

    For tests that stop, kill (``fresh_server.server.kill()``) or freeze
    (``.pause()``/``.resume()``) the server. Skipped when another external endpoint
    is configured. Make connections with ``fresh_server.connection(db_key)``.
    """
    if _env("EBOOKLET_TEST_FRESH_SERVER") == "seaweedfs":
        target = _start_seaweedfs_target()
    elif _env("EBOOKLET_TEST_ENDPOINT") is not None:
        pytest.skip("fresh_server needs a server of its own (set EBOOKLET_TEST_FRESH_SERVER)")
    else:
        target = _start_local_target()
    try:
        yield target
    finally:
        assert target.server is not None
        target.server.stop()


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> int:
    """Index shards of 1,024 keys for this test, so that a few thousand keys make
    several shards (the default keeps 16,384 keys per shard)."""
    import ebooklet.format

    monkeypatch.setattr(ebooklet.format, "KEYS_PER_SHARD", 1024)
    return 1024
