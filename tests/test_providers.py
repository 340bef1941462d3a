"""Behaviour that differs between S3 servers, checked on whichever the suite runs against
(moto by default, SeaweedFS in CI's second run, any endpoint given by the
``EBOOKLET_TEST_*`` variables), and the lock-only fallback on a server that ignores
conditional writes (s3rver, see ``lenient_server``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import ebooklet
from conftest import S3Target, folder_blocks_create
from ebooklet import RemoteError


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
