"""A reader trusts nothing a bucket says (issue 10, points 2 and 3).

A small real database is pushed to moto_server, then damaged or made hostile by PUTting
objects into the bucket with boto3; a reader then opens it through a recording HTTP proxy
on loopback (so every request path is seen) by connection and by public URL. Each case
runs in a child process with an address-space limit and a file-size limit, and asserts:

- a typed ebooklet error (never ``struct.error``, ``KeyError``, ``TypeError``,
  ``OverflowError``, ``MemoryError``, orjson errors...), or success where the damage is
  harmless by design (a damaged lock is replaced);
- nothing requested outside the database's objects (``/<bucket>/<db_key>`` and
  ``/<bucket>/<db_key>.ebk/...``; a listing only with a prefix inside them);
- nothing written but the local cache files, together under :data:`FILES_BOUND`;
- the child's peak RSS (``VmHWM``, the high-water mark of its own memory, as ``ru_maxrss``
  would be without the pytest process it was forked from) under :data:`RSS_BOUND`.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
import pytest

import ebooklet
from ebooklet import IntegrityError
from ebooklet import format as fmt

RSS_BOUND = 200 << 20
"""Peak resident memory of a child reading a hostile database (200 MiB)."""
ADDRESS_SPACE = 2 << 30
"""The child's address-space limit (2 GiB): an allocation from a claimed size fails there
instead of taking the machine's memory."""
FILE_SIZE_LIMIT = 256 << 20
"""The child's file-size limit: a local file sized from a claimed count fails there."""
FILES_BOUND = 16 << 20
"""What the local cache files of a three-key database may hold together."""
HUGE_MANIFEST = 300 << 20
"""Size of the oversized manifest (300 MB, 1.2 GiB of RSS when it was parsed)."""
CLAIMED_LENGTH = 3 << 30
"""A value length claimed by a hostile index entry (3 GiB)."""
BASE = {"a": "alpha", "b": "bravo", "c": "charlie"}
UNTYPED = "untyped"


# --------------------------------------------------------------------------- recording proxy


class _Handler(http.server.BaseHTTPRequestHandler):
    """Forwards each request to the upstream endpoint (Host header kept, so signatures
    hold), streams the answer back and records the method and path."""

    protocol_version = "HTTP/1.1"
    server: _Proxy

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        self.server.record(self.command, self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            self.send_response_only(answer.status, answer.reason)
            chunked = answer.getheader("Content-Length") is None
            data = answer.read() if chunked else None
            for name, value in answer.getheaders():
                if name.lower() not in ("connection", "transfer-encoding"):
                    self.send_header(name, value)
            if chunked:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data is not None:
                self.wfile.write(data)
            elif self.command != "HEAD":
                while chunk := answer.read(1 << 20):
                    self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client stopped reading: stop sending
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class _Proxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def proxy(s3_server: Any) -> Iterator[_Proxy]:
    """A recording forwarding proxy to the test S3 endpoint (a plain-http server on this
    machine: moto, or SeaweedFS in CI's second run)."""
    where = urlsplit(s3_server.endpoint_url)
    if where.scheme != "http" or where.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the recording proxy forwards only to a plain-http server on loopback")
    server = _Proxy(urlsplit(s3_server.endpoint_url).netloc)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def outside(requests: list[tuple[str, str]], bucket: str, db_keys: list[str]) -> list[str]:
    """The requests that are not for the objects of the databases at ``db_keys``."""
    bad = []
    for method, raw in requests:
        parts = urlsplit(raw)
        path = unquote(parts.path)
        if path == f"/{bucket}" or path == f"/{bucket}/":  # a listing: its prefix must be ours
            prefixes = parse_qs(parts.query).get("prefix", [""])
            ok = "delete" not in parts.query and all(
                any(p == k or p.startswith(k + fmt.PREFIX) for k in db_keys) for p in prefixes
            )
        else:
            ok = any(path == f"/{bucket}/{k}" or path.startswith(f"/{bucket}/{k}{fmt.PREFIX}") for k in db_keys)
        if not ok:
            bad.append(f"{method} {raw}")
    return bad


# --------------------------------------------------------------------------- the child process

CHILD = r"""
import json, os, resource, signal, sys
args = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (args["address_space"], args["address_space"]))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (args["file_size"], args["file_size"]))
import ebooklet
from ebooklet.errors import EBookletError

def remote(form, db_key):
    if form == "public_url":
        return f"{args['proxy']}/{args['bucket']}/{db_key}"
    return ebooklet.S3Connection(args["key_id"], args["secret"], db_key, args["bucket"],
                                 endpoint_url=args["proxy"], retries=0)

def act(form, path):
    action = args["action"]
    if action == "read":
        with ebooklet.open(remote(form, args["db_key"]), path, "r", value_serializer="str") as db:
            values = {k: db[k] for k in list(db)}
            db.get_metadata()
            db.history()
            return sorted(values)
    if action == "bulk":
        with ebooklet.open(remote(form, args["db_key"]), path, "r", value_serializer="str") as db:
            db.load_items()
            return sorted(dict(db.items()))
    if action == "remote_hash":
        with ebooklet.open(remote(form, args["db_key"]), path, "r", value_serializer="str") as db:
            return sorted(db.get_remote_hash())
    if action == "lock":
        with ebooklet.open(remote(form, args["db_key"]), path, "w", value_serializer="str") as db:
            return sorted(db)
    if action == "copy":
        with ebooklet.open(remote(form, args["db_key"]), path, "r", value_serializer="str") as db:
            db.copy_remote(remote(form, args["target"]))
            return []
    raise ValueError(action)

results = {}
for form in args["forms"]:
    folder = os.path.join(args["tmp"], form)
    os.makedirs(folder)
    try:
        outcome = ["ok", act(form, os.path.join(folder, "copy.blt"))]
    except EBookletError as exc:
        outcome = [type(exc).__name__, str(exc)]
    except BaseException as exc:
        outcome = ["untyped", f"{type(exc).__module__}.{type(exc).__qualname__}: {exc!s:.300}"]
    files = {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)}
    results[form] = {"outcome": outcome, "files": files}
# The peak RSS of this process since its exec: VmHWM. (ru_maxrss would also count the
# memory of the pytest process this child was forked from: exec keeps that high mark.)
with open("/proc/self/status") as status:
    rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"results": results, "rss": rss}))
"""


def run_child(
    s3_server: Any, proxy: _Proxy, db_key: str, tmp: Path, action: str, forms: list[str], **extra: Any
) -> dict:
    """Run ``action`` on the database at ``db_key`` in a child process (through the proxy)."""
    args = {
        "proxy": proxy.url, "bucket": s3_server.bucket, "db_key": db_key, "tmp": str(tmp),
        "key_id": s3_server.access_key_id, "secret": s3_server.access_key, "action": action,
        "forms": forms, "address_space": ADDRESS_SPACE, "file_size": FILE_SIZE_LIMIT, **extra,
    }
    src = str(Path(ebooklet.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=src, MALLOC_ARENA_MAX="2")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_child(
    report: dict, expected: str, proxy: _Proxy, bucket: str, db_keys: list[str], since: int
) -> None:
    """The assertions every hostile case makes (see the module docstring)."""
    for form, result in report["results"].items():
        kind, detail = result["outcome"]
        assert kind != UNTYPED, f"{form}: untyped error {detail}"
        assert kind == expected, f"{form}: expected {expected}, got {kind}: {detail}"
        allowed = {"copy.blt", "copy.blt.local_hash", "copy.blt.remote_index", "copy.blt.ebk.json",
                   "copy.blt.ebk.lock", "copy.blt.ebk.writer"}  # the locks: docs/processes.md
        assert set(result["files"]) <= allowed, f"{form}: unexpected files {result['files']}"
        assert sum(result["files"].values()) < FILES_BOUND, f"{form}: {result['files']}"
    assert report["rss"] < RSS_BOUND, f"peak RSS {report['rss'] / 2**20:.0f} MiB"
    assert not outside(proxy.requests[since:], bucket, db_keys)


# --------------------------------------------------------------------------- building hostile buckets


class Bucket:
    """The test's database in the bucket, and the means to damage it."""

    def __init__(self, client: Any, bucket: str, db_key: str):
        self.client, self.bucket, self.db_key = client, bucket, db_key

    def get(self, suffix: str = "") -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.db_key + suffix)["Body"].read()

    def put(self, suffix: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.db_key + suffix, Body=body)

    def manifest(self) -> dict:
        return orjson.loads(self.get())

    def set_manifest(self, manifest: Any) -> None:
        self.put("", orjson.dumps(manifest))

    def edit_manifest(self, **fields: Any) -> None:
        manifest = self.manifest()
        manifest.update(fields)
        self.set_manifest(manifest)

    def shard_name(self) -> str:
        return fmt.shard_name(self.manifest()["shards"][0], 0)

    def pack_name(self) -> str:
        entries = fmt.decode_shard(self.get(self.shard_name()))
        return fmt.pack_name(next(iter(entries.values())).pack)


def _patched(body: bytes, start: int, layout: str, value: int) -> bytes:
    """``body`` (a shard or pack footer, ending with its md5) with one field replaced and
    its md5 made right again, so that only the field's value is wrong."""
    data = bytearray(body[:-16])
    struct.pack_into(layout, data, start, value)
    return bytes(data) + fmt.md5(data)


DIRECTORY_HEADER = struct.Struct("<8sII")  # magic, records per page, record count
PAGE_REF = struct.Struct("<III16s")  # page offset, page length, first key length, page md5
SHARD_TRAILER = struct.Struct("<I8s")  # directory length, magic
RECORD_SIZE = 64  # bytes of one record of a shard's page


def shard_bytes(
    pages: list[bytes], first_keys: list[bytes], page_records: int, count: int,
    refs: list[tuple[int, int, bytes]] | None = None,
) -> bytes:
    """An index shard of ``pages`` as given (docs/format.md §3), with a directory saying
    ``page_records`` records per page, ``count`` records and these first keys; ``refs``:
    each page's ``(offset, length, md5)`` if not where and what the pages are."""
    if refs is None:
        offsets = [sum(map(len, pages[:i])) for i in range(len(pages))]
        refs = [(o, len(p), fmt.md5(p)) for o, p in zip(offsets, pages, strict=True)]
    directory = DIRECTORY_HEADER.pack(fmt.SHARD_MAGIC, page_records, count)
    directory += b"".join(
        PAGE_REF.pack(o, n, len(k), m) for (o, n, m), k in zip(refs, first_keys, strict=True)
    ) + b"".join(first_keys)
    directory += fmt.md5(directory)
    return b"".join(pages) + directory + SHARD_TRAILER.pack(len(directory), fmt.SHARD_MAGIC)


def split_shard(shard: bytes) -> tuple[list[bytes], list[bytes], int, int]:
    """``(pages, first keys, records per page, count)`` of a shard as :func:`shard_bytes`
    takes them (a shard written by ebooklet)."""
    length = SHARD_TRAILER.unpack(shard[-SHARD_TRAILER.size :])[0]
    directory = shard[-SHARD_TRAILER.size - length : -SHARD_TRAILER.size]
    _, page_records, count = DIRECTORY_HEADER.unpack_from(directory)
    n_pages = -(-count // page_records)
    refs = list(PAGE_REF.iter_unpack(directory[DIRECTORY_HEADER.size :][: n_pages * PAGE_REF.size]))
    pages = [shard[o : o + n] for o, n, _, _ in refs]
    keys, at = [], DIRECTORY_HEADER.size + n_pages * PAGE_REF.size
    for _, _, k_len, _ in refs:
        keys.append(directory[at : at + k_len])
        at += k_len
    return pages, keys, page_records, count


# shard record fields: offset in the record (of page 0), struct layout
SHARD_FIELDS = {"count": (-1, "<I"), "timestamp": (16, "<q"), "offset": (40, "<Q"),
                "length": (48, "<Q"), "key_offset": (56, "<I"), "key_length": (60, "<I")}
FOOTER_FIELDS = {"count": (-1, "<I"), "timestamp": (16, "<q"), "offset": (24, "<Q"),
                 "length": (32, "<Q"), "key_offset": (40, "<I"), "key_length": (44, "<I")}


def patch_shard(b: Bucket, field: str, value: int) -> None:
    """Set ``field`` of the first record (or the record count) of the database's shard,
    its md5s made right again."""
    where, layout = SHARD_FIELDS[field]
    pages, keys, page_records, count = split_shard(b.get(b.shard_name()))
    if where < 0:
        count = value
    else:
        page = bytearray(pages[0])
        struct.pack_into(layout, page, where, value)
        pages[0] = bytes(page)
    b.put(b.shard_name(), shard_bytes(pages, keys, page_records, count))


def patch_footer(b: Bucket, field: str, value: int) -> None:
    """Set ``field`` of the first record (or the record count) of the pack's footer."""
    name = b.pack_name()
    pack = b.get(name)
    footer_len = struct.unpack("<Q", pack[-16:-8])[0]
    begin = len(pack) - 16 - footer_len
    where, layout = FOOTER_FIELDS[field]
    footer = _patched(pack[begin:-16], 8 if where < 0 else 12 + where, layout, value)
    b.put(name, pack[:begin] + footer + pack[-16:])


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _without(field: str) -> Callable[[Bucket], None]:
    def mutate(b: Bucket) -> None:
        manifest = b.manifest()
        del manifest[field]
        b.set_manifest(manifest)

    return mutate


def _fields(**fields: Any) -> Callable[[Bucket], None]:
    return lambda b: b.edit_manifest(**fields)


def plant_escaping_shard(b: Bucket) -> str:
    """Name the database's shard ``../../planted`` in its manifest, and plant a valid
    shard where a URL with that name lands once its dot segments are resolved: beside
    the database (``<test prefix>/planted-0``), outside its objects. Returns that key."""
    planted = f"{b.db_key.rpartition('/')[0]}/planted-0"
    b.client.put_object(Bucket=b.bucket, Key=planted, Body=b.get(b.shard_name()))
    b.edit_manifest(shards=["../../planted"])
    return planted


def _raw_field(field: str, depth: int) -> Callable[[Bucket], None]:
    """Set ``field`` to arrays nested ``depth`` deep (written as text: orjson would not)."""

    def mutate(b: Bucket) -> None:
        manifest = b.manifest()
        manifest[field] = None
        body = orjson.dumps(manifest).replace(
            f'"{field}":null'.encode(), f'"{field}":'.encode() + b"[" * depth + b"]" * depth
        )
        b.put("", body)

    return mutate


def _trailer_length(value: int) -> Callable[[Bucket], None]:
    def mutate(b: Bucket) -> None:
        name = b.pack_name()
        pack = b.get(name)
        b.put(name, pack[:-16] + struct.pack("<Q8s", value, fmt.PACK_MAGIC))

    return mutate


def _lock(body: bytes) -> Callable[[Bucket], None]:
    return lambda b: b.put(fmt.LOCK_NAME, body)


LIVE = time.time() + 3600
HEX = "0123456789abcdef" * 2
ESCAPE = "../../../../elsewhere/planted"

#: id -> (how the bucket is damaged, what the reader does, the error expected)
CASES: dict[str, tuple[Callable[[Bucket], None], str, str]] = {
    # manifest: type, range, shape
    "manifest-format-missing": (_without("format"), "read", "IntegrityError"),
    "manifest-version-str": (_fields(version="1"), "read", "IntegrityError"),
    "manifest-version-bool": (_fields(version=True), "read", "IntegrityError"),
    "manifest-version-newer": (_fields(version=fmt.FORMAT_VERSION + 1), "read", "FormatVersionError"),
    "manifest-version-older": (_fields(version=fmt.FORMAT_VERSION - 1), "read", "IntegrityError"),
    "manifest-n_keys-missing": (_without("n_keys"), "read", "IntegrityError"),
    "manifest-uuid-int": (_fields(uuid=5), "read", "IntegrityError"),
    "manifest-uuid-path": (_fields(uuid=ESCAPE), "read", "IntegrityError"),
    "manifest-commit_id-path": (_fields(commit_id=ESCAPE), "read", "IntegrityError"),
    "manifest-commit_id-upper": (_fields(commit_id=HEX.upper()), "read", "IntegrityError"),
    "manifest-parent-str": (_fields(parent="x"), "read", "IntegrityError"),
    "manifest-parent-path": (_fields(parent={"seq": 1, "commit_id": ESCAPE}), "read", "IntegrityError"),
    "manifest-parent-loop": (_fields(parent={"seq": 9, "commit_id": HEX}), "read", "IntegrityError"),
    "manifest-seq-negative": (_fields(seq=-1), "read", "IntegrityError"),
    "manifest-seq-bool": (_fields(seq=True), "read", "IntegrityError"),
    "manifest-seq-float": (_fields(seq=1.5), "read", "IntegrityError"),
    "manifest-timestamp-negative": (_fields(timestamp=-1), "read", "IntegrityError"),
    "manifest-timestamp-2**62": (_fields(timestamp=2**62), "read", "IntegrityError"),
    "manifest-timestamp-str": (_fields(timestamp="now"), "read", "IntegrityError"),
    "manifest-key_serializer-int": (_fields(key_serializer=5), "read", "IntegrityError"),
    "manifest-value_serializer-path": (_fields(value_serializer="../str"), "read", "IntegrityError"),
    "manifest-n_buckets-str": (_fields(n_buckets="many"), "read", "IntegrityError"),
    "manifest-n_shards-0": (_fields(n_shards=0, shards=[]), "read", "IntegrityError"),
    "manifest-n_shards-3": (_fields(n_shards=3, shards=[None, None, None]), "read", "IntegrityError"),
    "manifest-n_shards-2**40": (_fields(n_shards=2**40), "read", "IntegrityError"),
    "manifest-shards-dict": (_fields(shards={"0": None}), "read", "IntegrityError"),
    "manifest-shards-short": (_fields(n_shards=2), "read", "IntegrityError"),
    "manifest-shards-int": (_fields(shards=[5]), "read", "IntegrityError"),
    "manifest-shards-path": (_fields(shards=[ESCAPE]), "read", "IntegrityError"),
    "manifest-shards-dotdot": (_fields(shards=[".."]), "read", "IntegrityError"),
    "manifest-n_keys-negative": (_fields(n_keys=-1), "read", "IntegrityError"),
    "manifest-n_bytes-2**63": (_fields(n_bytes=2**63), "read", "IntegrityError"),
    "manifest-metadata-300-deep": (_raw_field("metadata", 300), "read", "IntegrityError"),
    "manifest-metadata-2000-deep": (_raw_field("metadata", 2000), "read", "IntegrityError"),
    "manifest-unknown-field-deep": (_fields(extra=nested(200)), "read", "IntegrityError"),
    "manifest-message-int": (_fields(message=5), "read", "IntegrityError"),
    "manifest-message-huge": (_fields(message="m" * (fmt.MAX_MESSAGE + 1)), "read", "IntegrityError"),
    "manifest-changed_keys-str": (_fields(changed_keys="x"), "read", "IntegrityError"),
    "manifest-list": (lambda b: b.set_manifest([1, 2]), "read", "IntegrityError"),
    # index shards
    "shard-count-2**32-1": (lambda b: patch_shard(b, "count", 2**32 - 1), "read", "IntegrityError"),
    "shard-count-plus-one": (lambda b: patch_shard(b, "count", 4), "read", "IntegrityError"),
    "shard-truncated": (lambda b: b.put(b.shard_name(), b.get(b.shard_name())[:-7]), "read", "IntegrityError"),
    "shard-key-outside-blob": (lambda b: patch_shard(b, "key_offset", 2**31), "read", "IntegrityError"),
    "shard-key-length-huge": (lambda b: patch_shard(b, "key_length", 2**32 - 1), "read", "IntegrityError"),
    "shard-timestamp--1": (lambda b: patch_shard(b, "timestamp", -1), "read", "IntegrityError"),
    "shard-timestamp-2**62": (lambda b: patch_shard(b, "timestamp", 2**62), "read", "IntegrityError"),
    "shard-length-2**40": (lambda b: patch_shard(b, "length", 2**40), "bulk", "IntegrityError"),
    "shard-offset-2**63": (lambda b: patch_shard(b, "offset", 2**63), "read", "IntegrityError"),
    # pack footers (read by get_remote_hash, which lists: connection only)
    "footer-count-2**32-1": (lambda b: patch_footer(b, "count", 2**32 - 1), "remote_hash", "IntegrityError"),
    "footer-key-outside-blob": (lambda b: patch_footer(b, "key_offset", 2**31), "remote_hash", "IntegrityError"),
    "footer-timestamp--1": (lambda b: patch_footer(b, "timestamp", -1), "remote_hash", "IntegrityError"),
    "footer-value-past-end": (lambda b: patch_footer(b, "offset", 1 << 30), "remote_hash", "IntegrityError"),
    "footer-length-2**40": (lambda b: patch_footer(b, "length", 2**40), "remote_hash", "IntegrityError"),
    "trailer-footer-2**63": (_trailer_length(2**63), "remote_hash", "IntegrityError"),
    "trailer-footer-tiny": (_trailer_length(3), "remote_hash", "IntegrityError"),
    # lock records: a damaged lock is nobody's and expired, so the writer replaces it
    "lock-list": (_lock(b"[1, 2]"), "lock", "ok"),
    "lock-str": (_lock(b'"locked"'), "lock", "ok"),
    "lock-expires-str": (_lock(b'{"owner_id": "x", "expires": "soon"}'), "lock", "ok"),
    "lock-garbage-host": (
        _lock(orjson.dumps({"owner_id": HEX, "host": "\x1b[2J\x1b[31mevil", "pid": 1, "path": "p",
                            "created": "now", "expires": LIVE})),
        "lock", "ok",
    ),
    "lock-huge": (_lock(b'{"pad": "' + b"x" * (fmt.MAX_LOCK_BYTES + 1) + b'"}'), "lock", "ok"),
}

FORMS = {"read": ["connection", "public_url"], "bulk": ["connection", "public_url"], "remote_hash": ["connection"], "lock": ["connection"]}


@pytest.fixture
def bucket(conn: Any, boto3_client: Any, s3_server: Any, db_key: str, tmp_path: Path) -> Bucket:
    """The test's database, pushed with three keys; then damaged by each test."""
    with ebooklet.open(conn, tmp_path / "origin.blt", "n", value_serializer="str") as db:
        db.update(BASE)
        db.changes().push()
    return Bucket(boto3_client, s3_server.bucket, db_key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_field_gives_a_typed_error_and_stays_inside(
    case: str, bucket: Bucket, proxy: _Proxy, s3_server: Any, tmp_path: Path
) -> None:
    """Each malformed field of a manifest, shard, pack footer or lock record: a typed error
    (or, for a lock, its replacement), by connection and by public URL, with nothing
    requested outside the database, nothing written but the cache, bounded memory."""
    mutate, action, expected = CASES[case]
    mutate(bucket)
    since = len(proxy.requests)
    report = run_child(s3_server, proxy, bucket.db_key, tmp_path / "child", action, FORMS[action])
    check_child(report, expected, proxy, s3_server.bucket, [bucket.db_key], since)


# --------------------------------------------------------------------------- the attacks, one test each


def test_shard_name_escaping_the_database_is_never_fetched(
    bucket: Bucket, proxy: _Proxy, s3_server: Any, tmp_path: Path
) -> None:
    """Issue point 2: ``shards=["../../../../other/planted"]`` made a reader fetch an object
    outside the database (planted there, a valid shard) and use it as its index."""
    plant_escaping_shard(bucket)
    since = len(proxy.requests)
    report = run_child(s3_server, proxy, bucket.db_key, tmp_path / "c", "read", FORMS["read"])
    check_child(report, "IntegrityError", proxy, s3_server.bucket, [bucket.db_key], since)


def test_parent_name_escaping_the_database_is_never_followed(
    bucket: Bucket, proxy: _Proxy, s3_server: Any, tmp_path: Path
) -> None:
    """Issue point 2: a parent id with '..' in it made ``history()`` fetch a commit record
    from outside the database (planted there)."""
    record = dict(bucket.manifest(), seq=1, commit_id=HEX, parent=None)
    bucket.client.put_object(
        Bucket=bucket.bucket, Key=f"{bucket.db_key.rpartition('/')[0]}/planted", Body=orjson.dumps(record)
    )
    bucket.edit_manifest(seq=2, parent={"seq": 1, "commit_id": "../../../planted"})
    since = len(proxy.requests)
    report = run_child(s3_server, proxy, bucket.db_key, tmp_path / "c", "read", FORMS["read"])
    check_child(report, "IntegrityError", proxy, s3_server.bucket, [bucket.db_key], since)


def test_copy_remote_from_a_hostile_source_never_puts_outside_the_target(
    bucket: Bucket, proxy: _Proxy, s3_server: Any, tmp_path: Path
) -> None:
    """Issue point 2: ``copy_remote`` from a source whose shard names climb out PUT
    (signed with the user's keys) outside the target's prefix."""
    target = bucket.db_key + "-target"
    plant_escaping_shard(bucket)
    since = len(proxy.requests)
    report = run_child(s3_server, proxy, bucket.db_key, tmp_path / "c", "copy", ["connection"], target=target)
    check_child(report, "IntegrityError", proxy, s3_server.bucket, [bucket.db_key, target], since)
    puts = [path for method, path in proxy.requests[since:] if method in ("PUT", "POST")]
    assert all(unquote(p).startswith(f"/{s3_server.bucket}/{target}") for p in puts), puts


@pytest.mark.parametrize(
    ("n_keys", "expected"),
    [(10**9, "IntegrityError"), (fmt.MAX_SHARD_RECORDS + 1, "IntegrityError"),
     (fmt.MAX_SHARD_RECORDS, "ok")],
    ids=["10**9", "cap+1", "cap"],
)
def test_claimed_key_count_does_not_size_the_local_file(
    n_keys: int, expected: str, bucket: Bucket, proxy: _Proxy, s3_server: Any, tmp_path: Path
) -> None:
    """Issue point 3: a manifest claiming ``n_keys=10**9`` made opening the URL write a
    12 GB local file (and ``list(db)`` ask for 8 GB). More keys than the manifest's
    shards can hold is refused; a count they could hold opens in small files."""
    bucket.edit_manifest(n_keys=n_keys)
    since = len(proxy.requests)
    report = run_child(s3_server, proxy, bucket.db_key, tmp_path / "c", "read", FORMS["read"])
    check_child(report, expected, proxy, s3_server.bucket, [bucket.db_key], since)
    if expected == "ok":
        assert all(r["outcome"][1] == sorted(BASE) for r in report["results"].values())


@pytest.mark.parametrize("action", ["read", "bulk"])
def test_claimed_value_length_is_not_allocated(
    action: str, bucket: Bucket, proxy: _Proxy, s3_server: Any, tmp_path: Path
) -> None:
    """Issue point 3: an index entry claiming a 3 GiB value allocated 3 GiB before any
    byte arrived (the bulk reads, ``load_items``/``items``, read into a buffer of the
    claimed size); the server sends a few bytes, which is what is held."""
    patch_shard(bucket, "length", CLAIMED_LENGTH)
    since = len(proxy.requests)
    report = run_child(s3_server, proxy, bucket.db_key, tmp_path / "c", action, FORMS["read"])
    check_child(report, "IntegrityError", proxy, s3_server.bucket, [bucket.db_key], since)


def test_oversized_manifest_is_not_downloaded(
    bucket: Bucket, proxy: _Proxy, s3_server: Any, tmp_path: Path
) -> None:
    """Issue point 3: a 300 MB manifest (metadata) took 1.2 GiB of RSS; the download stops
    at :data:`ebooklet.format.MAX_MANIFEST_BYTES`."""
    body = orjson.dumps(dict(bucket.manifest(), metadata=None))
    head, _, rest = body.partition(b'"metadata":null')
    bucket.put("", b"".join([head, b'"metadata":"', b"x" * HUGE_MANIFEST, b'"', rest]))
    del body, head, rest
    since = len(proxy.requests)
    report = run_child(s3_server, proxy, bucket.db_key, tmp_path / "c", "read", FORMS["read"])
    check_child(report, "IntegrityError", proxy, s3_server.bucket, [bucket.db_key], since)


# --------------------------------------------------------------------------- smaller holes


def test_lock_record_holds_only_the_base_name_of_the_local_file(
    conn: Any, bucket: Bucket, tmp_path: Path
) -> None:
    """The lock object may be world-readable (a public bucket): it must not show the
    writer's absolute local path."""
    path = tmp_path / "private-dir" / "mine.blt"
    path.parent.mkdir()
    with ebooklet.open(conn, path, "w", value_serializer="str"):
        record = orjson.loads(bucket.get(fmt.LOCK_NAME))
    assert record["path"] == "mine.blt"
    assert str(tmp_path) not in json.dumps(record)


@pytest.mark.parametrize(
    "head",
    [b"not json", b"[1]", b'{"manifest": {"format": "ebooklet"}, "etag": "x"}',
     b'{"manifest": null, "etag": 5}'],
    ids=["not-json", "list", "missing-fields", "etag-int"],
)
def test_damaged_cached_manifest_is_fetched_again(
    head: bytes, bucket: Bucket, reader: Any, tmp_path: Path
) -> None:
    """``P.remote_index`` is a cache: a damaged manifest record there warns and is replaced
    by the remote's, instead of a raw orjson/KeyError/TypeError."""
    import booklet

    path = tmp_path / "copy.blt"
    with ebooklet.open(reader(), path, "r", value_serializer="str") as db:
        assert dict(db) == BASE
    with booklet.open(str(path) + ".remote_index", "w") as mirror:
        mirror["head"] = head
    with pytest.warns(RuntimeWarning, match="cached head manifest is damaged"):
        db = ebooklet.open(reader(), path, "r", value_serializer="str")
    with db:
        assert dict(db) == BASE


def test_cached_manifest_naming_a_path_outside_is_refused(bucket: Bucket, conn: Any, tmp_path: Path) -> None:
    """A cached manifest goes through the same checks as one from the bucket."""
    import booklet

    path = tmp_path / "copy.blt"
    with ebooklet.open(conn, path, "r", value_serializer="str") as db:
        assert dict(db) == BASE
    manifest = dict(bucket.manifest(), shards=[ESCAPE])
    with booklet.open(str(path) + ".remote_index", "w") as mirror:
        mirror["head"] = orjson.dumps({"manifest": manifest, "etag": '"x"'})
    with pytest.warns(RuntimeWarning, match="damaged"), ebooklet.open(None, path, "r", value_serializer="str") as db:
        assert dict(db) == {}  # offline: no remote data until it is fetched again


def test_writer_refuses_metadata_readers_would_refuse(conn: Any, tmp_path: Path) -> None:
    """A push never writes a manifest that readers refuse (too deeply nested metadata)."""
    with ebooklet.open(conn, tmp_path / "w.blt", "n", value_serializer="str") as db:
        db["k"] = "v"
        db.set_metadata(nested(fmt.MAX_JSON_DEPTH + 1))
        with pytest.raises(ValueError, match="nests deeper"):
            db.changes().push()


def test_connection_refuses_object_names_leaving_the_database(conn: Any) -> None:
    """The last line of defence: no URL is made from a name with '..', '.', '//' in it."""
    for suffix in ("/../x", ".ebk/../../x", ".ebk/pack/..", ".ebk//x", ".ebk/./x", "x"):
        with pytest.raises(IntegrityError, match="Refused the object name"):
            conn.get(suffix)
