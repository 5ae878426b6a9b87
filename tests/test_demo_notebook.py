"""The demo notebook through nbclient: the bad cell gets a sparse_to_dense alert on its
densifying line, the sparse-preserving fix gets none."""

import pathlib

import pytest

ALERT_MIME = "application/vnd.memguard.alert+json"
NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "sparse_to_dense.ipynb"


def _alerts(cell):
    return [o["data"][ALERT_MIME] for o in cell.get("outputs", [])
            if o.get("output_type") == "display_data" and ALERT_MIME in o.get("data", {})]


@pytest.mark.stack
def test_demo_notebook_alerts_on_the_densifying_line_only():
    import nbformat  # here, not at the top: collecting this file must not need the stack
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    bad = next(c for c in code if ".toarray()" in c.source)
    fix = next(c for c in code if c is not bad and "mean(axis=0)" in c.source
               and ".toarray()" not in c.source)
    densify_line = next(i for i, text in enumerate(bad.source.splitlines(), 1) if ".toarray()" in text)
    alerts = _alerts(bad)
    kinds = {a["kind"] for a in alerts}
    assert "sparse_to_dense" in kinds, alerts
    s2d = [a for a in alerts if a["kind"] == "sparse_to_dense"]
    assert all(a["line"] == densify_line for a in s2d)
    assert all(a["cell"] == bad.execution_count for a in s2d)
    assert s2d[0]["format"] == "csr" and s2d[0]["dense_bytes"] >= 256 * 2**20
    assert not [a for a in _alerts(fix) if a["kind"] == "sparse_to_dense"]
