"""Managing remote databases: history, snapshots, diff, delete, copy, vacuum and check.

A database at object key ``D`` owns ``D`` (its manifest) and the objects under
``D.ebk/`` (see docs/format.md); nothing here ever reads or writes another key,
so sibling keys such as ``D2`` or ``D.old`` are never touched.

History is a chain: each commit's manifest names its parent ``{seq, commit_id}``
and every committed manifest is kept as ``D.ebk/commit/<seq:012d>-<commit_id>``,
so walking the chain needs only GETs (public readers can do it). ``vacuum``
shortens the chain and deletes whatever the kept commits do not reference;
``docs/history-and-vacuum.md`` explains what it guarantees.

Modules, lowest first: ``versioning`` (listing a database's object versions),
``history`` (the commit chain, pinning, diff, revert), ``copying`` (delete and copy),
``vacuum``, ``check``; they read index shards through a ``remote.RemoteIndex``. The names
below are the package's interface; ``history`` and ``vacuum`` here are the
functions, not the modules of the same name.
"""

from ..remote import MemoryMirror
from .check import CheckResult, check_remote, remote_hash
from .copying import CopyResult, DeleteResult, copy_remote, delete_remote, same_store
from .history import (
    Commit,
    History,
    KeyDiff,
    check_commit_arg,
    db_diff,
    db_head,
    diff_manifests,
    find_commit,
    history,
    iter_chain,
    pin_commit,
    stage_revert,
)
from .vacuum import DEFAULT_REWRITE_BELOW, VacuumResult, vacuum

__all__ = [
    "DEFAULT_REWRITE_BELOW",
    "CheckResult",
    "Commit",
    "CopyResult",
    "DeleteResult",
    "History",
    "KeyDiff",
    "MemoryMirror",
    "VacuumResult",
    "check_commit_arg",
    "check_remote",
    "copy_remote",
    "db_diff",
    "db_head",
    "delete_remote",
    "diff_manifests",
    "find_commit",
    "history",
    "iter_chain",
    "pin_commit",
    "remote_hash",
    "same_store",
    "stage_revert",
    "vacuum",
]
