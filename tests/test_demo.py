"""`python -m ebooklet.demo` (the README's first command) runs and passes its own checks.

The demo always starts its own local moto_server, whatever S3 target the suite uses.
"""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_verifies_itself() -> None:
    """The demo starts its own S3 server, round-trips 500 values and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "ebooklet.demo", "--keys", "500"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "OK: every check passed" in proc.stdout, output
    for step in ("push #1", "load_items() of all keys", "push #2", "reader.pull()"):
        assert step in proc.stdout, output


def test_demo_rejects_bad_arguments() -> None:
    """A bad option is a usage error (exit 2), not a crash."""
    proc = subprocess.run(
        [sys.executable, "-m", "ebooklet.demo", "--keys", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--keys" in proc.stderr
