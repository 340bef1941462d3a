"""The ``ebooklet`` command line, run as a user runs it: the installed console script
(and ``python -m ebooklet``) in subprocesses, against the real moto_server, with
credentials only in the subprocess's AWS environment variables.

Each subcommand's happy path, then bad input and its exit code (see ebooklet.cli).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ebooklet
from conftest import LOCAL_REGION, S3Target
from ebooklet import cli
from ebooklet.server import LocalS3Server, find_free_port

SCRIPT = Path(sys.executable).parent / ("ebooklet.exe" if os.name == "nt" else "ebooklet")
"""The console script installed next to this Python (``pip install -e .`` makes it)."""
SRC = Path(__file__).resolve().parent.parent / "src"
VALUES = {"a/1": {"n": 1}, "a/2": {"n": 2}, "b": "text", "c": [1, 2, 3]}

needs_script = pytest.mark.skipif(
    not SCRIPT.exists(), reason=f"no console script at {SCRIPT}: pip install -e ."
)


# --------------------------------------------------------------------------- helpers


def base_env(tmp_path: Path) -> dict[str, str]:
    """The subprocess environment: no AWS settings of this machine, a cache dir of the
    test's own, and this checkout's source first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "EBOOKLET_"))}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata probe for credentials
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        EBOOKLET_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])]),
    )
    return env


def with_keys(env: dict[str, str], target: S3Target) -> dict[str, str]:
    """``env`` with the target's credentials and region in the AWS variables."""
    return {
        **env,
        "AWS_ACCESS_KEY_ID": target.access_key_id,
        "AWS_SECRET_ACCESS_KEY": target.access_key,
        "AWS_REGION": target.region or "us-east-1",
    }


class Runner:
    """``run(*args, code=0)`` runs the CLI and checks its exit code; ``.env`` is its
    environment and ``.cli`` the command (the console script, or ``python -m ebooklet``)."""

    def __init__(self, cli_command: list[str], env: dict[str, str], target: S3Target):
        self.cli = cli_command
        self.env = env
        self.target = target

    def __call__(self, *args: str, code: int = 0, env: dict[str, str] | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*self.cli, *args], env=env or self.env, capture_output=True, timeout=timeout,
        )
        assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
        if code not in (0, 2) and "--debug" not in args:  # an error: one line (and maybe a hint), no traceback
            err = proc.stderr.decode()
            assert err.startswith("ebooklet: error: ") and "Traceback" not in err, err
        return proc

    def s3(self, db_key: str) -> list[str]:
        """The arguments naming ``db_key`` as an s3:// target."""
        return [f"s3://{self.target.bucket}/{db_key}", "--endpoint", str(self.target.endpoint_url)]


@pytest.fixture(params=["script", "module"])
def run(request: pytest.FixtureRequest, s3_server: S3Target, tmp_path: Path) -> Runner:
    """A :class:`Runner` for the console script, then for ``python -m ebooklet``."""
    if request.param == "script":
        if not SCRIPT.exists():
            pytest.skip(f"no console script at {SCRIPT}: pip install -e .")
        command = [str(SCRIPT)]
    else:
        command = [sys.executable, "-m", "ebooklet"]
    return Runner(command, with_keys(base_env(tmp_path), s3_server), s3_server)


@pytest.fixture
def script(s3_server: S3Target, tmp_path: Path) -> Runner:
    """A :class:`Runner` for the console script alone."""
    if not SCRIPT.exists():
        pytest.skip(f"no console script at {SCRIPT}: pip install -e .")
    return Runner([str(SCRIPT)], with_keys(base_env(tmp_path), s3_server), s3_server)


def seed(conn: Any, path: Path, serializer: str | None = "orjson") -> None:
    """Two commits: VALUES, then ``a/2`` modified and ``c`` deleted."""
    with ebooklet.open(conn, path, "n", value_serializer=serializer) as db:
        db.update(VALUES)
        db.changes().push(message="first")
        db["a/2"] = {"n": 20}
        del db["c"]
        db.changes().push(message="second")


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stdout.decode().splitlines()


# --------------------------------------------------------------------------- happy paths


def test_help_and_version(run: Runner) -> None:
    assert lines(run("--version")) == [f"ebooklet {ebooklet.__version__}"]
    text = run("--help").stdout.decode()
    for command in ("ls", "get", "info", "log", "diff", "status", "push", "pull", "check",
                    "vacuum", "copy", "break-lock", "serve", "revert"):
        assert f"    {command}" in text
    assert "exit codes" in text and "AWS_ACCESS_KEY_ID" in text
    run("nosuchcommand", code=cli.EXIT_USAGE)


def test_python_m_ebooklet_runs_commands(
    run: Runner, conn: Any, db_key: str, tmp_path: Path
) -> None:
    seed(conn, tmp_path / "w")
    assert sorted(lines(run("ls", *run.s3(db_key)))) == ["a/1", "a/2", "b"]


def test_read_commands(script: Runner, conn: Any, db_key: str, tmp_path: Path) -> None:
    seed(conn, tmp_path / "w")
    target = script.s3(db_key)
    info = json.loads(script("info", *target, "--json").stdout)
    assert (info["seq"], info["keys"], info["value_serializer"]) == (2, 3, "orjson")
    assert info["key_serializer"] == "str" and len(info["uuid"]) == 32
    assert "not made yet" in info["local_copy"]
    assert sorted(lines(script("ls", *target))) == ["a/1", "a/2", "b"]
    long = lines(script("ls", *target, "--long", "--prefix", "a/"))
    assert sorted(line.split("\t")[2] for line in long) == ["a/1", "a/2"]
    assert all(line.split("\t")[0].endswith("Z") for line in long)
    assert all(int(line.split("\t")[1]) > 0 for line in long)  # the size, from the index
    assert lines(script("get", *target, "a/2")) == ['{"n": 20}']
    assert lines(script("get", *target, "b")) == ["text"]
    out = tmp_path / "out.json"
    script("get", *target, "a/1", "-o", str(out))
    assert json.loads(out.read_text()) == {"n": 1}
    log = [json.loads(line) for line in lines(script("log", *target, "--json"))]
    assert [(c["seq"], c["message"]) for c in log] == [(2, "second"), (1, "first")]
    assert lines(script("log", *target, "-n", "1"))[0].startswith("2\t")
    assert sorted(lines(script("diff", *target, "1", "2"))) == ["deleted\tc", "modified\ta/2"]
    assert lines(script("diff", *target, log[1]["commit_id"])) == lines(script("diff", *target, "1"))
    check = json.loads(script("check", *target, "--json").stdout)
    assert check["ok"] and check["values_checked"] == 3
    # the default local copy went under EBOOKLET_CACHE_DIR, named by target.txt
    (copy,) = (tmp_path / "cache").glob("*/db.blt")
    assert db_key in (copy.parent / "target.txt").read_text()


def test_public_url_reads_bytes_raw_without_credentials(
    script: Runner, make_conn: Callable[..., Any], db_key: str, public_url: str, tmp_path: Path
) -> None:
    raw = bytes(range(256)) * 3
    with ebooklet.open(make_conn(), tmp_path / "w", "n") as db:  # bytes values
        db["blob"] = raw
        db.changes().push()
    anonymous = base_env(tmp_path)
    assert script("get", public_url, "blob", env=anonymous).stdout == raw
    assert lines(script("ls", public_url, env=anonymous)) == ["blob"]
    assert json.loads(script("info", public_url, "--json", env=anonymous).stdout)["keys"] == 1


def test_status_push_pull(script: Runner, conn: Any, db_key: str, tmp_path: Path) -> None:
    seed(conn, tmp_path / "w")
    target = script.s3(db_key)
    mine = str(tmp_path / "mine")
    with ebooklet.open(conn, mine, "w") as db:
        db["b"] = "edited"
        db["new"] = {"n": 9}
        del db["a/1"]
    status = sorted(lines(script("status", *target, "--path", mine)))
    assert status == ["added\tnew", "deleted\ta/1", "modified\tb"]
    assert json.loads(lines(script("status", *target, "--path", mine, "--json"))[0])["kind"]
    assert script("get", *target, "b").stdout == b"text\n"  # cached in the default copy
    pushed = lines(script("push", *target, "--path", mine, "-m", "from the shell"))
    assert pushed[0].startswith("pushed 2 key(s), deleted 1") and "commit 3" in pushed[0]
    assert lines(script("status", *target, "--path", mine)) == []
    assert b"nothing to push" in script("push", *target, "--path", mine).stderr
    assert lines(script("log", *target, "-n", "1"))[0].endswith("\tfrom the shell")
    assert lines(script("pull", *target)) == ["downloaded 1 value(s)"]  # b changed remotely
    assert script("get", *target, "b").stdout == b"edited\n"
    assert lines(script("pull", *target, "--all")) == ["downloaded 2 value(s)"]
    reverted = lines(script("revert", *target, "--path", mine, "2"))
    assert reverted[0].startswith("restored 2 key(s), deleted 1") and "commit 4" in reverted[0]
    assert script("get", *target, "b").stdout == b"text\n"
    assert lines(script("log", *target, "-n", "1"))[0].endswith("\trevert to 2")


def test_conflict_then_force(script: Runner, conn: Any, db_key: str, tmp_path: Path) -> None:
    seed(conn, tmp_path / "w")
    target = script.s3(db_key)
    mine = str(tmp_path / "mine")
    with ebooklet.open(conn, mine, "w") as db:
        db["b"] = "mine"
    with ebooklet.open(conn, tmp_path / "theirs", "w") as db:
        db["b"] = "theirs"
        db.changes().push()
    proc = script("push", *target, "--path", mine, code=cli.EXIT_CONFLICT)
    assert b"'b'" in proc.stderr and b"push --force" in proc.stderr
    script("push", *target, "--path", mine, "--force", "b")
    assert script("get", *target, "b").stdout == b"mine\n"


def test_locked_then_break_lock(script: Runner, conn: Any, db_key: str, tmp_path: Path) -> None:
    seed(conn, tmp_path / "w")
    target = script.s3(db_key)
    with ebooklet.open(conn, tmp_path / "holder", "w") as db:
        db["b"] = "held"
        proc = script("push", *target, "--path", str(tmp_path / "other"), code=cli.EXIT_LOCKED)
        assert b"break-lock" in proc.stderr
        broken = json.loads(script("break-lock", *target, "--json").stdout)
        assert broken["pid"] == os.getpid()
        assert b"no lock" in script("break-lock", *target).stderr


def test_vacuum_and_copy(
    script: Runner, conn: Any, db_key: str, tmp_path: Path
) -> None:
    seed(conn, tmp_path / "w")
    target = script.s3(db_key)
    result = json.loads(script("vacuum", *target, "--keep", "1", "--json").stdout)
    assert result["commits_kept"] == [2] and result["commits_removed"] == [1]
    assert [line.split("\t")[0] for line in lines(script("log", *target))] == ["2"]
    dest = f"s3://{script.target.bucket}/{db_key}-copy"
    copied = json.loads(script("copy", *target, dest, "--json").stdout)
    assert copied["seq"] == 1
    proc = script("copy", *target, dest, code=cli.EXIT_CONFLICT)
    assert b"overwrite" in proc.stderr
    script("copy", *target, dest, "--overwrite")
    dest_args = [dest, "--endpoint", str(script.target.endpoint_url)]
    assert sorted(lines(script("ls", *dest_args))) == ["a/1", "a/2", "b"]
    script("vacuum", *target, "--keep", "0", code=cli.EXIT_USAGE)


# --------------------------------------------------------------------------- bad input


def test_untrusted_serializer_needs_the_flag(
    script: Runner, conn: Any, db_key: str, tmp_path: Path
) -> None:
    with ebooklet.open(conn, tmp_path / "w", "n", value_serializer="pickle") as db:
        db["s"] = {1, 2}
        db.changes().push()
    target = script.s3(db_key)
    proc = script("get", *target, "s", code=cli.EXIT_SERIALIZER)
    assert b"--trust-serializers" in proc.stderr
    assert lines(script("get", *target, "s", "--trust-serializers")) == ["{1, 2}"]


def test_bad_targets_and_missing_things(
    script: Runner, conn: Any, db_key: str, public_url: str, tmp_path: Path
) -> None:
    seed(conn, tmp_path / "w")
    target = script.s3(db_key)
    for bad in ("ftp://host/x", "s3://bucket-only", "http://", "plain-word"):
        assert b"not a" in script("ls", bad, code=cli.EXIT_USAGE).stderr
    script("ls", *script.s3(f"{db_key}-absent"), code=cli.EXIT_NOT_FOUND)
    proc = script("get", *target, "no-such-key", code=cli.EXIT_NOT_FOUND)
    assert proc.stderr.decode().splitlines()[0] == "ebooklet: error: not found: key 'no-such-key'"
    script("diff", *target, "99", code=cli.EXIT_NOT_FOUND)
    script("push", public_url, code=cli.EXIT_AUTH)  # a public URL is read-only
    anonymous = base_env(tmp_path)
    proc = script("push", *target, env=anonymous, code=cli.EXIT_AUTH)
    assert b"AWS_ACCESS_KEY_ID" in proc.stderr  # the hint names the variables
    proc = script("get", *target, "no-such-key", "--debug", code=cli.EXIT_NOT_FOUND)
    assert b"Traceback" in proc.stderr


def test_unreachable_and_hanging_endpoints_are_offline(script: Runner, tmp_path: Path) -> None:
    dead = ["s3://bucket/db", "--endpoint", f"http://127.0.0.1:{find_free_port()}"]
    script("ls", *dead, "--retries", "0", "--timeout", "2", code=cli.EXIT_OFFLINE)
    with socket.socket() as hanging:  # takes connections (the backlog), never answers
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(16)
        endpoint = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        start = time.monotonic()
        script("ls", "s3://bucket/db", "--endpoint", endpoint, "--timeout", "1",
               code=cli.EXIT_OFFLINE)
        script("info", "s3://bucket/db", "--endpoint", endpoint, "--timeout", "1",
               "--retries", "0", code=cli.EXIT_OFFLINE)
        assert time.monotonic() - start < 12


@needs_script
def test_offline_with_a_local_copy_needs_the_flag(
    fresh_server: S3Target, tmp_path: Path
) -> None:
    run = Runner([str(SCRIPT)], with_keys(base_env(tmp_path), fresh_server), fresh_server)
    seed(fresh_server.connection("db"), tmp_path / "w")
    target = [*run.s3("db"), "--timeout", "1", "--retries", "0"]
    assert run("get", *target, "b").stdout == b"text\n"
    assert fresh_server.server is not None
    fresh_server.server.kill()
    proc = run("ls", *target, code=cli.EXIT_OFFLINE)
    assert b"--offline" in proc.stderr
    proc = run("get", *target, "b", "--offline")
    assert proc.stdout == b"text\n" and b"ebooklet: warning:" in proc.stderr


@pytest.fixture(scope="module")
def auth_server() -> Iterator[S3Target]:
    """A private moto_server that checks signatures: an IAM user allowed ``s3:*`` (by
    default moto accepts any key)."""
    import boto3

    with LocalS3Server(region=LOCAL_REGION) as server:
        server.create_bucket("auth", public=False)
        iam = boto3.client(
            "iam", endpoint_url=server.endpoint_url, region_name=LOCAL_REGION,
            aws_access_key_id=server.access_key_id, aws_secret_access_key=server.access_key,
        )
        iam.create_user(UserName="cli")
        iam.put_user_policy(UserName="cli", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }))
        key = iam.create_access_key(UserName="cli")["AccessKey"]
        http_conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        http_conn.request("POST", "/moto-api/reset-auth", body=b"0")
        assert http_conn.getresponse().status == 200
        http_conn.close()
        yield S3Target(
            endpoint_url=server.endpoint_url, access_key_id=key["AccessKeyId"],
            access_key=key["SecretAccessKey"], bucket="auth", region=LOCAL_REGION,
            public_base_url=None, is_local=True, server=server,
        )


@needs_script
def test_wrong_credentials_are_the_auth_code(
    auth_server: S3Target, db_key: str, tmp_path: Path
) -> None:
    seed(auth_server.connection(db_key), tmp_path / "w")
    run = Runner([str(SCRIPT)], with_keys(base_env(tmp_path), auth_server), auth_server)
    assert sorted(lines(run("ls", *run.s3(db_key)))) == ["a/1", "a/2", "b"]
    wrong = {**run.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = run("ls", *run.s3(db_key), "--path", str(tmp_path / "x"), env=wrong,
               code=cli.EXIT_AUTH)
    assert b"not-the-secret" not in proc.stderr
    run("check", *run.s3(db_key), env=wrong, code=cli.EXIT_AUTH)


# --------------------------------------------------------------------------- serve


@needs_script
def test_serve_prints_an_endpoint_that_works_and_stops_on_sigint(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    port = find_free_port()
    proc = subprocess.Popen(
        [str(SCRIPT), "serve", "--port", str(port), "--bucket", "play"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        banner = []
        while not banner or not banner[-1].startswith("everything is kept in memory"):
            line = proc.stdout.readline() if proc.stdout else ""
            assert line, (banner, proc.stderr.read() if proc.stderr else "")
            banner.append(line.rstrip("\n"))
        endpoint = banner[0].removeprefix("endpoint: ")
        assert endpoint == f"http://127.0.0.1:{port}"
        (export,) = [line.strip() for line in banner if line.strip().startswith("export ")]
        served = dict(item.split("=", 1) for item in export.removeprefix("export ").split())
        assert served["AWS_ENDPOINT_URL"] == endpoint
        conn = ebooklet.S3Connection(served["AWS_ACCESS_KEY_ID"], served["AWS_SECRET_ACCESS_KEY"],
                                     "my/db", "play", endpoint_url=endpoint)
        with ebooklet.open(conn, tmp_path / "w", "n", value_serializer="orjson") as db:
            db["x"] = 1
            db.changes().push()
        info = subprocess.run([str(SCRIPT), "info", "s3://play/my/db", "--json"],
                              env={**env, **served}, capture_output=True, timeout=60)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["keys"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "stopping" in (proc.stderr.read() if proc.stderr else "")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
