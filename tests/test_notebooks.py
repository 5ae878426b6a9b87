"""The notebooks of notebooks/ (one per motivating case) through nbclient, each in a fresh
kernel: the bad cell gets its case's alert on the right line, with figures within 10% of
what the cell allocated, and the fixed cell (like every other cell) gets none."""

# what this shows: memguard catches, in a real kernel and on the cell line responsible,
# a write buffer of small dicts that never flushes (accumulation through pymalloc arenas), a
# dict of dense subsets (accumulation of NumPy arrays), np.concatenate's inputs + output peak
# (accumulation, then budget) and SQLite's native memory (budget, counted by the native
# hooks, with a small untracked_bytes); each notebook's fix runs with no alert. The expected sizes
# come from the notebooks' own parameters (their literal assignments), or, for SQLite, from
# SQLite's own counter as printed by the cell.

import ast
import pathlib
import re
import sys

import pytest

ALERT_MIME = "application/vnd.memguard.alert+json"
NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"
WATCHED = {"accumulation", "sparse_to_dense", "budget"}  # must never fire on healthy cells
TOLERANCE = 0.10
ARENA = 2**20  # a pymalloc arena (CPython 3.10+ Objects/obmalloc.c ARENA_SIZE)


@pytest.fixture(scope="module")
def run_notebook():
    """``run_notebook(name)`` executes notebooks/<name> once per module in a fresh python3
    kernel and returns the executed notebook; a failure is raised again for each caller."""
    pytest.importorskip("nbclient")  # not in Debian's stack (make test-compat): skip there
    import nbformat
    from nbclient import NotebookClient

    done = {}

    def run(name):
        if name not in done:
            path = NOTEBOOKS / name
            nb = nbformat.read(path, as_version=4)
            try:
                NotebookClient(nb, kernel_name="python3", timeout=300,
                               resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
                done[name] = nb
            except Exception as exc:  # noqa: BLE001 - re-raised for every test of this notebook
                done[name] = exc
        if isinstance(done[name], Exception):
            raise done[name]
        return done[name]

    return run


def _alerts(cell):
    """The cell's alerts, in the order they first arrived. nbclient applies each
    update_display_data to the display_data of the same display_id, so these are the latest
    figures of every alert."""
    return [o["data"][ALERT_MIME] for o in cell.get("outputs", [])
            if o.get("output_type") == "display_data" and ALERT_MIME in o.get("data", {})]


def _of(cell, kind):
    return [a for a in _alerts(cell) if a["kind"] == kind]


def _cell(nb, cell_id):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def _line(cell, marker):
    """The 1-based line of the cell's source that contains ``marker`` (exactly one must)."""
    lines = [i for i, text in enumerate(cell.source.splitlines(), 1) if marker in text]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def _params(nb):
    """Every ``name = literal`` (or ``a, b = literal, literal``) assignment of the notebook's
    code cells, magics left out: the notebook's own parameters."""
    params = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines()
                           if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                continue
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            target = node.targets[0]
            if isinstance(target, ast.Name):
                params[target.id] = value
            elif isinstance(target, ast.Tuple) and isinstance(value, tuple):
                params.update((t.id, v) for t, v in zip(target.elts, value)
                              if isinstance(t, ast.Name))
    return params


def _stdout(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _close(actual, expected, what):
    assert abs(actual - expected) <= TOLERANCE * expected, (
        f"{what}: {actual:,} is not within {TOLERANCE:.0%} of {expected:,.0f}")


def _assert_quiet_except(nb, bad_ids):
    """No accumulation, sparse_to_dense or budget alert in any code cell but ``bad_ids``:
    the fixed cell, the set-up and the load cell."""
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.get("id") not in bad_ids:
            noisy = [a for a in _alerts(cell) if a["kind"] in WATCHED]
            assert not noisy, (cell.get("id"), noisy)


def _pymalloc_bytes(obj):
    """What ``obj`` takes in pymalloc: its size rounded up to the 16-byte size class."""
    return -(-sys.getsizeof(obj) // 16) * 16


# --- 1. a write buffer that never flushes ----------------------------------------------------

def test_buffer_that_never_flushes_gets_accumulation_at_the_append_line(run_notebook):
    nb = run_notebook("accumulating_buffer.ipynb")
    p = _params(nb)
    bad = _cell(nb, "bad-buffer")
    acc = _of(bad, "accumulation")
    assert {a["kind"] for a in _alerts(bad)} == {"accumulation"}, _alerts(bad)
    assert len(acc) == 1, acc  # one alert for the line, updated in place
    alert = acc[0]
    assert alert["cell"] == bad.execution_count
    assert alert["line"] == _line(bad, "buffer.append(")
    # A record as the cell builds it: the dict (object + keys table), a new int and a new
    # float (the user string is shared); plus one 8-byte slot in the list.
    record = {"seq": 10**9 + 1, "user": "user0001", "value": 0.25}
    per_record = sum(map(_pymalloc_bytes, (record, record["seq"], record["value"]))) + 8
    expected = p["n_records"] * per_record
    _close(alert["retained_bytes"], expected, "retained_bytes")
    # The dicts are held in 1 MiB arenas (plus the list's one pointer array).
    _close(alert["count"], expected / ARENA, "count (arenas)")
    assert alert["bytes"] == alert["retained_bytes"]
    assert alert["budget"] == 512 * 10**6
    assert alert["message"]


def test_buffer_fix_and_setup_get_no_alert(run_notebook):
    nb = run_notebook("accumulating_buffer.ipynb")
    _assert_quiet_except(nb, {"bad-buffer"})
    assert "1,000,000 records" in _stdout(_cell(nb, "fix-buffer"))


# --- 2. a dict of dense subsets per cell type ------------------------------------------------

def test_dense_subsets_get_accumulation_at_the_toarray_line(run_notebook):
    nb = run_notebook("dense_subsets.ipynb")
    p = _params(nb)
    bad = _cell(nb, "bad-dense-subsets")
    assert {a["kind"] for a in _alerts(bad)} == {"accumulation"}, _alerts(bad)
    acc = _of(bad, "accumulation")
    assert len(acc) == 1, acc
    alert = acc[0]
    assert alert["cell"] == bad.execution_count
    assert alert["line"] == _line(bad, ".toarray()")
    n_types = len(p["sizes"])
    dense_bytes = sum(p["sizes"].values()) * p["n_genes"] * 4  # float32 rows x genes
    assert dense_bytes == p["n_cells"] * p["n_genes"] * 4
    _close(alert["count"], n_types, "count (live subsets)")
    _close(alert["retained_bytes"], dense_bytes, "retained_bytes")
    assert alert["budget"] == 10**9


def test_dense_subsets_fix_keeps_sparse_and_gets_no_alert(run_notebook):
    nb = run_notebook("dense_subsets.ipynb")
    _assert_quiet_except(nb, {"bad-dense-subsets"})
    assert "same means as the dense subsets" in _stdout(_cell(nb, "fix-sparse-stats"))


# --- 3. np.concatenate: the peak is inputs + output ------------------------------------------

def test_concatenate_gets_accumulation_on_the_parts_then_budget_on_the_copy(run_notebook):
    nb = run_notebook("concatenate_peak.ipynb")
    p = _params(nb)
    bad = _cell(nb, "bad-concatenate")
    alerts = _alerts(bad)
    assert {a["kind"] for a in alerts} == {"accumulation", "budget"}, alerts
    part = p["rows_per_part"] * p["n_cols"] * 4  # float32
    total = p["n_parts"] * part

    (acc,) = _of(bad, "accumulation")
    assert acc["cell"] == bad.execution_count
    assert acc["line"] == _line(bad, "parts.append(")
    _close(acc["count"], p["n_parts"], "count (live parts)")
    _close(acc["retained_bytes"], total, "retained_bytes")

    (budget,) = _of(bad, "budget")
    assert budget["cell"] == bad.execution_count
    assert budget["line"] == _line(bad, "np.concatenate(")
    assert budget["budget"] == 10**9
    _close(budget["request_bytes"], total, "request_bytes (the concatenated result)")
    _close(budget["peak"], 2 * total, "peak (inputs + output)")
    assert alerts.index(acc) < alerts.index(budget), "the parts are flagged before the copy"


def test_concatenate_fix_preallocates_and_gets_no_alert(run_notebook):
    nb = run_notebook("concatenate_peak.ipynb")
    _assert_quiet_except(nb, {"bad-concatenate"})
    assert "same values as the bad version" in _stdout(_cell(nb, "fix-preallocate"))


# --- 4. native memory: SQLite's, counted; the untracked gap as a check ----------------------

def test_in_memory_sqlite_gets_a_budget_alert_with_the_untracked_gap(run_notebook):
    nb = run_notebook("untracked_gap.ipynb")
    p = _params(nb)
    bad = _cell(nb, "bad-in-memory-db")
    alerts = _alerts(bad)
    assert {a["kind"] for a in alerts} == {"budget"}, alerts
    (alert,) = alerts
    assert alert["cell"] == bad.execution_count
    assert alert["line"] == _line(bad, "executemany(")
    assert alert["budget"] == 256 * 10**6
    # What SQLite allocated, by its own counter (sqlite3_memory_used), as the cell printed it.
    match = re.search(r"SQLite holds ([\d,]+) MB", _stdout(bad))
    assert match, _stdout(bad)
    sqlite_bytes = int(match.group(1).replace(",", "")) * 10**6
    # The native hooks count SQLite's page cache (docs/design.md, "Native memory"): the
    # cell's tracked peak holds it, beside the workers' arrays, and the gap stays small.
    threads = p["n_blocks"] * p["block_values"] * 8  # float64
    assert alert["peak"] >= sqlite_bytes * (1 - TOLERANCE), (alert["peak"], sqlite_bytes)
    assert alert["peak"] <= (sqlite_bytes + threads) * (1 + TOLERANCE), alert["peak"]
    assert alert["untracked_bytes"] < TOLERANCE * sqlite_bytes, alert["untracked_bytes"]
    assert alert["rss_bytes"] >= alert["rss_growth"]


def test_status_shows_the_gap_and_the_on_disk_fix_gets_no_alert(run_notebook):
    nb = run_notebook("untracked_gap.ipynb")
    _assert_quiet_except(nb, {"bad-in-memory-db"})
    status = "".join(o["data"].get("text/plain", "") for o in _cell(nb, "status").outputs
                     if o.get("output_type") == "display_data")
    assert "RSS" in status and "untracked" in status.lower(), status
    assert "rows on disk" in _stdout(_cell(nb, "fix-on-disk-db"))
