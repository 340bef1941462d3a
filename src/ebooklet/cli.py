"""The ``ebooklet`` command line: look at, sync and manage remote databases from a shell.

Run ``ebooklet --help`` (or ``python -m ebooklet --help``) for the subcommands, and
``ebooklet COMMAND --help`` for each one's options. Built on the public API only
(``ebooklet.open``, ``ebooklet.check``, ``ebooklet.break_lock``, ``db.changes()``...).

A TARGET is a database's public URL (``https://host/bucket/db_key``, read-only, no
credentials) or ``s3://bucket/db_key`` (signed requests; ``--endpoint URL`` for a store
other than AWS, else ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL``). Credentials come
only from the standard AWS chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``), ``AWS_PROFILE``, the config and credentials files, SSO,
roles; never from the command line.

The local copy of a target lives at ``--path FILE``, by default
``<cache>/ebooklet/<hash>/db.blt``: ``<cache>`` is ``$EBOOKLET_CACHE_DIR`` when set, else
``$XDG_CACHE_HOME`` or ``~/.cache`` (Linux), ``~/Library/Caches`` (macOS),
``%LOCALAPPDATA%`` (Windows); ``<hash>`` is derived from the target (scheme, endpoint,
bucket and key, or URL), and ``target.txt`` beside the file names it.

Exit codes:

====  ================================================================================
0     success
1     any other error
2     usage: a bad argument, option or target
3     not found: no database at the target, no such key or commit
4     conflict: keys changed locally and remotely, a lost commit, a copy target in use
5     locked: another writer holds the remote write lock
6     offline: the remote cannot be reached (or answered nothing in ``--timeout``)
7     auth: credentials missing or refused, or a write through a read-only target
8     integrity: a damaged or too-new object or file, or ``check`` found problems
9     serializer: a value or key its serializer cannot handle, or one not trusted
130   interrupted (Ctrl-C)
====  ================================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import ebooklet
from ebooklet.format import utc_datetime

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_LOCKED = 5
EXIT_OFFLINE = 6
EXIT_AUTH = 7
EXIT_INTEGRITY = 8
EXIT_SERIALIZER = 9
EXIT_INTERRUPTED = 130

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (ebooklet.LockedError, EXIT_LOCKED),
    (ebooklet.ConflictError, EXIT_CONFLICT),
    (ebooklet.RemoteExistsError, EXIT_CONFLICT),
    (ebooklet.RemoteNotFoundError, EXIT_NOT_FOUND),
    (KeyError, EXIT_NOT_FOUND),
    (ebooklet.OfflineError, EXIT_OFFLINE),
    (ebooklet.AuthError, EXIT_AUTH),
    (ebooklet.UntrustedEndpointError, EXIT_AUTH),
    (ebooklet.ReadOnlyError, EXIT_AUTH),
    (ebooklet.IntegrityError, EXIT_INTEGRITY),
    (ebooklet.FormatVersionError, EXIT_INTEGRITY),
    (ebooklet.SerializationError, EXIT_SERIALIZER),
    (ebooklet.EBookletError, EXIT_ERROR),
    (ValueError, EXIT_USAGE),
    (TypeError, EXIT_USAGE),
]
"""Exception type -> exit code, the first match winning (subclasses come first)."""

HINTS: list[tuple[type[BaseException], str]] = [
    (ebooklet.UntrustedSerializerError, "pass --trust-serializers if you trust this database"),
    (ebooklet.ConflictError, "keep the local values with 'ebooklet push --force KEY...', "
     "or the remote ones with 'ebooklet pull --force KEY...'"),
    (ebooklet.LockedError, "wait, or remove a stale lock with 'ebooklet break-lock TARGET'"),
    (ebooklet.AuthError, "credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
     "AWS_PROFILE or the AWS config files; a public database reads by its https:// URL"),
    (ebooklet.ReadOnlyError, "writing needs an s3://bucket/db_key target and credentials"),
]
"""Exception type -> a one-line hint in command-line terms, printed after the message."""

CACHE_ENV = "EBOOKLET_CACHE_DIR"
"""Environment variable overriding the directory of default local copies."""
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Environment variables read, in order, when ``--endpoint`` is not given."""
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
"""Environment variables read, in order, when ``--region`` is not given."""
DEBUG_LOGGERS = ("ebooklet", "urllib3")
"""The loggers ``--debug`` turns to DEBUG: ebooklet's own and its requests (urllib3's)."""
LOCAL_NAME = "db.blt"
"""The file name of a default local copy, in its target's directory."""
OFFLINE_PREFIX = "Working offline from local files: "
"""Dropped from the library's ``OfflineWarning`` when the command refuses to work offline."""

EPILOG = """\
targets:
  https://host/bucket/db_key   a database's public URL (read-only, no credentials)
  s3://bucket/db_key           signed requests; --endpoint URL for a store other than AWS
                               (default $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)

credentials: only the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  AWS_SESSION_TOKEN, AWS_PROFILE, the AWS config files, SSO, roles); never arguments.

local copy: --path FILE, else <cache>/ebooklet/<hash of the target>/db.blt, <cache> being
  $EBOOKLET_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache (Linux), ~/Library/Caches (macOS),
  %LOCALAPPDATA% (Windows).

exit codes:
  0 ok  1 error  2 usage  3 not found  4 conflict  5 locked  6 offline/unreachable
  7 auth (credentials missing or refused, read-only target)  8 integrity  9 serializer
  130 interrupted
"""


class UsageError(Exception):
    """A bad argument the parser could not catch (exit code 2)."""


# ---------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a database lives, as parsed from the command line.

    Attributes:
        url: the public URL (read-only), or ``None`` for an ``s3://`` target.
        bucket, db_key: the ``s3://`` target's bucket and key.
        endpoint: the S3 endpoint (``None``: AWS).
        region: the signing region (``None``: the connection's default).
    """

    url: str | None
    bucket: str | None = None
    db_key: str | None = None
    endpoint: str | None = None
    region: str | None = None

    @property
    def identity(self) -> str:
        """A string naming the database, from which the default local path is derived."""
        if self.url is not None:
            return self.url
        return f"s3://{self.bucket}/{self.db_key} at {self.endpoint or 'AWS'}"

    def connection(self, timeout: float | None = None, retries: int | None = None,
                   ) -> ebooklet.S3Connection:
        """An ``S3Connection`` to the target (credentials from the AWS chain at first use);
        ``timeout`` and ``retries`` as in ``S3Connection`` (``None``: its defaults)."""
        params: dict[str, Any] = {}
        if timeout is not None:
            params.update(timeout=timeout, connect_timeout=min(timeout, 3.0))
        if retries is not None:
            params.update(retries=retries)
        if self.url is not None:
            return ebooklet.S3Connection(db_url=self.url, **params)
        return ebooklet.S3Connection(
            db_key=self.db_key, bucket=self.bucket, endpoint_url=self.endpoint,
            region=self.region, **params,
        )


def parse_target(text: str, endpoint: str | None, region: str | None) -> Target:
    """Parse a TARGET argument.

    Raises:
        UsageError: neither an http(s) URL nor ``s3://bucket/db_key``.
    """
    parts = urlsplit(text)
    if parts.scheme in ("http", "https"):
        if not parts.hostname or parts.path.strip("/") == "":
            raise UsageError(f"{text!r} is not a database URL: expected {parts.scheme}://host/...")
        return Target(url=text)
    if parts.scheme == "s3":
        db_key = parts.path.lstrip("/")
        if not parts.netloc or not db_key or parts.query or parts.fragment:
            raise UsageError(f"{text!r} is not an s3://bucket/db_key target")
        return Target(None, parts.netloc, db_key, _env_default(endpoint, ENDPOINT_ENVS),
                      _env_default(region, REGION_ENVS))
    raise UsageError(
        f"{text!r} is not a target: give a database's https:// URL or s3://bucket/db_key"
    )


def _env_default(given: str | None, names: Sequence[str]) -> str | None:
    """``given``, else the first of the environment variables ``names`` that is set."""
    if given:
        return given
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def cache_root() -> Path:
    """The directory holding default local copies (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ebooklet"


def default_path(target: Target) -> Path:
    """The default local copy of ``target``: ``<cache root>/<hash>/db.blt``."""
    digest = hashlib.sha256(target.identity.encode()).hexdigest()[:20]
    return cache_root() / digest / LOCAL_NAME


def make_default_dir(target: Target, path: Path) -> None:
    """Create the directory of ``target``'s default local copy ``path``, with a
    ``target.txt`` naming the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    note = path.parent / "target.txt"
    if not note.exists():
        note.write_text(target.identity + "\n")


# ---------------------------------------------------------------- opening


def target_of(args: argparse.Namespace) -> Target:
    """The parsed ``args.target``."""
    return parse_target(args.target, args.endpoint, args.region)


def connection(args: argparse.Namespace, target: Target) -> ebooklet.S3Connection:
    """An ``S3Connection`` to ``target`` with the ``--timeout`` and ``--retries`` of ``args``."""
    return target.connection(args.timeout, args.retries)


def local_path(args: argparse.Namespace, target: Target) -> Path:
    """``--path``, else the target's default local copy (its directory created)."""
    if args.path:
        return Path(args.path)
    path = default_path(target)
    make_default_dir(target, path)
    return path


@contextlib.contextmanager
def opened(args: argparse.Namespace, flag: str = "r", **kw: Any) -> Iterator[Any]:
    """Open the target's database in its local copy; refuse to work offline unless
    ``--offline`` was given (exit code 6)."""
    target = target_of(args)
    path = local_path(args, target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        db = ebooklet.open(
            connection(args, target), path, flag,
            trust_serializers=bool(args.trust_serializers), remote_timeout=args.timeout,
            lock_timeout=getattr(args, "lock_timeout", 0.0), **kw,
        )
    try:
        if db.offline and not args.offline:
            causes = " ".join(
                str(w.message).removeprefix(OFFLINE_PREFIX)
                for w in caught if w.category is ebooklet.OfflineWarning
            )
            raise ebooklet.OfflineError(
                f"{target.identity} cannot be reached ({causes}); pass --offline to work "
                f"from the local copy {path}."
            )
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        yield db
    finally:
        db.close()


# ---------------------------------------------------------------- output


def timestamp_text(us: int | None) -> str:
    """A timestamp in microseconds as ISO 8601 UTC (``-`` for ``None``)."""
    if us is None:
        return "-"
    moment = utc_datetime(us)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def key_text(key: Any) -> str:
    """A key as one line of text: a ``str`` or int as is, anything else as JSON or repr."""
    if isinstance(key, (str, int)):
        return str(key)
    return value_text(key)


def value_text(value: Any) -> str:
    """A decoded value as text: a ``str`` as is, else one line of JSON, else its repr."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        return repr(value)


def record(obj: Any) -> dict[str, Any]:
    """The fields of a result object (dataclass or named tuple) as a dict."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "_asdict"):
        return dict(obj._asdict())
    return dict(vars(obj))


def jsonable(value: Any) -> Any:
    """``value`` made JSON-serializable (Counters as dicts, datetimes as ISO strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def emit_fields(fields: dict[str, Any], as_json: bool) -> None:
    """Print ``fields`` as JSON, or as aligned ``name: value`` lines."""
    if as_json:
        print(json.dumps(jsonable(fields), ensure_ascii=False))
        return
    width = max((len(k) for k in fields), default=0)
    for name, value in fields.items():
        shown = value_text(jsonable(value)) if not isinstance(value, str) else value
        print(f"{name + ':':<{width + 1}} {shown}")


def emit_rows(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    """Print ``rows`` as JSON lines, or the ``columns`` of each separated by tabs."""
    for row in rows:
        if as_json:
            print(json.dumps(jsonable(row), ensure_ascii=False))
        else:
            print("\t".join("" if row[c] is None else key_text(row[c]) for c in columns))


# ---------------------------------------------------------------- commands


def cmd_ls(args: argparse.Namespace) -> int:
    """List the keys (no value is downloaded)."""
    with opened(args) as db:
        for key in db:
            if args.prefix is not None and not (isinstance(key, str) and key.startswith(args.prefix)):
                continue
            if args.long:
                stat = db.stat(key)
            if args.json:
                row = {"key": key}
                if args.long:
                    row.update(timestamp=stat.timestamp, size=stat.size, md5=stat.md5)
                print(json.dumps(jsonable(row), ensure_ascii=False, default=repr))
            elif args.long:
                print(f"{timestamp_text(stat.timestamp)}\t{stat.size}\t{key_text(key)}")
            else:
                print(key_text(key))
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    """Write one value to stdout or ``-o FILE``."""
    with opened(args) as db:
        value = db[args.key]
    data = value if isinstance(value, bytes) else (value_text(value) + "\n").encode()
    if args.output and args.output != "-":
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """What the remote manifest says (one GET; no local copy is made)."""
    target = target_of(args)
    conn = connection(args, target)
    # A remote connection group's add() reads a manifest and keeps what it says: a
    # throw-away local group is the public API's way of reading it.
    with tempfile.TemporaryDirectory(prefix="ebooklet-info-") as tmp:
        group = ebooklet.open_rcg(None, Path(tmp) / "group", "n")
        try:
            entry = dict(group[group.add(conn)])
        finally:
            group.close()
    path = Path(args.path) if args.path else default_path(target)
    fields = {
        "target": target.identity,
        "url": entry.get("db_url"),
        "uuid": entry["uuid"],
        "seq": entry["seq"],
        "commit_id": entry["commit_id"],
        "last_commit": timestamp_text(entry["last_commit"]),
        "keys": entry["n_keys"],
        "bytes": entry["n_bytes"],
        "key_serializer": entry["key_serializer"],
        "value_serializer": entry["value_serializer"],
        "metadata": entry["metadata"],
        "local_copy": f"{path}{'' if path.exists() else ' (not made yet)'}",
    }
    emit_fields(fields, args.json)
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    """The commits, newest first."""
    with opened(args) as db:
        commits = db.history(limit=args.limit)
    rows = []
    for commit in commits:
        row = record(commit)
        row["time"] = timestamp_text(row["timestamp"])
        rows.append(row)
    emit_rows(rows, args.json,
              ("seq", "time", "commit_id", "changed_keys", "n_keys", "n_bytes", "message"))
    return EXIT_OK


def commit_arg(text: str) -> int | str:
    """A commit given on the command line: a seq (digits) or a commit id."""
    return int(text) if text.isdigit() else text


def cmd_diff(args: argparse.Namespace) -> int:
    """The keys that differ between two commits."""
    with opened(args) as db:
        diffs = db.diff(commit_arg(args.a), commit_arg(args.b) if args.b else None)
    emit_rows([record(d) for d in diffs], args.json, ("kind", "key"))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """The pending edits of the local copy, and remote changes to its cached values."""
    with opened(args) as db:
        changes = list(db.changes().iter_changes())
    emit_rows([record(c) for c in changes], args.json, ("kind", "key"))
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    """Upload the local copy's pending edits in one commit."""
    with opened(args, "w") as db:
        result = db.changes().push(args.keys or None, force=args.force, message=args.message)
    if not result.committed:
        print("nothing to push", file=sys.stderr)
        return EXIT_OK
    print(f"pushed {result.keys_pushed} key(s), deleted {result.keys_deleted}, "
          f"{result.bytes_uploaded} bytes: commit {result.seq} ({result.commit_id})")
    return EXIT_OK


def cmd_revert(args: argparse.Namespace) -> int:
    """Restore a past commit's state as a new commit."""
    with opened(args, "w") as db:
        result = db.revert(commit_arg(args.commit), message=args.message)
    if not result.committed:
        print(f"the newest commit already is the state of {args.commit}", file=sys.stderr)
        return EXIT_OK
    print(f"restored {result.keys_pushed} key(s), deleted {result.keys_deleted}: "
          f"commit {result.seq} ({result.commit_id})")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    """Bring remote changes into the local copy."""
    with opened(args) as db:
        count = db.changes().pull(args.keys or None, force=args.force)
        if args.all:
            count += db.load_items()
    print(f"downloaded {count} value(s)")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Verify the remote database (exit code 8 when it finds problems)."""
    target = target_of(args)
    sample: int | float | None = args.sample
    if sample is not None and sample >= 1:
        sample = int(sample)
    result = ebooklet.check(connection(args, target), sample=sample, seed=args.seed)
    fields = {"ok": result.ok, **record(result)}
    emit_fields(fields, args.json)
    return EXIT_OK if result.ok else EXIT_INTEGRITY


def duration_arg(text: str) -> Any:
    """``--older-than``: ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (a timedelta) or an
    ISO 8601 date/time with a timezone (passed on as is)."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    number, unit = text[:-1], text[-1:]
    if unit in units and number.replace(".", "", 1).isdigit():
        return datetime.timedelta(**{units[unit]: float(number)})
    return text


def cmd_vacuum(args: argparse.Namespace) -> int:
    """Remove old commits and the objects only they used."""
    with opened(args) as db:
        result = db.vacuum(keep=args.keep, older_than=args.older_than,
                           rewrite_below=args.rewrite_below, purge=args.purge)
    fields = {**record(result), "bytes_reclaimed": result.bytes_reclaimed}
    emit_fields(fields, args.json)
    return EXIT_OK


def cmd_copy(args: argparse.Namespace) -> int:
    """Copy the newest commit to another location."""
    dest = parse_target(args.dest, args.dest_endpoint or args.endpoint, args.region)
    if dest.url is not None:
        raise UsageError("the copy's destination must be s3://bucket/db_key (it is written)")
    with opened(args) as db:
        result = db.copy_remote(connection(args, dest), overwrite=args.overwrite,
                                server_side=args.server_side, message=args.message)
    emit_fields(record(result), args.json)
    return EXIT_OK


def cmd_break_lock(args: argparse.Namespace) -> int:
    """Delete the remote write lock by hand."""
    target = target_of(args)
    if target.url is not None:
        raise UsageError("break-lock needs an s3://bucket/db_key target and credentials")
    broken = ebooklet.break_lock(connection(args, target))
    if broken is None:
        print("no lock", file=sys.stderr)
    else:
        emit_fields(dict(broken), args.json)
    return EXIT_OK


class _Stop(Exception):
    """Raised by the SIGTERM handler of ``serve``."""


def _raise_stop(signum: int, frame: Any) -> NoReturn:
    """A signal handler ending ``serve``'s wait."""
    raise _Stop


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a throw-away local S3 server in the foreground until Ctrl-C or SIGTERM."""
    from ebooklet.server import LocalS3Server

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then
    # raises no KeyboardInterrupt.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = LocalS3Server(host=args.host, port=args.port, region=args.region or "us-east-1")
    try:
        server.start()
        server.create_bucket(args.bucket, public=not args.private)
        print_serve_banner(server, args.bucket, not args.private)
        while server.running:
            time.sleep(0.2)
        print("ebooklet: the S3 server stopped by itself", file=sys.stderr)
        return EXIT_ERROR
    except _Stop:
        print("stopping the S3 server; every bucket it held is gone", file=sys.stderr)
        return EXIT_OK
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def print_serve_banner(server: Any, bucket: str, public: bool) -> None:
    """Print where ``serve``'s server is and how to use it."""
    endpoint = server.endpoint_url
    print(f"endpoint: {endpoint}")
    print(f"bucket:   {bucket} ({'anonymous reads allowed' if public else 'private'})")
    print(f"region:   {server.region}")
    print("credentials: any key pair is accepted; in a shell:")
    print(f"  export AWS_ACCESS_KEY_ID={server.access_key_id} "
          f"AWS_SECRET_ACCESS_KEY={server.access_key} AWS_ENDPOINT_URL={endpoint}")
    print(f"  ebooklet info s3://{bucket}/my/db")
    print("in Python:")
    print(f"  conn = ebooklet.S3Connection({server.access_key_id!r}, {server.access_key!r}, "
          f"'my/db', {bucket!r}, endpoint_url={endpoint!r})")
    if public:
        print(f"public URL of a database: {server.public_url(bucket, 'my/db')}")
    print("everything is kept in memory; Ctrl-C stops the server", flush=True)


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The ``ebooklet`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ebooklet",
        description="Look at, sync and manage ebooklet databases (local files kept in "
        "sync with S3-compatible stores).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ebooklet {ebooklet.__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show tracebacks and the library's debug log")
    remote = argparse.ArgumentParser(add_help=False, parents=[common])
    remote.add_argument("target", metavar="TARGET",
                        help="https://host/bucket/db_key (public, read-only) or s3://bucket/db_key")
    remote.add_argument("--endpoint", metavar="URL",
                        help="S3 endpoint of an s3:// target (default $AWS_ENDPOINT_URL_S3, "
                        "$AWS_ENDPOINT_URL, else AWS)")
    remote.add_argument("--region", help="signing region (default $AWS_REGION, "
                        "$AWS_DEFAULT_REGION, else us-east-1)")
    remote.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                        help="seconds to wait for the remote at open (default 5) and for each "
                        "answer (default 30)")
    remote.add_argument("--retries", type=int, metavar="N",
                        help="retries of a failed request (default 3)")
    local = argparse.ArgumentParser(add_help=False, parents=[remote])
    local.add_argument("--path", metavar="FILE",
                       help="the local copy (default: under the user cache dir, see --help)")
    local.add_argument("--offline", action="store_true",
                       help="work from the local copy when the remote cannot be reached "
                       "(else exit code 6)")
    local.add_argument("--trust-serializers", action="store_true",
                       help="let the database's serializers run even if they can run code or "
                       "inflate (pickle, *zstd): whoever can write the bucket could then run "
                       "code on this machine. Remembered for this local copy")
    writer = argparse.ArgumentParser(add_help=False, parents=[local])
    writer.add_argument("--lock-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="seconds to wait for another writer's lock (default 0)")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], parents: list, help: str,
            json_output: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=parents, help=help, description=help)
        p.set_defaults(func=func, json=False)
        if json_output:
            p.add_argument("--json", action="store_true", help="print JSON (one object a line)")
        return p

    p = add("ls", cmd_ls, [local], "list the keys (downloads no value)")
    p.add_argument("--prefix", help="only the str keys starting with PREFIX")
    p.add_argument("-l", "--long", action="store_true",
                   help="also each key's timestamp (UTC) and size in bytes, from the index "
                   "(no value is downloaded)")

    p = add("get", cmd_get, [local], "print a value (bytes raw; str as text; else JSON or repr)",
            json_output=False)
    p.add_argument("key", metavar="KEY")
    p.add_argument("-o", "--output", metavar="FILE", help="write the value to FILE")

    p = add("info", cmd_info, [remote], "what the remote manifest says: commit, keys, bytes, "
            "serializers, uuid")
    p.add_argument("--path", metavar="FILE", help="the local copy to name (default: see --help)")

    p = add("log", cmd_log, [local], "the commits, newest first: seq, time, commit id, "
            "changed keys, keys, bytes, message")
    p.add_argument("-n", "--limit", type=positive_int, help="at most N commits")

    p = add("diff", cmd_diff, [local], "the keys that differ between commits A and B")
    p.add_argument("a", metavar="A", help="a commit: its seq or commit id")
    p.add_argument("b", metavar="B", nargs="?", help="another commit (default: the newest)")

    add("status", cmd_status, [local], "the pending edits of the local copy and the remote "
        "changes to its cached values (kind and key)")

    p = add("push", cmd_push, [writer], "upload the local copy's pending edits in one commit",
            json_output=False)
    p.add_argument("keys", metavar="KEY", nargs="*", help="push only these keys")
    p.add_argument("--force", action="store_true", help="keep the local values of conflicts")
    p.add_argument("-m", "--message", help="the commit message")

    p = add("revert", cmd_revert, [writer], "restore the state of commit SEQ as a new commit",
            json_output=False)
    p.add_argument("commit", metavar="SEQ", help="a commit: its seq or commit id")
    p.add_argument("-m", "--message", help="the commit message (default 'revert to SEQ')")

    p = add("pull", cmd_pull, [local], "download the remote's changes to the cached values "
            "(or the KEYs given)", json_output=False)
    p.add_argument("keys", metavar="KEY", nargs="*")
    p.add_argument("--force", action="store_true", help="discard local edits of those keys")
    p.add_argument("--all", action="store_true", help="also download every value not cached")

    p = add("check", cmd_check, [remote], "verify the remote database (exit code 8 on problems)")
    p.add_argument("--sample", type=positive_float, metavar="N",
                   help="check N values (or a fraction in (0, 1)) instead of all")
    p.add_argument("--seed", type=int, help="seed of the sample")

    p = add("vacuum", cmd_vacuum, [local], "remove old commits and every object only they use")
    p.add_argument("--keep", type=positive_int, metavar="N", help="keep the N newest commits")
    p.add_argument("--older-than", type=duration_arg, metavar="AGE",
                   help="remove commits older than AGE: 30d, 12h, 90m, 2w, or an ISO 8601 time")
    p.add_argument("--rewrite-below", type=float, default=0.5, metavar="F",
                   help="rewrite packs less than this fraction live (default 0.5)")
    p.add_argument("--purge", action=argparse.BooleanOptionalAction, default=None,
                   help="also delete the old versions of a versioned bucket "
                   "(default: when one commit is kept)")

    p = add("copy", cmd_copy, [local], "copy the newest commit to DEST (a new database)")
    p.add_argument("dest", metavar="DEST", help="s3://bucket/db_key")
    p.add_argument("--dest-endpoint", metavar="URL", help="DEST's endpoint (default --endpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace a database at DEST")
    p.add_argument("--server-side", action=argparse.BooleanOptionalAction, default=None,
                   help="use server-side CopyObject (default: when source and DEST share "
                   "endpoint and keys)")
    p.add_argument("-m", "--message", help="the commit message of the copy")

    add("break-lock", cmd_break_lock, [remote], "delete the remote write lock by hand (only "
        "when its writer is surely gone)")

    p = add("serve", cmd_serve, [common], "run a throw-away local S3 server (moto) in the "
            "foreground; Ctrl-C stops it", json_output=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="default: a free port")
    p.add_argument("--bucket", default="ebooklet", help="the bucket to create (default ebooklet)")
    p.add_argument("--region", help="default us-east-1")
    p.add_argument("--private", action="store_true", help="no anonymous reads")
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


# ---------------------------------------------------------------- running


def exit_code(exc: BaseException) -> int:
    """The exit code of an error (see the module docstring)."""
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), EXIT_ERROR)


def error_line(exc: BaseException) -> str:
    """The error's message on one line."""
    if isinstance(exc, KeyError) and not isinstance(exc, ebooklet.EBookletError):
        return f"not found: key {exc.args[0]!r}" if exc.args else "not found"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def report(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` on stderr (one line, a hint, a traceback with ``debug``); its exit code."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    print(f"ebooklet: error: {error_line(exc)}", file=sys.stderr)
    hint = next((h for kind, h in HINTS if isinstance(exc, kind)), None)
    if hint is not None:
        print(f"ebooklet: hint: {hint}", file=sys.stderr)
    return exit_code(exc)


def _show_warning(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
    """Warnings as one line on stderr, without the source line."""
    print(f"ebooklet: warning: {' '.join(str(message).split())}", file=sys.stderr)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; KEYs of ``push``/``pull`` may come after options too (argparse
    gives an optional list of positionals only the words right after TARGET)."""
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "keys") and not any(e.startswith("-") for e in extras):
        args.keys = [*args.keys, *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parse(parser, argv)
    logging.basicConfig(format="ebooklet: %(levelname)s: %(name)s: %(message)s")
    if args.debug:
        for name in DEBUG_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except UsageError as exc:
        if args.debug:
            traceback.print_exc()
        parser.print_usage(sys.stderr)
        print(f"ebooklet: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ebooklet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (``ebooklet ls ... | head``): not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        return report(exc, args.debug)


def run() -> NoReturn:
    """The console script's entry point."""
    sys.exit(main())
