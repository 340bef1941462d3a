"""What ebooklet logs: one DEBUG line per HTTP answer and an INFO line per retry, on the
``ebooklet`` loggers, never a credential."""

from __future__ import annotations

import http.server
import logging
import threading

import pytest

import ebooklet


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("ebooklet")]


def test_each_answer_is_a_debug_line_without_credentials(s3_server, make_conn, tmp_path, caplog):
    conn = make_conn()
    with caplog.at_level(logging.DEBUG, logger="ebooklet"):
        with ebooklet.open(conn, tmp_path / "a.blt", "n") as db:
            db["k"] = b"v" * 1000
            db.changes().push()
        with ebooklet.open(make_conn(), tmp_path / "b.blt", "r") as db:
            assert db["k"] == b"v" * 1000
    lines = _messages(caplog)
    puts = [line for line in lines if line.startswith("PUT ") and "-> 200" in line]
    assert puts and any("B up" in line for line in puts)
    assert any(line.startswith("GET ") and "-> 200" in line for line in lines)
    assert any(line.startswith("pushed 1 key(s), deleted 0, 1000 bytes") for line in lines)
    secrets = [s for s in (s3_server.access_key, s3_server.access_key_id) if s]
    joined = "\n".join(lines)
    assert not [s for s in secrets if s in joined]
    assert "Signature" not in joined and "Authorization" not in joined and "X-Amz-Credential" not in joined


class _Busy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"<Error><Code>SlowDown</Code></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_retries_are_info_lines(tmp_path, caplog):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/bucket/db"
    try:
        with caplog.at_level(logging.INFO, logger="ebooklet"), pytest.raises(ebooklet.EBookletError):
            ebooklet.open(ebooklet.S3Connection(db_url=url, retries=2), tmp_path / "a.blt", "r")
    finally:
        server.shutdown()
        server.server_close()
    retries = [line for line in _messages(caplog) if line.startswith("retrying GET")]
    assert len(retries) == 2 and all("after status 503" in line for line in retries)
