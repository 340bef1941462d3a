"""Mirrors (see ``remote.Mirror``) kept in memory, for the ``RemoteIndex`` that maintenance
operations read index shards through."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class MemoryMirror:
    """A mirror (see ``remote.Mirror``) kept in memory: for one-off remotes (copy targets, checks)."""

    def __init__(self) -> None:
        self._manifest: tuple[dict | None, str | None] = (None, None)
        self._shards: dict[str, bytes] = {}

    def get_manifest(self) -> tuple[dict | None, str | None]:
        return self._manifest

    def set_manifest(self, manifest: dict | None, etag: str | None) -> None:
        self._manifest = (manifest, etag)

    def get_shard(self, name: str) -> bytes | None:
        return self._shards.get(name)

    def set_shard(self, name: str, data: bytes) -> None:
        self._shards[name] = data

    def drop_shards(self, names: Iterable[str]) -> None:
        for name in names:
            self._shards.pop(name, None)


class PinnedMirror(MemoryMirror):
    """The mirror of a snapshot: the pinned manifest in memory, shards through the real mirror.

    Index shards are immutable and named by the commit that wrote them, so the
    local ``P.remote_index`` can share them; its ``head`` is never changed.
    """

    def __init__(self, manifest: dict, base: Any):
        super().__init__()
        self._manifest = (manifest, None)
        self._base = base

    def get_shard(self, name: str) -> bytes | None:
        return self._base.get_shard(name)

    def set_shard(self, name: str, data: bytes) -> None:
        self._base.set_shard(name, data)

    def drop_shards(self, names: Iterable[str]) -> None:
        pass
