"""memguard's kernel launcher (jupyter_ext/memguard/launcher.py) in real conditions: real
kernels started by jupyter_client from the kernelspec ``python -m memguard install
--kernelspec`` wrote into a temporary kernel dir.

- a budget alert of a GIL-holding ``json.loads`` reaches the client while the call runs;
- a SIGKILL of the kernel mid-cell, and a real cgroup v1 OOM kill, put a ``kernel_died``
  notice under that cell before the kernel manager sees the launcher exit;
- interrupt, restart and shutdown work, and no process is left behind.

Every wait polls with a deadline.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ALERT_MIME = "application/vnd.memguard.alert+json"
NAME = "memguard-launcher-test"
CGROUP_V1 = "/sys/fs/cgroup/memory"


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("kernels")
    out = subprocess.run([sys.executable, "-m", "memguard", "install", "--kernelspec", NAME,
                          "--prefix", str(prefix)], capture_output=True, text=True, check=True)
    assert "installed kernelspec" in out.stdout
    return str(prefix / "share" / "jupyter" / "kernels")


@pytest.fixture
def mgdir(tmp_path, monkeypatch):
    d = tmp_path / "mg"
    monkeypatch.setenv("MEMGUARD_DIR", str(d))
    return d


class Launched:
    """A kernel started from the launcher kernelspec, and a client on it."""

    def __init__(self, spec_dir):
        ksm = KernelSpecManager(kernel_dirs=[spec_dir])
        self.km = KernelManager(kernel_name=NAME, kernel_spec_manager=ksm)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=90)
        self.launcher_pid = self.km.provisioner.process.pid
        self.child_pid = int(self.run("import os; print(os.getpid())")["stdout"])
        self.pids = [self.launcher_pid, self.child_pid]

    def reconnect(self):
        self.kc.stop_channels()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=90)
        self.launcher_pid = self.km.provisioner.process.pid
        self.first_cell = self.run("import os; print(os.getpid())")
        self.child_pid = int(self.first_cell["stdout"])
        self.pids += [self.launcher_pid, self.child_pid]

    def collect(self, msg_id, until, timeout=120):
        """IOPub messages parented to msg_id, as (arrival monotonic, msg), until
        ``until(msg)`` is true (that message included)."""
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # queue.Empty
                break
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            out.append((time.monotonic(), m))
            if until(m):
                return out
        raise AssertionError(f"no end message in {timeout} s; got "
                             f"{[x[1]['msg_type'] for x in out]}")

    def run(self, code, timeout=120):
        msg_id = self.kc.execute(code)
        msgs = self.collect(msg_id, _idle, timeout)
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:  # an earlier request's
            reply = self.kc.get_shell_msg(timeout=timeout)
        stdout = "".join(m["content"]["text"] for _, m in msgs
                         if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        return {"msg_id": msg_id, "msgs": msgs, "reply": reply, "stdout": stdout.strip()}

    def close(self):
        try:
            self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
        assert_gone(self.pids)


def _idle(m):
    return m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"


def _alerts(msgs, kind=None):
    return [(t, m) for t, m in msgs
            if m["msg_type"] in ("display_data", "update_display_data")
            and ALERT_MIME in m["content"]["data"]
            and (kind is None or m["content"]["data"][ALERT_MIME]["kind"] == kind)]


def _dead(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_gone(pids, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_dead(p) for p in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"left running: {[p for p in pids if not _dead(p)]}")


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def launched(spec_dir, mgdir):
    k = Launched(spec_dir)
    yield k
    k.close()


def test_kernelspec_cli(tmp_path):
    prefix = tmp_path / "p"
    run = [sys.executable, "-m", "memguard"]
    subprocess.run(run + ["install", "--kernelspec", "--prefix", str(prefix)], check=True,
                   capture_output=True)
    ksm = KernelSpecManager(kernel_dirs=[str(prefix / "share/jupyter/kernels")])
    spec = ksm.get_kernel_spec("python3-memguard")
    assert spec.display_name == "Python 3 (memguard)"
    assert spec.argv[1:5] == ["-m", "memguard.launcher", "-f", "{connection_file}"]
    out = subprocess.run(run + ["uninstall", "--kernelspec", "--prefix", str(prefix)],
                         check=True, capture_output=True, text=True)
    assert "removed kernelspec" in out.stdout
    assert not (prefix / "share/jupyter/kernels/python3-memguard").exists()


def test_kernel_is_a_child_of_the_launcher_and_iopub_is_forwarded(launched):
    assert psutil.Process(launched.child_pid).ppid() == launched.launcher_pid
    env = launched.run("import os; print(os.environ.get('MEMGUARD_LAUNCHER_ENDPOINT'))")
    assert env["stdout"] == "None"  # memguard took it out of the environment
    ex = launched.run("%memguard status")
    assert ex["reply"]["content"]["status"] == "ok"
    ex = launched.run("for i in range(3): print(i, flush=True)")
    assert ex["stdout"].split() == ["0", "1", "2"]


def test_gil_held_json_alert_arrives_while_the_call_runs(launched):
    # ~7 M small lists of 2 ints and a str: about 1.5 GB of Python objects from a 230 MB
    # document, built by json.loads (C, holding the GIL) for several seconds.
    launched.run("import json\n"
                 "doc = '[' + ','.join(['[1234567,1234568,\"abcdefgh\"]'] * 7_000_000) + ']'")
    # The main thread keeps the GIL from the cell's start to its end, so ipykernel's IOPub
    # thread cannot send the cell's own status/execute_input until json.loads returns (this
    # happens by chance without the setting too): the launcher must find the cell without
    # them, and its alert comes before the kernel's "busy".
    launched.run("import sys; sys.setswitchinterval(60)")
    ex = launched.run("%%memguard 200MB\nobj = json.loads(doc)\nn = len(obj)", timeout=300)
    idle = ex["msgs"][-1][0]
    budget = _alerts(ex["msgs"], "budget")
    assert budget, [m["msg_type"] for _, m in ex["msgs"]]
    first_t, first = budget[0]
    assert first["msg_type"] == "display_data"
    assert first["parent_header"]["msg_id"] == ex["msg_id"]
    assert first["metadata"].get("memguard", {}).get("from") == "launcher"
    count = ex["reply"]["content"]["execution_count"]
    assert {m["content"]["data"][ALERT_MIME]["cell"] for _, m in budget} == {count}
    # The call was still running: the alert came well before the cell's end.
    assert first_t < idle - 1.0, (first_t, idle)
    # One element per cause: every later message for it updates the same display.
    did = first["content"]["transient"]["display_id"]
    assert all(m["msg_type"] == "update_display_data" for _, m in budget[1:])
    assert {m["content"]["transient"]["display_id"] for _, m in budget} == {did}
    # The kernel's own relay caught up after the call and updated that display.
    assert any(not m["metadata"].get("memguard") for _, m in budget[1:])
    launched.run("del obj, doc")


def _kill_mid_cell(launched, kill):
    """Run a cell that never ends (allocating at line 5), wait until its black box has
    seen line 5, ``kill()`` the kernel, and return the execute_request's msg_id and its
    IOPub messages up to the death notice."""
    from memguard import blackbox

    msg_id = launched.kc.execute("import time\nimport numpy as np\nx = 1\nwhile True:\n"
                                 "    y = np.ones(1_000_000)\n    time.sleep(0.01)")
    launched.collect(msg_id, lambda m: m["msg_type"] == "execute_input", 60)
    path = blackbox.path_for(launched.km.connection_file)

    def at_line_5():
        try:
            return blackbox.read(path).state["line"] == 5
        except blackbox.BlackBoxError:
            return False

    wait_for(at_line_5, 30, "the black box to record line 5")
    kill()
    msgs = launched.collect(msg_id, lambda m: bool(_alerts([(0, m)], "kernel_died")), 120)
    return msg_id, msgs


def _oom_kill_elsewhere():
    """Have the OOM killer end an unrelated process (in a 64 MiB cgroup of its own), as on
    a shared host; returns once /proc/vmstat's oom_kill has moved. False when cgroup v1 is
    not writable here."""
    if not _cgroup_v1_writable():
        return False
    from memguard.launcher import system_oom_kills

    cg = os.path.join(CGROUP_V1, f"memguard-other-{uuid.uuid4().hex[:8]}")
    os.mkdir(cg)
    try:
        for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            if os.path.exists(os.path.join(cg, name)):
                with open(os.path.join(cg, name), "w") as fh:
                    fh.write(str(64 * 2**20))
        before = system_oom_kills()

        def join():
            with open(os.path.join(cg, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))

        proc = subprocess.run([sys.executable, "-c", "x = bytearray(512 * 2**20)"],
                              preexec_fn=join, capture_output=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc
        wait_for(lambda: system_oom_kills() > before, 10, "vmstat's oom_kill to move")
    finally:
        deadline = time.monotonic() + 20
        while os.path.isdir(cg):
            try:
                os.rmdir(cg)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    return True


def test_sigkill_mid_cell_is_announced_under_the_cell(launched):
    launched.run("import numpy as np\nkeep = np.ones(50_000_000)")  # 400 MB, in the box
    child, launcher = launched.child_pid, launched.launcher_pid
    # Another process on the host is OOM-killed meanwhile: this kill is still not the OOM
    # killer's (the kernel's own cgroup counter says so).
    _oom_kill_elsewhere()
    msg_id, msgs = _kill_mid_cell(launched, lambda: os.kill(child, signal.SIGKILL))
    t, notice = _alerts(msgs, "kernel_died")[0]
    alert = notice["content"]["data"][ALERT_MIME]
    assert notice["parent_header"]["msg_id"] == msg_id
    assert alert["signal"] == "SIGKILL" and alert["oom_killer"] is False
    assert alert["cell"] is not None and alert["line"] == 5
    assert alert["peak"] >= 400e6
    assert "killed by SIGKILL" in notice["content"]["data"]["text/plain"]
    # The launcher then exits like its kernel did, and the manager can restart it.
    proc = launched.km.provisioner.process
    wait_for(lambda: proc.poll() is not None, 30, "the launcher to exit")
    assert proc.returncode == -signal.SIGKILL
    assert_gone([child, launcher])
    launched.km.restart_kernel(now=True)
    launched.reconnect()
    report = _alerts(launched.first_cell["msgs"], "crash_report")  # the full report stays
    assert report and report[0][1]["content"]["data"][ALERT_MIME]["pid"] == child


def _cgroup_v1_writable():
    try:
        d = os.path.join(CGROUP_V1, f"memguard-probe-{uuid.uuid4().hex[:8]}")
        os.mkdir(d)
        os.rmdir(d)
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _cgroup_v1_writable(), reason="needs a writable cgroup v1 memory hierarchy")
def test_cgroup_oom_kill_mid_cell_is_announced(launched):
    cg = os.path.join(CGROUP_V1, f"memguard-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(cg)
    try:
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as fh:
            fh.write(str(600 * 2**20))
        memsw = os.path.join(cg, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            with open(memsw, "w") as fh:
                fh.write(str(600 * 2**20))
        with open(os.path.join(cg, "cgroup.procs"), "w") as fh:
            fh.write(str(launched.child_pid))
        child = launched.child_pid
        msg_id = launched.kc.execute("import numpy as np\nchunks = []\nwhile True:\n"
                                     "    chunks.append(np.ones(25_000_000))")
        msgs = launched.collect(msg_id, lambda m: bool(_alerts([(0, m)], "kernel_died")), 180)
        notice = _alerts(msgs, "kernel_died")[0][1]
        alert = notice["content"]["data"][ALERT_MIME]
        assert notice["parent_header"]["msg_id"] == msg_id
        assert alert["oom_killer"] is True and alert["signal"] == "SIGKILL"
        assert alert["limit"] == 600 * 2**20 and alert["limit_source"] == "cgroup"
        assert alert["line"] in (3, 4)
        assert "OOM killer" in alert["message"]
        proc = launched.km.provisioner.process
        wait_for(lambda: proc.poll() is not None, 30, "the launcher to exit")
        assert proc.returncode == -signal.SIGKILL
        assert_gone([child])
    finally:
        deadline = time.monotonic() + 20
        while True:
            try:
                os.rmdir(cg)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def test_interrupt_restart_shutdown(launched):
    # Interrupt only once the cell's code runs: execute_input is published before
    # run_cell starts, and a SIGINT in between is caught by the kernel's own loop
    # ("KeyboardInterrupt caught in kernel"), so the cell would never see it.
    msg_id = launched.kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    launched.collect(msg_id, lambda m: m["msg_type"] == "stream"
                     and "sleeping" in m["content"]["text"], 60)
    launched.km.interrupt_kernel()
    msgs = launched.collect(msg_id, _idle, 30)
    errors = [m for _, m in msgs if m["msg_type"] == "error"]
    assert errors and errors[0]["content"]["ename"] == "KeyboardInterrupt"
    assert launched.run("print('alive')")["stdout"] == "alive"  # the same kernel lives on
    old = list(launched.pids)
    launched.km.restart_kernel(now=False)
    assert_gone(old)
    launched.reconnect()
    assert launched.run("print(2 + 2)")["stdout"] == "4"
    pids = [launched.launcher_pid, launched.child_pid]
    launched.kc.stop_channels()
    launched.km.shutdown_kernel(now=False)
    assert_gone(pids)
    assert launched.km.provisioner is None or launched.km.provisioner.process is None


def test_kill_of_the_launcher_takes_the_kernel(launched):
    child = launched.child_pid
    os.kill(launched.launcher_pid, signal.SIGKILL)
    assert_gone([launched.launcher_pid, child])


def test_sigterm_to_the_launcher_is_forwarded(launched):
    proc = launched.km.provisioner.process
    os.kill(launched.launcher_pid, signal.SIGTERM)
    wait_for(lambda: proc.poll() is not None, 30, "the launcher to exit")
    assert proc.returncode == -signal.SIGTERM
    assert_gone(launched.pids)
