"""A throw-away local S3 server for demos, tests and benchmarks.

:class:`LocalS3Server` runs `moto <https://github.com/getmoto/moto>`_'s
``moto_server`` (installed by the ``server``, ``demo`` and ``test`` extras:
``pip install "ebooklet-s3[server]"``) as a separate process on a free loopback
port, so that ebooklet talks to it over real HTTP exactly as it would to AWS,
Cloudflare R2, MinIO or any other S3-compatible store::

    from ebooklet.server import LocalS3Server

    with LocalS3Server() as server:
        server.create_bucket("demo")            # public-read by default
        conn = ebooklet.S3Connection(
            server.access_key_id, server.access_key, "my/db", "demo",
            endpoint_url=server.endpoint_url,
        )
        ...
        print(server.request_counts())          # Counter({'GET': 12, 'PUT': 5, ...})

Everything lives in the server's memory: stopping it loses every bucket.

This module uses only the standard library (and boto3, imported lazily by
:meth:`LocalS3Server.create_bucket` and :meth:`LocalS3Server.client`); it imports
no other ebooklet module. ``python -m ebooklet.server`` runs ``ebooklet serve`` (see
:mod:`ebooklet.cli`): a server in the foreground until Ctrl-C.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from . import serializers

__all__ = ["LocalS3Server", "find_free_port", "moto_server_command"]

#: Matches ANSI colour codes; werkzeug colours the access-log lines of non-2xx answers.
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

#: One werkzeug access-log line: ``127.0.0.1 - - [date] "GET /bkt/key HTTP/1.1" 200 -``.
_ACCESS_RE = re.compile(r'\] "([A-Z]+) (\S*) HTTP/[0-9.]+" (\d{3}) ')

#: Paths of moto's own control API, left out of :meth:`LocalS3Server.request_counts`.
_CONTROL_PREFIX = "/moto-api"


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    The port is found by binding a socket to port 0 and letting the kernel choose;
    another process could take it before the caller binds it, so callers retry
    on failure (as :meth:`LocalS3Server.start` does).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def moto_server_command() -> list[str]:
    """Return the command that starts ``moto_server`` with the current Python.

    In order of preference: the ``moto_server`` script next to :data:`sys.executable`
    (same virtual environment), ``python -m moto.server`` when moto is importable
    here, and a ``moto_server`` found on ``PATH``.

    Raises:
        RuntimeError: moto's server is not installed.
    """
    bindir = Path(sys.executable).parent
    for name in ("moto_server", "moto_server.exe"):
        script = bindir / name
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)]
    if importlib.util.find_spec("moto") is not None:
        return [sys.executable, "-m", "moto.server"]
    found = shutil.which("moto_server")
    if found:
        return [found]
    raise RuntimeError(
        f"moto_server was not found: install it with  pip install '{serializers.DISTRIBUTION}[server]'  "
        "(or  pip install 'moto[server]')"
    )


def wait_stopped(pid: int, timeout: float = 5.0) -> bool:
    """Wait until every thread of process ``pid`` is stopped (after a SIGSTOP, which a busy
    machine may take a few milliseconds to bring to all threads: a request sent at once
    could still be answered). Returns whether they are; ``True`` at once where
    ``/proc`` is missing (nothing to watch)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = [(task / "stat").read_text().rpartition(")")[2].split()[0] for task in tasks.iterdir()]
        except (OSError, IndexError):
            return False  # the process is gone
        if all(state in ("T", "t") for state in states):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


class LocalS3Server:
    """A local ``moto_server`` process speaking the S3 API on ``127.0.0.1``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        host: the loopback address to bind.
        port: the port to bind; ``None`` picks a free one (retrying if it is taken
            before the server binds it).
        log_path: where the server's stderr (werkzeug's access log, one line per
            request) is written. ``None`` uses a temporary directory that
            :meth:`stop` removes.
        startup_timeout: seconds to wait for the server to answer HTTP.
        command: the command that starts moto's server, without host and port
            arguments; ``None`` uses :func:`moto_server_command`.
        region: the region buckets are created in.

    Attributes:
        access_key_id, access_key: dummy credentials (moto accepts any).
        region: the region used by :meth:`client` and :meth:`create_bucket`.
    """

    access_key_id: str = "testing"
    access_key: str = "testing"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        command: Sequence[str] | None = None,
        region: str = "us-east-1",
    ) -> None:
        self.host = host
        self.region = region
        self.startup_timeout = float(startup_timeout)
        self._requested_port = port
        self._port: int | None = None
        self._command = list(command) if command is not None else None
        self._user_log_path = Path(log_path) if log_path is not None else None
        self._tmpdir: str | None = None
        self._log_path: Path | None = None
        self._log_file: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._count_offset = 0
        self._client: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalS3Server:
        """Start the server and wait until it answers HTTP.

        Returns:
            ``self``, so that ``server = LocalS3Server().start()`` works.

        Raises:
            RuntimeError: the server is already running, or did not answer within
                ``startup_timeout`` seconds (the message ends with its stderr).
        """
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already running")
        if self._user_log_path is not None:
            self._log_path = self._user_log_path
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="ebooklet-s3-")
            self._log_path = Path(self._tmpdir) / "moto_server.log"

        attempts = 1 if self._requested_port is not None else 3
        error: RuntimeError | None = None
        for _ in range(attempts):
            port = self._requested_port or find_free_port(self.host)
            try:
                self._launch(port)
                return self
            except RuntimeError as exc:
                error = exc
                self._terminate()
                # Only a lost race for the port is worth another try.
                if "address already in use" not in str(exc).lower():
                    break
        self._cleanup_files()
        assert error is not None
        raise error

    def _launch(self, port: int) -> None:
        """Start the process on ``port`` and wait for it, or raise RuntimeError."""
        assert self._log_path is not None
        command = self._command if self._command is not None else moto_server_command()
        argv = [*command, "-H", self.host, "-p", str(port)]
        env = dict(os.environ)
        env["MOTO_PORT"] = str(port)
        env["PYTHONUNBUFFERED"] = "1"
        self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._count_offset = self._log_path.stat().st_size
        self._port = port
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session: a Ctrl-C meant for the caller does not kill it mid-test.
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"moto_server exited with code {code} during startup "
                    f"({' '.join(argv)}).\n{self._stderr_tail()}"
                )
            if self._answers_http():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto_server did not answer on {self.endpoint_url} within "
                    f"{self.startup_timeout:g} s ({' '.join(argv)}).\n{self._stderr_tail()}"
                )
            time.sleep(0.05)
        # Count only the requests made after startup.
        self._count_offset = self._log_path.stat().st_size

    def _answers_http(self) -> bool:
        """True when the server answers any HTTP response on its port."""
        assert self._port is not None
        conn = http.client.HTTPConnection(self.host, self._port, timeout=2.0)
        try:
            conn.request("GET", f"{_CONTROL_PREFIX}/")
            conn.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _stderr_tail(self, max_chars: int = 4000) -> str:
        """The last ``max_chars`` characters the server wrote to its stderr."""
        if self._log_path is None or not self._log_path.exists():
            return "(no server output)"
        data = self._log_path.read_bytes()[-max_chars:]
        text = _ANSI_RE.sub("", data.decode("utf-8", "replace")).strip()
        return "server output:\n" + (text or "(empty)")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

        Removes the temporary log directory (unless ``log_path`` was given).
        Calling it on a server that is not running does nothing.
        """
        self._terminate(timeout)
        self._cleanup_files()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as in a crash; the log is kept.

        Call :meth:`stop` afterwards to clean up (the fixtures do).
        """
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang instead of failing (POSIX).
        Returns once every thread of it has stopped (see :func:`wait_stopped`)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)
            wait_stopped(self._proc.pid)

    def resume(self) -> None:
        """Let a server frozen by :meth:`pause` run again (SIGCONT)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # in case it was paused
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc is not None:
            proc.wait()  # reap a process that already exited
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._client = None

    def _cleanup_files(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._log_path = None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id, or ``None`` when not started."""
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort so that a forgotten server does not outlive the interpreter.
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = self.endpoint_url if self._port is not None else "no port yet"
        return f"<LocalS3Server {where} {state}>"

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        """The TCP port the server listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, e.g. ``http://127.0.0.1:43125``."""
        return f"http://{self.host}:{self.port}"

    def public_url(self, bucket: str, key: str = "") -> str:
        """The anonymous (path-style) URL of ``key`` in ``bucket``."""
        url = f"{self.endpoint_url}/{bucket}"
        return f"{url}/{key}" if key else url

    @property
    def log_path(self) -> Path:
        """The file receiving the server's stderr (werkzeug's access log)."""
        if self._log_path is None:
            raise RuntimeError("the server has not been started (or its log was removed)")
        return self._log_path

    # ------------------------------------------------------------------ S3 helpers

    def client(self) -> Any:
        """A boto3 S3 client for this server (cached until :meth:`stop`).

        Path-style addressing, the dummy credentials and the ``when_required``
        checksum settings (botocore >= 1.36 otherwise adds CRC checksums that some
        S3-compatible servers reject).
        """
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.access_key,
                region_name=self.region,
                config=Config(
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 2, "mode": "standard"},
                ),
            )
        return self._client

    def create_bucket(self, name: str, public: bool = True) -> None:
        """Create bucket ``name``; when ``public``, let anyone GET its objects.

        A public bucket gets a bucket policy allowing anonymous ``s3:GetObject`` on
        ``arn:aws:s3:::NAME/*`` (not listing, and not ``HEAD``: moto answers an
        anonymous HEAD with 403 even then, unlike AWS).
        """
        client = self.client()
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        client.create_bucket(**kwargs)
        if public:
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Sid": "PublicRead",
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::{name}/*",
                    }
                ],
            }
            client.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))

    def reset(self) -> None:
        """Delete every bucket and object (moto's ``POST /moto-api/reset``)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10.0)
        try:
            conn.request("POST", f"{_CONTROL_PREFIX}/reset")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"moto reset failed: HTTP {resp.status}")
        finally:
            conn.close()

    # ------------------------------------------------------------------ request log

    def iter_requests(self) -> list[tuple[str, str, int]]:
        """The requests logged since startup or :meth:`reset_request_counts`.

        Returns:
            ``(method, path, status)`` tuples in arrival order; requests to moto's
            control API (``/moto-api/...``) are left out.

        werkzeug writes a request's log line before it sends the response, so a
        request whose response the caller has received is always counted.
        """
        with open(self.log_path, "rb") as f:
            f.seek(self._count_offset)
            data = f.read()
        requests = []
        for line in data.decode("utf-8", "replace").splitlines():
            m = _ACCESS_RE.search(_ANSI_RE.sub("", line))
            if m is None or m.group(2).startswith(_CONTROL_PREFIX):
                continue
            requests.append((m.group(1), m.group(2), int(m.group(3))))
        return requests

    def request_counts(self) -> collections.Counter[str]:
        """The number of requests by HTTP method since startup or the last reset.

        Parsed from the access log (see :attr:`log_path`); e.g.
        ``Counter({'GET': 3, 'PUT': 2})``.
        """
        return collections.Counter(method for method, _, _ in self.iter_requests())

    def reset_request_counts(self) -> None:
        """Start counting requests afresh from now."""
        self._count_offset = self.log_path.stat().st_size


if __name__ == "__main__":  # python -m ebooklet.server: the same as ``ebooklet serve``
    from ebooklet.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
