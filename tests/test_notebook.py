"""docs/example.ipynb runs end to end in a real Jupyter kernel, and shows HTML tables."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "example.ipynb"


def test_example_notebook_runs_and_renders_html(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("<b>Changes of" in h and "station-000" in h for h in html)  # db.changes()
    assert any("Pushed: commit 1" in h for h in html)  # the PushResult
    assert any("<b>History</b>" in h and "second survey" in h for h in html)  # db.history()
    texts = [o["data"]["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    assert "(199, {'temp': 99, 'name': 'Station 7 (faulty sensor)'})" in texts
