"""A reader of a public URL trusts nothing the HTTP server says (issue 10).

A hostile endpoint on loopback (a thread of this test, raw sockets, stopping by itself)
answers every request the same way: an error whose body is a gzip bomb or huge, a body
cut short, a stall or a trickle in the middle of the body, a ``Content-Encoding`` that
is a lie. Opening its URL must give a typed error quickly and in bounded memory, or, with
a local copy, an ``OfflineWarning`` and the local values within the open's deadline.
The real moto server serves objects a publisher stored with ``ContentEncoding``
metadata: the bytes the md5 covers are read, undecoded, and the database reads as usual.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet.ebooklet import OPEN_WAIT
from ebooklet.errors import IntegrityError, OfflineError, OfflineWarning

VALUES = {"a": "alpha", "b": "bravo", "c": "charlie"}
SERVE_FOR = 15.0
"""Seconds the hostile endpoint serves one connection at most (it stops by itself)."""
MARGIN = 2.0
"""Seconds an open may take beyond ``OPEN_WAIT`` to fall back offline."""
PEAK_RSS = 200 << 20
"""Peak RSS (bytes) allowed to a child process that opens a hostile URL."""

Handler = Callable[[socket.socket, threading.Event], None]


class HostileEndpoint:
    """An HTTP endpoint on 127.0.0.1 answering every request with ``handler``."""

    def __init__(self, handler: Handler):
        self._handler = handler
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url(self, db_key: str = "db") -> str:
        """The public URL of a database ``db_key`` at this endpoint."""
        return f"http://127.0.0.1:{self.port}/bkt/{db_key}"

    def close(self) -> None:
        """Stop serving (connections being served end within a second)."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        end = time.monotonic() + 4 * SERVE_FOR
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(client,), daemon=True).start()

    def _answer(self, client: socket.socket) -> None:
        with client:
            client.settimeout(SERVE_FOR)
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    request += chunk
                self._handler(client, self._stop)
            except OSError:
                pass  # the reader hung up: that is what a bounded reader does


def _head(status: str, length: int, *extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {length}", *extra, "", ""]
    return "\r\n".join(lines).encode()


def _pause(stop: threading.Event, seconds: float) -> bool:
    """Wait ``seconds``; False when the endpoint is stopping."""
    return not stop.wait(seconds)


def gzip_bomb_error(client: socket.socket, stop: threading.Event) -> None:
    """A 404 whose gzip body (1.5 MB, 1536 members) inflates to 1.5 GiB."""
    body = gzip.compress(b"<" * (1 << 20)) * 1536
    client.sendall(_head("404 Not Found", len(body), "Content-Encoding: gzip") + body)
    _pause(stop, 1)


def huge_error(client: socket.socket, stop: threading.Event) -> None:
    """A 404 whose plain body is 1 GiB (sent until the reader hangs up)."""
    chunk = b"<" + b"x" * ((1 << 20) - 1)
    client.sendall(_head("404 Not Found", 1024 * len(chunk)))
    for _ in range(1024):
        if stop.is_set():
            return
        client.sendall(chunk)


def busy_huge(client: socket.socket, stop: threading.Event) -> None:
    """A 503 asking for a retry in 30 s, whose plain body is 1 GiB."""
    chunk = b"<" + b"x" * ((1 << 20) - 1)
    client.sendall(_head("503 Slow Down", 1024 * len(chunk), "Retry-After: 30"))
    for _ in range(1024):
        if stop.is_set():
            return
        client.sendall(chunk)


def lying_encoding(client: socket.socket, stop: threading.Event) -> None:
    """A 200 that says ``Content-Encoding: gzip`` over bytes that are not gzip."""
    body = b'{"format": "not gzip"}'
    client.sendall(_head("200 OK", len(body), "Content-Encoding: gzip") + body)
    _pause(stop, 1)


def cut_short(client: socket.socket, stop: threading.Event) -> None:
    """A 200 announcing 100,000 bytes that hangs up after 10."""
    client.sendall(_head("200 OK", 100_000) + b'{"format":')


def stall(client: socket.socket, stop: threading.Event) -> None:
    """A 200 announcing 1000 bytes that sends one and then nothing."""
    client.sendall(_head("200 OK", 1000) + b"{")
    _pause(stop, SERVE_FOR)


def trickle(client: socket.socket, stop: threading.Event) -> None:
    """A 200 announcing 100,000 bytes sent one every 0.2 s."""
    client.sendall(_head("200 OK", 100_000))
    end = time.monotonic() + SERVE_FOR
    while time.monotonic() < end and _pause(stop, 0.2):
        client.sendall(b" ")


@pytest.fixture
def endpoint() -> Iterator[Callable[[Handler], HostileEndpoint]]:
    """``endpoint(handler)`` starts a hostile endpoint; all are stopped after the test."""
    started: list[HostileEndpoint] = []

    def start(handler: Handler) -> HostileEndpoint:
        started.append(HostileEndpoint(handler))
        return started[-1]

    yield start
    for hostile in started:
        hostile.close()


@pytest.fixture
def local_copy(conn: Any, public_url: str, tmp_path: Path) -> Path:
    """The path of a local copy (values cached) of a small database read by its URL."""
    with ebooklet.open(conn, tmp_path / "origin.blt", "n", value_serializer="str") as db:
        db.update(VALUES)
        db.changes().push()
    path = tmp_path / "copy.blt"
    with ebooklet.open(public_url, path, "r") as db:
        assert dict(db.items()) == VALUES
    return path


def _read_all(url: str, path: Path) -> dict:
    with ebooklet.open(url, path, "r") as db:
        return dict(db.items())


# ---------------------------------------------------------------- error bodies (child process)

CHILD = r"""
import json, resource, sys, warnings
import ebooklet
from ebooklet.errors import EBookletError
warnings.simplefilter("ignore")
url, path, action = sys.argv[1:]
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
try:
    if action == "open":
        with ebooklet.open(url, path, "r"):
            outcome = "ok"
    else:  # a value read: a range GET of a pack, retried after a 503
        ebooklet.S3Connection(db_url=url, retries=1).get_range(".ebk/pack/" + "0" * 32, 0, 100)
        outcome = "ok"
except EBookletError as exc:
    outcome = type(exc).__name__
except BaseException as exc:
    outcome = f"untyped {type(exc).__module__}.{type(exc).__qualname__}"
with open("/proc/self/status") as status:
    rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "rss": rss}))
"""


def run_child(url: str, path: Path, action: str) -> dict:
    """Run ``action`` (``open`` the URL, or a ``range`` read) in a child process: its
    outcome and peak RSS."""
    src = str(Path(ebooklet.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=src, MALLOC_ARENA_MAX="2")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(path), action],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("handler", [gzip_bomb_error, huge_error], ids=["gzip-bomb", "huge"])
def test_error_body_is_read_capped(endpoint: Any, handler: Handler, tmp_path: Path) -> None:
    """A 404 whose body is a gzip bomb or 1 GiB: "not found", in bounded memory and time."""
    hostile = endpoint(handler)
    started = time.monotonic()
    report = run_child(hostile.url(), tmp_path / "copy.blt", "open")
    assert report["outcome"] == "RemoteNotFoundError"
    assert report["rss"] < PEAK_RSS, f"peak RSS {report['rss'] >> 20} MiB"
    assert time.monotonic() - started < 30


def test_retried_answer_is_not_drained(endpoint: Any, tmp_path: Path) -> None:
    """A 503 with a 1 GiB body and ``Retry-After: 30`` on a value read: the retry reads
    little of each body and waits at most ``connection.RETRY_AFTER_MAX`` (10 s), then a
    typed error."""
    hostile = endpoint(busy_huge)
    started = time.monotonic()
    report = run_child(hostile.url(), tmp_path / "copy.blt", "range")
    assert report["outcome"] == "RemoteError"
    assert report["rss"] < PEAK_RSS, f"peak RSS {report['rss'] >> 20} MiB"
    assert time.monotonic() - started < 20


# ---------------------------------------------------------------- broken bodies, no local copy


def test_lying_content_encoding_is_not_decoded(endpoint: Any, tmp_path: Path) -> None:
    """``Content-Encoding: gzip`` over bytes that are not gzip: the bytes are judged as
    they are (not a manifest), never handed to a decoder."""
    hostile = endpoint(lying_encoding)
    with pytest.raises(IntegrityError, match="manifest"):
        _read_all(hostile.url(), tmp_path / "copy.blt")


@pytest.mark.parametrize("handler", [cut_short, stall, trickle], ids=["cut", "stall", "trickle"])
def test_broken_body_without_local_copy(endpoint: Any, handler: Handler, tmp_path: Path) -> None:
    """A manifest cut short, stalled or trickled: OfflineError within the open's deadline."""
    hostile = endpoint(handler)
    started = time.monotonic()
    with pytest.raises(OfflineError, match="no local copy"):
        _read_all(hostile.url(), tmp_path / "copy.blt")
    assert time.monotonic() - started < OPEN_WAIT + MARGIN


# ---------------------------------------------------------------- broken bodies, local copy


@pytest.mark.parametrize("handler", [cut_short, stall, trickle], ids=["cut", "stall", "trickle"])
def test_broken_body_falls_back_offline(endpoint: Any, handler: Handler, local_copy: Path) -> None:
    """With a local copy, a broken manifest answer means working offline from it, within
    ``OPEN_WAIT`` plus a small margin, whatever the server does with the body."""
    hostile = endpoint(handler)
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ebooklet.open(hostile.url(), local_copy, "r") as db:
            opened = time.monotonic() - started
            assert db.offline
            assert dict(db.items()) == VALUES
    assert opened < OPEN_WAIT + MARGIN
    assert any(issubclass(w.category, OfflineWarning) for w in caught)


# ---------------------------------------------------------------- ContentEncoding metadata (moto)


def _objects(boto3_client: Any, bucket: str, db_key: str) -> list[str]:
    listed = boto3_client.list_objects_v2(Bucket=bucket, Prefix=db_key)
    return [item["Key"] for item in listed.get("Contents", [])]


@pytest.mark.parametrize(
    ("which", "encoding"),
    [("manifest", "gzip"), ("index", "gzip"), ("pack", "gzip"), ("index", "deflate")],
)
def test_content_encoding_metadata_is_ignored(
    conn: Any, public_url: str, boto3_client: Any, s3_server: Any, db_key: str,
    tmp_path: Path, which: str, encoding: str,
) -> None:
    """A publisher's ``ContentEncoding`` on the manifest, a shard or a pack: S3 serves the
    header back, and the reader still reads the stored bytes (those the md5 covers)."""
    with ebooklet.open(conn, tmp_path / "origin.blt", "n", value_serializer="str") as db:
        db.update(VALUES)
        db.changes().push()
    keys = _objects(boto3_client, s3_server.bucket, db_key)
    target = db_key if which == "manifest" else next(k for k in keys if f".ebk/{which}/" in k)
    body = boto3_client.get_object(Bucket=s3_server.bucket, Key=target)["Body"].read()
    boto3_client.put_object(
        Bucket=s3_server.bucket, Key=target, Body=body, ContentEncoding=encoding
    )
    assert _read_all(public_url, tmp_path / "copy.blt") == VALUES
    with ebooklet.open(conn.copy(), tmp_path / "hash.blt", "r") as db:
        assert set(db.get_remote_hash()) == set(VALUES)
    assert ebooklet.check(public_url).corrupt == []
