"""memguard on Dask workers (memguard.dask), end to end: a real kernel with memguard loaded
(conftest's ``kernel``) runs a real ``distributed.LocalCluster`` with process workers and
nannies; its alerts, raise mode, the crash report of a worker the nanny terminates, workers
that join later and uninstall are checked from the kernel's IOPub messages and from the
worker processes themselves (``client.run``)."""

# what this shows: a task's sparse densification, a task's kept arrays, a task's over-budget
# allocation in raise mode and a task that grows until its nanny kills the worker each give
# memguard's alert (or MemoryError, or crash report) naming the task's key, its function and
# the notebook cell and line the function was defined on, under the cell that computed it;
# workers added later are guarded, and uninstall leaves no hook, thread or box in any worker.

import json
import time

import pytest

pytest.importorskip("distributed")

# A cell that defines the task functions: the alerts must name this cell and these lines.
FUNCTIONS = """\
def densify(n_rows, n_cols):
    X = sp.random(n_rows, n_cols, density=0.001, format="csr", dtype=np.float64, random_state=0)
    D = X.toarray()
    return float(D.sum())

def keep_parts(n, part_bytes):
    parts = []
    for i in range(n):
        parts.append(np.ones(part_bytes // 8))
    return len(parts)

def one_big(nbytes):
    a = np.ones(nbytes // 8)
    return float(a.sum())

def grow_forever(step_bytes):
    held = []
    while True:
        held.append(np.ones(step_bytes // 8))
        time.sleep(0.02)

def arrow_random(n):
    import pyarrow.compute as pc
    r = pc.random(n)
    return len(r)

def arrow_big(nbytes):
    import pyarrow as pa
    buf = pa.allocate_buffer(nbytes)
    return buf.size

def torch_big(n):
    import torch
    t = torch.ones(n, dtype=torch.float64)
    return float(t.sum())
"""
LINES = {"densify": 3, "keep_parts": 9, "one_big": 13, "grow_forever": 19, "arrow_random": 24,
         "arrow_big": 29, "torch_big": 34}
MEMORY_LIMIT = 1_000_000_000
# The least peak RSS a black box may record for a worker its nanny terminated: the nanny
# terminates at 95% of memory_limit, and the box holds the monitor's last RSS sample (every
# 20 ms in a worker) before that. A task growing 50 MB per 20 ms outruns the samples, more
# so on a loaded machine: a clean-clone run beside other work recorded 0.84 x the limit.
KILLED_PEAK_MIN = 0.75 * MEMORY_LIMIT

SETUP = f"""\
import json, os, time
import dask, numpy as np, scipy.sparse as sp
dask.config.set({{"distributed.scheduler.allowed-failures": 0}})
from distributed import Client, LocalCluster
import memguard.dask as mgd
cluster = LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                       memory_limit={MEMORY_LIMIT}, dashboard_address=None, silence_logs=50)
client = Client(cluster)
client.wait_for_workers(2)
"""

# Run in a worker (client.run, which passes dask_worker): memguard's state there, and whether
# a 50 MB array is counted.
PROBE = """\
def probe(dask_worker=None):
    import os, threading
    import numpy as np
    import memguard.dask
    from memguard import _core, coreview, sparse
    from memguard._state import STATE
    before = coreview.snapshot(_core).tracked
    a = np.ones(50_000_000 // 8)
    counted = coreview.snapshot(_core).tracked - before >= 40_000_000
    del a
    native = _core.native_stats()
    return {"loaded": STATE.loaded, "monitor": coreview.monitor_stats(_core).running,
            "counting": counted, "native": native["installed"], "slots": native["slots"],
            "numpy_route": native["numpy_route"], "not_patched": native["failed"],
            "sparse": sparse.installed() or any(isinstance(f, sparse._ImportWatcher)
                                                for f in __import__("sys").meta_path),
            "threads": sorted(t.name for t in threading.enumerate() if "memguard" in t.name),
            "box": os.path.exists(memguard.dask.box_path(os.getpid())),
            "plugin": "memguard" in dask_worker.plugins, "pid": os.getpid()}
"""


@pytest.fixture
def dask_kernel(kernel):
    """The kernel with a 2-worker LocalCluster (process workers, 1 thread each, 1 GB each)
    as ``client``/``cluster``, and the task functions defined in one cell; yields
    (kernel, that cell's execution count)."""
    kernel.execute(SETUP, timeout=180)
    defined = kernel.execute(FUNCTIONS)
    kernel.execute(PROBE)
    yield kernel, defined.execution_count
    kernel.execute("client.close(); cluster.close()", ok=False, timeout=60)


def _value(kernel, expr):
    """The JSON value of ``expr`` evaluated in the kernel."""
    ex = kernel.execute(f"print(json.dumps({expr}))")
    return json.loads(ex.stdout.strip().splitlines()[-1])


def _task_alerts(ex, kind, task):
    """The latest state of each ``kind`` alert about ``task`` under the cell of ``ex``."""
    latest = {}
    for _, _, alert, msg in ex.alerts_of(kind):
        if alert.get("task") == task:
            latest[msg["content"]["transient"]["display_id"]] = alert
    return list(latest.values())


def _assert_task_fields(alert, task, function, cell, line):
    assert alert["task"] == task, alert
    assert alert["function"] == function, alert
    assert alert["cell"] == cell, alert
    assert alert["line"] == line, alert
    assert alert["worker"].startswith("tcp://"), alert
    assert alert["limit_source"] == "dask worker memory_limit", alert
    assert alert["limit"] == int(MEMORY_LIMIT * 0.95), alert  # the nanny's terminate fraction
    assert alert["message"], alert


def test_sparse_to_dense_in_a_task_is_reported_with_key_function_and_line(dask_kernel):
    kernel, cell = dask_kernel
    kernel.execute('mgd.install(client, budget="100MB")')
    ex = kernel.execute('client.submit(densify, 2000, 10000, key="densify-1").result()')
    alerts = _task_alerts(ex, "sparse_to_dense", "densify-1")
    assert len(alerts) == 1, ex.alerts
    alert = alerts[0]
    _assert_task_fields(alert, "densify-1", "densify", cell, LINES["densify"])
    assert alert["dense_bytes"] == 2000 * 10000 * 8
    assert alert["shape"] == [2000, 10000] and alert["format"] == "csr"
    assert alert["budget"] == 100 * 10**6
    assert "task" in alert["message"] and "cell" not in alert["message"], alert["message"]
    # The same bundle as in a kernel: text names the task, HTML is memguard's box.
    msg = next(m for _, _, a, m in ex.alerts_of("sparse_to_dense") if a["task"] == "densify-1")
    data = msg["content"]["data"]
    assert "task 'densify-1', densify() on worker tcp://" in data["text/plain"]
    assert 'class="memguard-alert memguard-sparse_to_dense"' in data["text/html"]


def test_accumulation_in_a_task_is_reported_at_the_append_line(dask_kernel):
    kernel, cell = dask_kernel
    kernel.execute('mgd.install(client, budget="300MB")')
    ex = kernel.execute('client.submit(keep_parts, 6, 40_000_000, key="keep-1").result()')
    alerts = _task_alerts(ex, "accumulation", "keep-1")
    assert len(alerts) == 1, ex.alerts
    alert = alerts[0]
    _assert_task_fields(alert, "keep-1", "keep_parts", cell, LINES["keep_parts"])
    # The final figures when the task ended: six 40 MB parts alive.
    assert alert["count"] == 6, alert
    assert 240_000_000 <= alert["retained_bytes"] < 241_000_000, alert
    # The computing cell's record in memguard's history counts the worker's alert.
    history = _value(kernel, "__import__('memguard').history()[-1]['alerts']")
    assert "accumulation" in history


def test_raise_mode_fails_the_task_with_memguards_message_and_the_worker_lives(dask_kernel):
    kernel, cell = dask_kernel
    kernel.execute('mgd.install(client, budget="100MB", mode="raise")')
    before = _value(kernel, "sorted(client.run(os.getpid).items())")
    ex = kernel.execute('client.submit(one_big, 200_000_000, key="big-1").result()', ok=False)
    error = ex.error
    assert error is not None and error["ename"] == "MemoryError", error
    assert error["evalue"].startswith("memguard (raise mode) refused an allocation of 200 MB "
                                      "for an array with shape (25000000,) and dtype float64 "
                                      f"at line {LINES['one_big']} in task 'big-1' (one_big)"), error
    assert "over its budget of 100 MB" in error["evalue"]
    assert "the worker is fine" in error["evalue"]
    refused = [a for a in _task_alerts(ex, "budget", "big-1") if a.get("refused")]
    assert refused, ex.alerts
    _assert_task_fields(refused[0], "big-1", "one_big", cell, LINES["one_big"])
    after = _value(kernel, "sorted(client.run(os.getpid).items())")
    assert after == before  # same workers, same pids: nothing died
    # And the worker still computes.
    ok = kernel.execute('print(client.submit(one_big, 8_000_000, key="small-1").result())')
    assert ok.stdout.strip() == "1000000.0"


@pytest.mark.parametrize("function,size", [("arrow_big", "2 * 10**9"),
                                           ("torch_big", "250_000_000")])
def test_raise_mode_refuses_a_native_block_in_a_task_and_the_worker_lives(dask_kernel,
                                                                          function, size):
    """Arrow's memory pool (ArrowMemoryError) and torch's CPU allocator (RuntimeError), the
    callers that survive a refused block, fail the task with memguard's MemoryError."""
    kernel, cell = dask_kernel
    kernel.execute(f"import {function.split('_')[0]}")  # the client unpickles its errors
    kernel.execute('mgd.install(client, budget="100MB", mode="raise")')
    before = _value(kernel, "sorted(client.run(os.getpid).items())")
    ex = kernel.execute(f'client.submit({function}, {size}, key="native-big").result()',
                        ok=False, timeout=120)
    error = ex.error
    assert error is not None and error["ename"] == "MemoryError", error
    assert error["evalue"].startswith("memguard (raise mode) refused an allocation of 2 GB"), error
    assert f"at line {LINES[function]} in task 'native-big' ({function})" in error["evalue"], error
    assert "over its budget of 100 MB" in error["evalue"], error
    refused = [a for a in _task_alerts(ex, "budget", "native-big") if a.get("refused")]
    assert refused and refused[-1]["request_bytes"] >= 2 * 10**9, ex.alerts
    assert _value(kernel, "sorted(client.run(os.getpid).items())") == before


def test_a_task_the_nanny_kills_gives_a_crash_report_with_key_and_line(dask_kernel):
    kernel, cell = dask_kernel
    kernel.execute("mgd.install(client)")
    ex = kernel.execute('client.submit(grow_forever, 50_000_000, key="grow-1").result()',
                        ok=False, timeout=180)
    assert ex.error is not None and ex.error["ename"] == "KilledWorker", ex.error
    reports = _task_alerts(ex, "crash_report", "grow-1")
    assert len(reports) == 1, ex.alerts
    report = reports[0]
    _assert_task_fields(report, "grow-1", "grow_forever", cell, LINES["grow_forever"])
    # The peak against the worker's limit (KILLED_PEAK_MIN).
    assert KILLED_PEAK_MIN <= report["peak"], report
    assert "grow-1" in report["message"] and "memory_limit" in " ".join(report["suggestions"])
    assert any(row[2] and "held.append" in row[1] for row in report["source"]), report["source"]
    # It came before the cell's error, i.e. with the KilledWorker, under this cell.
    data = next(m for _, _, a, m in ex.alerts_of("crash_report"))["content"]["data"]
    assert "a Dask worker died" in data["text/html"]
    assert "post-crash report" in data["text/plain"]


def test_native_memory_in_a_task_gets_a_budget_alert_on_its_line(dask_kernel):
    """pyarrow's memory (dask.dataframe's default string columns are pyarrow's) is native
    code's: counted per task on the worker as in a kernel."""
    kernel, cell = dask_kernel
    kernel.execute('mgd.install(client, budget="200MB")')
    ex = kernel.execute('print(client.submit(arrow_random, 40_000_000, key="arrow-1").result())')
    assert ex.stdout.strip() == "40000000", ex.stdout
    alerts = _task_alerts(ex, "budget", "arrow-1")
    assert len(alerts) == 1, ex.alerts
    _assert_task_fields(alerts[0], "arrow-1", "arrow_random", cell, LINES["arrow_random"])
    # Counted, not only seen as RSS growth: without the native hooks the RSS rule alone
    # fires, with untracked_bytes about the whole growth.
    alert = alerts[0]
    assert alert["bytes"] >= 200 * 10**6, alert
    assert alert["untracked_bytes"] < 0.25 * alert["rss_growth"], alert


def test_workers_added_after_install_are_guarded(dask_kernel):
    kernel, cell = dask_kernel
    kernel.execute("mgd.install(client, budget='300MB')")
    kernel.execute("old = set(client.scheduler_info()['workers']); cluster.scale(3); "
                   "client.wait_for_workers(3)", timeout=180)
    new = _value(kernel, "sorted(set(client.scheduler_info()['workers']) - old)")
    assert len(new) == 1
    # The plugin reaches a new worker while it registers; wait for its setup, no fixed sleep.
    kernel.execute(f"""
deadline = time.monotonic() + 60
while not client.run(probe, workers={new!r})[{new[0]!r}]["loaded"]:
    assert time.monotonic() < deadline, "the new worker never loaded memguard"
    time.sleep(0.1)
""")
    states = _value(kernel, "client.run(probe)")
    assert len(states) == 3
    for state in states.values():
        assert state["loaded"] and state["monitor"] and state["counting"], state
    ex = kernel.execute(f'client.submit(keep_parts, 6, 40_000_000, key="keep-new", '
                        f'workers={new!r}).result()')
    alerts = _task_alerts(ex, "accumulation", "keep-new")
    assert len(alerts) == 1 and alerts[0]["worker"] == new[0], ex.alerts


def test_uninstall_leaves_no_hook_in_any_worker(dask_kernel):
    kernel, cell = dask_kernel
    kernel.execute("mgd.install(client, budget='300MB')")
    installed = _value(kernel, "client.run(probe)")
    assert len(installed) == 2
    for state in installed.values():
        assert state["loaded"] and state["monitor"] and state["counting"], state
        assert state["sparse"] and state["box"] and state["plugin"], state
        assert state["threads"] == ["memguard-relay"], state
        assert state["native"] and state["slots"] > 0 and state["numpy_route"], state
    kernel.execute('client.submit(keep_parts, 3, 1_000_000, key="warm-1").result()')
    kernel.execute("mgd.uninstall(client)")
    removed = _value(kernel, "client.run(probe)")
    assert sorted(s["pid"] for s in removed.values()) == sorted(
        s["pid"] for s in installed.values())
    for state in removed.values():
        assert not state["loaded"] and not state["monitor"] and not state["counting"], state
        assert not state["sparse"] and not state["box"] and not state["plugin"], state
        assert state["threads"] == [], state
        assert not state["native"] and state["slots"] == 0, state  # every GOT entry restored
    # Nothing is reported any more.
    ex = kernel.execute('client.submit(keep_parts, 6, 40_000_000, key="keep-after").result()')
    assert not ex.alerts, ex.alerts


def test_magic_installs_on_the_notebooks_client_and_rejects_mistakes(dask_kernel):
    kernel, cell = dask_kernel
    ex = kernel.execute("%memguard dask install 300MB")
    assert "memguard: installed on 2 workers" in ex.stdout and "budget 300MB" in ex.stdout
    assert all(s["loaded"] for s in _value(kernel, "client.run(probe)").values())
    bad = kernel.execute("%memguard dask install lots", ok=False)
    assert bad.error is not None and "UsageError" in bad.error["ename"], bad.error
    ex = kernel.execute("%memguard dask uninstall")
    assert "memguard: removed" in ex.stdout
    assert not any(s["loaded"] for s in _value(kernel, "client.run(probe)").values())


def test_a_function_that_keeps_its_cell_filename_resolves_to_its_cell():
    """cloudpickle before 3.1.3 sends a notebook function with its cell's own filename, not
    "<dynamic-code>": the worker reports that file, and it names the cell directly. A real
    IPython shell compiles the cells (its compiler's filename map)."""
    from IPython.core.interactiveshell import InteractiveShell
    from memguard.dask import cell_of_function, describe

    shell = InteractiveShell.instance()
    try:
        shell.run_cell("x = 1", store_history=True)
        shell.run_cell("y = 2\n\ndef kept(n):\n    return n\n", store_history=True)
        fields, _globs = describe(shell.user_ns["kept"])
        assert fields["file"] and fields["function_line"] == 3, fields
        count = shell.execution_count - 1
        assert cell_of_function(shell, fields) == (count, fields["file"])
        # A file that is no cell of this shell (a module's function) names no cell.
        assert cell_of_function(shell, dict(fields, file=json.__file__)) == (None, None)
    finally:
        InteractiveShell.clear_instance()


def test_a_task_function_is_described_once_and_not_kept_alive():
    """A worker describes each task function once (bytecode hash, the black box's JSON), and
    a function closing over a large object does not outlive its graph because of it."""
    import gc
    import weakref

    from memguard.dask import _Described

    class Big:
        pass

    big = Big()

    def task(x, big=big):
        return x

    described = _Described()
    fields, globs, filename, fragment = described.get(task)
    assert fields["function"].endswith("task") and fields["code_hash"], fields
    assert globs is task.__globals__ and filename == task.__code__.co_filename
    assert json.loads(fragment + "}") == fields
    assert described.get(task)[0] is fields  # the second task of the graph: kept
    # A builtin has no bytecode: described each time, the same way.
    assert described.get(len)[0] == {"function": "len", "file": None, "function_line": None,
                                     "code_hash": None}
    gone = weakref.ref(big)
    del task, big
    gc.collect()
    assert gone() is None


def test_terminal_client_gets_the_text_form_on_stderr(tmp_path):
    """A script (no kernel): the alert's text form on stderr, with the task's fields."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(f"""\
import numpy as np, time
{FUNCTIONS}
if __name__ == "__main__":
    from distributed import Client, LocalCluster
    import memguard.dask as mgd
    with LocalCluster(processes=True, n_workers=1, threads_per_worker=1,
                      memory_limit={MEMORY_LIMIT}, dashboard_address=None,
                      silence_logs=50) as cluster, Client(cluster) as client:
        side = mgd.install(client, budget="300MB")
        client.submit(keep_parts, 6, 40_000_000, key="keep-script").result()
        deadline = time.monotonic() + 30
        while not side.events and time.monotonic() < deadline:
            time.sleep(0.05)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    # The script's own lines (FUNCTIONS starts on its line 2); no cell outside a kernel.
    assert ("memguard: memory kept alive in a loop (line 10, task 'keep-script', keep_parts() "
            "on worker tcp://") in out.stderr, out.stderr


# --- notebooks/dask_workers.ipynb ------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_notebook():
    """notebooks/dask_workers.ipynb executed once through nbclient in a fresh kernel (as
    tests/test_notebooks.py runs the other notebooks)."""
    pytest.importorskip("nbclient")
    import nbformat
    from nbclient import NotebookClient
    from test_notebooks import NOTEBOOKS

    nb = nbformat.read(NOTEBOOKS / "dask_workers.ipynb", as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def _notebook_alert(nb, cell_id, kind):
    from test_notebooks import _cell, _of

    found = _of(_cell(nb, cell_id), kind)
    assert len(found) == 1, (cell_id, kind, found)
    return found[0]


def test_notebook_each_bad_task_gets_its_alert_on_its_line(dask_notebook):
    from test_notebooks import _cell, _line

    nb = dask_notebook
    functions = _cell(nb, "functions")
    dense = _notebook_alert(nb, "bad-densify", "sparse_to_dense")
    assert (dense["task"], dense["function"]) == ("dense-means", "column_means_dense")
    assert dense["cell"] == functions.execution_count
    assert dense["line"] == _line(functions, "D = X.toarray()")
    assert dense["dense_bytes"] == 2_000 * 10_000 * 8
    acc = _notebook_alert(nb, "bad-accumulate", "accumulation")
    assert (acc["task"], acc["function"]) == ("simulate-all", "simulate_all")
    assert acc["cell"] == functions.execution_count
    assert acc["line"] == _line(functions, "runs.append(")
    assert acc["count"] == 4 and 80_000_000 <= acc["retained_bytes"] < 81_000_000, acc
    crash = _notebook_alert(nb, "bad-kill", "crash_report")
    assert (crash["task"], crash["function"]) == ("collect-forever", "collect_forever")
    assert crash["cell"] == functions.execution_count
    assert crash["line"] == _line(functions, "collected.append(")
    assert crash["peak"] >= KILLED_PEAK_MIN  # the notebook's memory_limit is MEMORY_LIMIT
    # The cell's error is KilledWorker. Seen with CPython 3.11.7: IPython's traceback
    # formatter sometimes fails inside ast.parse ("SystemError: AST constructor recursion
    # depth mismatch") and prints the traceback as text instead of an error output: accept
    # either form.
    outputs = _cell(nb, "bad-kill").outputs
    errors = [o["ename"] for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert errors == ["KilledWorker"] or "KilledWorker" in text, (errors, text[-2000:])


def test_notebook_fixes_get_no_alert_and_raise_mode_keeps_the_worker(dask_notebook):
    from test_notebooks import _alerts, _cell, _stdout

    nb = dask_notebook
    for cell_id in ("fix-densify", "fix-accumulate"):
        assert not _alerts(_cell(nb, cell_id)), (cell_id, _alerts(_cell(nb, cell_id)))
    assert "same means: True" in _stdout(_cell(nb, "fix-densify"))
    assert "same mean: True" in _stdout(_cell(nb, "fix-accumulate"))
    out = _stdout(_cell(nb, "fix-kill"))
    assert "MemoryError: memguard (raise mode) refused an allocation of 50 MB" in out, out
    assert "in task 'collect-bounded' (collect_forever)" in out, out
    assert "workers alive, same pids: True" in out, out
