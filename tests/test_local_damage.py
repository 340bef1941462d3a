"""Damaged local files (issue 10, points 4 and 5): no pending edit is lost, and no wrong
value is returned, without an error.

The local files of a database at ``P`` are damaged the ways a crash, a disk or a careless
copy damages them, then the database is opened against the real moto_server:

- ``P.local_hash`` (the journal of pending edits) cut at every byte, or garbled: only a
  last record cut short is dropped; any other damage raises ``IntegrityError`` and keeps
  the damaged file as ``P.local_hash.damaged-<time>``, from which ``get_local_hash()``
  recovers the edits whose values are in ``P``;
- a value in ``P`` garbled (same length and timestamp) or cut: a cached remote value is
  downloaded again, or raises ``IntegrityError`` when the remote is out of reach; a local
  edit's value raises ``IntegrityError`` on read and on push, naming the key;
- ``P.ebk.json`` not JSON, or with fields of the wrong type: ``IntegrityError`` saying how
  to rebuild it.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import booklet
import pytest

import ebooklet
from ebooklet import IntegrityError
from ebooklet import format as fmt
from ebooklet.local import ChangeLog, local_paths
from ebooklet.server import find_free_port

REMOTE = {f"r{i}": f"remote value number {i:02d} " * 3 for i in range(8)}
"""Pushed before the edits; every one is then cached in ``P``."""
EDITS = {"r1": "EDITED-ONE " * 4, "r2": "EDITED-TWO " * 4, "r3": None, "n1": "NEW-ONE " * 5,
         "n2": "NEW-TWO " * 5}
"""The five pending edits (``None``: deleted); ``n1``, ``n2`` are new keys."""
PACK_ID = b"\x07" * 16
CLOSE_KIND = b"E"
CLOSE_SIZE = 45
LOG_MAGICS = {b"EBKLOG02": (41, 4), b"EBKLOG01": (37, 0)}
"""Journal magic -> (record head size, checksum size after the record), docs/format.md 9.2."""


# --------------------------------------------------------------------------- helpers


def make_database(conn: Any, path: Path) -> None:
    """``REMOTE`` pushed and cached in ``path``, then the five ``EDITS`` pending and one
    upload record (a pack of an uncommitted push) journaled after them."""
    with ebooklet.open(conn, path, "n", value_serializer="str") as db:
        db.update(REMOTE)
        assert db.changes().push().committed
    with ebooklet.open(conn, path, "w") as db:
        assert dict(db.items()) == REMOTE  # every remote value cached
        for key, value in EDITS.items():
            if value is None:
                del db[key]
            else:
                db[key] = value
    footer = fmt.encode_pack_footer([(b"n1", fmt.md5(EDITS["n1"].encode()), 1, 0, 40)])
    log = ChangeLog(journal_path(path))
    log.record_pack(PACK_ID, footer)
    log.close()


def journal_path(path: Path) -> Path:
    return local_paths(path)[1]


def record_spans(data: bytes) -> list[tuple[int, int, int]]:
    """``(start, head end, end)`` of each record of a journal's bytes (docs/format.md 9.2),
    but the close record (kind ``E``, the last one of a journal closed cleanly)."""
    head, check = LOG_MAGICS[data[:8]]
    spans, pos = [], 8
    while pos < len(data):
        kind, key_len = struct.unpack_from("<cI", data, pos)
        end = pos + head + key_len + (40 if kind == b"U" else 0) + check
        if kind != CLOSE_KIND:
            spans.append((pos, pos + head, end))
        pos = end
    return spans


def as_if_killed(path: Path) -> None:
    """Make ``P.ebk.json`` say what a session killed before its close leaves:
    ``closed: false``."""
    meta_path = local_paths(path)[3]
    meta = json.loads(meta_path.read_bytes())
    meta["data_state"]["closed"] = False
    meta_path.write_bytes(json.dumps(meta).encode())


def expected_state(upto: int | None = None) -> dict[str, str | None]:
    """What each edited key reads after the first ``upto`` edits (all by default)."""
    state: dict[str, str | None] = {k: REMOTE.get(k) for k in EDITS}
    for key in list(EDITS)[:upto]:
        state[key] = EDITS[key]
    return state


def pending(db: Any) -> dict[str, str | None]:
    """The pending local edits, by key: the local value (``None``: deleted)."""
    return {c.key: db.get(c.key) for c in db.changes().iter_changes() if c.local_md5 or c.kind == "deleted"}


def kept_aside(path: Path) -> list[Path]:
    """The damaged journals kept beside ``path``."""
    return sorted(path.parent.glob(journal_path(path).name + ".damaged-*"))


def open_recovering(conn: Any, path: Path, damaged: bytes) -> tuple[bool, Any]:
    """Open ``path`` 'w'. When the journal is refused as damaged, check that it was kept
    byte for byte, then reopen and rebuild it from the data file as the error says.
    Returns ``(refused, db)``."""
    try:
        return False, ebooklet.open(conn, path, "w")
    except IntegrityError as exc:
        kept = kept_aside(path)
        assert len(kept) == 1 and kept[0].read_bytes() == damaged, exc
        assert str(kept[0]) in str(exc) and "get_local_hash()" in str(exc)
    db = ebooklet.open(conn, path, "w")
    db.get_local_hash()
    return True, db


def garble(path: Path, at: int, size: int = 4) -> None:
    """Flip the bits of ``size`` bytes of ``path`` at offset ``at``."""
    data = bytearray(path.read_bytes())
    data[at : at + size] = bytes(b ^ 0xFF for b in data[at : at + size])
    path.write_bytes(bytes(data))


def value_offset(path: Path, value: str) -> int:
    """Where the encoded ``value`` lies in the data file ``path`` (it must be there once)."""
    data = path.read_bytes()
    at = data.find(value.encode())
    assert at > 0 and data.find(value.encode(), at + 1) == -1
    return at


def closed_port_url(s3_server: Any, db_key: str) -> ebooklet.S3Connection:
    """A public-URL connection to a loopback port nobody listens on (the remote is down)."""
    bucket_url = s3_server.public_url(db_key)
    assert bucket_url is not None
    path = bucket_url.split("/", 3)[3]
    return ebooklet.S3Connection(db_url=f"http://127.0.0.1:{find_free_port()}/{path}", timeout=1, retries=0)


# --------------------------------------------------------------------------- the journal


def journal_bytes(tmp_path: Path) -> bytes:
    """A journal of five edits and one pack record, written by ChangeLog alone."""
    log = ChangeLog(tmp_path / "model.local_hash")
    for i, key in enumerate(EDITS):
        log.record_edits([(key.encode(), None if EDITS[key] is None else bytes([i]) * 16, None)])
    log.record_pack(PACK_ID, b"footer bytes")
    log.close()
    return (tmp_path / "model.local_hash").read_bytes()


def test_a_journal_cut_at_any_byte_keeps_every_whole_record(tmp_path: Path) -> None:
    """Cut at each byte offset, a journal replays every record that is whole and drops only
    the one cut short (its change never reached the data file), and a writable open cuts
    it away (the close then ends it with its close record again); a cut inside the magic
    is damage: IntegrityError, the bytes kept aside."""
    data = journal_bytes(tmp_path)
    spans = record_spans(data)
    close_record = data[-CLOSE_SIZE:]
    assert close_record[:1] == CLOSE_KIND
    failures = []
    for cut in range(len(data) + 1):
        path = tmp_path / f"cut{cut}.local_hash"
        path.write_bytes(data[:cut])
        whole = [i for i, (_, _, end) in enumerate(spans) if end <= cut]
        try:
            log = ChangeLog(path)
        except IntegrityError:
            kept = list(tmp_path.glob(path.name + ".damaged-*"))
            if not (0 < cut < 8 and len(kept) == 1 and kept[0].read_bytes() == data[:cut]):
                failures.append((cut, "refused"))
            continue
        keys = [k.encode() for k in EDITS][: len([i for i in whole if i < len(EDITS)])]
        ok = list(log.edits) == keys and bool(log._packs) == (len(spans) - 1 in whole)
        log.close()
        if not ok or path.read_bytes() != data[: spans[whole[-1]][2] if whole else 8] + close_record:
            failures.append((cut, "records"))
    assert not failures, f"{len(failures)} of {len(data) + 1} cuts: {failures[:10]}"


@pytest.mark.parametrize("where", ["magic", "key length", "md5", "key", "head check", "check",
                                   "kind", "last record key"])
def test_a_garbled_journal_is_refused_and_kept(
    conn: Any, tmp_path: Path, where: str
) -> None:
    """Four garbled bytes anywhere in the journal (the issue: a key length made huge) are
    damage, not a torn tail: the open raises IntegrityError, the file is kept aside as it
    was, and get_local_hash() finds the five edits again from the data file."""
    path = tmp_path / "db"
    make_database(conn, path)
    log = journal_path(path)
    spans = record_spans(log.read_bytes())
    start, head_end, end = spans[1]  # the second edit
    at = {
        "magic": 2, "kind": start, "key length": start + 1, "md5": start + 5, "key": head_end,
        "head check": head_end - 4, "check": end - 4, "last record key": spans[-1][1] + 10,
    }[where]
    garble(log, at, 1 if where == "kind" else 4)
    damaged = log.read_bytes()

    refused, db = open_recovering(conn, path, damaged)
    with db:
        assert refused
        state = pending(db)
        assert {k: state.get(k) for k in EDITS if EDITS[k] is not None} == {
            k: v for k, v in EDITS.items() if v is not None
        }


CUTS = ["start", "start+1", "in head", "head end", "end-1"]


def cut_offset(spans: list[tuple[int, int, int]], record: int, cut: str) -> int:
    start, head_end, end = spans[record]
    return {"start": start, "start+1": start + 1, "in head": start + 20,
            "head end": head_end, "end-1": end - 1}[cut]


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("record", range(6), ids=[*EDITS, "pack"])
def test_a_truncated_journal_keeps_the_edits_of_its_whole_records(
    conn: Any, tmp_path: Path, record: int, cut: str
) -> None:
    """After a session killed before its close, a journal cut at or inside a record (a
    write killed midway, or a system crash) keeps every edit whose record is whole:
    pending, reading its local value, and pushed by the next push."""
    path = tmp_path / "db"
    make_database(conn, path)
    as_if_killed(path)
    log = journal_path(path)
    data = log.read_bytes()
    log.write_bytes(data[: cut_offset(record_spans(data), record, cut)])

    with ebooklet.open(conn, path, "w") as db:
        whole = expected_state(record)
        state = pending(db)
        for key in list(EDITS)[:record]:
            assert key in state and state[key] == whole[key]
        db.changes().push(keys=[k for k in list(EDITS)[:record]])
    with ebooklet.open(conn, tmp_path / "fresh", "r") as fresh:
        for key in list(EDITS)[:record]:
            assert fresh.get(key) == whole[key]


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("record", range(6), ids=[*EDITS, "pack"])
def test_a_truncated_journal_loses_no_edit_silently(
    conn: Any, tmp_path: Path, record: int, cut: str
) -> None:
    """The issue's bar: after a clean close, a journal cut anywhere (even at a record
    boundary, which the checksums cannot tell) lacks its close record: the open raises
    IntegrityError, keeps the file aside, and get_local_hash() as advised finds every
    edit whose value is in the data file again (an unpushed deletion is not recovered,
    as the error says: the kept file lists it)."""
    path = tmp_path / "db"
    make_database(conn, path)
    log = journal_path(path)
    data = log.read_bytes()
    log.write_bytes(data[: cut_offset(record_spans(data), record, cut)])

    refused, db = open_recovering(conn, path, log.read_bytes())
    with db:
        assert refused
        values = {k: v for k, v in expected_state().items() if v is not None}
        state = pending(db)
        assert {k: state.get(k) for k in values} == values
        db.changes().push()
    with ebooklet.open(conn, tmp_path / "fresh", "r") as fresh:
        assert {k: fresh.get(k) for k in values} == values


def test_a_journal_cut_where_an_earlier_session_ended_is_refused(conn: Any, tmp_path: Path) -> None:
    """Two sessions closed cleanly: the journal holds one close record, the last (the
    first session's went when the second one wrote), so a cut where the first session
    ended is refused too, and get_local_hash() finds the edits of both sessions."""
    path = tmp_path / "db"
    make_database(conn, path)
    log = journal_path(path)
    first = log.read_bytes()
    with ebooklet.open(conn, path, "w") as db:
        db["n3"] = "NEW-THREE " * 4
    data = log.read_bytes()
    assert data.startswith(first[:-CLOSE_SIZE]) and data.count(first[-CLOSE_SIZE:]) == 1
    log.write_bytes(data[: len(first)])  # as long as the journal the first session closed

    refused, db = open_recovering(conn, path, log.read_bytes())
    with db:
        state = pending(db)
        assert refused and state["n3"] == "NEW-THREE " * 4
        assert {k: state.get(k) for k in EDITS if EDITS[k]} == {k: v for k, v in EDITS.items() if v}


@pytest.mark.parametrize("loss", ["deleted", "emptied", "magic only"])
def test_a_journal_lost_after_a_clean_close_is_refused(conn: Any, tmp_path: Path, loss: str) -> None:
    """The journal of a copy closed cleanly is deleted, emptied or cut to its magic bytes
    (a rename without fsync, then a power cut, leaves such files): the open refuses once,
    saying how to recover, and get_local_hash() then finds every value edit again
    (before, the open started an empty journal and reads fetched the remote values over
    the edits)."""
    path = tmp_path / "db"
    make_database(conn, path)
    log = journal_path(path)
    if loss == "deleted":
        log.unlink()
    else:
        log.write_bytes(log.read_bytes()[: 0 if loss == "emptied" else 8])
    with pytest.raises(IntegrityError, match=r"get_local_hash\(\)"):
        ebooklet.open(conn, path, "w")
    with ebooklet.open(conn, path, "w") as db:
        db.get_local_hash()
        state = pending(db)
        assert {k: state.get(k) for k in EDITS if EDITS[k]} == {k: v for k, v in EDITS.items() if v}


NO_CLOSE_RECORD_EXPECTED = ["killed mid-session", "flag n", "no data_state"]


@pytest.mark.parametrize("case", NO_CLOSE_RECORD_EXPECTED)
def test_a_journal_without_close_record_is_no_damage_where_none_is_due(
    conn: Any, tmp_path: Path, case: str
) -> None:
    """Only a journal whose last session closed cleanly (P.ebk.json says so) must end with
    the close record. A session killed midway (a copy of its files taken while it is
    open), flag 'n', and a copy without a recorded state open without error; the killed
    session's edits are all pending. (A journal missing after a clean close is refused:
    test_a_journal_lost_after_a_clean_close_is_refused.)"""
    path = tmp_path / "db"
    make_database(conn, path)
    log = journal_path(path)
    if case == "killed mid-session":
        with ebooklet.open(conn, path, "w") as db:
            db["n3"] = "NEW-THREE " * 4
            path = tmp_path / "copy"
            for source, copy in zip(local_paths(tmp_path / "db"), local_paths(path), strict=True):
                shutil.copyfile(source, copy)
    else:
        log.write_bytes(log.read_bytes()[:-CLOSE_SIZE])
    if case == "no data_state":
        meta_path = local_paths(path)[3]
        meta_path.write_bytes(json.dumps(
            {k: v for k, v in json.loads(meta_path.read_bytes()).items() if k != "data_state"}
        ).encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the killed session's unwritten value
        db = ebooklet.open(conn, path, "n" if case == "flag n" else "w")
    with db:
        state = pending(db)
        if case in ("killed mid-session", "no data_state"):
            assert {k: state.get(k) for k in EDITS} == expected_state()
        if case == "flag n":
            assert len(db) == 0
    assert not kept_aside(path)


def test_a_journal_of_format_1_is_read_and_rewritten(conn: Any, tmp_path: Path) -> None:
    """A journal written before records had checksums (magic EBKLOG01) still gives its
    pending edits, and a writable open rewrites it in the current format."""
    path = tmp_path / "db"
    make_database(conn, path)
    log = journal_path(path)
    edits = ChangeLog(log, writable=False).edits
    old = b"EBKLOG01" + b"".join(
        struct.pack("<cI16s16s", b"S" if e.md5 else b"D", len(k), e.md5 or bytes(16),
                    e.base or bytes(16)) + k
        for k, e in edits.items()
    )
    log.write_bytes(old)
    with ebooklet.open(conn, path, "w") as db:
        assert pending(db) == expected_state()
    assert log.read_bytes()[:8] == b"EBKLOG02"
    with ebooklet.open(conn, path, "w") as db:
        assert pending(db) == expected_state()
        db.changes().push()
    with ebooklet.open(conn, tmp_path / "fresh", "r") as fresh:
        assert {k: fresh.get(k) for k in EDITS} == expected_state()


# --------------------------------------------------------------------------- cached values


def garble_cached(path: Path, key: str) -> None:
    """Garble the cached copy of remote ``key`` in the data file: same length, same
    timestamp, other bytes (still a valid str)."""
    at = value_offset(path, REMOTE[key])
    data = bytearray(path.read_bytes())
    data[at : at + 6] = b"WRONG!"
    path.write_bytes(bytes(data))


READS: dict[str, Callable[[Any, str], Any]] = {
    "getitem": lambda db, k: db[k],
    "get": lambda db, k: db.get(k),
    "get_timestamp": lambda db, k: db.get_timestamp(k, include_value=True)[1],
    "items": lambda db, k: dict(db.items())[k],
    "get_items": lambda db, k: dict(db.get_items([k]))[k],
    "values": lambda db, k: sorted(db.values())[sorted(REMOTE).index(k)],
}


def cached_copy(conn: Any, path: Path) -> None:
    """``REMOTE`` pushed and every value cached in ``path``; no local edit."""
    with ebooklet.open(conn, path, "n", value_serializer="str") as db:
        db.update(REMOTE)
        db.changes().push()
    with ebooklet.open(conn, path, "r") as db:
        assert dict(db.items()) == REMOTE


@pytest.mark.parametrize("read", READS)
def test_a_garbled_cached_value_is_downloaded_again(
    conn: Any, tmp_path: Path, read: str
) -> None:
    """Online, a cached value that fails its md5 is downloaded again: the right value."""
    path = tmp_path / "db"
    cached_copy(conn, path)
    garble_cached(path, "r4")
    with ebooklet.open(conn, path, "r") as db:
        assert READS[read](db, "r4") == REMOTE["r4"]
        assert db["r4"] == REMOTE["r4"]
    assert REMOTE["r4"].encode() in path.read_bytes()  # the good copy is cached again


@pytest.mark.parametrize("read", ["getitem", "get", "get_timestamp", "get_items"])
def test_a_garbled_cached_value_offline_is_an_integrity_error(
    s3_server: Any, conn: Any, db_key: str, tmp_path: Path, read: str
) -> None:
    """With the remote out of reach (a closed loopback port), a cached value that fails its
    md5 raises IntegrityError, never the wrong value; intact cached values still read."""
    path = tmp_path / "db"
    cached_copy(conn, path)
    garble_cached(path, "r4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ebooklet.OfflineWarning)
        db = ebooklet.open(closed_port_url(s3_server, db_key), path, "r")
    with db:
        assert db.offline
        with pytest.raises(IntegrityError, match="'r4'.*damaged"):
            READS[read](db, "r4")
        assert db["r5"] == REMOTE["r5"]


def test_a_garbled_cached_value_when_the_server_goes_away_is_an_integrity_error(
    fresh_server: Any, tmp_path: Path
) -> None:
    """Opened online, then the server dies: the garbled cached value raises IntegrityError."""
    path = tmp_path / "db"
    # Default patience for the setup: a server just started may take over a second to
    # answer its first writes (the quick connection below is for the outage).
    cached_copy(fresh_server.connection("damage/db"), path)
    garble_cached(path, "r4")
    conn = fresh_server.connection("damage/db", timeout=1, retries=0)
    with ebooklet.open(conn, path, "r") as db:
        fresh_server.server.kill()
        with pytest.raises(IntegrityError, match="'r4'"):
            db["r4"]
        assert db["r5"] == REMOTE["r5"]
    conn.close()


# --------------------------------------------------------------------------- local edits


def edited_copy(conn: Any, path: Path) -> None:
    make_database(conn, path)
    garble(path, value_offset(path, EDITS["n1"]) + 3)


@pytest.mark.parametrize("read", ["getitem", "get", "get_timestamp", "items"])
def test_a_garbled_local_edit_is_an_integrity_error(conn: Any, tmp_path: Path, read: str) -> None:
    """A pending edit whose value in the data file is not the one journaled raises
    IntegrityError naming the key, on read; the other edits read fine."""
    path = tmp_path / "db"
    edited_copy(conn, path)
    with ebooklet.open(conn, path, "w") as db:
        with pytest.raises(IntegrityError, match="'n1'.*discard"):
            READS[read](db, "n1")
        assert db["n2"] == EDITS["n2"]


def test_a_garbled_local_edit_is_not_pushed(conn: Any, tmp_path: Path) -> None:
    """A push fails with IntegrityError naming the key and commits nothing; after setting
    the key again, or discarding it, the push goes through with the right values."""
    path = tmp_path / "db"
    edited_copy(conn, path)
    with ebooklet.open(conn, path, "w") as db:
        with pytest.raises(IntegrityError, match="'n1'"):
            db.changes().push()
        with ebooklet.open(conn, tmp_path / "fresh", "r") as fresh:
            assert dict(fresh.items()) == REMOTE
        db.changes().discard(["n1"])
        db.changes().push()
    with ebooklet.open(conn, tmp_path / "fresh2", "r") as fresh:
        assert {k: fresh.get(k) for k in EDITS} == {**expected_state(), "n1": None}


# --------------------------------------------------------------------------- the data file


DATA_CUTS: dict[str, Callable[[Path], int]] = {
    "in a cached value": lambda p: value_offset(p, REMOTE["r5"]) + 5,
    "in an edit's value": lambda p: value_offset(p, EDITS["r2"]) + 5,
    "after an edit's value": lambda p: value_offset(p, EDITS["n1"]) + len(EDITS["n1"]),
    "after the first edit's value": lambda p: value_offset(p, EDITS["r1"]) + len(EDITS["r1"]),
    "3 bytes short": lambda p: p.stat().st_size - 3,
    "in the index": lambda p: 1000,
}
DATA_GARBLES: dict[str, Callable[[Path], int]] = {
    "garbled file header": lambda p: 0,
    "garbled index slot of a cached value": lambda p: index_slot(b"r6"),
    "garbled index slot of an edit": lambda p: index_slot(b"r1"),
    "garbled record head": lambda p: value_offset(p, REMOTE["r5"]) - 12,
    "garbled edit record head": lambda p: value_offset(p, EDITS["r2"]) - 12,
}


def index_slot(key: bytes, n_buckets: int = 12007) -> int:
    """Where booklet 0.12 keeps the position of ``key``'s bucket chain in a file of
    ``n_buckets`` buckets (ebooklet.open's default)."""
    bucket = int.from_bytes(booklet.utils.hash_key(key), "little") % n_buckets
    return booklet.utils.sub_index_init_pos + bucket * booklet.utils.n_bytes_file


@pytest.mark.parametrize("cut", [*DATA_CUTS, *DATA_GARBLES])
def test_a_damaged_data_file_gives_right_values_or_typed_errors(
    conn: Any, tmp_path: Path, cut: str
) -> None:
    """Cut or garble the data file: opening raises IntegrityError, or every read gives the right value
    (cached remote values downloaded again) or IntegrityError (a pending edit whose value
    was cut away, an index leading nowhere), never a wrong value; every edit stays pending,
    and a push either sends the right values or raises IntegrityError."""
    path = tmp_path / "db"
    make_database(conn, path)
    if cut in DATA_CUTS:
        path.write_bytes(path.read_bytes()[: DATA_CUTS[cut](path)])
    else:
        garble(path, DATA_GARBLES[cut](path))
    try:
        db = ebooklet.open(conn, path, "w")
    except IntegrityError:
        return
    right = {**REMOTE, **expected_state()}
    with db:
        for key, value in right.items():
            try:
                assert db.get(key) == value
            except IntegrityError as exc:  # an edit's value cut away, or booklet's index
                assert key in EDITS or "is damaged" in str(exc)
        assert {c.key for c in db.changes().iter_changes()} == set(EDITS)
        try:
            db.changes().push()
        except IntegrityError:
            return
    with ebooklet.open(conn, tmp_path / "fresh", "r") as fresh:
        assert {k: fresh.get(k) for k in right} == right


# --------------------------------------------------------------------------- P.ebk.json


META_DAMAGE: dict[str, Callable[[dict], Any]] = {
    "not json": lambda m: b"{not json",
    "a list": lambda m: [m],
    "empty object": lambda m: {},
    "version a string": lambda m: {**m, "version": "1"},
    "version zero": lambda m: {**m, "version": 0},
    "format": lambda m: {**m, "format": "other"},
    "uuid a number": lambda m: {**m, "uuid": 12},
    "owner_id": lambda m: {**m, "owner_id": "../../x"},
    "n_buckets a string": lambda m: {**m, "n_buckets": "12007"},
    "n_buckets negative": lambda m: {**m, "n_buckets": -1},
    "serializer unknown": lambda m: {**m, "value_serializer": "evil"},
    "serializer a list": lambda m: {**m, "key_serializer": ["str"]},
    "remote a string": lambda m: {**m, "remote": "s3://x"},
    "remote field a number": lambda m: {**m, "remote": {**m["remote"], "bucket": 5}},
    "conditional_writes": lambda m: {**m, "conditional_writes": "yes"},
}


@pytest.mark.parametrize("damage", META_DAMAGE)
def test_a_damaged_local_metadata_file_is_an_integrity_error(
    conn: Any, tmp_path: Path, damage: str
) -> None:
    """A damaged P.ebk.json raises IntegrityError (never KeyError/TypeError) saying how to
    rebuild it; deleted as advised, the reopened copy has every pending edit."""
    path = tmp_path / "db"
    make_database(conn, path)
    meta_path = local_paths(path)[3]
    made = META_DAMAGE[damage](json.loads(meta_path.read_bytes()))
    meta_path.write_bytes(made if isinstance(made, bytes) else json.dumps(made).encode())
    for flag in ("r", "w"):
        with pytest.raises(IntegrityError, match=r"ebk\.json.*delete it"):
            ebooklet.open(conn, path, flag)
    meta_path.unlink()
    with ebooklet.open(conn, path, "w") as db:
        assert pending(db) == expected_state()


def test_a_journal_read_in_small_pieces_replays_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal is read ``local.JOURNAL_READ`` bytes at a time, never whole: with pieces
    smaller than a record (a pack footer of 2 KiB among edits), every record replays as
    from one read, a journal cut inside a record keeps every record before it, and a byte
    garbled in a record far past the first piece is damage found at that record."""
    monkeypatch.setattr(ebooklet.local, "JOURNAL_READ", 48)
    path = tmp_path / "j.local_hash"
    keys = [b"k%04d" % i for i in range(40)]
    items = [(b"p%04d" % i, fmt.md5(b"%d" % i), 1_700_000_000_000_000 + i, 10 * i, 10) for i in range(40)]
    log = ChangeLog(path)
    for i, key in enumerate(keys):
        log.record_edits([(key, bytes([i]) * 16, None)])
        if i == 19:
            log.record_pack(PACK_ID, fmt.encode_pack_footer(items))
    log.close()
    data = path.read_bytes()
    spans = record_spans(data)
    uploads = {m: (PACK_ID, offset, length, ts) for _, m, ts, offset, length in items}
    log = ChangeLog(path)
    assert list(log.edits) == keys
    assert {m: tuple(up) for m, up in log.uploads.items()} == uploads
    log.close()
    for cut in (spans[20][0] + 1000, spans[20][2] + 3, spans[-1][2] - 1):
        cut_path = tmp_path / f"cut{cut}.local_hash"
        cut_path.write_bytes(data[:cut])
        whole = [i for i, (_, _, end) in enumerate(spans) if end <= cut]
        log = ChangeLog(cut_path)
        assert list(log.edits) == [k for i, k in enumerate(keys) if (i if i < 20 else i + 1) in whole]
        assert bool(log.uploads) == (20 in whole)
        log.close()
    garbled = bytearray(data)
    garbled[spans[30][1] + 2] ^= 0xFF  # in the key of a record past many pieces
    bad = tmp_path / "bad.local_hash"
    bad.write_bytes(bytes(garbled))
    with pytest.raises(IntegrityError, match=f"damaged at byte {spans[30][0]}:"):
        ChangeLog(bad)
