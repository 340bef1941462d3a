"""Checking a remote database: every referenced object present, values matching their md5s."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .. import format as fmt
from ..connection import S3Connection
from ..errors import FormatVersionError, IntegrityError, ReadOnlyError, RemoteNotFoundError
from ..format import Entry
from ..remote import MemoryMirror, RemoteIndex, plan_ranges, read_pack_footer
from ..replica import Replica
from .history import iter_chain


@dataclass
class CheckResult:
    """What :func:`ebooklet.check` found.

    Attributes:
        seq, commit_id: the head commit checked.
        commits: commits of the history walked.
        shards_checked, packs_checked, values_checked: objects and values verified.
        missing: referenced objects that do not exist.
        corrupt: descriptions of damaged objects and values.
        orphans: objects under ``D.ebk/`` no commit of the history references
            (``None`` when the connection cannot list, e.g. a public URL).
            ``vacuum()`` deletes them; ``check`` never deletes anything.
    """

    seq: int = 0
    commit_id: str = ""
    commits: int = 0
    shards_checked: int = 0
    packs_checked: int = 0
    values_checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    orphans: list[str] | None = None

    @property
    def ok(self) -> bool:
        """True when nothing referenced is missing or corrupt (orphans are harmless)."""
        return not self.missing and not self.corrupt


def check_remote(conn: S3Connection, sample: int | float | None = None, seed: int | None = None) -> CheckResult:
    """Verify the remote database of ``conn`` without changing anything: the work of
    :func:`ebooklet.check`, whose docstring says what is checked.

    Raises:
        RemoteNotFoundError: there is no database at ``conn``.
    """
    result = CheckResult()
    index = RemoteIndex(conn, MemoryMirror())
    try:
        head, _ = index.fetch_manifest()
    except (IntegrityError, FormatVersionError) as exc:
        result.corrupt.append(f"manifest: {exc}")
        return result
    if head is None:
        raise RemoteNotFoundError(f"There is no database at {conn!r} (or it is not public).")
    result.seq, result.commit_id = head["seq"], head["commit_id"]
    listing = dict(conn.list(fmt.PREFIX)) if conn.writable else None

    def exists(name: str) -> bool:
        if listing is not None:
            return name in listing
        try:
            conn.get_range(name, 0, 1)
            return True
        except RemoteNotFoundError:
            return False

    record = fmt.commit_name(head["seq"], head["commit_id"])
    if not exists(record):
        result.missing.append(record)
    chain = list(iter_chain(conn, head, listing=listing)) if listing is not None else [head]
    result.commits = len(chain)
    referenced = {fmt.commit_name(m["seq"], m["commit_id"]) for m in chain}
    names = list(dict.fromkeys(name for m in chain for _, name in fmt.iter_shard_names(m)))
    referenced.update(names)

    def load(name: str) -> str | None:
        """``None`` when the shard is intact, else what is wrong with it."""
        if listing is not None and name not in listing:
            return "missing"
        try:
            index.shard(name)
        except RemoteNotFoundError:
            return "missing"
        except IntegrityError as exc:
            return str(exc)
        return None

    good = set()
    for name, problem in zip(names, conn.workers.map(load, names), strict=True):
        result.shards_checked += 1
        if problem == "missing":
            result.missing.append(name)
        elif problem is not None:
            result.corrupt.append(problem)
        else:
            good.add(name)
            referenced.update(fmt.pack_name(e.pack) for e in index.shard(name).values())
    head_entries = [
        item for _, name in fmt.iter_shard_names(head) if name in good for item in index.shard(name).items()
    ]
    packs = sorted(n for n in referenced if n.startswith(fmt.PREFIX + "pack/"))
    present = dict(zip(packs, conn.workers.map(exists, packs), strict=True))
    result.packs_checked = len(packs)
    result.missing.extend(n for n, ok in present.items() if not ok)
    if listing is not None:
        for key, e in head_entries:
            size = listing.get(fmt.pack_name(e.pack))
            if size is not None and e.offset + e.length > size:
                result.corrupt.append(f"{key!r}: its value lies past the end of {fmt.pack_name(e.pack)}")
    wanted = [(k, e) for k, e in head_entries if present.get(fmt.pack_name(e.pack))]
    wanted = _sample(wanted, sample, seed)
    result.values_checked = len(wanted)
    result.corrupt.extend(_verify_values(conn, wanted))
    if listing is not None:
        result.orphans = sorted(n for n in listing if n not in referenced and n != fmt.LOCK_NAME)
    return result


def _sample(wanted: list, sample: int | float | None, seed: int | None) -> list:
    if sample is None:
        return wanted
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or sample <= 0:
        raise ValueError(f"sample must be a positive count, a fraction in (0, 1], or None; not {sample!r}.")
    n = sample if isinstance(sample, int) else max(1, round(sample * len(wanted)))
    if isinstance(sample, float) and sample > 1:
        raise ValueError(f"A sample fraction must be at most 1, not {sample}.")
    if n >= len(wanted):
        return wanted
    return random.Random(seed).sample(wanted, n)


def _verify_values(conn: S3Connection, wanted: list[tuple[bytes, Entry]]) -> list[str]:
    """Fetch values range by range and describe every one that does not match its md5."""
    ranges = plan_ranges(wanted)

    def verify(rng: Any) -> list[str]:
        name = fmt.pack_name(rng.pack)
        try:
            data = conn.get_range(name, rng.start, rng.length)
        except (IntegrityError, RemoteNotFoundError) as exc:
            return [f"{name}: {exc}"]
        bad = []
        for key, e in rng.items:
            start = e.offset - rng.start
            if fmt.md5(data[start : start + e.length]) != e.md5:
                bad.append(f"{key!r}: the value in {name} does not match its md5")
        return bad

    return [problem for problems in conn.workers.map(verify, ranges) for problem in problems]


def remote_hash(replica: Replica) -> dict[Any, tuple[str, int]]:
    """The remote index rebuilt from the footers of every pack of ``replica``'s remote:
    ``key -> (md5 hex, timestamp)``, the newest timestamp winning (see
    :meth:`EBooklet.get_remote_hash`).

    Raises:
        ReadOnlyError: the connection cannot list the bucket (none, or a public URL).
    """
    replica.check_open()
    conn = replica.conn
    if conn is None or not conn.writable:
        raise ReadOnlyError("get_remote_hash lists the bucket: it needs an S3Connection with credentials.")
    found: dict[bytes, tuple[bytes, int]] = {}
    packs = [name for name, _ in conn.list(fmt.PREFIX + "pack/") if fmt.is_own_name(name)]
    for items, _, _ in conn.workers.map(lambda name: read_pack_footer(conn, name), packs):
        for item in items:
            if item.key not in found or found[item.key][1] < item.timestamp:
                found[item.key] = (item.md5, item.timestamp)
    return {replica.codec.decode_key(k): (m.hex(), ts) for k, (m, ts) in found.items()}
