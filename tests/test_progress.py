"""Progress reporting: a callback for programs, a bar when asked or on a terminal,
nothing in scripts."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from ebooklet import EBookletError
from ebooklet.progress import Progress


def test_a_callback_sees_every_unit_from_every_thread():
    seen: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def callback(done: int, total: int | None) -> None:
        with lock:
            seen.append((done, total))

    with Progress(callback, total=8 * 100) as progress:
        threads = [threading.Thread(target=lambda: [progress.update(1) for _ in range(100)]) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert progress.done == 800
    assert sorted(done for done, _ in seen) == list(range(1, 801))
    assert {total for _, total in seen} == {800}


def test_silent_by_default_off_a_terminal_and_when_false(capsys):
    for how in (None, False):
        with Progress(how, total=10) as progress:
            progress.update(10)
    assert capsys.readouterr() == ("", "")


def test_true_draws_a_bar(capsys):
    with Progress(True, total=3 << 20, desc="push") as progress:
        progress.update(3 << 20)
    assert "push" in capsys.readouterr().err


def test_bad_kinds_are_refused():
    with pytest.raises(TypeError, match="progress must be"):
        Progress("yes", total=1)


def test_true_without_tqdm_names_the_extra():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'tqdm': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from ebooklet.progress import Progress\n"
        "from ebooklet import EBookletError\n"
        "try:\n"
        "    Progress(True, total=1)\n"
        "except EBookletError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert '[progress]"' in out.stdout, out.stderr
    assert EBookletError  # the type the child caught
