"""The remote write lock ``D.ebk/lock``: a lease renewed while held, reclaimed from a
crashed holder or after its lease, and broken by hand.

The lock is a courtesy that saves wasted uploads: commits stay correct without it
where the server honours conditional writes. Where it does not, the lock is taken
by writing, waiting :data:`LOCK_SETTLE` and reading back. This module knows the
lock record (docs/format.md §6) and the verbs of the store (:mod:`.store`), nothing
of the index, the packs or the local files.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from datetime import datetime, timezone
from typing import Any

import orjson

from . import format as fmt
from .errors import (
    EBookletError,
    IntegrityError,
    LockedError,
    PreconditionFailed,
    RemoteNotFoundError,
)
from .store import Fetched, IfMatch, Mode, Store

LOCK_LEASE = 30.0
"""Seconds a write lock lives without renewal; renewed every third of it."""
LOCK_SETTLE = 1.0
"""On a server that ignores conditional writes, seconds a lock taker waits between
writing its lock record and reading it back (see :meth:`RemoteLock.acquire`)."""


class RemoteLock:
    """The write lock ``D.ebk/lock``: a lease renewed in the background while held.

    Args:
        conn: a writable connection.
        owner_id: the stable id of the local copy taking the lock; a lock with
            the same owner id (left by a crashed process) is reclaimed at once.
        path: the local path; its base name only is recorded, for humans (a public
            bucket shows the lock to anyone).
        lease: seconds the lock lives without renewal (default: :data:`LOCK_LEASE`,
            read when the lock is made, so setting it shortens later leases).
    """

    def __init__(self, conn: Store, owner_id: str, path: str, lease: float | None = None):
        self.conn = conn
        self.owner_id = owner_id
        self.path = path
        self.lease = LOCK_LEASE if lease is None else lease
        self.etag: str | None = None
        self.lost = False
        self.contended = False
        """True when the last :meth:`acquire` found the lock taken (then waited or reclaimed)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._created: float | None = None
        self._token: str | None = None  # tells this holder's record from any other

    @property
    def held(self) -> bool:
        return self.etag is not None and not self.lost

    def _record(self, renewal: bool = False) -> bytes:
        now = time.time()
        if not renewal or self._created is None:
            self._created = now  # "created" says since when the lock is held: kept on renewal
            self._token = fmt.new_commit_id()
        return orjson.dumps(
            {
                "owner_id": self.owner_id,
                "token": self._token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "path": os.path.basename(self.path),  # the bucket may be public: no full path
                "created": datetime.fromtimestamp(self._created, timezone.utc).isoformat(),
                "expires": now + self.lease,
            }
        )

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds for another writer.

        Where the server honours conditional writes the lock is created with
        ``If-None-Match: *`` and renewed with ``If-Match``. Where it ignores them (then
        only the lock protects commits) it is taken by writing and reading back after
        :data:`LOCK_SETTLE` seconds, and every renewal and release reads it first.

        Raises:
            LockedError: another live writer holds it.
        """
        deadline = time.monotonic() + timeout
        self.contended = False
        while True:
            holder = self._take_once()
            if holder is None:
                break
            self.contended = True
            if time.monotonic() >= deadline:
                raise LockedError(holder, _locked_message(self.conn, holder))
            time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="ebooklet-lock", daemon=True)
        self._thread.start()

    def _take_once(self) -> dict | None:
        """One try at the lock: ``None`` when taken, else the live holder's record
        (``{}`` when unknown)."""
        if not self.conn.knows_conditional_writes():
            return self._take_probing()
        return self._take() if self.conn.conditional_writes() else self._take_by_settling()

    def _take_probing(self) -> dict | None:
        """The first try on a bucket not probed yet: the lock is the probe. A live
        holder's record is looked for first (on a server that ignores ``If-None-Match``
        the create would overwrite it); then our record is created, and PUT the same
        way again (:meth:`.store.Store.probe_conditional_writes`): a 412 proves the
        lock ours, a success means the server ignores conditions, and the lock is
        settled as :meth:`_take_by_settling` does."""
        holder, _ = read_lock(self.conn)
        if holder is not None and not self._reclaimable(holder):
            return holder
        record = self._record()
        try:
            self.etag = self.conn.put(fmt.LOCK_NAME, record, precondition=Mode.CREATE)
        except PreconditionFailed:  # appeared meanwhile, or ours to reclaim
            return self._take()
        if self.conn.probe_conditional_writes(fmt.LOCK_NAME, record):
            return None
        self.etag = None
        return self._settled()

    def _take(self) -> dict | None:
        """One try at the lock with conditional writes: ``None`` when taken, else the
        live holder's record."""
        try:
            self.etag = self.conn.put(fmt.LOCK_NAME, self._record(), precondition=Mode.CREATE)
            return None
        except PreconditionFailed:
            pass
        holder, etag = read_lock(self.conn)
        if holder is None:
            return self._take()  # released meanwhile
        if self._reclaimable(holder):
            try:
                self.etag = self.conn.put(
                    fmt.LOCK_NAME, self._record(), precondition=IfMatch(etag or "")
                )
                return None
            except PreconditionFailed:
                return self._take()
        return holder

    def _take_by_settling(self) -> dict | None:
        """One try at the lock on a server that ignores conditional writes: write our
        record only where no live holder's is, wait :data:`LOCK_SETTLE` seconds for the
        PUTs of writers that looked at the same moment to land, then read it back:
        the lock is ours only if our record is the one there (the last PUT wins). Safe
        as long as a PUT lands within ``LOCK_SETTLE`` of the read that preceded it."""
        holder, _ = read_lock(self.conn)
        if holder is not None and not self._reclaimable(holder):
            return holder
        self.conn.put(fmt.LOCK_NAME, self._record())
        return self._settled()

    def _settled(self) -> dict | None:
        """Our lock record was PUT unconditionally: after :data:`LOCK_SETTLE` seconds,
        the lock is ours if our record is the one there."""
        time.sleep(LOCK_SETTLE)
        holder, etag = read_lock(self.conn)
        if self._is_ours(holder):
            self.etag = etag
            return None
        return holder or {}

    def _reclaimable(self, holder: dict) -> bool:
        """A lock left by this local copy (a crashed process) or past its lease."""
        return holder.get("owner_id") == self.owner_id or holder.get("expires", 0) < time.time()

    def _is_ours(self, holder: dict | None) -> bool:
        return holder is not None and holder.get("token") == self._token

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.renew()
            except EBookletError:
                continue  # a transient failure; the next round tries again

    def renew(self) -> None:
        """Extend the lease; marks the lock lost if someone broke it meanwhile."""
        with self._lock:
            if self.etag is None:
                return
            ignored = not self.conn.conditional_writes()  # If-Match would be: look first
            if ignored and not self._is_ours(read_lock(self.conn)[0]):
                self._mark_lost()
                return
            try:
                self.etag = self.conn.put(
                    fmt.LOCK_NAME, self._record(renewal=True), precondition=IfMatch(self.etag)
                )
            except (PreconditionFailed, RemoteNotFoundError):
                holder, etag = read_lock(self.conn)
                if self._is_ours(holder):
                    self.etag = etag  # a retried renewal whose first try had succeeded
                    return
                self._mark_lost()

    def _mark_lost(self) -> None:
        self.lost = True
        self._stop.set()

    def ensure(self) -> None:
        """Raise if the lock was broken or taken over while we held it."""
        if self.lost:
            holder, _ = read_lock(self.conn)
            raise LockedError(
                holder or {},
                f"The write lock on {self.conn!r} was broken while this writer held it; "
                "reopen the database to take it again.",
            )

    def release(self, tries: int = 3) -> None:
        """Stop renewing and delete the lock (retried; it expires by itself anyway)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.conn.timeout)
        with self._lock:
            etag, self.etag = self.etag, None
        if etag is None or self.lost:
            return
        for attempt in range(tries):
            try:
                if not self.conn.conditional_writes() and not self._is_ours(read_lock(self.conn)[0]):
                    return  # If-Match would be ignored: another writer's lock stays
                self.conn.delete(fmt.LOCK_NAME, IfMatch(etag))
                return
            except PreconditionFailed:
                return  # no longer ours
            except EBookletError:
                if attempt == tries - 1:
                    warnings.warn(
                        f"Could not release the write lock on {self.conn!r}; it expires "
                        f"by itself within {self.lease:.0f} s.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                else:
                    time.sleep(0.2 * 2**attempt)


LOCK_TEXT_MAX = 255
"""Longest text field (host, path, created) of a lock record shown to a user."""
_DAMAGED_LOCK = {
    "owner_id": None, "token": None, "host": None, "pid": None, "path": None, "created": None,
    "expires": 0.0,
}
"""What a damaged lock record reads as: nobody's, expired (a writer replaces it)."""


def read_lock(conn: Store) -> tuple[dict | None, str | None]:
    """The current lock record and its ETag, or ``(None, None)`` when unlocked.

    The record is validated (:func:`check_lock_record`); a damaged one reads as an expired
    lock of nobody (``owner_id`` and the other fields ``None``), which a writer replaces.
    """
    try:
        answer = conn.get(fmt.LOCK_NAME, max_bytes=fmt.MAX_LOCK_BYTES)
    except RemoteNotFoundError:
        return None, None
    except IntegrityError:  # over the size cap: damaged
        answer = Fetched(b"", "")
    assert isinstance(answer, Fetched)
    try:
        record = check_lock_record(orjson.loads(answer.data))
    except orjson.JSONDecodeError:
        record = None
    return (record if record is not None else dict(_DAMAGED_LOCK)), answer.etag


def check_lock_record(obj: Any) -> dict | None:
    """A lock record with exactly the fields of docs/format.md §6, typed and bounded, or
    ``None`` when ``obj`` is not one (text fields must be printable, so nothing a bucket
    holds can garble a message)."""
    if not isinstance(obj, dict):
        return None
    texts = [obj.get(f) for f in ("owner_id", "host", "path", "created")]
    expires, pid, token = obj.get("expires"), obj.get("pid"), obj.get("token")
    valid = (
        all(isinstance(t, str) and len(t) <= LOCK_TEXT_MAX and t.isprintable() for t in texts)
        and (token is None or fmt.is_id(token))
        and isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < 1 << 32
        and isinstance(expires, (int, float)) and not isinstance(expires, bool)
        and 0 <= expires < 1e12
    )
    if not valid:
        return None
    return {f: obj.get(f) for f in _DAMAGED_LOCK}


def _locked_message(conn: Store, holder: dict) -> str:
    left = holder.get("expires", 0) - time.time()
    return (
        f"{conn!r} is locked by another writer: host {holder.get('host')!r}, pid "
        f"{holder.get('pid')}, path {holder.get('path')!r}, since {holder.get('created')} "
        f"(lease expires in {left:.0f} s unless renewed). Wait for it to close, pass "
        "lock_timeout= to wait, or ebooklet.break_lock(conn) if that writer is gone."
    )


def break_lock(conn: Store) -> dict | None:
    """Delete the write lock of the database of ``conn`` (writable) by hand; returns the
    broken record (see :func:`ebooklet.break_lock`)."""
    holder, _ = read_lock(conn)
    conn.delete(fmt.LOCK_NAME)
    return holder
