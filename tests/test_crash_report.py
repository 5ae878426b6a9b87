"""The black box and the post-crash report (docs/interface.md, "Files" and the
``crash_report`` alert): the box survives SIGKILL and the restarted kernel explains the
death; bad black boxes are rejected in one line and set aside; the reader is fuzzed; a clean
shutdown leaves nothing behind."""

import os
import random
import signal
import struct
import sys
import time

import pytest

from conftest import Kernel

MB = 10**6


@pytest.fixture
def boxdir(tmp_path):
    return str(tmp_path)


def _kill_and_restart(k):
    os.kill(k.km.provisioner.pid, signal.SIGKILL)  # what the OOM killer sends
    deadline = time.monotonic() + 30
    while k.km.is_alive():  # reaps it: the restarted kernel finds a dead kernel's box
        assert time.monotonic() < deadline, "the SIGKILLed kernel is still alive after 30 s"
        time.sleep(0.01)
    k.km.restart_kernel(now=True)
    k.kc.wait_for_ready(timeout=60)


def _boxes(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".mgbox"))


def _wait_for_box(path, ready, what, timeout=60):
    """Read the black box at ``path`` until ``ready(box)`` is true; return that box. A box
    being created (or with no complete state yet) is read again; after ``timeout`` seconds
    the test fails, naming ``what`` it waited for and the last box or error seen."""
    from memguard import blackbox

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            box = blackbox.read(str(path))
        except (OSError, blackbox.BlackBoxError) as exc:
            last = exc
        else:
            if ready(box):
                return box
            last = box.state, box.alerts, len(box.samples)
        time.sleep(0.02)
    pytest.fail(f"the black box never showed {what} in {timeout} s; last seen: {last}")


def _kinds(box):
    return {a["kind"] for a in box.alerts}


def test_kernel_killed_mid_cell_gets_a_crash_report_after_restart(boxdir):
    k = Kernel(env={"MEMGUARD_DIR": boxdir})
    try:
        k.execute("%load_ext memguard")
        k.execute("import numpy as np, time\n%memguard budget 400MB")
        code = ("parts = []\n"
                "for i in range(1000):\n"
                "    parts.append(np.ones(5_000_000))  # 40 MB a turn\n"
                "    time.sleep(0.05)\n")
        k.kc.execute(code)
        # Kill once the box holds what the report must show: both alerts, and a peak and a
        # last sample past 400 MB.
        (name,) = _boxes(boxdir)
        _wait_for_box(os.path.join(boxdir, name),
                      lambda b: {"accumulation", "budget"} <= _kinds(b)
                      and b.state["rss_peak"] >= 400 * MB and b.samples[-1][1] >= 400 * MB,
                      "both alerts and 400 MB of RSS")
        killed_count = 3  # %load_ext is 1, the import cell 2, this one 3
        _kill_and_restart(k)
        ex = k.execute("%load_ext memguard")
        reports = ex.alerts_of("crash_report")
        assert len(reports) == 1, [a[2]["kind"] for a in ex.alerts]
        _t, msg_type, alert, msg = reports[0]
        assert msg_type == "display_data" and msg["parent_header"]["msg_id"] == ex.msg_id
        assert alert["cell"] == killed_count
        assert alert["line"] == 3
        assert alert["peak"] >= 400 * MB and alert["rss"] >= 400 * MB
        assert alert["pid"] > 0 and alert["limit_source"] == "physical"
        assert alert["top_sites"][0]["line"] == 3 and alert["top_sites"][0]["cell"] == killed_count
        kinds = {a["kind"] for a in alert["alerts"]}
        assert {"accumulation", "budget"} <= kinds
        assert len([a for a in alert["alerts"] if a["kind"] == "budget"]) == 1  # updates merged
        assert any("aggregate" in s for s in alert["suggestions"])
        assert [row[0] for row in alert["source"] if row[2]] == [3]
        data = msg["content"]["data"]
        assert "<svg" in data["text/html"] and "<script" not in data["text/html"]
        assert "->    3 |     parts.append" in data["text/plain"]
        again = k.execute("%memguard report")
        shown = next(m for _, m in again.messages if m["msg_type"] == "display_data")
        assert "died while running cell 3, line 3" in shown["content"]["data"]["text/plain"]
        names = _boxes(boxdir)
        assert any(".crashed-" in n for n in names)  # set aside, not reported twice
        second = k.execute("x = 1")
        assert second.alerts_of("crash_report") == []
    finally:
        k.shutdown()


def test_clean_shutdown_removes_the_box_and_no_report_follows(boxdir):
    k = Kernel(env={"MEMGUARD_DIR": boxdir})
    k.execute("%load_ext memguard")
    assert len(_boxes(boxdir)) == 1
    k.shutdown()
    assert _boxes(boxdir) == []


def _real_box(tmp_path, name="kernel-x.mgbox"):
    """A black box written by the C writer (memguard._core) in this process."""
    import memguard._core as core

    path = str(tmp_path / name)
    core.blackbox_open(path, "kernel-x.json")
    core.blackbox_set_cell(1, 5, "a = 1\nb = [0] * 10\n")
    core.blackbox_add_alert(1, 5, 0, 2, 123, "over budget")
    from memguard.relay import load_zmq

    load_zmq(core)
    core.monitor_start(f"ipc://{tmp_path}/nobody")  # the monitor writes state and samples
    try:
        _wait_for_box(path, lambda b: len(b.samples) >= 2, "two timeline samples", 10)
    finally:
        core.monitor_stop()
    core.blackbox_close(False)
    return path


def test_reader_layout_matches_the_c_writer():
    import memguard._core as core
    from memguard import blackbox

    assert blackbox.layout() == core.blackbox_layout()
    assert blackbox.FILE_BYTES < 2**20


def test_a_real_box_reads_back(tmp_path):
    from memguard import blackbox

    box = blackbox.read(_real_box(tmp_path))
    assert box.pid == os.getpid() and box.connection == "kernel-x.json"
    assert box.cell_count == 5 and box.cell_source.startswith("a = 1")
    assert box.alerts[0]["kind"] == "budget" and box.alerts[0]["line"] == 2
    # The monitor sampled this very process: its RSS, give or take what moved since.
    rss_now = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert len(box.samples) >= 2 and abs(box.state["rss"] - rss_now) <= 64 * 2**20


@pytest.mark.parametrize("damage, why", [
    ("random", "not a memguard black box"),
    ("truncated", "truncated"),
    ("newer", "newer memguard (layout {next}"),
    ("older", "older memguard (layout 1;"),
    ("half", "half-written"),
    ("empty", "truncated"),
])
def test_bad_boxes_are_rejected_in_one_line(tmp_path, damage, why):
    from memguard import blackbox

    path = _real_box(tmp_path)
    data = bytearray(open(path, "rb").read())
    if damage == "random":
        data = bytearray(random.Random(1).randbytes(len(data)))
    elif damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "newer":
        struct.pack_into("<I", data, 8, blackbox.LAYOUT + 1)
    elif damage == "older":
        struct.pack_into("<I", data, 8, 1)
    elif damage == "half":
        for i in range(2):  # both state copies caught mid-write
            off = blackbox.OFF_STATE + i * blackbox.STATE_BYTES
            struct.pack_into("<Q", data, off, 7)
    elif damage == "empty":
        data = bytearray()
    open(path, "wb").write(data)
    with pytest.raises(blackbox.BlackBoxError) as err:
        blackbox.read(path)
    why = why.format(next=blackbox.LAYOUT + 1)
    assert why in str(err.value) and "\n" not in str(err.value)


def test_reader_survives_fuzzed_boxes(tmp_path):
    from memguard import blackbox

    good = open(_real_box(tmp_path), "rb").read()
    rng = random.Random(20261122)
    path = str(tmp_path / "fuzz.mgbox")
    outcomes = {"read": 0, "rejected": 0}
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 40)):
            at = rng.randrange(len(data))
            data[at:at + 8] = rng.randbytes(8)
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        open(path, "wb").write(data)
        try:
            box = blackbox.read(path)
        except blackbox.BlackBoxError as exc:
            assert "\n" not in str(exc)
            outcomes["rejected"] += 1
        else:
            from memguard import render, report

            render.crash_text(report.crash_alert(box))  # a box that reads must also render
            outcomes["read"] += 1
    assert outcomes["read"] > 0 and outcomes["rejected"] > 0


def test_bad_box_at_load_is_set_aside_with_a_note(boxdir):
    k = Kernel(env={"MEMGUARD_DIR": boxdir})
    try:
        path = k.execute("from ipykernel.kernelapp import IPKernelApp\n"
                         "import os\n"
                         "print(os.path.splitext(os.path.basename("
                         "IPKernelApp.instance().connection_file))[0])").stdout.strip()
        with open(os.path.join(boxdir, path + ".mgbox"), "wb") as fh:
            fh.write(b"MGBLKBOX" + b"\x09\x00\x00\x00" + b"\x00" * 300)
        ex = k.execute("%load_ext memguard")
        assert "set aside" in ex.stdout and "newer memguard" in ex.stdout
        assert ex.alerts_of("crash_report") == []
        assert any(".bad-" in n for n in _boxes(boxdir))
    finally:
        k.shutdown()


def test_boxes_of_dead_kernels_older_than_a_week_are_cleaned(boxdir, tmp_path):
    old = os.path.join(boxdir, "kernel-old.crashed-1.mgbox")
    recent = os.path.join(boxdir, "kernel-recent.crashed-2.mgbox")
    for p in (old, recent):
        open(p, "wb").write(b"x")
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(old, (week_ago, week_ago))
    k = Kernel(env={"MEMGUARD_DIR": boxdir})
    try:
        k.execute("%load_ext memguard")
        names = _boxes(boxdir)
        assert "kernel-old.crashed-1.mgbox" not in names
        assert "kernel-recent.crashed-2.mgbox" in names
    finally:
        k.shutdown()


def test_report_command_prints_the_newest_dead_kernels_box_and_rejects_bad_files(tmp_path):
    import subprocess
    import sys

    from memguard import blackbox

    path = _real_box(tmp_path)
    # Make it a dead kernel's box: a pid that cannot exist.
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<q", data, 24, 2**31 - 2)
    open(path, "wb").write(data)
    env = {**os.environ, "MEMGUARD_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "memguard", "report"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "memguard post-crash report" in out.stdout and "cell 5" in out.stdout
    assert "alert before the death: budget in cell 5, line 2: over budget" in out.stdout
    bad = tmp_path / "bad.mgbox"
    bad.write_bytes(b"\0" * 100)
    out = subprocess.run([sys.executable, "-m", "memguard", "report", str(bad)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "truncated" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-m", "memguard", "report"],
                         env={**env, "MEMGUARD_DIR": str(empty)}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "no black box of a dead kernel" in out.stderr
    assert blackbox.read(path).pid == 2**31 - 2


def test_installed_memguard_shows_the_report_in_the_first_cell_after_restart(tmp_path):
    import subprocess
    import sys

    ipydir, boxdir = tmp_path / "ipython", tmp_path / "boxes"
    env = {"IPYTHONDIR": str(ipydir), "MEMGUARD_DIR": str(boxdir)}
    subprocess.run([sys.executable, "-m", "memguard", "install"], env={**os.environ, **env},
                   check=True, capture_output=True, timeout=60)
    k = Kernel(env=env)
    try:
        first = k.execute("import numpy as np, time")
        assert first.execution_count == 1
        k.execute("%memguard budget 300MB")
        k.kc.execute("grow = []\n"
                     "while True:\n"
                     "    grow.append(np.ones(5_000_000))\n"
                     "    time.sleep(0.05)\n")
        (name,) = _boxes(boxdir)
        _wait_for_box(boxdir / name,
                      lambda b: b.cell_count == 3 and b.state["line"] == 3
                      and {"accumulation", "budget"} <= _kinds(b),
                      "cell 3 at line 3 with both alerts")
        _kill_and_restart(k)
        ex = k.execute("y = 2")  # no %load_ext: the profile loaded memguard at start
        (alert,) = [a[2] for a in ex.alerts_of("crash_report")]
        assert alert["cell"] == 3 and alert["line"] == 3
        assert {"accumulation", "budget"} <= {a["kind"] for a in alert["alerts"]}
        # And the first cell's own alerts carry its right number (loaded outside a cell).
        ex2 = k.execute("%%memguard 100MB\nimport numpy as np\nz = np.ones(25_000_000)\n")
        budget = ex2.alerts_of("budget")[-1][2]
        assert budget["cell"] == ex2.execution_count == 2
    finally:
        k.shutdown()


_TORN_WRITER = """
import sys, time
import memguard._core as core
from memguard.relay import load_zmq
path, parent_max, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
core.blackbox_open(path, "kernel-t.json")
load_zmq(core)
core.monitor_start("ipc://" + path + ".nobody")
parents = {c: '{"msg_id": "%s"}' % (c * (parent_max - 20)) for c in "ab"}
sources = {c: c * 4000 for c in "ab"}
# Bursts of back-to-back rewrites (a read overlapping one is what can tear) between pauses
# as long (a read then finds the record still, as it does a real kernel's between cells).
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    burst = time.monotonic() + 0.002
    while time.monotonic() < burst:
        c = "ab"[i % 2]
        core.blackbox_set_cell(1 + i % 2, i, sources[c], parents[c])
        i += 1
    time.sleep(0.002)
core.monitor_stop()
core.blackbox_close(False)
"""


def test_reader_never_returns_a_torn_cell_record(tmp_path):
    """The launcher reads a live kernel's box while the kernel writes it: a cell record
    rewritten during the read must not come back as a mix of two cells (one cell's parent
    header or source with another's). A second process rewrites the record as fast as it
    can, alternating two cells whose headers have one length, so a mix is still the right
    length. The rewrites come in bursts with pauses between, so a reader that reads again
    while a record moves also gets records."""
    import subprocess

    from memguard import blackbox

    path = str(tmp_path / "kernel-t.mgbox")
    parents = {c: '{"msg_id": "%s"}' % (c * (blackbox.PARENT_MAX - 20)) for c in "ab"}
    sources = {c: c * 4000 for c in "ab"}
    writer = subprocess.Popen([sys.executable, "-c", _TORN_WRITER, path,
                               str(blackbox.PARENT_MAX), "15"])
    try:
        _wait_for_box(path, lambda b: b.cell_parent is not None, "a cell record", 30)
        seen = torn = 0
        while writer.poll() is None and seen < 20000:
            try:
                box = blackbox.read(path)
            except blackbox.BlackBoxError:
                continue  # the writer has closed (and removed) it
            if box.cell_parent is None:
                continue
            seen += 1
            c = "a" if box.cell_epoch == 1 else "b"
            if box.cell_parent.decode() != parents[c] or box.cell_source != sources[c]:
                torn += 1
        assert seen >= 2000, f"only {seen} reads saw a cell record"
        assert torn == 0, f"{torn} of {seen} reads returned a torn cell record"
    finally:
        writer.kill()
        writer.wait()
