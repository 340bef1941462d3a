"""Tests of ebooklet.server.LocalS3Server and of the conftest fixtures built on it."""

from __future__ import annotations

import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import urllib3

from ebooklet.server import LocalS3Server, find_free_port, moto_server_command


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def server() -> Iterator[LocalS3Server]:
    with LocalS3Server() as srv:
        srv.create_bucket("pub", public=True)
        srv.create_bucket("priv", public=False)
        yield srv


@pytest.fixture(scope="module")
def http() -> urllib3.PoolManager:
    return urllib3.PoolManager(retries=False, timeout=10.0)


def test_find_free_port_and_command() -> None:
    port = find_free_port()
    assert 0 < port < 65536
    assert port_is_free(port)
    assert moto_server_command()


def test_start_answers_and_stop_frees_port(http: urllib3.PoolManager) -> None:
    srv = LocalS3Server()
    with pytest.raises(RuntimeError):
        _ = srv.endpoint_url  # no port before start
    srv.start()
    try:
        assert srv.running and srv.pid
        assert srv.endpoint_url == f"http://127.0.0.1:{srv.port}"
        assert "running" in repr(srv)
        assert not port_is_free(srv.port)
        resp = http.request("GET", srv.endpoint_url + "/")  # ListBuckets answers
        assert resp.status == 200
        log_path = srv.log_path
        assert log_path.exists()
        with pytest.raises(RuntimeError, match="already running"):
            srv.start()
    finally:
        srv.stop()
    assert not srv.running
    assert port_is_free(srv.port)
    assert not log_path.exists()  # the temporary log directory is removed
    srv.stop()  # stopping twice is harmless


def test_public_bucket_is_readable_anonymously(
    server: LocalS3Server, http: urllib3.PoolManager
) -> None:
    client = server.client()
    client.put_object(Bucket="pub", Key="dir/obj", Body=b"hello")
    client.put_object(Bucket="priv", Key="dir/obj", Body=b"secret")

    resp = http.request("GET", server.public_url("pub", "dir/obj"))
    assert resp.status == 200
    assert resp.data == b"hello"
    ranged = http.request(
        "GET", server.public_url("pub", "dir/obj"), headers={"Range": "bytes=1-3"}
    )
    assert ranged.status == 206
    assert ranged.data == b"ell"

    # A private bucket refuses anonymous reads.
    assert http.request("GET", server.public_url("priv", "dir/obj")).status == 403
    # A missing key in a public bucket: moto says 404 (AWS may say 403 without ListBucket).
    assert http.request("GET", server.public_url("pub", "missing")).status in (403, 404)


def test_anonymous_head_is_refused_by_moto(
    server: LocalS3Server, http: urllib3.PoolManager
) -> None:
    # The quirk DESIGN.md relies on: public readers must use GET, never HEAD.
    server.client().put_object(Bucket="pub", Key="head-me", Body=b"x")
    assert http.request("HEAD", server.public_url("pub", "head-me")).status == 403


def test_request_counts(server: LocalS3Server, http: urllib3.PoolManager) -> None:
    client = server.client()
    server.reset_request_counts()
    assert server.request_counts() == Counter()
    client.put_object(Bucket="pub", Key="c1", Body=b"1")
    client.put_object(Bucket="pub", Key="c2", Body=b"2")
    client.get_object(Bucket="pub", Key="c1")["Body"].read()
    http.request("GET", server.public_url("pub", "c2"))
    http.request("GET", server.public_url("priv", "nope"))  # non-2xx lines count too
    client.delete_object(Bucket="pub", Key="c1")
    assert server.request_counts() == Counter({"PUT": 2, "GET": 3, "DELETE": 1})
    requests = server.iter_requests()
    assert requests[0] == ("PUT", "/pub/c1", 200)
    assert ("GET", "/priv/nope", 403) in requests or ("GET", "/priv/nope", 404) in requests
    server.reset_request_counts()
    assert server.request_counts() == Counter()


def test_explicit_log_path_is_kept(tmp_path) -> None:
    log = tmp_path / "logs" / "moto.log"
    with LocalS3Server(log_path=log) as srv:
        srv.create_bucket("bkt", public=False)
        assert srv.log_path == log
        assert srv.request_counts()["PUT"] == 1
    assert log.exists()
    assert '"PUT /bkt HTTP/1.1" 200' in log.read_text()


def test_kill_pause_resume(http: urllib3.PoolManager) -> None:
    with LocalS3Server() as srv:
        url = srv.endpoint_url + "/"
        srv.pause()
        with pytest.raises(urllib3.exceptions.HTTPError):
            http.request("GET", url, timeout=urllib3.Timeout(connect=2.0, read=0.5))
        srv.resume()
        assert http.request("GET", url).status == 200
        srv.kill()
        assert not srv.running
        with pytest.raises(urllib3.exceptions.HTTPError):
            http.request("GET", url, timeout=2.0)
    assert port_is_free(srv.port)


def test_reset_deletes_everything() -> None:
    with LocalS3Server() as srv:
        srv.create_bucket("gone")
        assert [b["Name"] for b in srv.client().list_buckets()["Buckets"]] == ["gone"]
        srv.reset()
        assert srv.client().list_buckets()["Buckets"] == []


def test_startup_failure_reports_stderr() -> None:
    command = [sys.executable, "-c", "import sys; sys.stderr.write('boom-xyz\\n'); sys.exit(3)"]
    srv = LocalS3Server(command=command)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*boom-xyz"):
        srv.start()
    assert not srv.running


def test_startup_timeout_reports_stderr() -> None:
    command = [
        sys.executable,
        "-c",
        "import sys, time; print('still-warming-up', file=sys.stderr, flush=True); time.sleep(60)",
    ]
    srv = LocalS3Server(command=command, startup_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)did not answer.*still-warming-up"):
        srv.start()
    assert time.monotonic() - t0 < 15
    assert not srv.running


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        srv = LocalS3Server(port=port)
        with pytest.raises(RuntimeError, match="(?i)in use"):
            srv.start()
        assert not srv.running


# ------------------------------------------------------------ the conftest fixtures


def test_s3_server_fixture_public_read(s3_server, boto3_client, db_key, http) -> None:
    boto3_client.put_object(Bucket=s3_server.bucket, Key=db_key, Body=b"manifest?")
    got = boto3_client.get_object(Bucket=s3_server.bucket, Key=db_key)["Body"].read()
    assert got == b"manifest?"
    url = s3_server.public_url(db_key)
    if url is None:
        pytest.skip("the S3 target has no public URL")
    resp = http.request("GET", url)
    assert resp.status == 200
    assert resp.data == b"manifest?"


def test_db_key_is_unique_per_test(db_key, request) -> None:
    assert db_key.startswith("tests/test_db_key_is_unique_per_test-")
    assert db_key.endswith("/db")
    assert len(db_key.split("/")[1].rsplit("-", 1)[1]) == 8


def test_fresh_server_can_be_killed(fresh_server, http) -> None:
    assert fresh_server.server is not None
    client = fresh_server.client()
    client.put_object(Bucket=fresh_server.bucket, Key="k", Body=b"v")
    assert http.request("GET", fresh_server.public_url("k")).data == b"v"
    fresh_server.server.kill()
    assert not fresh_server.server.running
