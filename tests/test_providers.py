"""Behaviour that differs between S3 servers, checked on whichever the suite runs against
(moto by default, SeaweedFS in CI's second run, any endpoint given by the
``EBOOKLET_TEST_*`` variables), and the lock-only fallback on a server that ignores
conditional writes (s3rver, see ``lenient_server``)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

import ebooklet
from conftest import S3Target, folder_blocks_create
from ebooklet import RemoteError
from test_concurrency import Worker, create, read_remote


def test_creating_a_database_whose_key_is_a_folder_says_so_at_once(
    s3_server: S3Target, make_conn, db_key: str, tmp_path: Path
) -> None:
    """``D/child`` exists and a database is created at ``D``. Path-based stores
    (SeaweedFS) refuse the conditional create: the push fails at once with an error
    naming the key and the cause, not after retries blaming concurrent writers that
    do not exist. Other stores (moto, AWS) create the database beside the folder."""
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{db_key}/child", Body=b"x")
    blocked = folder_blocks_create(s3_server, db_key.rsplit("/", 1)[0])
    conn = make_conn()
    with ebooklet.open(conn, tmp_path / "db", "c", value_serializer="str") as db:
        db["a"] = "1"
        if not blocked:  # moto, AWS: the same layout just works
            db.changes().push()
            assert ebooklet.open(make_conn(), tmp_path / "copy", "r")["a"] == "1"
            return
        started = time.monotonic()
        puts = conn.request_counts["PUT"]
        with pytest.raises(RemoteError, match="folder") as raised:
            db.changes().push()
        assert db_key in str(raised.value) and "db_key" in str(raised.value)
        assert conn.request_counts["PUT"] - puts <= 6  # pack, shard, commit record, manifest, lock
        assert time.monotonic() - started < 10
        assert list(db.changes().iter_changes())  # the edit is still pending


# --------------------------------------------------------------------------- the lock-only fallback

S3RVER = Path(__file__).resolve().parent / "s3rver" / "node_modules" / ".bin" / "s3rver"
LENIENT_BUCKET = "lenient"


class S3rver:
    """s3rver (npm), an S3 server that accepts ``If-Match``/``If-None-Match`` on PUT
    and ignores them, as Backblaze B2 is reported to: the server ebooklet's lock-only
    fallback is for. Installed by ``npm ci --prefix tests/s3rver`` (``.ci/run``)."""

    access_key_id = access_key = "S3RVER"  # s3rver's own key pair; it checks signatures

    def __init__(self, folder: Path):
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._log = open(folder / "s3rver.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [str(S3RVER), "-d", str(folder), "-a", "127.0.0.1", "-p", str(self.port),
             "--configure-bucket", LENIENT_BUCKET],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while urllib3_status(self.endpoint_url + "/" + LENIENT_BUCKET) is None:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"s3rver did not start:\n{(folder / 's3rver.log').read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def urllib3_status(url: str) -> int | None:
    """The status of a GET of ``url``, ``None`` when nothing answers."""
    try:
        return urllib3.request("GET", url, retries=False, timeout=2).status
    except urllib3.exceptions.HTTPError:
        return None


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Target]:
    """A private s3rver with a bucket, as an :class:`S3Target`. Skipped where s3rver is
    not installed, except in CI (``CI=true``), where that is an error."""
    if not S3RVER.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("s3rver is not installed: npm ci --prefix tests/s3rver")
        pytest.skip("s3rver is not installed (npm ci --prefix tests/s3rver)")
    server = S3rver(tmp_path_factory.mktemp("s3rver"))
    try:
        yield S3Target(
            endpoint_url=server.endpoint_url, access_key_id=S3rver.access_key_id,
            access_key=S3rver.access_key, bucket=LENIENT_BUCKET, region="us-east-1",
            public_base_url=f"{server.endpoint_url}/{LENIENT_BUCKET}", is_local=False,
        )
    finally:
        server.stop()


def _db_key() -> str:
    return f"tests/lenient-{uuid.uuid4().hex[:8]}/db"


def test_lenient_server_is_found_out_and_pushes_warn(lenient: S3Target, tmp_path: Path) -> None:
    """The probe finds that the server ignores conditional writes (a second
    ``If-None-Match: *`` create succeeds); every push then says that only the lock
    protects it, and what it committed reads back by connection and by URL."""
    db_key = _db_key()
    conn = lenient.connection(db_key)
    with ebooklet.open(conn, tmp_path / "w", "c", value_serializer="str") as db:
        db.update({f"k{i}": str(i) for i in range(50)})
        with pytest.warns(ebooklet.ConsistencyWarning, match="only the write lock"):
            db.changes().push()
        assert conn.conditional_writes() is False
        db["k1"] = "changed"
        with pytest.warns(ebooklet.ConsistencyWarning):
            db.changes().push()
    for remote in (lenient.connection(db_key), lenient.public_url(db_key)):
        with ebooklet.open(remote, tmp_path / f"r-{uuid.uuid4().hex[:6]}", "r") as db:
            assert len(db) == 50 and db["k1"] == "changed" and db["k2"] == "2"


def test_writers_in_turn_under_the_lock_alone_lose_no_update(lenient: S3Target, tmp_path: Path) -> None:
    """Two processes increment one counter in turns (open 'w' waiting for the lock,
    read, write, push, close) on a server whose conditional writes are ignored: the
    lock alone keeps every increment."""
    db_key = _db_key()
    with pytest.warns(ebooklet.ConsistencyWarning):
        create(lenient.connection(db_key), tmp_path, {"counter": "0"})
    workers = [Worker(name, lenient, db_key, tmp_path, None) for name in ("a", "b")]
    try:
        for worker in workers:
            worker.send("turns", n=4, name=worker.name, path=str(tmp_path / f"{worker.name}.blt"))
        for worker in workers:
            worker.ok(worker.receive())
    finally:
        for worker in workers:
            worker.stop()
    final = read_remote(lenient.connection(db_key), tmp_path)
    assert final["counter"] == "8"
    assert sorted(k for k in final if k != "counter") == sorted(f"{w}-{i}" for w in "ab" for i in range(4))


def test_killed_writer_leaves_the_last_commit_and_its_lock_expires(
    lenient: S3Target, tmp_path: Path
) -> None:
    """A writer SIGKILLed in the middle of a push, on a server whose conditional writes
    are ignored: readers see the whole previous commit; its lock blocks others until
    the lease runs out, then the next writer commits; nothing committed is lost."""
    db_key = _db_key()
    lease = 2.0
    with pytest.warns(ebooklet.ConsistencyWarning):
        create(lenient.connection(db_key), tmp_path, {f"k{i}": "old" for i in range(300)})
    writer = Worker("killed", lenient, db_key, tmp_path, lease)
    try:
        writer.call("open", path=str(tmp_path / "killed.blt"))
        writer.call("update", items={f"k{i}": "x" * 20_000 for i in range(300)})
        writer.send("push", announce=True)
        writer.expect("pushing")
        time.sleep(0.05)
        writer.kill()
    finally:
        writer.stop()
    seen = read_remote(lenient.public_url(db_key), tmp_path)
    assert set(seen.values()) in ({"old"}, {"x" * 20_000}), "a mix of two commits"
    mine = tmp_path / "mine.blt"
    with ebooklet.open(lenient.connection(db_key), mine, "w", lock_timeout=10 * lease) as db:
        db["new"] = "1"
        with pytest.warns(ebooklet.ConsistencyWarning):
            assert db.changes().push().committed
    after = read_remote(lenient.connection(db_key), tmp_path)
    assert after == {**seen, "new": "1"}
