"""memguard in a real ipykernel: loading, budgets, sparse_to_dense, alert routing."""

import json
import time

import pytest

from conftest import ALERT_MIME, IMPORT_GET_HANDLER_NAME, TIMEOUT, Kernel, last_alert


def test_loading_prints_one_line_with_limit_budget_and_mode(bare_kernel):
    ex = bare_kernel.execute("%load_ext memguard")
    lines = ex.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("memguard 0.1.0 loaded; limit ")
    assert "budget off" in lines[0] and "mode warn" in lines[0]
    assert any(src in lines[0] for src in ("(cgroup)", "(rlimit)", "(physical)"))


def test_loading_twice_registers_hooks_once(kernel):
    ex = kernel.execute("%load_ext memguard")
    assert "already loaded" in ex.stdout
    ex = kernel.execute(
        "import memguard.cells as g\n"
        "cbs = get_ipython().events.callbacks\n"
        "print(cbs['pre_run_cell'].count(g.pre_run_cell), cbs['post_run_cell'].count(g.post_run_cell))")
    assert ex.stdout.split() == ["1", "1"]


def _wait_for_file(path, seconds=60):
    """Cell code, one line: wait until the test creates ``path`` (at most ``seconds``)."""
    return (f"deadline = time.monotonic() + {seconds}\n"
            f"while not os.path.exists({str(path)!r}) and time.monotonic() < deadline: "
            f"time.sleep(0.01)\n")


def test_budget_alert_arrives_under_the_cell_before_it_finishes(kernel, tmp_path):
    # The cell cannot finish before the test has received the alert: after allocating, it
    # waits for a file the test creates only when the alert arrives.
    seen = tmp_path / "alert-seen"

    def on_message(channel, msg):
        if channel == "iopub" and ALERT_MIME in (msg["content"].get("data") or {}):
            seen.touch()

    kernel.execute("%memguard budget 200MB")
    ex = kernel.execute(
        "import numpy as np, os, time\n"
        "a = np.ones(50_000_000)  # 400 MB\n"
        + _wait_for_file(seen) +
        f"print('released' if os.path.exists({str(seen)!r}) else 'timed out')\n",
        on_message=on_message)
    assert ex.stdout.strip() == "released", "the alert did not arrive while the cell ran"
    alerts = ex.alerts_of("budget")
    assert alerts, ex.messages
    t, msg_type, alert, msg = alerts[0]
    assert msg_type == "display_data"
    assert alert["cell"] == ex.execution_count
    assert alert["line"] == 2
    assert alert["budget"] == 200_000_000
    assert alert["peak"] >= 400_000_000
    assert alert["limit"] > 0 and alert["limit_source"] in ("cgroup", "rlimit", "physical")
    assert msg["parent_header"]["msg_id"] == ex.msg_id
    assert msg["parent_header"]["msg_type"] == "execute_request"
    (released,) = [a for a, m in ex.messages
                   if m["msg_type"] == "stream" and "released" in m["content"]["text"]]
    # Both on the IOPub socket, read in the order sent: the alert came before the cell's
    # output. (The reply is on another socket, read in turns with IOPub, so its read time
    # cannot order it against IOPub messages; "released" above already shows the alert
    # arrived while the cell ran.)
    assert t < released
    assert set(msg["content"]["data"]) == {
        "text/plain", "text/html", "application/vnd.memguard.alert+json"}
    assert msg["content"]["transient"]["display_id"].startswith("memguard-")


def test_growing_peak_updates_the_alert_in_place(kernel):
    ex = kernel.execute(
        "%%memguard 100MB\n"
        "import numpy as np\n"
        "a = np.ones(20_000_000)  # 160 MB\n"
        "b = np.ones(40_000_000)  # +320 MB\n")
    alerts = ex.alerts_of("budget")
    assert [a[1] for a in alerts][:1] == ["display_data"]
    assert len(alerts) >= 2 and all(a[1] == "update_display_data" for a in alerts[1:])
    ids = {a[3]["content"]["transient"]["display_id"] for a in alerts}
    assert len(ids) == 1
    assert alerts[0][2]["line"] == 3
    assert alerts[-1][2]["peak"] >= 480_000_000


def test_cell_magic_budget_applies_to_that_cell_only(kernel):
    ex = kernel.execute("%%memguard 100MB\nimport numpy as np\nz = np.zeros(25_000_000)\nz.sum()")
    (alert,) = [a[2] for a in ex.alerts_of("budget")][:1]
    assert alert["budget"] == 100_000_000 and alert["line"] == 3
    assert alert["cell"] == ex.execution_count
    result = [m for _, m in ex.messages if m["msg_type"] == "execute_result"]
    assert result and "0.0" in result[0]["content"]["data"]["text/plain"]
    ex = kernel.execute("import numpy as np\nz2 = np.zeros(25_000_000)")
    assert ex.alerts == []


def test_sparse_to_dense_alert_names_the_densifying_line(kernel):
    ex = kernel.execute(
        "import numpy as np, scipy.sparse as sp\n"
        "X = sp.random(12000, 12000, density=0.001, format='csr', dtype=np.float64,\n"
        "              random_state=np.random.default_rng(0))\n"
        "info = (X.nnz, X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)\n"
        "D = X.toarray()\n"
        "del D\n"
        "print(*info)")
    nnz, sparse_bytes = map(int, ex.stdout.split())
    alerts = ex.alerts_of("sparse_to_dense")
    assert len(alerts) == 1, ex.alerts
    _, _, alert, msg = alerts[0]
    assert alert["line"] == 5 and alert["cell"] == ex.execution_count
    assert alert["format"] == "csr" and alert["shape"] == [12000, 12000]
    assert alert["dtype"] == "float64" and alert["nnz"] == nnz
    assert alert["sparse_bytes"] == sparse_bytes
    assert alert["dense_bytes"] == 12000 * 12000 * 8 == alert["bytes"]
    assert msg["parent_header"]["msg_id"] == ex.msg_id
    assert ex.sent_before_reply(msg)


def test_todense_on_csc_is_caught_and_repeats_update_one_alert(kernel):
    ex = kernel.execute(
        "import numpy as np, scipy.sparse as sp\n"
        "X = sp.random(12000, 8000, density=0.001, format='csc', dtype=np.float32,\n"
        "              random_state=np.random.default_rng(1))\n"
        "for _ in range(3):\n"
        "    M = X.todense()\n")
    alerts = ex.alerts_of("sparse_to_dense")
    assert [a[1] for a in alerts] == ["display_data", "update_display_data", "update_display_data"]
    assert alerts[-1][2]["count"] == 3
    assert alerts[-1][2]["format"] == "csc" and alerts[-1][2]["line"] == 5
    assert alerts[-1][2]["dense_bytes"] == 12000 * 8000 * 4


def test_sparse_preserving_code_gets_no_alert(kernel):
    kernel.execute("%memguard budget 200MB")
    ex = kernel.execute(
        "import numpy as np, scipy.sparse as sp\n"
        "X = sp.random(12000, 12000, density=0.001, format='csr',\n"
        "              random_state=np.random.default_rng(0))\n"
        "m = X.mean(axis=0)\n"
        "s = X.sum(axis=1)\n"
        "p = X.multiply(X)\n"
        "q = X @ X.T\n")
    assert ex.alerts == []


def test_array_created_in_a_later_cell_uses_memguard_handler(kernel):
    kernel.execute("import numpy as np")
    ex = kernel.execute(
        "import threading\n"
        + IMPORT_GET_HANDLER_NAME +
        "names = [get_handler_name(), get_handler_name(np.ones(10))]\n"
        "t = threading.Thread(target=lambda: names.append(get_handler_name(np.ones(10))))\n"
        "t.start(); t.join()\n"
        "print(*names)")
    assert ex.stdout.split() == ["memguard"] * 3


def test_numpy_allocations_from_a_thread_count_toward_the_cell(kernel):
    ex = kernel.execute(
        "%%memguard 200MB\n"
        "import numpy as np, threading\n"
        "keep = []\n"
        "t = threading.Thread(target=lambda: keep.append(np.ones(40_000_000)))\n"
        "t.start(); t.join()\n")
    alerts = ex.alerts_of("budget")
    assert alerts and alerts[0][2]["peak"] >= 320_000_000


# 100,000 arrays of 64 float64 (512 bytes: a size NumPy's default handler caches when
# freed), kept and then dropped, with the NumPy domain read before, between and after.
SMALL_ARRAYS = (
    "import json, memguard, numpy as np\n"
    "def numpy_bytes():\n"
    "    return memguard._core.snapshot()['numpy']\n"
    "stats = memguard._core.native_stats()\n"
    "route = [stats['numpy_route'], stats['failed'], stats['usable_header']]\n"
    "s0 = numpy_bytes()\n"
    "keep = [np.ones(64) for _ in range(100_000)]\n"
    "s1 = numpy_bytes()\n"
    "del keep\n"
    "s2 = numpy_bytes()\n"
    "print('SMALL', json.dumps([route, s1 - s0, s2 - s0]))\n")


@pytest.mark.parametrize("native", ["1", "0"])
def test_small_arrays_are_counted_as_numpy_data_with_and_without_the_route(native):
    """With the native hooks NumPy's own malloc calls are counted (the NumPy route, docs/
    design.md) and the handler passes small requests through; without them the handler
    counts. Either way kept small arrays are NumPy data, and dropping them gives it back,
    up to the blocks NumPy's cache keeps (7 of a size). Every loaded object is patched,
    on Debian's /usr/bin/python3.11 too, whose executable is not position-independent
    (include/mg_elf.h: its canonical PLT entries), and blocks are measured from glibc's
    chunk header there as on every interpreter of the matrix (include/mg_usable.h: the
    definition behind the program's canonical PLT entry is glibc's)."""
    k = Kernel(env={"MEMGUARD_NATIVE": native})
    try:
        k.execute("%load_ext memguard")
        ex = k.execute(SMALL_ARRAYS)
        route, grown, left = json.loads(ex.stdout.split("SMALL ", 1)[1].splitlines()[0])
    finally:
        k.shutdown()
    routed, not_patched, usable_header = route
    assert not_patched == [] and routed == (native == "1"), route
    assert usable_header == 1, route
    assert 100_000 * 512 <= grown <= 100_000 * 600, grown
    assert 0 <= left <= 7 * 600, left


HANDLER_STATE = (
    IMPORT_GET_HANDLER_NAME
    + "import memguard._core as core\n"
    "print('STATE', core.native_stats()['numpy_passing'], get_handler_name())\n")


def test_numpy_handler_passes_through_in_warn_mode_and_judges_in_raise_mode(kernel):
    """Outside raise mode the "memguard" handler's malloc, realloc and free are NumPy's own
    (the route's wrappers count), in raise mode memguard's (they refuse); either way a
    large array is counted with its line and a kept one is NumPy data."""
    def state():
        ex = kernel.execute(HANDLER_STATE)
        return ex.stdout.split("STATE ", 1)[1].split()

    assert state() == ["1", "memguard"]
    ex = kernel.execute("%%memguard 100MB\nimport numpy as np\n"
                        "big = np.empty(40_000_000)  # 320 MB\nbig[:] = 1.0\n")
    alert = ex.alerts_of("budget")[0][2]
    assert alert["line"] == 3 and alert["bytes"] >= 320_000_000, alert
    kernel.execute("%memguard mode raise")
    assert state() == ["0", "memguard"]
    ex = kernel.execute("%%memguard 100MB\nx = np.empty(40_000_000)\n", ok=False)
    refused = last_alert(ex, "budget")
    assert ex.error["ename"] == "MemoryError" and refused["refused"] and refused["line"] == 2
    kernel.execute("%memguard mode warn")
    assert state() == ["1", "memguard"]
    ex = kernel.execute("import memguard._core as core\nbefore = core.snapshot()['numpy']\n"
                        "del big\nprint('FREED', before - core.snapshot()['numpy'])\n")
    freed = int(ex.stdout.split("FREED ", 1)[1].split()[0])
    assert 320_000_000 <= freed <= 321_000_000, freed


@pytest.mark.parametrize("bad", ["budget -5MB", "budget abc", "budget", "budget 0.1", "budget 1e30",
                                 "budget 5XB", "bogus", "budget 'unclosed", "budget ½GB"])
def test_bad_sizes_raise_usage_error_and_change_nothing(kernel, bad):
    kernel.execute("%memguard budget 300MB")
    ex = kernel.execute(f"%memguard {bad}", ok=False)
    assert ex.error and ex.error["ename"] == "UsageError", ex.error
    assert "e.g." in ex.error["evalue"] or "Usage" in ex.error["evalue"]
    ex = kernel.execute("from memguard._state import STATE; print(STATE.default_budget)")
    assert ex.stdout.strip() == "300000000"


def test_status_shows_limit_budget_mode_tracked_and_rss(kernel):
    kernel.execute("%memguard budget 1GiB")
    ex = kernel.execute("%memguard status")
    (msg,) = [m for _, m in ex.messages if m["msg_type"] == "display_data"]
    text = msg["content"]["data"]["text/plain"]
    for label in ("limit", "budget", "mode", "tracked", "RSS", "last cell peak"):
        assert label in text
    assert "1.07 GB" in text and "warn" in text


def test_unload_then_free_then_reload_keeps_the_kernel_sane(kernel):
    kernel.execute("import numpy as np\nkeep = [np.ones(1_000_000) for _ in range(5)]\n"
                   "objs = [dict(a=i) for i in range(100_000)]")
    wrapped = "print('get_code_name' in vars(get_ipython().compile))"
    assert kernel.execute(wrapped).stdout.strip() == "True"  # cells.watch_compiler
    kernel.execute("%unload_ext memguard")
    assert kernel.execute(wrapped).stdout.strip() == "False"  # the compiler as it was
    ex = kernel.execute("del keep, objs\nimport gc; gc.collect()\n"
                        "after = [np.ones(1_000_000) for _ in range(5)]\n"
                        "%memguard", ok=False)
    assert ex.error and ex.error["ename"] == "UsageError"  # the magic is gone
    ex = kernel.execute("%load_ext memguard")
    assert "loaded" in ex.stdout
    assert kernel.execute(wrapped).stdout.strip() == "True"
    ex = kernel.execute("%%memguard 10MB\nbig = np.ones(5_000_000)\ndel after")
    assert ex.alerts_of("budget")
    ex = kernel.execute("print(1 + 1)")
    assert ex.stdout.strip() == "2"


def test_alert_parent_is_the_execute_request_even_with_other_shell_requests(kernel, tmp_path):
    # kernel.get_parent("shell") is the latest shell request of any type (docs/design.md,
    # "ipykernel internals"). The cell waits until the test has sent a complete_request, so
    # that request provably reaches the kernel while the cell runs, before the allocation.
    sent = tmp_path / "complete-sent"
    complete = {}

    def on_message(channel, msg):
        if (channel == "iopub" and msg["msg_type"] == "stream"
                and "waiting" in msg["content"]["text"] and not complete):
            complete["id"] = kernel.kc.complete("np.on", 5)
            complete["t"] = time.monotonic()
            sent.touch()
        elif channel == "shell" and msg["parent_header"].get("msg_id") == complete.get("id"):
            complete["reply"] = msg

    ex = kernel.execute("%%memguard 100MB\n"
                        "import numpy as np, os, time\n"
                        "print('waiting', flush=True)\n"
                        + _wait_for_file(sent) +
                        "a = np.ones(30_000_000)\n"
                        f"print('released', os.path.exists({str(sent)!r}))\n",
                        on_message=on_message)
    assert "released True" in ex.stdout, "the cell did not see the complete_request go out"
    (busy_t, busy), (idle_t, idle) = ex.status
    assert busy["content"]["execution_state"] == "busy" and busy_t < complete["t"] < idle_t
    alerts = ex.alerts_of("budget")
    assert alerts and all(a[3]["parent_header"]["msg_id"] == ex.msg_id for a in alerts)
    assert alerts[0][0] > complete["t"]
    assert alerts[0][2]["line"] == 6
    # ipykernel answers shell requests one at a time, so the reply comes after the cell's.
    deadline = time.monotonic() + TIMEOUT
    while "reply" not in complete:
        assert time.monotonic() < deadline, "no complete_reply"
        try:
            msg = kernel.kc.get_shell_msg(timeout=0.1)
        except Exception:
            continue
        on_message("shell", msg)
    reply = complete["reply"]
    assert reply["msg_type"] == "complete_reply" and reply["content"]["status"] == "ok"
    # The kernel's own clock: the request was stamped before the cell went idle.
    assert reply["parent_header"]["date"] < idle["header"]["date"]


def test_debug_allocator_gives_a_clear_message_at_load():
    k = Kernel(env={"PYTHONMALLOC": "debug"})
    try:
        ex = k.execute("%load_ext memguard")
        assert "not loaded" in ex.stdout and "debug allocator" in ex.stdout
        ex = k.execute("import numpy as np\nprint(np.ones(3).sum())")
        assert ex.stdout.strip() == "3.0"
    finally:
        k.shutdown()


def test_sparse_rule_is_configurable(kernel):
    code = ("import numpy as np, scipy.sparse as sp\n"
            "X = sp.random(4000, 4000, density=0.01, format='csr',\n"
            "              random_state=np.random.default_rng(2))\n"
            "D = X.toarray()  # 128 MB dense, 64x the sparse bytes\n")
    assert kernel.execute(code).alerts == []
    ex = kernel.execute("import memguard\nprint(memguard.configure(sparse_min_bytes='100MB', "
                        "sparse_min_ratio=50))")
    assert "100000000" in ex.stdout
    (alert,) = [a[2] for a in kernel.execute(code).alerts_of("sparse_to_dense")]
    assert alert["line"] == 4 and alert["dense_bytes"] == 128_000_000
    ex = kernel.execute("memguard.configure(sparse_min_ratio=0.5)", ok=False)
    assert ex.error["ename"] == "ValueError"
