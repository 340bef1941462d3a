"""A self-contained tour of ebooklet against a local S3 server.

Run it with::

    pip install "ebooklet-s3[demo]"
    python -m ebooklet.demo            # --keys N, --keep, --serializer NAME

It starts a throw-away ``moto_server`` (:class:`ebooklet.server.LocalS3Server`)
with a public bucket, then:

1. creates a database and writes ``--keys`` small dict values locally;
2. pushes them (one atomic commit);
3. opens the database read-only through its public URL in a fresh local file,
   and checks ``len()`` before any value is downloaded;
4. reads a few values one by one, then downloads all of them with ``load_items``
   and checks every value is identical to what was written;
5. modifies some keys, deletes one and adds one, lists the changes, pushes again;
6. ``pull()``\\ s on the reader and checks it sees exactly the new state.

Each step is printed with its time and the requests it cost, counted by the
client (``S3Connection.request_counts``) and by the server (its access log).
The exit status is 0 when every check passed, 1 otherwise (with the reason).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ebooklet
from ebooklet.server import LocalS3Server

BUCKET = "ebooklet-demo"
DB_KEY = "demo/measurements"
N_READ_ONE_BY_ONE = 10
N_MODIFIED = 100


class DemoFailure(Exception):
    """A check of the demo did not hold."""


def make_value(i: int, version: int = 1) -> dict[str, Any]:
    """A small dict value, like a row of a data set."""
    return {
        "id": i,
        "station": f"station-{i % 97:02d}",
        "readings": [round(i * 0.1 * version, 3), i % 13, -i],
        "ok": i % 5 != 0,
        "version": version,
    }


def key_of(i: int) -> str:
    return f"sample/{i:06d}"


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailure(message)


def fmt_counts(counts: Counter) -> str:
    """``GET 3, PUT 2`` (zero counts left out), or ``-``."""
    parts = [f"{m} {n}" for m, n in sorted(counts.items()) if n]
    return ", ".join(parts) or "-"


class Report:
    """Times each step and collects the requests it made, client and server side."""

    def __init__(self, server: LocalS3Server, out: Callable[[str], None] = print):
        self.server = server
        self.conns: list[ebooklet.S3Connection] = []
        self.rows: list[tuple[str, float, Counter, Counter, str]] = []
        self.out = out

    def watch(self, conn: ebooklet.S3Connection | None) -> None:
        """Count ``conn``'s requests from now on."""
        if conn is not None and conn not in self.conns:
            self.conns.append(conn)

    def _client_counts(self) -> Counter:
        total: Counter = Counter()
        for conn in self.conns:
            total.update(conn.request_counts)
        return total

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """Time the block; the block may append a note to the yielded list."""
        notes: list[str] = []
        before = self._client_counts()
        self.server.reset_request_counts()
        start = time.perf_counter()
        yield notes
        ms = (time.perf_counter() - start) * 1000
        client = self._client_counts()
        client.subtract(before)
        row = (name, ms, +client, self.server.request_counts(), "; ".join(notes))
        self.rows.append(row)
        self.out(self.format_row(row))

    HEADER = f"{'step':<34} {'ms':>8}  {'client requests':<24} {'server saw':<24} notes"

    def format_row(self, row: tuple[str, float, Counter, Counter, str]) -> str:
        name, ms, client, server, note = row
        return f"{name:<34} {ms:>8.1f}  {fmt_counts(client):<24} {fmt_counts(server):<24} {note}"


class Demo:
    """The demo's state: the server, the connection, the local files and what to expect."""

    def __init__(self, server: LocalS3Server, n_keys: int, workdir: Path, serializer: str, out):
        self.server = server
        self.n_keys = n_keys
        self.serializer = serializer
        self.writer_path = workdir / "writer.blt"
        self.reader_path = workdir / "reader.blt"
        self.conn = ebooklet.S3Connection(
            server.access_key_id,
            server.access_key,
            DB_KEY,
            BUCKET,
            endpoint_url=server.endpoint_url,
            region=server.region,
        )
        self.report = Report(server, out)
        self.report.watch(self.conn)
        self.expected = {key_of(i): make_value(i) for i in range(n_keys)}

    def write_and_push(self) -> ebooklet.EBooklet:
        """Steps 1-2: create the database, write every value locally, push."""
        report, n = self.report, self.n_keys
        with report.step("open writer (flag 'n')") as notes:
            writer = ebooklet.open(
                self.conn, self.writer_path, "n", value_serializer=self.serializer
            )
            notes.append(
                "takes the remote write lock; on a bucket not probed yet, a second PUT of "
                "the lock record is the conditional-write probe"
            )
        with report.step(f"write {n} values locally") as notes:
            writer.update(self.expected)
            check(len(writer) == n, f"the writer has {len(writer)} keys, not {n}")
            notes.append("no requests: writes stay local until push")
        with report.step("push #1") as notes:
            result = writer.changes().push(message="demo: initial load")
            check(result.committed, "the first push made no commit")
            check(result.keys_pushed == n, f"push #1 sent {result.keys_pushed} keys, not {n}")
            notes.append(
                f"seq {result.seq}, {result.keys_pushed} keys, "
                f"{result.bytes_uploaded / 1024:.0f} KiB"
            )
        return writer

    def read_by_url(self, reader: ebooklet.EBooklet) -> list[str]:
        """Steps 3-4: count, read a few values, load all, compare; returns the keys read."""
        report, n = self.report, self.n_keys
        with report.step("len(reader)") as notes:
            check(len(reader) == n, f"the reader sees {len(reader)} keys, not {n}")
            notes.append(f"{n} keys, no value downloaded")
        picks = [key_of(i) for i in range(0, n, max(1, n // N_READ_ONE_BY_ONE))]
        with report.step(f"read {len(picks)} values one by one") as notes:
            for key in picks:
                value = reader[key]
                check(
                    value == self.expected[key],
                    f"{key}: read {value!r}, wrote {self.expected[key]!r}",
                )
            notes.append("index shards once, then 1 range GET per value")
        with report.step("load_items() of all keys") as notes:
            loaded = reader.load_items()
            want = n - len(picks)
            check(loaded == want, f"load_items downloaded {loaded} values, not {want}")
            notes.append(f"{loaded} values, neighbouring ranges coalesced")
        with report.step("verify all values (local reads)") as notes:
            got = dict(reader.items())
            check(got == self.expected, _diff("reader after push #1", got, self.expected))
            notes.append("identical; served from the local file")
        return picks

    def modify_and_push(self, writer: ebooklet.EBooklet) -> tuple[list[str], str]:
        """Step 5: modify some keys, delete one, add one, push; returns (modified, deleted)."""
        report, n, expected = self.report, self.n_keys, self.expected
        modified = [key_of(i) for i in range(1, n, max(1, n // N_MODIFIED))]
        deleted, added = key_of(0), key_of(n)
        with report.step(f"modify {len(modified)}, delete 1, add 1") as notes:
            for key in modified:
                writer[key] = expected[key] = make_value(int(key.split("/")[1]), version=2)
            del writer[deleted]
            del expected[deleted]
            writer[added] = expected[added] = make_value(n)
            kinds = Counter(c.kind for c in writer.changes().iter_changes())
            want = Counter(modified=len(modified), deleted=1, added=1)
            check(kinds == want, f"iter_changes gave {dict(kinds)}, not {dict(want)}")
            notes.append("iter_changes: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        with report.step("push #2") as notes:
            result = writer.changes().push(message="demo: update")
            sent = (result.keys_pushed, result.keys_deleted)
            check(sent == (len(modified) + 1, 1), f"push #2 sent/deleted {sent} keys")
            notes.append(
                f"seq {result.seq}, {result.keys_pushed} keys, {result.keys_deleted} deleted, "
                f"{result.bytes_uploaded / 1024:.1f} KiB"
            )
        with report.step("push #3 (nothing changed)") as notes:
            result = writer.changes().push()
            check(not result.committed, "a push without changes made a commit")
            check(result.requests["PUT"] == 0, "a push without changes sent a PUT")
            notes.append("no commit, no PUT")
        return modified, deleted

    def pull_and_verify(self, reader: ebooklet.EBooklet, modified: list[str], deleted: str) -> None:
        """Step 6: the reader pulls and sees exactly the new state."""
        report, expected = self.report, self.expected
        with report.step("reader.pull()") as notes:
            pulled = reader.pull()
            check(pulled == len(modified), f"pull downloaded {pulled} values, not {len(modified)}")
            notes.append(f"{pulled} changed value(s) downloaded, the deleted key dropped")
        with report.step("verify the new state") as notes:
            check(deleted not in reader, f"{deleted} was deleted but the reader still has it")
            check(len(reader) == len(expected), f"the reader has {len(reader)} keys")
            got = dict(reader.items())
            check(got == expected, _diff("reader after push #2", got, expected))
            notes.append(f"{len(got)} keys identical (the added key fetched on first read)")

    def reopen_reader(self, key: str) -> None:
        """An up-to-date local copy reopens with one 304 and reads from the local file."""
        with self.report.step("reopen reader file, read one key") as notes:
            with ebooklet.open(self.conn.db_url, self.reader_path, "r") as again:
                self.report.watch(again.remote)
                check(again[key] == self.expected[key], f"{key} is wrong after reopening")
            seen = self.server.iter_requests()
            check(
                [(method, status) for method, _, status in seen] == [("GET", 304)],
                f"reopening an up-to-date copy should cost one 304 GET; the server saw {seen}",
            )
            notes.append("1 conditional GET: 304 Not Modified; the value from the local file")

    def run(self) -> None:
        report = self.report
        writer = self.write_and_push()
        try:
            with report.step("open reader by public URL ('r')") as notes:
                # The serializer is passed: a URL cannot make its readers decode pickle.
                reader = ebooklet.open(
                    self.conn.db_url, self.reader_path, "r", value_serializer=self.serializer
                )
                report.watch(reader.remote)
                notes.append("anonymous; 1 GET of the manifest")
            try:
                self.read_by_url(reader)
                modified, deleted = self.modify_and_push(writer)
                self.pull_and_verify(reader, modified, deleted)
            finally:
                reader.close()
            self.reopen_reader(modified[0])
        finally:
            with report.step("close writer") as notes:
                writer.close()
                notes.append("releases the lock")


def run(n_keys: int, workdir: Path, serializer: str, out: Callable[[str], None] = print) -> None:
    """Run every step of the demo in ``workdir``; raises :class:`DemoFailure` on a wrong result."""
    t0 = time.perf_counter()
    out("Starting a local S3 server (moto_server) ...")
    with LocalS3Server() as server:
        server.create_bucket(BUCKET, public=True)
        demo = Demo(server, n_keys, workdir, serializer, out)
        started = (time.perf_counter() - t0) * 1000
        out(f"  endpoint   {server.endpoint_url}  (started in {started:.0f} ms)")
        out(f"  database   s3://{BUCKET}/{DB_KEY}")
        out(f"  public URL {demo.conn.db_url}")
        out(f"  local dir  {workdir}")
        out(f"  {n_keys} keys, value_serializer={serializer!r}")
        out("")
        out(Report.HEADER)
        out("-" * len(Report.HEADER))
        demo.run()
        rows = demo.report.rows
        total: Counter = Counter()
        for _, _, client, _, _ in rows:
            total.update(client)
        out("-" * len(Report.HEADER))
        out(f"{'total':<34} {sum(r[1] for r in rows):>8.1f}  {fmt_counts(total):<24}")
    out("")
    out(f"OK: every check passed ({time.perf_counter() - t0:.1f} s including the server's start).")


def _diff(what: str, got: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    return (
        f"{what}: {len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
        f"(e.g. {extra[:3]}), {len(wrong)} different (e.g. {wrong[:3]})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ebooklet.demo",
        description="Write, push, read by public URL, modify and pull an ebooklet "
        "database on a throw-away local S3 server; prints timings and request counts.",
    )
    parser.add_argument(
        "--keys", type=int, default=5000, metavar="N", help="number of values (default 5000)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory with the local files"
    )
    parser.add_argument(
        "--serializer",
        default="orjson",
        choices=["orjson", "pickle", "json"],
        help="value serializer (default orjson)",
    )
    args = parser.parse_args(argv)
    if args.keys < 2:
        parser.error("--keys must be at least 2")

    workdir = Path(tempfile.mkdtemp(prefix="ebooklet-demo-"))
    try:
        with warnings.catch_warnings():
            # The server is local: being offline is a failure, not a warning.
            warnings.simplefilter("error", ebooklet.OfflineWarning)
            run(args.keys, workdir, args.serializer)
        return 0
    except DemoFailure as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        return 1
    except (ebooklet.EBookletError, RuntimeError, OSError, ebooklet.OfflineWarning) as exc:
        print(f"\nDEMO FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print("\nDEMO FAILED: unexpected error (traceback above).", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"Local files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
