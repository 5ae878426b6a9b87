"""The package's life cycle: a load that fails half-way leaves nothing behind, the relay
never closes a socket its thread may still use, a traced cell's alerts survive tracemalloc
stopping under them, the Python frame rule, and the package's import graph."""

import ast
import os
import struct
import sys
import threading
import time

import pytest

from conftest import Kernel

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jupyter_ext",
                       "memguard")


def _imports(path, modules):
    """The package modules ``path`` imports (at any depth: lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memguard."):
            names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("memguard.")]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def test_the_package_has_no_import_cycle():
    modules = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py")}
    graph = {m: _imports(os.path.join(PACKAGE, m + ".py"), modules) for m in modules}
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    # The layers of the split: nothing below imports anything above it.
    assert not graph["render"] - {"sizes"}
    assert not graph["records"] & {"cells", "commands", "extension", "magics"}
    assert not graph["cells"] & {"commands", "extension", "magics"}
    assert not graph["commands"] & {"extension", "magics"}
    assert "magics" not in graph["extension"]


def test_relay_stop_leaves_the_socket_to_its_busy_thread():
    import zmq

    from memguard.relay import Relay

    entered, release = threading.Event(), threading.Event()

    def on_record(fields):
        entered.set()
        release.wait(10)

    relay = Relay("<q", on_record)
    relay.start()
    ctx = zmq.Context.shadow(relay.context)
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(relay.endpoint)
    for i in range(3):  # the thread is in on_record for the first, two more are queued
        push.send(struct.pack("<q", i))
    assert entered.wait(5)
    push.close()
    errors = []
    saved_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        relay.stop()  # gives up after its timeout: the thread is still in on_record
        assert relay._thread.is_alive()
        assert not relay._sock.closed, "stop() closed a socket its thread still uses"
        release.set()
        relay._thread.join(5)
        assert not relay._thread.is_alive()
    finally:
        release.set()
        threading.excepthook = saved_hook
    assert errors == []
    assert relay._sock.closed and relay._ctx.closed  # the thread closed both on its way out


def _switches(tid):
    """Context switches of thread ``tid`` of this process so far (/proc, proc(5))."""
    with open(f"/proc/self/task/{tid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if "ctxt_switches" in line)
    return sum(int(v) for v in fields.values())


def test_an_idle_relay_sleeps_until_a_record_and_stop_wakes_it():
    import zmq

    from memguard.relay import Relay

    got = []
    relay = Relay("<q", got.append)
    relay.start()
    ctx = zmq.Context.shadow(relay.context)
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(relay.endpoint)
    push.send(struct.pack("<q", 7))
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [(7,)]
    # Idle, the thread must not wake (each wake takes the GIL from the running cell). A
    # timed wait would switch ten times a second; allow a few for the record's aftermath.
    before = _switches(relay._thread.native_id)
    time.sleep(1.0)
    assert _switches(relay._thread.native_id) - before <= 2
    push.close()
    t0 = time.monotonic()
    assert relay.stop(timeout=5) is True
    assert time.monotonic() - t0 < 1.0, "stop() waited for a timeout instead of waking it"
    assert not relay._thread.is_alive()
    assert relay.bad == 0 and relay.received == 1


def test_relay_stop_before_start_closes_everything():
    from memguard.relay import Relay

    relay = Relay("<q", lambda fields: None)
    assert relay.stop() is True
    assert relay._sock.closed and relay._ctx.closed


def test_traced_top_lines_survive_tracemalloc_stopping_under_them(monkeypatch):
    import tracemalloc

    from memguard.trace import CellTrace

    assert not tracemalloc.is_tracing()
    tracer = CellTrace("<cell>")
    try:
        keep = [bytearray(100_000) for _ in range(5)]
        assert tracer.top() and keep
        # tracemalloc stops (the cell's own code, or another thread) right after a check
        # that it was tracing: the alert being built must still go out, without top lines.
        real_is_tracing = tracemalloc.is_tracing

        def stops_right_after():
            if real_is_tracing():
                tracemalloc.stop()
                return True
            return False

        monkeypatch.setattr(tracemalloc, "is_tracing", stops_right_after)
        assert tracer.top() == []
    finally:
        monkeypatch.undo()
        tracer.stop()
        assert not tracemalloc.is_tracing()


def test_frame_rule_reads_another_threads_cell_line():
    from memguard import frames

    ns = {}
    code = compile("import threading\nev = threading.Event()\ndef wait():\n    ev.wait(10)\n"
                   "wait()\n", "<cell-7>", "exec")
    worker = threading.Thread(target=exec, args=(code, ns))
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while "wait" not in ns or frames.thread_cell_line(worker.ident, ns) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert frames.thread_cell_line(worker.ident, ns) == 4
        assert frames.thread_cell_line(worker.ident, ns, "<cell-7>") == 4
        assert frames.thread_cell_line(worker.ident, ns, "<not-compiled>") == 4
        assert frames.thread_cell_line(worker.ident, {}) is None
        assert frames.thread_cell_line(threading.get_ident(), ns) is None
    finally:
        ns["ev"].set()
        worker.join(5)


# A step of the load made to fail in the kernel, with the check that the load undid every
# step before it: hooks off (allocations are not counted), no memguard thread, no events,
# magics, exception handler, black box or switch interval left, and a later load works.
FAIL_STEPS = {"monitor": ("memguard._core", "monitor_start"),
              "last step": ("memguard.cells", "begin")}
STATE_AFTER = (
    "import sys, threading, memguard._core as c, memguard.cells as cells\n"
    "from memguard._state import STATE\n"
    "ip = get_ipython()\n"
    "t0 = c.snapshot()['tracked']\n"
    "x = bytearray(50_000_000)\n"
    "counted = c.snapshot()['tracked'] - t0\n"
    "del x\n"
    "print('loaded', STATE.loaded, STATE.relay, STATE.blackbox_path)\n"
    "print('counted', counted)\n"
    "print('threads', [t.name for t in threading.enumerate() if 'memguard' in t.name])\n"
    "print('monitor', c.monitor_stats()['running'])\n"
    "print('events', cells.pre_run_cell in ip.events.callbacks['pre_run_cell'],\n"
    "      cells.post_run_cell in ip.events.callbacks['post_run_cell'])\n"
    "print('magics', 'memguard' in ip.magics_manager.magics['line'])\n"
    "print('custom_exc', MemoryError in ip.custom_exceptions)\n"
    "print('switch', sys.getswitchinterval())\n"
)


@pytest.mark.parametrize("step", sorted(FAIL_STEPS))
def test_a_failed_load_undoes_every_step_and_a_later_load_works(step, tmp_path):
    k = Kernel(env={"MEMGUARD_DIR": str(tmp_path)})
    try:
        switch = k.execute("import sys; print(sys.getswitchinterval())").stdout.strip()
        module, name = FAIL_STEPS[step]
        k.execute(f"import importlib\n_m = importlib.import_module({module!r})\n"
                  f"_real = _m.{name}\n"
                  f"def _boom(*args, **kwargs):\n    raise OSError('injected failure')\n"
                  f"_m.{name} = _boom")
        ex = k.execute("%load_ext memguard", ok=False)
        assert ex.error is not None and "injected failure" in ex.error["evalue"], ex.messages
        assert "memguard: not loaded" in ex.stdout
        k.execute(f"_m.{name} = _real")  # the step works again
        lines = dict(line.split(" ", 1) for line in
                     k.execute(STATE_AFTER).stdout.strip().splitlines())
        assert lines["loaded"] == "False None None"
        assert lines["counted"] == "0", "the allocator hooks still count"
        assert lines["threads"] == "[]"
        assert lines["monitor"] == "0"
        assert lines["events"] == "False False"
        assert lines["magics"] == "False"
        assert lines["custom_exc"] == "False"
        assert lines["switch"] == switch
        assert [n for n in os.listdir(tmp_path) if n.endswith(".mgbox")] == []
        ex = k.execute("%load_ext memguard")
        assert "loaded;" in ex.stdout, ex.stdout
        ex = k.execute("%%memguard 50MB\nimport numpy as np\na = np.ones(20_000_000)\n")
        assert [a[2]["line"] for a in ex.alerts_of("budget")][:1] == [3]
    finally:
        k.shutdown()
