"""``update()`` writes its pairs in batches (memory holds one batch, the encoded pairs
wait in a temporary file) and still writes all of them or none, with ``dict()``'s
semantics for its arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import ebooklet
from ebooklet import ebooklet as face


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(face, "UPDATE_BATCH", 3)
    monkeypatch.setattr(face, "UPDATE_BATCH_BYTES", 200)
    monkeypatch.setattr(face, "UPDATE_SPOOL_BYTES", 100)  # into a file after a few pairs


def test_many_batches_from_a_generator(small_batches: None, tmp_path: Path) -> None:
    with ebooklet.open(None, tmp_path / "db", "n", value_serializer="pickle") as db:
        db["kept"] = "before"
        db.update(((f"k{i}", "x" * i) for i in range(50)), k7="keyword wins")
        db.update([("dup", 1), ("dup", 2)])
        expected = {"kept": "before", **{f"k{i}": "x" * i for i in range(50)}, "k7": "keyword wins", "dup": 2}
        assert dict(db.items()) == expected
        assert len(db) == len(expected) == len(list(db.changes().iter_changes()))
    with ebooklet.open(None, tmp_path / "db", "r", value_serializer="pickle") as db:
        assert dict(db.items()) == expected


def test_a_bad_pair_in_a_late_batch_writes_nothing(small_batches: None, tmp_path: Path) -> None:
    with ebooklet.open(None, tmp_path / "db", "n", value_serializer="json") as db:
        pairs = [(f"k{i}", i) for i in range(20)]
        with pytest.raises(ebooklet.SerializationError):
            db.update([*pairs, ("bad", object())])
        with pytest.raises(ValueError, match="at most"):
            db.update([*pairs, ("k" * 70_000, 1)])
        assert list(db.keys()) == [] and list(db.changes().iter_changes()) == []


@pytest.mark.parametrize(
    "args", [([1],), ([(1, 2, 3)],), ([[[], 1]],), ({}, {}), ([("k", 1)], [])], ids=repr
)
def test_bad_arguments_fail_as_dict_does(args: tuple, tmp_path: Path) -> None:
    with pytest.raises((TypeError, ValueError)) as expected:
        dict(*args)
    with ebooklet.open(None, tmp_path / "db", "n") as db:
        with pytest.raises(type(expected.value)) as got:
            db.update(*args)
        assert str(got.value) == str(expected.value).replace("dict expected", "update expected")
        assert list(db.keys()) == []


def test_a_mapping_that_is_not_a_dict(tmp_path: Path) -> None:
    class Keys:
        def keys(self) -> list[str]:
            return ["a", "b"]

        def __getitem__(self, key: str) -> Any:
            return key.upper()

    with ebooklet.open(None, tmp_path / "db", "n", value_serializer="pickle") as db:
        db.update(Keys())
        assert dict(db.items()) == {"a": "A", "b": "B"}
