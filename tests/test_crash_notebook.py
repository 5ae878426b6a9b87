"""notebooks/post_crash_report.ipynb end to end: the kernel is SIGKILLed in the middle of a
cell (the notebook does it to itself, as the OOM killer would), restarted, and the next
`%load_ext memguard` shows the crash report under its cell, naming the killed cell and its
allocating line; `%memguard report` shows it again; the fixed version gets no alert."""

import pathlib

import pytest

ALERT_MIME = "application/vnd.memguard.alert+json"
NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "post_crash_report.ipynb"


def _alerts(cell):
    return [o["data"][ALERT_MIME] for o in cell.get("outputs", [])
            if o.get("output_type") == "display_data" and ALERT_MIME in o.get("data", {})]


def test_post_crash_notebook_tells_the_whole_story(tmp_path):
    pytest.importorskip("nbclient")
    import nbformat
    from nbclient import NotebookClient
    from jupyter_core.utils import run_sync
    from nbclient.exceptions import DeadKernelError

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    cells = {c.metadata.get("id"): (i, c) for i, c in enumerate(nb.cells)}
    died = False
    with client.setup_kernel(env={"MEMGUARD_DIR": str(tmp_path)}):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except DeadKernelError:
                died = True
                # nbclient's managers are asynchronous; nbclient itself does not restart.
                run_sync(client.km.restart_kernel)(now=True)
                run_sync(client.kc.wait_for_ready)(timeout=60)
    assert died, "the killing cell did not kill the kernel"
    _i, killed = cells["killed"]
    _i, shown = cells["report"]
    reports = [a for a in _alerts(shown) if a["kind"] == "crash_report"]
    assert len(reports) == 1
    report = reports[0]
    append_line = next(n for n, text in enumerate(killed.source.splitlines(), 1)
                       if "batches.append" in text)
    assert report["cell"] == killed.execution_count
    assert report["line"] == append_line
    assert report["peak"] >= 1.0e9
    assert {"accumulation", "budget"} <= {a["kind"] for a in report["alerts"]}
    _i, again = cells["again"]
    text = "".join(o["data"]["text/plain"] for o in again.outputs if "data" in o)
    assert f"cell {killed.execution_count}, line {append_line}" in text
    _i, fixed = cells["fixed"]
    assert [a for a in _alerts(fixed) if a["kind"] != "crash_report"] == []
    assert fixed.outputs[-1]["output_type"] == "execute_result"
