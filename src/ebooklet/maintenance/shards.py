"""What the maintenance operations share: an in-memory mirror and a reader of index shards."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .. import format as fmt
from ..connection import S3Connection
from ..format import Entry
from ..remote import RemoteIndex


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


class Shards:
    """Decoded index shards by object name, each fetched once (in parallel)."""

    def __init__(self, conn: S3Connection, remote: RemoteIndex | None = None):
        self.conn = conn
        self.remote = remote
        self._cache: dict[str, dict[bytes, Entry]] = {}

    def load(self, names: Iterable[str | None]) -> None:
        missing = []
        for name in {n for n in names if n is not None and n not in self._cache}:
            cached = self.remote.local_shard(name)[0] if self.remote is not None else None
            if cached is not None:
                self._cache[name] = cached
            else:
                missing.append(name)

        def fetch(name: str) -> tuple[str, dict[bytes, Entry]]:
            return name, fmt.decode_shard(self.conn.get(name, max_bytes=fmt.MAX_SHARD_BYTES).data, name)

        for name, shard in self.conn.map(fetch, sorted(missing)):
            self._cache[name] = shard

    def add(self, name: str, entries: dict[bytes, Entry]) -> None:
        """Remember the decoded shard ``name`` (one this process just wrote)."""
        self._cache[name] = entries

    def __getitem__(self, name: str | None) -> dict[bytes, Entry]:
        if name is None:
            return {}
        if name not in self._cache:
            self.load([name])
        return self._cache[name]

    def entries(self, manifest: dict) -> Iterator[tuple[bytes, Entry]]:
        """Every ``(key, entry)`` of a manifest."""
        names = [name for _, name in fmt.iter_shard_names(manifest)]
        self.load(names)
        for name in names:
            yield from self._cache[name].items()
