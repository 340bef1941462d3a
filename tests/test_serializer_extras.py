"""A serializer whose package is not installed is refused at open, naming the extra.

booklet imports its optional packages (zstandard, msgpack, numpy, pandas...) when it can
and fails at the first value otherwise. Each test runs ``ebooklet.open`` in a child
process whose ``sys.meta_path`` refuses to import the packages named, as on a machine
where they were never installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import booklet
import pytest

import ebooklet
from ebooklet import serializers

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"

CHILD = r"""
import json, sys

spec = json.loads(sys.argv[1])
blocked = set(spec["blocked"])


class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Uninstalled())
import ebooklet

results = []
for target, path, kwargs, value in spec["opens"]:
    try:
        with ebooklet.open(target, path, **kwargs) as db:
            if value is not None:
                db["k"] = value
                assert db["k"] == value
        results.append({"error": None})
    except Exception as exc:
        results.append({"error": type(exc).__name__, "message": str(exc)})
print(json.dumps(results))
"""


def run_child(blocked: list[str], opens: list[tuple[Any, str, dict, Any]]) -> list[dict]:
    """``[{"error": name or None, "message": str}]``: each ``open(target, path, **kwargs)``
    in a child that cannot import ``blocked``, writing and reading ``value`` if not None."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(ebooklet.__file__).parents[1]), *sys.path])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"blocked": blocked, "opens": opens})],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def install_hint(extras: str) -> str:
    return f'pip install "{serializers.DISTRIBUTION}[{extras}]"'


@pytest.mark.parametrize("field", ["value_serializer", "key_serializer"])
@pytest.mark.parametrize(
    ("name", "blocked", "extras"),
    [
        ("zstd", ["zstandard"], "zstd"),
        ("pickle_zstd", ["zstandard"], "zstd"),
        ("msgpack", ["msgpack"], "msgpack"),
        ("msgpack_zstd", ["zstandard"], "msgpack,zstd"),
        ("numpy_int4", ["numpy"], "numpy"),
    ],
)
def test_a_new_database_with_a_missing_package_fails_at_open(
    tmp_path: Path, field: str, name: str, blocked: list[str], extras: str
) -> None:
    [result] = run_child(blocked, [(None, str(tmp_path / "db"), {"flag": "n", field: name}, None)])
    assert result["error"] == "SerializationError", result
    assert install_hint(extras) in result["message"]
    assert f"{field} {name!r}" in result["message"]
    assert blocked[0] in result["message"]


def test_an_existing_file_with_a_missing_package_fails_at_open(tmp_path: Path) -> None:
    """Written where zstandard is installed, reopened where it is not: open() refuses."""
    pytest.importorskip("zstandard")
    path = tmp_path / "db"
    with ebooklet.open(None, path, "n", value_serializer="zstd") as db:
        db["k"] = b"v" * 100
    opens = [(None, str(path), {"flag": flag}, None) for flag in ("r", "w")]
    for result in run_child(["zstandard"], opens):
        assert result["error"] == "SerializationError", result
        assert install_hint("zstd") in result["message"]


def test_a_remote_with_a_missing_package_fails_at_open(
    conn: Any, public_url: str, tmp_path: Path
) -> None:
    """A published zstd database read by URL (with consent) where zstandard is missing."""
    pytest.importorskip("zstandard")
    with ebooklet.open(conn, tmp_path / "publisher", "n", value_serializer="zstd") as db:
        db["k"] = b"v" * 100
        db.changes().push()
    opens = [(public_url, str(tmp_path / "reader"), {"value_serializer": "zstd"}, None)]
    [result] = run_child(["zstandard"], opens)
    assert result["error"] == "SerializationError", result
    assert install_hint("zstd") in result["message"]


def test_installed_packages_are_not_refused(tmp_path: Path) -> None:
    """The same child with nothing blocked opens, writes and reads (the harness is fair)."""
    pytest.importorskip("zstandard")
    kwargs = {"flag": "n", "value_serializer": "orjson_zstd"}
    [result] = run_child([], [(None, str(tmp_path / "db"), kwargs, {"a": [1, 2]})])
    assert result == {"error": None}


def test_every_extra_named_is_in_pyproject(tmp_path: Path) -> None:
    """With every optional package missing, each booklet serializer opens or names extras
    that pyproject.toml declares, under the distribution name it declares."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["name"] == serializers.DISTRIBUTION
    declared = set(project["optional-dependencies"])
    optional = ["zstandard", "msgpack", "numpy", "pandas", "pyarrow", "geopandas", "shapely"]
    names = [n for n in booklet.available_serializers if n is not None]
    opens = [(None, str(tmp_path / n), {"flag": "n", "value_serializer": n}, None) for n in names]
    named = set()
    for name, result in zip(names, run_child(optional, opens), strict=True):
        if result["error"] is None:
            continue
        assert result["error"] == "SerializationError", (name, result)
        hint = result["message"].rpartition(f'"{serializers.DISTRIBUTION}[')[2]
        named.update(hint.partition("]")[0].split(","))
    assert named == {"zstd", "msgpack", "numpy", "pandas", "geopandas", "shapely"}
    assert named <= declared
