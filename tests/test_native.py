"""Native memory (docs/design.md, "Native memory") against real kernels: allocations made by
native code (Arrow's pool, polars' Rust allocator, torch's CPU allocator, sqlite's page
cache, a pandas string[pyarrow] Series) are counted in the ``native`` domain, get a budget
alert on the allocating line while the cell runs, and the cell's tracked peak follows its
RSS growth; kept torch tensors and Arrow tables get an accumulation alert; raise mode turns
a 2 GB Arrow buffer and a 2 GB torch tensor into exceptions with memguard's message, and
never refuses polars; unload restores every GOT slot and reload works, ten times."""

import json
import re

import pytest

from conftest import Kernel

pytest.importorskip("pyarrow")
pytest.importorskip("polars")
pytest.importorskip("torch")

MB = 10**6

# Printed by the measured cell's last line: its tracked peak usage and its RSS growth.
# memguard measures native mappings at the end of a cell (post_run_cell); the probe reads
# before that, so it measures them first, as the cell's end does.
PROBE = ("__import__('memguard')._core.native_settle()\n"
         "_s = __import__('memguard')._core.snapshot()\n"
         "print('FIGURES', _s['cell_peak'] - _s['cell_start'], "
         "_s['rss_cell_peak'] - _s['rss_cell_start'], _s['native'])\n")


def figures(ex):
    found = re.search(r"FIGURES (-?\d+) (-?\d+) (-?\d+)", ex.stdout)
    assert found, ex.stdout
    return tuple(int(v) for v in found.groups())


def budget_alert(ex):
    found = ex.alerts_of("budget")
    assert found, f"no budget alert; got {[a[2]['kind'] for a in ex.alerts]}"
    return found[0]


WORKLOADS = {
    # name: (setup cell, measured cell: line 2 allocates about 480 MB natively)
    "arrow": ("import numpy as np, pyarrow as pa, pyarrow.compute as pc\n"
              "a = pa.array(np.arange(60_000_000, dtype=np.int64))  # zero-copy from NumPy\n",
              "n = 1\n"
              "b = pc.add(a, 1)\n"),
    "polars": ("import polars as pl\n",
               "n = 1\n"
               "s = pl.int_range(0, 60_000_000, eager=True) * 2\n"),
    "torch": ("import torch\n",
              "n = 1\n"
              "t = torch.ones(60_000_000, dtype=torch.float64)\n"),
    "sqlite": ("import sqlite3\n"
               "con = sqlite3.connect(':memory:')\n"
               "con.execute('create table t(b blob)')\n"
               "blob = b'x' * (1 << 20)\n",
               "n = 1\n"
               "con.executemany('insert into t values (?)', ((blob,) for _ in range(480)))\n"),
    "pandas_string_pyarrow": ("import pandas as pd\n"
                              "words = [f'word-{i:09d}-' * 3 for i in range(8_000_000)]\n",
                              "n = 1\n"
                              "s = pd.Series(words, dtype='string[pyarrow]')\n"),
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_native_allocation_gets_a_budget_alert_on_its_line_and_peak_follows_rss(kernel, name):
    setup, body = WORKLOADS[name]
    kernel.execute(setup)
    kernel.execute("%memguard budget 200MB")
    ex = kernel.execute(body + PROBE)
    _, _, alert, msg = budget_alert(ex)
    # A crossing found in the cell's last milliseconds (pandas writes its pyarrow strings'
    # buffers at the end of the conversion) is published during post_run_cell's drain.
    assert ex.sent_before_reply(msg), "the budget alert was sent after the cell's execute_reply"
    assert alert["line"] == 2, alert
    peak, rss_growth, native = figures(ex)
    assert rss_growth > 300 * MB, (name, rss_growth)
    assert abs(peak - rss_growth) <= 0.2 * rss_growth, (name, peak, rss_growth, native)


def test_status_and_history_show_native_memory(kernel):
    kernel.execute("import torch\n"
                   "t = torch.ones(30_000_000, dtype=torch.float64)  # 240 MB\n")
    st = kernel.execute("%memguard status")
    (msg,) = [m for _, m in st.messages if m["msg_type"] == "display_data"]
    text = msg["content"]["data"]["text/plain"]
    assert re.search(r"native [\d.]+ [kMG]B\)", text), text
    assert "native memory" in text and "GOT slots patched" in text, text
    assert "not patched" not in text, text
    snap = kernel.execute("print(__import__('memguard')._core.snapshot()['native'])")
    assert int(snap.stdout) >= 230 * MB
    rec = kernel.execute("import memguard\n"
                         "print([r['native'] for r in memguard.history() if r['cell'] == 2])")
    assert eval(rec.stdout)[0] >= 230 * MB, rec.stdout
    hist = kernel.execute("%memguard history")
    (msg,) = [m for _, m in hist.messages if m["msg_type"] == "display_data"]
    assert "native" in msg["content"]["data"]["text/plain"]
    kernel.execute("%memguard summary on")
    ex = kernel.execute("t2 = torch.ones(30_000_000, dtype=torch.float64)")
    assert re.search(r"retained \+[\d.]+ MB \(native \+2[34]\d(\.\d+)? MB\)", ex.stdout), ex.stdout


def test_kept_torch_tensors_get_an_accumulation_alert(kernel):
    kernel.execute("import torch")
    kernel.execute("%memguard budget 200MB")
    ex = kernel.execute("kept = []\n"
                        "for i in range(8):\n"
                        "    kept.append(torch.ones(10_000_000, dtype=torch.float64))  # 80 MB\n")
    found = ex.alerts_of("accumulation")
    assert found, [a[2]["kind"] for a in ex.alerts]
    alert = found[-1][2]
    assert alert["line"] == 3 and alert["count"] >= 3, alert


def test_kept_arrow_tables_get_an_accumulation_alert():
    # Arrow's system pool (malloc/posix_memalign) gives one block per buffer; with its
    # default mimalloc pool, large buffers come out of one arena mapping (see design.md).
    k = Kernel(env={"ARROW_DEFAULT_MEMORY_POOL": "system"})
    try:
        k.execute("%load_ext memguard")
        k.execute("import numpy as np, pyarrow as pa, pyarrow.compute as pc\n"
                  "a = pa.array(np.arange(10_000_000, dtype=np.int64))\n")
        k.execute("%memguard budget 200MB")
        ex = k.execute("tables = []\n"
                       "for i in range(8):\n"
                       "    tables.append(pa.table({'x': pc.add(a, i)}))  # 80 MB each\n")
        found = ex.alerts_of("accumulation")
        assert found, [a[2]["kind"] for a in ex.alerts]
        assert found[-1][2]["line"] == 3 and found[-1][2]["count"] >= 3, found[-1][2]
    finally:
        k.shutdown()


def test_raise_mode_refuses_2GB_arrow_buffer_and_torch_tensor_and_kernel_lives(kernel):
    kernel.execute("import pyarrow as pa, torch")
    kernel.execute("%memguard budget 200MB")
    kernel.execute("%memguard mode raise")
    ex = kernel.execute("n = 1\nbuf = pa.allocate_buffer(2 * 10**9)\n", ok=False)
    assert ex.error is not None, ex.stdout
    assert "MemoryError" in ex.error["ename"], ex.error
    assert "memguard (raise mode) refused" in ex.error["evalue"], ex.error["evalue"]
    assert "budget of 200 MB" in ex.error["evalue"]
    alert = [a[2] for a in ex.alerts_of("budget") if a[2].get("refused")]
    assert alert and alert[-1]["request_bytes"] >= 2 * 10**9, [a[2] for a in ex.alerts]
    ex = kernel.execute("n = 1\nt = torch.ones(250_000_000, dtype=torch.float64)\n", ok=False)
    assert ex.error is not None, ex.stdout
    assert "memguard (raise mode) refused" in ex.error["evalue"], ex.error
    assert "line 2" in ex.error["evalue"], ex.error["evalue"]
    nxt = kernel.execute("print('alive', 'buf' in globals(), 't' in globals())")
    assert nxt.stdout.strip() == "alive False False"


def test_raise_mode_never_refuses_polars(kernel):
    kernel.execute("import polars as pl")
    kernel.execute("%memguard budget 200MB")
    kernel.execute("%memguard mode raise")
    ex = kernel.execute("n = 1\n"
                        "s = pl.int_range(0, 60_000_000, eager=True) * 2\n"
                        "print(len(s))\n")
    assert ex.stdout.strip() == "60000000"
    assert all(not a[2].get("refused") for a in ex.alerts), [a[2] for a in ex.alerts]
    assert ex.alerts_of("budget"), [a[2]["kind"] for a in ex.alerts]


def test_unload_reload_ten_times_with_blocks_freed_across(kernel):
    kernel.execute("import torch, ctypes\n"
                   "libc = ctypes.CDLL(None)\n"
                   "libc.malloc.restype = ctypes.c_void_p\n"
                   "libc.free.argtypes = [ctypes.c_void_p]\n"
                   "held = []\n")
    for i in range(10):
        ex = kernel.execute(
            "held.append(torch.ones(1_000_000))\n"
            "if len(held) > 2:\n"
            "    held.pop(0)\n"
            "%unload_ext memguard\n"
            "held.append(torch.ones(1_000_000))\n"
            "if len(held) > 2:\n"
            "    held.pop(0)\n"
            "%load_ext memguard\n"
            "import memguard\n"
            "print('STATS', json.dumps(memguard._core.native_stats()))\n"
            .replace("import memguard\n", "import memguard, json\n"))
        stats = json.loads(ex.stdout.split("STATS ", 1)[1].splitlines()[0])
        assert stats["installed"] == 1 and stats["slots"] > 0 and not stats["failed"], stats
    ex = kernel.execute("del held\nt = torch.ones(10_000_000)\nprint('ok', t.sum().item())\n")
    assert ex.stdout.strip() == "ok 10000000.0"
    # Unloaded, no slot points at memguard any more: libc's malloc is called directly.
    ex = kernel.execute("%unload_ext memguard\n"
                        "import memguard\n"
                        "print(memguard._core.native_stats()['slots'])\n")
    assert ex.stdout.strip().splitlines()[-1] == "0"


def test_library_loaded_after_load_is_patched(kernel):
    ex = kernel.execute("import memguard\n"
                        "before = memguard._core.native_stats()['slots']\n"
                        "import torch\n"
                        "t = torch.ones(30_000_000, dtype=torch.float64)\n"
                        "s = memguard._core.snapshot()\n"
                        "print(memguard._core.native_stats()['slots'] > before, s['native'] > 200e6)\n")
    assert ex.stdout.strip() == "True True"


def test_forked_child_with_native_hooks_exits_cleanly(kernel):
    ex = kernel.execute("import os, torch\n"
                        "pid = os.fork()\n"
                        "if pid == 0:\n"
                        "    x = torch.ones(10_000_000)\n"
                        "    os._exit(0 if x.sum().item() == 1e7 else 3)\n"
                        "_, status = os.waitpid(pid, 0)\n"
                        "print('child', os.waitstatus_to_exitcode(status))\n")
    assert ex.stdout.strip() == "child 0"


def test_pythonmalloc_malloc_kernel_counts_native_memory():
    k = Kernel(env={"PYTHONMALLOC": "malloc"})
    try:
        k.execute("%load_ext memguard")
        k.execute("import torch")
        k.execute("%memguard budget 200MB")
        ex = k.execute("n = 1\nt = torch.ones(60_000_000, dtype=torch.float64)\n" + PROBE)
        assert budget_alert(ex)[2]["line"] == 2
        peak, rss_growth, _ = figures(ex)
        assert abs(peak - rss_growth) <= 0.2 * rss_growth, (peak, rss_growth)
    finally:
        k.shutdown()


def test_parquet_buffer_notebook_alerts_on_the_buffering_line_and_its_fix_is_quiet():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "notebooks" / "parquet_buffer.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    mime = "application/vnd.memguard.alert+json"

    def cell(cell_id):
        return next(c for c in nb.cells if c.get("id") == cell_id)

    def alerts(c):
        return [o["data"][mime] for o in c.get("outputs", [])
                if o.get("output_type") == "display_data" and mime in o.get("data", {})]

    bad = cell("bad-buffer")
    line = next(i for i, text in enumerate(bad.source.splitlines(), 1) if "buffer.append(" in text)
    acc = [a for a in alerts(bad) if a["kind"] == "accumulation"]
    assert acc, alerts(bad)
    assert acc[-1]["line"] == line and acc[-1]["count"] >= 16, acc[-1]
    # 16 batches of 2 columns of 2.5M 8-byte values: 640 MB kept by that line.
    assert abs(acc[-1]["retained_bytes"] - 640 * MB) <= 0.2 * 640 * MB, acc[-1]
    assert any(a["kind"] == "budget" for a in alerts(bad)), alerts(bad)
    out = "".join(o.get("text", "") for o in bad.outputs if o.get("output_type") == "stream")
    assert "16 batches still buffered" in out, out
    fix = cell("fix-write-each-batch")
    assert alerts(fix) == [], alerts(fix)
    out = "".join(o.get("text", "") for o in fix.outputs if o.get("output_type") == "stream")
    assert "40000000 rows written" in out, out
