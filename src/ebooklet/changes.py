"""`Changes`: what differs between a local copy and its remote, and moving it.

What differs is decided per key by the three-way rule, :func:`.local.three_way`:
``iter_changes`` lists its verdicts and ``push`` plans from them.
"""

from __future__ import annotations

import bisect
import functools
import gc
import hashlib
import itertools
import logging
import operator
import os
import struct
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import display
from . import format as fmt
from . import remote as remote_module
from ._booklet_io import ScanInterrupted, n_buckets
from .errors import (
    CommitRetryError,
    ConflictError,
    OfflineError,
    PreconditionFailed,
    ReadOnlyError,
)
from .format import Entry
from .local import REMOTE_UNKNOWN, Edit, State, remote_md5, three_way
from .progress import Progress, ProgressArg, check
from .reads import Reads
from .remote import NewPack, PackUpload
from .replica import Replica

logger = logging.getLogger("ebooklet")

MAX_COMMIT_ATTEMPTS = 8
PUSH_BATCH_KEYS = 1 << 15
"""A push reads, uploads and indexes the values of about this many keys (whole index
shards, at least one: the keys it sets and those the shards already hold) before the next
ones: what it holds is bounded by this, not by the size of the push or of the database; a
batch of half the data file or more is read by one scan of it."""
PUSH_IN_FLIGHT = 16 << 20
"""Bytes of packs of small values a push has built and not yet seen uploaded (at least
one pack, at most one per connection thread)."""
SPILL_BUFFER = 8 << 20
"""A push of many batches that reads its values by one scan of the data file sets them
aside by batch in a temporary file, holding this many bytes of them in memory at most,
shared by the batches (at least :data:`SPILL_BATCH_MIN` a batch)."""
SPILL_BATCH_MIN = 16 << 10
CHUNK_RECORDS = 1 << 15
"""A push reads the values of its keys in chunks of this many at most, each holding an
eighth of :data:`SPILL_BUFFER` of values at most (or one value), handled a column at a
time."""
PUSH_GC_THRESHOLD = 50_000
"""While a push runs, the first threshold of Python's cyclic garbage collector is at least
this (CPython's default is 700); see :class:`_FewerCollections`."""


# Why a push raises the garbage collector's first threshold.
#
# A push of many keys holds tens of thousands of small objects at a time that live a
# shard or a batch of shards: the edits of a shard (two objects each), the index entries
# of a batch. CPython collects the young objects each time 700 more are alive than at the
# last collection, and every hundredth collection is a full one that walks everything
# alive; a shard's edits alone make that due. At 1M keys of 100 B that was 50 full
# collections, about a fifth of the push's CPU time (2.5 s of 12.5). With the first
# threshold at 10,000 there were 316 young collections and 3 full ones (0.8 s); at 50,000,
# more than a push holds at once, there are about 3 young collections in all (0.01 s),
# as good as disabling the collector. Cycles are still collected: the push itself leaves
# about 90 objects in cycles at 1M keys, and other threads' cycles wait for 50,000 new
# objects at most. The threshold is raised, not the collector disabled, because it is
# the process's: other threads keep collecting. It is put back when the last push of the
# process ends, unless something else set another meanwhile (that one is kept); a
# collector disabled by the application (threshold 0 or ``gc.disable()``) is left as it is.
class _FewerCollections:
    """A context manager: the collector's first threshold at :data:`PUSH_GC_THRESHOLD` at
    least while a push of this process runs (pushes of several threads share it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._saved: tuple[int, ...] | None = None  # the thresholds to put back
        self._raised: tuple[int, ...] | None = None  # those set in their place

    def __enter__(self) -> None:
        with self._lock:
            self._running += 1
            if self._running > 1:
                return
            saved = gc.get_threshold()
            if 0 < saved[0] < PUSH_GC_THRESHOLD:
                self._saved, self._raised = saved, (PUSH_GC_THRESHOLD, *saved[1:])
                gc.set_threshold(*self._raised)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._running -= 1
            if self._running or self._saved is None:
                return
            if gc.get_threshold() == self._raised:
                gc.set_threshold(*self._saved)
            self._saved = self._raised = None


_FEWER_COLLECTIONS = _FewerCollections()


class Change(NamedTuple):
    """One key that differs between the local copy and the remote.

    ``kind`` is ``"added"``, ``"modified"``, ``"deleted"`` (local edits),
    ``"remote_changed"``, ``"remote_deleted"`` (remote changes to values cached
    locally) or ``"conflict"``. The md5s are hex strings or ``None``.
    """

    kind: str
    key: Any
    local_md5: str | None
    remote_md5: str | None
    base_md5: str | None


@dataclass
class PushResult:
    """What a push did."""

    keys_pushed: int = 0
    keys_deleted: int = 0
    bytes_uploaded: int = 0
    requests: Counter = field(default_factory=Counter)
    commit_id: str | None = None
    seq: int | None = None

    @property
    def committed(self) -> bool:
        """True when the push made a new commit."""
        return self.commit_id is not None

    def _repr_html_(self) -> str:
        title = f"Pushed: commit {self.seq}" if self.committed else "Push: nothing to commit"
        return display.fields(title, [
            ("keys pushed", self.keys_pushed),
            ("keys deleted", self.keys_deleted),
            ("bytes uploaded", self.bytes_uploaded),
            ("requests", sum(self.requests.values())),
            ("commit id", self.commit_id),
        ])


def _hex(m: bytes | None) -> str | None:
    return m.hex() if m is not None else None


class _Plan(NamedTuple):
    """What a push sends, counted by :meth:`Changes._plan` (the keys are read again from
    the edits, a shard at a time, by :meth:`Changes._write`)."""

    n_plan: int  # the shard count the edits were counted by: >= the head's and the commit's
    sets: list[int]  # per shard of n_plan: keys whose local value goes up
    deletes: list[int]  # per shard of n_plan: keys deleted
    n_settled: int  # edits already equal to the remote
    selected: frozenset[bytes] | None  # the keys a push of some keys may send

    @property
    def n_sets(self) -> int:
        return sum(self.sets)

    @property
    def n_deletes(self) -> int:
        return sum(self.deletes)


_KEY, _EDIT = operator.itemgetter(0), operator.itemgetter(1)
_MD5, _LENGTH = operator.attrgetter("md5"), operator.attrgetter("length")


class _ShardWrite:
    """One index shard a push writes, and the values of its keys being uploaded.

    ``contents`` starts as the shard's entries in the head (deletions applied) and takes
    each uploaded value's entry; ``to_send`` maps the keys whose value the push sends to
    the md5 journaled with their edit. ``known`` maps the md5s of the shard's values to
    their location: an entry of the head, a key of ``contents`` whose value this push
    uploads in a pack, ``None`` while a large value is being uploaded (then its entry);
    ``shared`` those of the push (journaled uploads, large values): a value of either is
    not uploaded again. ``duplicates`` are ``(key, md5, timestamp)`` of such values,
    located once the uploads are done.
    """

    def __init__(self, number: int, contents: dict[bytes, Entry], shared: dict[bytes, Entry | None]):
        self.number = number
        self.contents = contents
        self.to_send: dict[bytes, bytes] = {}
        self.old_keys = len(contents)
        entries = contents.values()
        self.old_bytes = sum(map(_LENGTH, entries))
        self.known: dict[bytes, Entry | bytes | None] = dict(zip(map(_MD5, entries), entries, strict=True))
        self.shared = shared
        self.duplicates: list[tuple[bytes, bytes, int]] = []

    def reuses(self, m: bytes) -> bool:
        """Whether a value of md5 ``m`` is known (it is then not uploaded again)."""
        return m in self.known or m in self.shared

    def locate_duplicates(self) -> None:
        """Give each duplicate the location of its md5 (every upload of the shard is done)."""
        for kb, m, ts in self.duplicates:
            e = self.known.get(m)
            if e is None:  # the push's (a journaled upload, a large value)
                e = self.shared[m]
            elif isinstance(e, bytes):  # the key this push uploaded the value under
                e = self.contents[e]
            self.contents[kb] = Entry(m, ts, e.pack, e.offset, e.length)
        self.duplicates = []


class _LargeUploads:
    """Large values (over :data:`PART_SIZE`) of a push, uploaded in the background.

    A worker hashes a value (which must be the md5 journaled with its edit, else the push
    fails with :class:`IntegrityError`), notes it in its shard's ``duplicates`` when its md5
    is in the shard's ``known``, else uploads it as a pack of its own
    (:meth:`RemoteIndex.upload_large`; a multipart upload's parts run on the connection's
    pool, hence a pool of its own here). At most :data:`LARGE_IN_FLIGHT` bytes are in
    flight, at least one value; the uploads found done are handed to ``finished`` in the
    caller's thread.
    """

    def __init__(
        self,
        remote: Any,
        finished: Callable[[_ShardWrite, PackUpload], None],
        damaged: Callable[[bytes], Exception],
    ):
        self._remote = remote
        self._damaged = damaged
        self._finished = finished
        self._claim = threading.Lock()
        self._pool = ThreadPoolExecutor(remote_module.LARGE_IN_FLIGHT // remote_module.PART_SIZE, "ebooklet-large")
        self._pending: deque[tuple[int, _ShardWrite, Future]] = deque()
        self._held = 0
        self._uploaded = 0

    def add(self, shard: _ShardWrite, kb: bytes, ts: int, raw: bytes, expected: bytes) -> None:
        """Upload ``raw`` of ``shard``, whose md5 must be ``expected``, once fewer bytes are
        in flight (waits for the oldest uploads)."""
        while self._pending and self._held + len(raw) > remote_module.LARGE_IN_FLIGHT:
            self._collect()
        future = self._pool.submit(self._upload, shard, kb, ts, raw, expected)
        self._pending.append((len(raw), shard, future))
        self._held += len(raw)

    def cancel(self) -> None:
        """The push fails: start no more uploads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wait_for(self, shard: _ShardWrite) -> None:
        """Wait for the uploads of ``shard`` (and of the shards before it)."""
        while self._pending and any(s is shard for _, s, _ in self._pending):
            self._collect()

    def wait(self) -> int:
        """Wait for every upload; returns the bytes uploaded."""
        while self._pending:
            self._collect()
        self._pool.shutdown()
        return self._uploaded

    def _collect(self) -> None:
        size, shard, future = self._pending[0]
        try:
            kb, m, ts, done = future.result()
        except BaseException:
            self.cancel()
            raise
        self._pending.popleft()
        self._held -= size
        if done is None:
            shard.duplicates.append((kb, m, ts))
        else:
            self._uploaded += size
            self._finished(shard, done)

    def _upload(
        self, shard: _ShardWrite, kb: bytes, ts: int, raw: bytes, expected: bytes
    ) -> tuple[bytes, bytes, int, PackUpload | None]:
        hashed = hashlib.md5(raw, usedforsecurity=False)
        m = hashed.digest()
        if m != expected:
            raise self._damaged(kb)
        with self._claim:
            duplicate = shard.reuses(m)
            if not duplicate:
                shard.known[m] = None  # being uploaded by this push
        return kb, m, ts, None if duplicate else self._remote.upload_large(kb, raw, ts, hashed)


class Changes:
    """The differences between a database's local copy and its remote.

    Obtained from :meth:`EBooklet.changes`.
    """

    def __init__(self, replica: Replica, reads: Reads):
        self._replica = replica
        self._reads = reads
        self._packs_checked: dict[bytes, bool] = {}
        self._progress = Progress(False, None)  # the running push's
        self._remember_shards = True  # the running push keeps the shards it reads parsed

    def __repr__(self) -> str:
        return f"<Changes of {str(self._replica.path)!r}: call iter_changes() to list them>"

    def _repr_html_(self) -> str:
        """The changes as a table (lists them: refreshes the manifest when online)."""
        rows = ((c.kind, repr(c.key), c.local_md5, c.remote_md5) for c in self.iter_changes())
        title = f"Changes of {self._replica.path}"
        return display.table(title, ("kind", "key", "local md5", "remote md5"), rows)

    # ------------------------------------------------------------ inspecting

    def _remote_entries(self, keys: Iterable[bytes]) -> dict[bytes, Entry | None]:
        replica = self._replica
        if replica.log.replace:
            return dict.fromkeys(keys)
        return replica.remote.entries(keys)

    def _refresh(self) -> None:
        replica = self._replica
        if replica.conn is None:
            raise OfflineError(
                f"{replica.path} has no remote; reopen it with an S3Connection to sync."
            )
        replica.refresh()

    def iter_changes(self) -> Iterator[Change]:
        """Every local edit, conflict, and remote change to a locally cached value.

        Refreshes the remote manifest first (offline: local edits only).
        """
        replica = self._replica
        try:
            self._refresh()
            online = True
        except OfflineError:
            online = False
        edits = dict(replica.log.edits)
        remote = self._remote_entries(edits) if online else dict.fromkeys(edits, REMOTE_UNKNOWN)
        replacing = replica.log.replace
        for kb, edit in edits.items():
            entry = remote[kb]
            state = three_way(edit, entry, self._edit_ts(kb, edit), replacing)
            if state.listed:
                r = remote_md5(edit, entry, replacing)
                yield Change(state.value, replica.codec.decode_key(kb), _hex(edit.md5), _hex(r), _hex(edit.base))
        if online and not replacing:
            for kb, state, entry in self._stale_cache():
                yield Change(state.value, replica.codec.decode_key(kb), None, _hex(entry and entry.md5), None)

    def _stale_cache(self) -> Iterator[tuple[bytes, State, Entry | None]]:
        """Cached values (not edited) that the remote changed or deleted."""
        replica = self._replica
        cached = [(kb, ts) for kb, ts in replica.scan(include_value=False) if kb not in replica.log.edits]
        remote = replica.remote.entries(kb for kb, _ in cached)
        for kb, ts in cached:
            state = three_way(None, remote[kb], ts, replica.log.replace)
            if state.listed:
                yield kb, state, remote[kb]

    # ------------------------------------------------------------ pull & discard

    def pull(
        self, keys: Iterable[Any] | None = None, force: bool = False, progress: ProgressArg = None
    ) -> int:
        """Bring remote changes into the local file; returns values downloaded.

        Without ``keys``: refresh, re-download cached values the remote changed
        and drop those it deleted. With ``keys``: download those keys. Keys with
        local edits keep them unless ``force=True``, which discards the edits.
        ``progress`` reports values downloaded, as for :meth:`EBooklet.load_items`
        (a ``TypeError`` for a bad one comes before any request).
        """
        replica = self._replica
        replica.check_open()
        replica.check_local_writable("pull")
        check(progress)
        self._refresh()
        if force:
            self.discard(keys)
        if keys is not None:
            return self._reads.load_items(keys, progress)
        if replica.log.replace:
            return 0
        stale = list(self._stale_cache())
        gone = [kb for kb, state, _ in stale if state is State.REMOTE_DELETED]
        replica.drop_values(gone)
        changed = [replica.codec.decode_key(kb) for kb, state, _ in stale if state is State.REMOTE_CHANGED]
        return self._reads.load_items(changed, progress) if changed else 0

    def discard(self, keys: Iterable[Any] | None = None) -> int:
        """Drop local edits (of ``keys``, or all); those keys read the remote again.

        Returns how many edits were dropped.
        """
        replica = self._replica
        replica.check_writable()
        with replica.mutex:
            if keys is None:
                kbs = list(replica.log.edits)
                if replica.log.replace:
                    replica.log.set_replace(False)
                if replica.log.metadata_dirty:
                    replica.log.set_metadata_dirty(False)
            else:
                kbs = [kb for kb in (replica.codec.encode_key(k) for k in keys) if kb in replica.log.edits]
            replica.log.mark_clean(kbs)
            replica.drop_values(kbs)
            return len(kbs)

    # ------------------------------------------------------------ push

    def push(
        self, keys: Iterable[Any] | None = None, force: bool = False, message: str | None = None,
        progress: ProgressArg = None,
    ) -> PushResult:
        """Upload local edits (of ``keys``, or all) in one atomic commit.

        Takes the remote write lock if not held (with ``open(..., lock="push")``, for
        this push only), refreshes the manifest, checks
        for conflicts, uploads new packs and the touched index shards, then
        commits with a conditional manifest PUT, retrying on top of a
        concurrent commit. Pushing nothing sends no PUT.

        Args:
            keys: push only these keys' edits.
            force: on conflict keep the local values instead of raising.
            message: a note recorded in the commit.
            progress: reports value bytes uploaded: a callable(done, total) (``total``
                is ``None`` until every value to upload is read), ``True`` (a tqdm
                bar), ``False`` (nothing), ``None`` (a bar on a terminal only); see
                :mod:`ebooklet.progress`.

        A copy that replaces its remote (flag ``'n'``, or ``clear()`` not pushed
        yet) may push some ``keys`` only when the remote holds nothing: they then
        make the new remote, the other edits stay pending.

        Raises:
            ConflictError: keys changed on both sides (nothing is committed).
            CommitRetryError: another writer won every commit try (a ``ConflictError``
                with no keys; nothing is committed, the edits stay pending).
            LockedError: another writer holds the lock.
            OfflineError: the remote cannot be reached (edits stay pending).
            ValueError: ``keys`` given while the copy replaces a remote that holds keys
                or metadata.
            TypeError: ``progress`` is none of its kinds (before any request).
        """
        replica = self._replica
        replica.check_writable()
        conn = replica.conn
        if conn is None or not conn.writable:
            raise ReadOnlyError(
                f"{replica.path} has no writable remote; reopen it with an S3Connection to push."
            )
        selected = None if keys is None else {replica.codec.encode_key(k) for k in keys}
        before = Counter(conn.request_counts)
        result = PushResult()
        self._progress = Progress(progress, None, "B", "push")
        with self._progress, replica.mutex, _FEWER_COLLECTIONS, replica.holding_lock() as lock:
            replica.sync()
            for _ in range(MAX_COMMIT_ATTEMPTS):
                self._refresh()
                if selected is not None and replica.log.replace:
                    self._check_partial_replace()
                plan = self._plan(selected, force)
                metadata = replica.log.metadata_dirty and selected is None
                if not (plan.n_sets or plan.n_deletes or metadata or replica.log.replace):
                    if plan.n_settled:
                        self._settle_only(plan)
                    break
                try:
                    self._commit(plan, metadata, message, result)
                except PreconditionFailed:
                    time.sleep(0.05)
                    continue
                lock.ensure()
                self._after_commit(plan, metadata)
                break
            else:
                raise CommitRetryError(MAX_COMMIT_ATTEMPTS)
        result.requests = Counter(conn.request_counts) - before
        return result

    def _check_partial_replace(self) -> None:
        """A push of some keys by a copy that replaces its remote (flag ``'n'``, or
        ``clear()`` not pushed yet) commits those keys alone in place of the remote: fine
        when the remote holds nothing (absent, or no key and no metadata), refused
        (``ValueError``) when that would delete what it holds."""
        replica = self._replica
        manifest = replica.remote.manifest
        if manifest is None or (manifest["n_keys"] == 0 and manifest.get("metadata") is None):
            return
        raise ValueError(
            f"{replica.path} replaces its remote at the next push (it was opened with flag 'n' or "
            f"cleared), and the remote holds {manifest['n_keys']} key(s): pushing only some "
            "keys would delete every remote key this copy does not hold while the rest of "
            "your edits stay unpushed. Push all keys with changes().push() to replace the "
            "remote whole, or changes().discard() to keep the remote (dropping every local "
            "edit)."
        )

    def _plan(self, selected: set[bytes] | None, force: bool) -> _Plan:
        """Count what a push of the edits (of ``selected`` keys, or all) sends, by the
        three-way rule, a shard of edits at a time (:meth:`EditMap.by_shard`): nothing of
        the size of the push is held but a count a shard. Nothing is changed (edits
        already equal to the remote are forgotten by :meth:`_write`, once no conflict
        stops the push).

        Raises:
            ConflictError: keys changed on both sides (and not ``force``).
        """
        replica = self._replica
        head = None if replica.log.replace else replica.remote.manifest
        n_plan = remote_module.shard_count(head, len(replica.log.edits))
        chosen = None if selected is None else frozenset(selected)
        self._remember_shards = self._load_head_shards(head, n_plan, chosen)
        sets, deletes = [0] * n_plan, [0] * n_plan
        n_settled = 0
        conflicts: list[bytes] = []
        for number, group in self._edit_groups(n_plan, chosen):
            states, _ = self._verdicts(head, number, n_plan, group)
            n_settled += states.count(State.SETTLED)
            sets[number] = states.count(State.ADDED) + states.count(State.MODIFIED)
            deletes[number] = states.count(State.DELETED)
            if State.CONFLICT in states:
                in_conflict = [pair for pair, state in zip(group, states, strict=True) if state is State.CONFLICT]
                if force:  # pushed as they are
                    n_deleted = sum(edit.md5 is None for _, edit in in_conflict)
                    sets[number] += len(in_conflict) - n_deleted
                    deletes[number] += n_deleted
                else:
                    conflicts += [kb for kb, _ in in_conflict]
        if conflicts:
            raise ConflictError([replica.codec.decode_key(kb) for kb in conflicts])
        return _Plan(n_plan, sets, deletes, n_settled, chosen)

    def _edit_groups(
        self, n_shards: int, selected: frozenset[bytes] | None
    ) -> Iterator[tuple[int, list[tuple[bytes, Edit]]]]:
        """The edits (of ``selected`` keys, or all), grouped by their shard among
        ``n_shards``, in shard order (empty groups left out)."""
        for number, group in self._replica.log.edits.by_shard(n_shards):
            if selected is not None:
                group = [(kb, edit) for kb, edit in group if kb in selected]
            if group:
                yield number, group

    def _verdicts(
        self, head: dict | None, number: int, n_shards: int, group: list[tuple[bytes, Edit]],
        contents: dict[bytes, Entry] | None = None,
    ) -> tuple[list[State], Mapping[bytes, Entry | None]]:
        """The state of each edit of ``group`` (in its order), all of shard ``number`` of
        ``n_shards`` (as many as the head's or more), and the remote entries they were
        judged by (key -> entry; a key not there has none): ``contents`` (that shard's in
        the head) when given, else those of the head."""
        replica = self._replica
        replacing = replica.log.replace
        if contents is not None:
            found: Mapping[bytes, Entry | None] = contents
        elif head is None:
            found = {}
        else:
            name = fmt.shard_name_at(head, fmt.shard_under(head, number, n_shards))
            found = replica.remote.shard_entries(name, [kb for kb, _ in group], self._remember_shards)
        get, edit_ts = found.get, self._edit_ts
        return [  # a list, not a generator: these run once a key of a push, twice
            three_way(edit, get(kb), edit_ts(kb, edit) if edit.retimed else None, replacing)
            for kb, edit in group
        ], found

    def _load_head_shards(self, head: dict | None, n_plan: int, selected: frozenset[bytes] | None) -> bool:
        """Fetch the head's shards that hold edits and are not local, in parallel (kept in
        the mirror, not parsed); returns whether the push keeps the shards it parses in
        memory (a few shards' worth of keys at most: :data:`PUSH_BATCH_KEYS`). With edits
        four times as many as shards or more, nearly every shard holds one: all are fetched
        without grouping the edits."""
        if head is None:
            return True
        if selected is None and len(self._replica.log.edits) >= 4 * head["n_shards"]:
            names = [name for _, name in fmt.iter_shard_names(head)]
        else:
            numbers = {fmt.shard_under(head, number, n_plan) for number, _ in self._edit_groups(n_plan, selected)}
            names = [fmt.shard_name_at(head, i) for i in sorted(numbers)]
        self._replica.remote.load_shards(names, remember=False)  # searched, not parsed, if local
        return len(names) * fmt.KEYS_PER_SHARD <= PUSH_BATCH_KEYS

    def _edit_ts(self, kb: bytes, edit: Edit) -> int | None:
        """The local timestamp the three-way rule needs for ``edit``: a retimed edit's
        (``None`` for any other edit, which the rule compares by md5 alone)."""
        if not edit.retimed:
            return None
        return self._replica.local_timestamp(kb)

    def _settle(self, settled: list[tuple[bytes, Entry | None]]) -> None:
        """Forget edits equal to the remote; the local copy takes the remote timestamp."""
        if settled:
            self._replica.settle(settled)

    def _commit(self, plan: _Plan, metadata: bool, message: str | None, result: PushResult) -> None:
        replica = self._replica
        remote = replica.remote
        head = None if replica.log.replace else remote.manifest
        commit_id = fmt.new_commit_id()
        shards, n_shards, n_keys, n_bytes, uploaded = self._write(plan, head, commit_id)
        content = {
            "uuid": replica.uuid,
            "key_serializer": replica.codec.key_serializer_name,
            "value_serializer": replica.codec.value_serializer_name,
            "n_buckets": n_buckets(replica.data),
            "n_shards": n_shards,
            "shards": shards,
            "n_keys": n_keys,
            "n_bytes": n_bytes,
            "metadata": replica.data.get_metadata() if metadata else (head or {}).get("metadata"),
            "message": message,
            "changed_keys": plan.n_sets + plan.n_deletes,
        }
        manifest = fmt.build_manifest(content, remote.manifest, commit_id=commit_id)
        result.bytes_uploaded += uploaded  # counted even if this attempt loses the race
        remote.commit(manifest, remote.etag)
        result.keys_pushed = plan.n_sets
        result.keys_deleted = plan.n_deletes
        result.commit_id = commit_id
        result.seq = manifest["seq"]
        logger.info(
            "pushed %d key(s), deleted %d, %d bytes of values: commit %d of %s",
            result.keys_pushed, result.keys_deleted, result.bytes_uploaded, result.seq,
            replica.conn.db_url,
        )

    def _write(
        self, plan: _Plan, head: dict | None, commit_id: str
    ) -> tuple[list[str | None], int, int, int, int]:
        """Upload the values of ``plan`` and the index shards they touch, a batch of
        shards after the other (shards holding :data:`PUSH_BATCH_KEYS` keys to set, at
        least one shard): the edits of a batch's shards are read (:meth:`EditMap.by_shard`)
        and their values read, packed and uploaded, then its new shards, while the next
        batch's values are read. Nothing of the size of the push or of the database is
        held: only what two batches hold, the packs in flight and a count a shard.

        Returns the manifest's shard list, the shard count, the key and byte counts and
        the bytes of values uploaded.

        A value is uploaded once at most when it is already in its shard, in a journaled
        upload of an earlier attempt, or equal to another value of its shard in this
        push (a value over :data:`PART_SIZE`: of any shard); a value is checked against
        the md5 journaled with its edit before upload (see :meth:`Replica.damaged_edit`).
        """
        replica = self._replica
        n_shards = remote_module.shard_count(head, plan.n_sets)
        sets, touched = _per_shard(plan, n_shards)
        shards, numbers = replica.remote.shards_to_write(head, n_shards, touched, self._remember_shards)
        counts = [head["n_keys"] if head else 0, head["n_bytes"] if head else 0]
        batch_of, n_batches = _batches(numbers, sets, counts[0] // n_shards)
        remember = n_batches <= 1
        writer = _PushWriter(replica, self._journaled_uploads(), commit_id, remember, self._progress)
        groups = self._edit_groups(n_shards, plan.selected)
        group = next(groups, None)
        spill = None
        try:
            if n_batches > 1 and replica.scan_pays(plan.n_sets):
                spill = _ValueSpill(replica, batch_of, n_shards, n_batches)
            batch: list[_ShardWrite] = []
            for i in numbers:
                if batch and batch_of[i] != batch_of[batch[0].number]:
                    writer.send(batch, spill and spill.values(batch_of[batch[0].number]))
                    batch = []
                shard = _ShardWrite(
                    i, replica.remote.shard_contents(head, i, n_shards, self._remember_shards),
                    writer.shared,
                )
                if group is not None and group[0] == i:
                    self._apply_edits(head, shard, n_shards, group[1], sets.get(i, 0))
                    group = next(groups, None)
                batch.append(shard)
            if group is not None:  # edits the plan did not count: they would be forgotten
                raise RuntimeError(f"internal error: the edits of shard {group[0]} were not planned")
            if batch:
                writer.send(batch, spill and spill.values(batch_of[batch[0].number]))
            for i, name, keys_delta, bytes_delta in writer.finish():
                shards[i] = name
                counts[0] += keys_delta
                counts[1] += bytes_delta
        except BaseException:
            writer.cancel()
            raise
        finally:
            if spill is not None:
                spill.close()
        return shards, n_shards, counts[0], counts[1], writer.uploaded

    def _apply_edits(
        self, head: dict | None, shard: _ShardWrite, n_shards: int, group: list[tuple[bytes, Edit]],
        n_sets: int,
    ) -> None:
        """Apply to ``shard`` the deletions of the edits of ``group`` (its keys), add its
        keys to set to its ``to_send`` (key -> the md5 of its value), and forget its edits
        already equal to the remote (:meth:`_settle`). ``n_sets``: the keys to set the plan
        counted in the shard; when that is every edit of ``group``, they are not judged
        again (the mutex held since, nothing changed them)."""
        contents, to_send = shard.contents, shard.to_send
        if n_sets == len(group):
            md5s = list(map(_MD5, map(_EDIT, group)))
            if None not in md5s:  # a deletion would be a plan gone wrong: judged below
                to_send.update(zip(map(_KEY, group), md5s, strict=True))
                return
        settled = []
        states, _ = self._verdicts(head, shard.number, n_shards, group, contents)
        for (kb, edit), state in zip(group, states, strict=True):
            if state is State.SETTLED:
                settled.append((kb, contents.get(kb)))
            elif edit.md5 is None:
                contents.pop(kb, None)
            else:
                to_send[kb] = edit.md5
        self._settle(settled)

    def _settle_only(self, plan: _Plan) -> None:
        """Forget the edits already equal to the remote, a shard at a time, when a push
        has nothing else to do (:meth:`_write` does it for one that commits)."""
        head = None if self._replica.log.replace else self._replica.remote.manifest
        for number, group in self._edit_groups(plan.n_plan, plan.selected):
            states, found = self._verdicts(head, number, plan.n_plan, group)
            self._settle([(kb, found.get(kb)) for (kb, _), state in zip(group, states, strict=True)
                          if state is State.SETTLED])

    def _journaled_uploads(self) -> dict[bytes, Entry | None]:
        """md5 -> location of the values an earlier push uploaded but did not commit,
        whose pack is still there (vacuum() deletes the packs of pushes that never committed)."""
        uploads = dict(self._replica.log.uploads)
        alive = self._existing_packs({up.pack for up in uploads.values()})
        return {
            m: Entry(m, up.timestamp, up.pack, up.offset, up.length)
            for m, up in uploads.items() if up.pack in alive
        }

    def _existing_packs(self, packs: set[bytes]) -> set[bytes]:
        """Those of ``packs`` still in the bucket (one 1-byte GET each, once per push)."""
        checked = self._packs_checked
        todo = packs - checked.keys()
        alive = self._replica.remote.existing_packs(todo)
        checked.update((p, p in alive) for p in todo)
        return {p for p in packs if checked[p]}

    def _after_commit(self, plan: _Plan, metadata: bool) -> None:
        self._replica.record_push(None if plan.selected is None else list(plan.selected), metadata)


def _per_shard(plan: _Plan, n_shards: int) -> tuple[dict[int, int], set[int]]:
    """The keys to set in each shard of ``n_shards`` (at most ``plan.n_plan``, both powers
    of two: a shard of the plan lies in one of them) and the shards a deletion or a set
    touches."""
    factor = plan.n_plan // n_shards
    sets: dict[int, int] = {}
    touched: set[int] = set()
    for number, (n_set, n_delete) in enumerate(zip(plan.sets, plan.deletes, strict=True)):
        if n_set or n_delete:
            i = number // factor
            sets[i] = sets.get(i, 0) + n_set
            touched.add(i)
    return sets, touched


def _batches(numbers: Iterable[int], sets: dict[int, int], kept: int) -> tuple[dict[int, int], int]:
    """The batch of each shard a push writes (shards in order, a batch closed once it
    holds :data:`PUSH_BATCH_KEYS` keys: ``sets`` by shard, and ``kept``, the head's keys
    a shard holds on average) and the number of batches."""
    batch_of: dict[int, int] = {}
    batch = held = 0
    for i in numbers:
        if held >= PUSH_BATCH_KEYS:
            batch, held = batch + 1, 0
        batch_of[i] = batch
        held += sets.get(i, 0) + kept
    return batch_of, batch + 1 if batch_of else 0


Block = tuple[Sequence[int], Sequence[bytes], Sequence[int], Sequence[bytes]]
"""Values a push reads, a column each: shard numbers, encoded keys, timestamps, encoded
values."""


def _chunks(
    records: Iterable[tuple[bytes, int, bytes]],
) -> Iterator[tuple[list[bytes], list[int], list[bytes]]]:
    """``records`` (``(key, timestamp, value)``) a chunk at a time, a column each (keys,
    timestamps, values): :data:`CHUNK_RECORDS` at most, cut once the values reach an
    eighth of :data:`SPILL_BUFFER`. No record's tuple is kept: tuples alive by the
    thousand are what the garbage collector walks."""
    keys: list[bytes] = []
    timestamps: list[int] = []
    values: list[bytes] = []
    size, most, largest = 0, CHUNK_RECORDS, SPILL_BUFFER // 8
    for kb, ts, raw in records:
        keys.append(kb)
        timestamps.append(ts)
        values.append(raw)
        size += len(raw)
        if size >= largest or len(keys) >= most:
            yield keys, timestamps, values
            keys, timestamps, values, size = [], [], [], 0
    if keys:
        yield keys, timestamps, values


_TO_SEND = operator.attrgetter("to_send")
_KNOWN = operator.attrgetter("known")
_CONTENTS = operator.attrgetter("contents")


def _consume(calls: Iterable[Any]) -> None:
    """Run ``calls``, a ``map`` of a function called for its effect: a loop in C, not in
    Python, for the loops that make one call a value."""
    deque(calls, maxlen=0)


class _ValueSpill:
    """The values of a push of several batches that sets half the data file or more:
    one scan of the data file reads them, and sets each batch's aside in an unnamed
    temporary file beside it, so that a batch reads its own back in a few sequential
    reads (a lookup per key costs ~20 µs; a scan per batch, a scan of the file each).
    What it holds in memory is :data:`SPILL_BUFFER` at most, shared by the batches, and
    a chunk of the scan (an eighth of that).

    The value of every key of a batch's shards is set aside (the push sets half the file
    or more: telling its keys from the others would cost a lookup a record); the batch
    takes those of its keys (:meth:`_PushWriter.send`). A scan cut short by a write
    to the data file (:class:`ScanInterrupted`) leaves the rest to lookups.

    The scan is read a chunk at a time (:func:`_chunks`), and the records of a chunk
    that go to one batch are set aside as one block of columns: their count, then shard
    numbers, key lengths, value lengths and timestamps, then the keys and the values
    back to back (no Python call a value, set aside or read back).
    """

    _COUNT = struct.Struct("<I")  # records in a block

    def __init__(self, replica: Replica, batch_of: dict[int, int], n_shards: int, n_batches: int):
        self._file = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
            dir=replica.path.parent, prefix=".ebooklet-push-"
        )
        self._chunks: list[list[tuple[int, int]]] = [[] for _ in range(n_batches)]
        self._end = 0
        buffers = [bytearray() for _ in range(n_batches)]
        limit = max(SPILL_BUFFER // n_batches, SPILL_BATCH_MIN)
        batch_or_none = functools.partial(map, batch_of.get)
        try:
            for chunk in _chunks(replica.scan()):
                numbers = fmt.shards_of(chunk[0], n_shards)
                columns = (numbers, *chunk)
                del chunk
                by_batch: list[list[int]] = [[] for _ in range(n_batches + 1)]
                _consume(map(  # the positions of each batch's records; the last: shards not written
                    list.append, map(by_batch.__getitem__, batch_or_none(numbers, itertools.repeat(-1))),
                    range(len(numbers)),
                ))
                for b, positions in enumerate(by_batch[:-1]):
                    if positions:
                        self._put(buffers[b], *(list(map(column.__getitem__, positions)) for column in columns))
                        if len(buffers[b]) >= limit:
                            self._flush(b, buffers[b])
        except ScanInterrupted:
            pass  # the values not set aside are looked up by the batches
        for b, buffer in enumerate(buffers):
            self._flush(b, buffer)

    def _put(
        self, buffer: bytearray, numbers: list[int], keys: list[bytes], timestamps: list[int],
        values: list[bytes],
    ) -> None:
        """Append records (shard numbers, keys, timestamps, values) to ``buffer`` as a block."""
        n = len(numbers)
        buffer += self._COUNT.pack(n)
        buffer += struct.pack(f"<{3 * n}I{n}q", *numbers, *map(len, keys), *map(len, values), *timestamps)
        buffer += b"".join(keys)
        buffer += b"".join(values)

    def _flush(self, b: int, buffer: bytearray) -> None:
        if buffer:
            self._file.write(buffer)
            self._chunks[b].append((self._end, len(buffer)))
            self._end += len(buffer)
            buffer.clear()

    def values(self, b: int) -> Iterator[Block]:
        """The values set aside for batch ``b`` (once), a block for each piece of the
        file they were written in."""
        self._file.flush()
        fd = self._file.fileno()
        chunks, self._chunks[b] = self._chunks[b], []
        for at, length in chunks:
            data = os.pread(fd, length, at)
            numbers: list[int] = []
            keys: list[bytes] = []
            timestamps: list[int] = []
            values: list[bytes] = []
            pos = 0
            while pos < length:
                (n,) = self._COUNT.unpack_from(data, pos)
                columns = struct.unpack_from(f"<{3 * n}I{n}q", data, pos + self._COUNT.size)
                pos += self._COUNT.size + 20 * n
                key_ends = list(itertools.accumulate(columns[n : 2 * n], initial=pos))
                value_ends = list(itertools.accumulate(columns[2 * n : 3 * n], initial=key_ends[-1]))
                pos = value_ends[-1]
                numbers += columns[:n]
                keys += map(data.__getitem__, map(slice, key_ends, key_ends[1:]))
                timestamps += columns[3 * n :]
                values += map(data.__getitem__, map(slice, value_ends, value_ends[1:]))
            del data
            yield numbers, keys, timestamps, values

    def close(self) -> None:
        """Delete the temporary file."""
        self._file.close()


class _PushWriter:
    """The uploads of one push attempt: values in packs and large values on the
    connection's workers, then each shard once its values are up (see :meth:`Changes._write`).

    At most :data:`PUSH_IN_FLIGHT` bytes of packs and shards of :data:`PUSH_BATCH_KEYS`
    keys (at least one shard; at most ``conn.threads``) are in flight; a batch of shards is
    finished (duplicates located, shards uploaded) when the next batch's values are sent.
    ``remember``: keep the new shards decoded in memory (a push of one batch at most),
    not only in the local mirror.
    """

    def __init__(
        self, replica: Replica, shared: dict, commit_id: str, remember: bool, progress: Progress
    ):
        self._replica = replica
        self._progress = progress
        self._progress_start = progress.done
        self._remember = remember
        self._remote = replica.remote
        self._workers = replica.conn.workers
        self._threads = replica.conn.threads
        self._commit_id = commit_id
        self.shared = shared
        self.uploaded = 0
        self._packs: deque[tuple[list[_ShardWrite], tuple[NewPack, list[dict[bytes, Entry]]], Future]] = deque()
        self._open: deque[list[_ShardWrite]] = deque()
        self._shards: deque[tuple[int, Future]] = deque()  # (keys, upload) in flight
        self._shard_keys = 0  # keys of the shards in flight
        self._done: list[tuple[int, str | None, int, int]] = []
        self._large = _LargeUploads(self._remote, self._finished, lambda kb: replica.damaged_edit(kb, True))
        self._batch: list[_ShardWrite] = []  # the batch being sent
        self._new, self._owners = NewPack(), []  # the pack being filled, the contents of each value's shard

    def send(self, batch: list[_ShardWrite], spilled: Iterable[Block] | None = None) -> None:
        """Read, check and upload the values of the keys of each shard's ``to_send`` (of
        ``batch``; emptied), then finish the batch before it. ``spilled``: values set
        aside for the batch (:class:`_ValueSpill`; those of other keys are skipped); the
        keys it lacks are looked up.

        Raises:
            IntegrityError: a value is missing from the data file or is not the one
                journaled with its edit.
        """
        self._batch = batch
        by_number = {shard.number: shard for shard in batch}
        for numbers, keys, timestamps, values in self._values(batch, spilled):
            self._add_block(list(map(by_number.__getitem__, numbers)), keys, timestamps, values)
        missing = [kb for shard in batch for kb in shard.to_send]
        if missing:  # not in the data file
            raise self._replica.damaged_edit(min(missing), False)
        self._send_pack()
        self._open.append(batch)
        while len(self._open) > 1:
            self._finish_batch(self._open.popleft())

    def _add_block(
        self, shards: list[_ShardWrite], keys: Sequence[bytes], timestamps: Sequence[int],
        values: Sequence[bytes],
    ) -> None:
        """Check and pack the values of a block (``shards``: the shard of each) whose keys
        are to send; skip the others. A block of small values that are all new (no md5
        twice, none known) is checked and packed a column at a time, any other a value
        at a time (:meth:`_add_value`)."""
        expected = list(map(dict.pop, map(_TO_SEND, shards), keys, itertools.repeat(None)))
        if None in expected:  # values set aside for keys this push does not send
            sent = list(map(operator.is_not, expected, itertools.repeat(None)))
            shards, keys, timestamps, values, expected = (
                list(itertools.compress(column, sent)) for column in (shards, keys, timestamps, values, expected)
            )
        if not keys:
            return
        if max(map(len, values)) > remote_module.PART_SIZE or not self._all_new(shards, expected):
            _consume(map(self._add_value, shards, keys, timestamps, values, expected))
            return
        digests = fmt.md5s(values)
        if digests != expected:
            damaged = next(kb for kb, m, d in zip(keys, expected, digests, strict=True) if m != d)
            raise self._replica.damaged_edit(damaged, True)
        _consume(map(dict.__setitem__, map(_KNOWN, shards), digests, keys))  # uploaded under this key
        self._extend_pack(shards, keys, timestamps, values, digests)

    def _all_new(self, shards: list[_ShardWrite], md5s: list[bytes]) -> bool:
        """Whether no two of ``md5s`` are equal and none is known to the push or to its
        shard (the same place in ``shards``)."""
        distinct = set(md5s)  # a dict's keys() view checks the smaller side of the two
        return (
            len(distinct) == len(md5s)
            and self.shared.keys().isdisjoint(distinct)
            and not any(map(operator.contains, map(_KNOWN, shards), md5s))
        )

    def _add_value(self, shard: _ShardWrite, kb: bytes, ts: int, raw: bytes, m: bytes) -> None:
        """Check and upload one value of ``shard`` whose edit journaled the md5 ``m``: in
        the pack being filled, on its own when large, not at all when known (a duplicate)."""
        if len(raw) > remote_module.PART_SIZE:
            self._large.add(shard, kb, ts, raw, m)
            return
        if fmt.md5(raw) != m:
            raise self._replica.damaged_edit(kb, True)
        if shard.reuses(m):
            shard.duplicates.append((kb, m, ts))
            return
        shard.known[m] = kb  # uploaded under this key by this push
        self._extend_pack([shard], [kb], [ts], [raw], [m])

    def _extend_pack(
        self, shards: Sequence[_ShardWrite], keys: Sequence[bytes], timestamps: Sequence[int],
        values: Sequence[bytes], md5s: Sequence[bytes],
    ) -> None:
        """Add values of the batch's ``shards`` to the pack being filled, in order, sending
        it each time it reaches :data:`PACK_SIZE` (with the value that reaches it)."""
        lengths = list(map(len, values))
        start = 0
        while start < len(keys):
            room = remote_module.PACK_SIZE - len(self._new.values)
            stop = start + bisect.bisect_left(list(itertools.accumulate(lengths[start:])), room) + 1
            self._new.extend(keys[start:stop], values[start:stop], md5s[start:stop], timestamps[start:stop])
            self._owners.extend(map(_CONTENTS, shards[start:stop]))
            if len(self._new.values) >= remote_module.PACK_SIZE:
                self._send_pack()
            start = stop

    def finish(self) -> list[tuple[int, str | None, int, int]]:
        """Finish every shard; returns ``(number, its commit id or None when empty, key
        count change, byte count change)`` of each."""
        while self._open:
            self._finish_batch(self._open.popleft())
        self.uploaded += self._large.wait()
        self._progress.set_total(self._progress_start + self.uploaded)
        while self._shards:
            self._collect_shard()
        return self._done

    def cancel(self) -> None:
        """The push fails: start no more large uploads."""
        self._large.cancel()

    def _values(self, batch: list[_ShardWrite], spilled: Iterable[Block] | None) -> Iterator[Block]:
        """The blocks ``spilled``, then those of the keys still to send by ``batch`` (listed
        once ``spilled`` is read) from the data file."""
        looked_up = self._looked_up(batch)
        return looked_up if spilled is None else itertools.chain(spilled, looked_up)

    def _looked_up(self, batch: list[_ShardWrite]) -> Iterator[Block]:
        """The values of the keys still to send by ``batch`` from the data file, in blocks."""
        owner = {kb: shard.number for shard in batch for kb in shard.to_send}
        if owner:
            for keys, timestamps, values in _chunks(self._replica.stored_values(list(owner))):
                yield list(map(owner.__getitem__, keys)), keys, timestamps, values

    def _send_pack(self) -> None:
        """Send the pack being filled (if it holds a value), of the batch's shards, and
        start another."""
        new, owners = self._new, self._owners
        if owners:
            self.uploaded += len(new.values)
            self._packs.append((self._batch, (new, owners), self._workers.submit(self._remote.send_pack, new)))
            self._new, self._owners = NewPack(), []
        in_flight = max(1, min(self._threads, PUSH_IN_FLIGHT // remote_module.PACK_SIZE))
        while len(self._packs) > in_flight:
            self._collect_pack()

    def _collect_pack(self) -> None:
        _, (new, owners), future = self._packs.popleft()
        footer = future.result()
        _consume(map(dict.__setitem__, owners, new.keys, new.entries()))
        self._replica.log.record_pack(new.pack, footer)
        self._progress.update(len(new.values))

    def _finished(self, shard: _ShardWrite, done: PackUpload) -> None:
        """A large value of ``shard`` is up."""
        for kb, entry in done.located:
            shard.contents[kb] = shard.known[entry.md5] = self.shared[entry.md5] = entry
        self._replica.log.record_pack(done.pack, done.footer)
        self._progress.update(sum(entry.length for _, entry in done.located))

    def _finish_batch(self, batch: list[_ShardWrite]) -> None:
        """Wait for the batch's uploads, locate its duplicates and start its shards' uploads."""
        while self._packs and any(b is batch for b, _, _ in self._packs):
            self._collect_pack()
        for shard in batch:
            self._large.wait_for(shard)
            shard.locate_duplicates()
            self._shards.append((len(shard.contents), self._workers.submit(self._upload_shard, shard)))
            self._shard_keys += len(shard.contents)
            while len(self._shards) > self._threads or (
                len(self._shards) > 1 and self._shard_keys > PUSH_BATCH_KEYS
            ):
                self._collect_shard()

    def _collect_shard(self) -> None:
        keys, future = self._shards.popleft()
        self._shard_keys -= keys
        self._done.append(future.result())

    def _upload_shard(self, shard: _ShardWrite) -> tuple[int, str | None, int, int]:
        contents = shard.contents
        written = None
        if contents:
            self._remote.upload_shard(self._commit_id, shard.number, contents, self._remember)
            written = self._commit_id
        n_bytes = sum(map(_LENGTH, contents.values()))
        return shard.number, written, len(contents) - shard.old_keys, n_bytes - shard.old_bytes
