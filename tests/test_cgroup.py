"""raise mode inside a real memory cgroup (docs/design.md, "Limits and measures"): a kernel
in a 900 MB cgroup v1, whose OOM killer is real, keeps dense subsets (or Python objects)
alive until the limit. In raise mode the cell ends in memguard's MemoryError, shown as an
``error`` output with its traceback, and the kernel answers the next cell; in warn mode the
same cell is OOM-killed and the restarted kernel's crash report names it.

Needs a writable cgroup v1 memory hierarchy (``/sys/fs/cgroup/memory``, root): skipped with
the reason otherwise, except under ``CI=true``, where it fails. The cgroup v2 path goes
through the same code and is tested with recorded files (tests/test_limits.py,
tests/t-measures.c)."""

import os
import time
import uuid

import pytest

from conftest import Kernel

MB = 10**6
LIMIT = 900 * MB
CG_ROOT = "/sys/fs/cgroup/memory"


def _writable_or_skip():
    probe = os.path.join(CG_ROOT, f"memguard-probe-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe)
        with open(os.path.join(probe, "memory.limit_in_bytes"), "w") as fh:
            fh.write(str(LIMIT))
    except OSError as exc:
        why = f"cgroup v1 memory is not writable here ({CG_ROOT}: {exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    finally:
        if os.path.isdir(probe):
            os.rmdir(probe)


class Cgroup:
    """A child of the v1 memory root with a limit, removed when done."""

    def __init__(self, limit):
        self.path = os.path.join(CG_ROOT, f"memguard-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.path)
        self._write("memory.limit_in_bytes", str(limit))

    def _write(self, name, text):
        with open(os.path.join(self.path, name), "w") as fh:
            fh.write(text)

    def read(self, name):
        with open(os.path.join(self.path, name)) as fh:
            return fh.read()

    def add(self, pid):
        self._write("cgroup.procs", str(pid))

    def oom_kills(self):
        fields = dict(line.split() for line in self.read("memory.oom_control").splitlines())
        return int(fields["oom_kill"])

    def remove(self):
        """rmdir once the cgroup has no process left (an exited kernel leaves it at once, a
        killed one once it is reaped)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def cgroup():
    _writable_or_skip()
    cg = Cgroup(LIMIT)
    yield cg
    cg.remove()


def _start(cg, env=None):
    """A real kernel moved into ``cg`` before memguard loads, so memguard finds the limit."""
    k = Kernel(env=env)
    cg.add(k.km.provisioner.process.pid)
    ex = k.execute("%load_ext memguard")
    assert "limit 900 MB (cgroup)" in ex.stdout, ex.stdout
    return k


@pytest.fixture
def cg_kernel(cgroup):
    k = _start(cgroup)
    yield k
    k.shutdown()


def dense_subsets(step):
    """A cell keeping dense float32 subsets of ``step`` bytes each of a CSR matrix alive."""
    cols = 4000
    rows = step // (4 * cols)
    return ("import numpy as np, scipy.sparse as sp\n"
            f"X = sp.random(max(40_000, {rows}), {cols}, density=0.01, format='csr',\n"
            "              dtype='float32', random_state=np.random.default_rng(0))\n"
            "rng = np.random.default_rng(1)\n"
            "subsets = []\n"
            "for i in range(1000):\n"
            f"    rows = rng.choice(X.shape[0], {rows}, replace=False)\n"
            "    subsets.append(X[rows].toarray())\n")


PY_OBJECTS = {
    "ints": ("keep = []\n"
             "for i in range(1000):\n"
             "    keep.append(list(range(i * 1_000_000, (i + 1) * 1_000_000)))\n"),
    "strings": ("keep = []\n"
                "for i in range(1000):\n"
                "    keep.append([f'row {i} item {j}' for j in range(500_000)])\n"),
}


def _assert_refused_and_shown(k, cg, code):
    kills = cg.oom_kills()
    ex = k.execute(code, ok=False, timeout=300)
    err = ex.error
    assert err is not None, f"the cell ended without an error: {ex.stdout!r}"
    assert err["ename"] == "MemoryError", (err["ename"], err["evalue"])
    # refused by a hook, or stopped before a sparse matrix is densified
    assert "memguard (raise mode) refused" in err["evalue"] or \
        "memguard (raise mode) stopped" in err["evalue"], err["evalue"]
    assert "limit of 900 MB (cgroup" in err["evalue"], err["evalue"]
    assert err["traceback"], "the execute_reply carries no traceback"
    shown = [m["content"] for _, m in ex.messages if m["msg_type"] == "error"]
    assert len(shown) == 1, [m["msg_type"] for _, m in ex.messages]
    assert shown[0]["ename"] == "MemoryError" and shown[0]["evalue"] == err["evalue"]
    assert shown[0]["traceback"] and any("memguard (raise mode)" in line
                                         for line in shown[0]["traceback"])
    refused = [a[2] for a in ex.alerts_of("limit") if a[2].get("refused")]
    if "refused" in err["evalue"]:  # a hook's refusal also sends its alert
        assert refused and refused[-1]["measure"] == "cgroup usage", [a[2] for a in ex.alerts]
    # The kernel lives on and answers; the OOM killer never acted.
    nxt = k.execute("print('alive')")
    assert nxt.stdout.strip() == "alive"
    assert cg.oom_kills() == kills, cg.read("memory.oom_control")
    return ex


@pytest.mark.parametrize("step_mb", [32, 128, 512])
def test_raise_mode_refuses_dense_subsets_before_the_oom_killer_acts(cg_kernel, cgroup, step_mb):
    cg_kernel.execute("%memguard mode raise")
    ex = _assert_refused_and_shown(cg_kernel, cgroup, dense_subsets(step_mb * MB))
    # The refusal names the array (and, from a hook, the line that asked).
    assert "float32" in ex.error["evalue"], ex.error["evalue"]
    assert "stopped" in ex.error["evalue"] or "line 8 of cell" in ex.error["evalue"]
    freed = cg_kernel.execute("del subsets\nimport numpy as np\nz = np.ones(50_000_000)\n"
                              "print(z.nbytes)")
    assert freed.stdout.strip() == "400000000"


@pytest.mark.parametrize("kind", sorted(PY_OBJECTS))
def test_raise_mode_refuses_python_objects_before_the_oom_killer_acts(cg_kernel, cgroup, kind):
    cg_kernel.execute("%memguard mode raise")
    ex = _assert_refused_and_shown(cg_kernel, cgroup, PY_OBJECTS[kind])
    assert "line 3 of cell" in ex.error["evalue"], ex.error["evalue"]
    freed = cg_kernel.execute("del keep\nprint(len(list(range(10_000_000))))")
    assert freed.stdout.strip() == "10000000"


def test_warn_mode_is_oom_killed_and_the_crash_report_names_the_cell(cgroup, tmp_path):
    k = _start(cgroup, env={"MEMGUARD_DIR": str(tmp_path)})
    try:
        kills = cgroup.oom_kills()
        pid = k.km.provisioner.process.pid
        k.kc.execute(dense_subsets(128 * MB))  # cell 2, warn mode
        deadline = time.monotonic() + 300
        while k.km.is_alive():  # reaps it: the restarted kernel finds a dead kernel's box
            assert time.monotonic() < deadline, "the kernel was not killed in 300 s"
            time.sleep(0.05)
        assert cgroup.oom_kills() > kills, cgroup.read("memory.oom_control")
        k.km.restart_kernel(now=True)
        k.kc.wait_for_ready(timeout=60)
        ex = k.execute("%load_ext memguard")
        (report,) = [a[2] for a in ex.alerts_of("crash_report")]
        assert report["pid"] == pid and report["cell"] == 2, report
        assert report["line"] in (7, 8), report  # picking rows or densifying them
        assert LIMIT - 4096 < report["limit"] <= LIMIT  # the kernel rounds it to pages
    finally:
        k.shutdown()


# --- cgroup v2 through the same code, with recorded files ------------------------------

def _limits_module():
    from test_limits import limits
    return limits


def test_v2_usage_is_memory_current_less_inactive_file_and_oom_kills_are_read(tmp_path):
    from test_limits import FakeTree, _v2, _small
    limits = _limits_module()
    tree = FakeTree(tmp_path)
    _v2(tree, "/kubepods/pod1/kernel")
    limit = _small(900)
    cg = "/sys/fs/cgroup/kubepods/pod1/kernel"
    tree.write(f"{cg}/memory.max", f"{limit}\n")
    tree.write(f"{cg}/memory.current", "700000000\n")
    tree.write(f"{cg}/memory.stat", "anon 600000000\nfile 90000000\nkernel 6000000\n"
               "active_anon 600000000\ninactive_file 40000000\nactive_file 50000000\n")
    tree.write(f"{cg}/memory.events", "low 0\nhigh 0\nmax 31\noom 2\noom_kill 2\n"
               "oom_group_kill 0\n")
    found = tree.effective_limit()
    assert (found.bytes, found.source) == (limit, "cgroup")
    assert tree.usage() == 660_000_000  # what the OOM killer acts on
    assert limits.cgroup_oom_kills(found.detail) == 2
    # A malformed memory.stat subtracts nothing; a missing usage file gives None.
    tree.write(f"{cg}/memory.stat", "inactive_file lots\n")
    assert tree.usage() == 700_000_000
    os.unlink(tree.path(f"{cg}/memory.current"))
    assert tree.usage() is None


def test_v1_usage_is_usage_in_bytes_less_total_inactive_file(tmp_path):
    from test_limits import FakeTree, _v1, _small
    limits = _limits_module()
    tree = FakeTree(tmp_path)
    _v1(tree)
    limit = _small(900)
    cg = "/sys/fs/cgroup/memory/docker/abc"
    tree.write(f"{cg}/memory.limit_in_bytes", f"{limit}\n")
    tree.write(f"{cg}/memory.usage_in_bytes", "700000000\n")
    tree.write(f"{cg}/memory.stat", "cache 1000\nrss 600000000\ninactive_file 1000\n"
               "total_cache 50000000\ntotal_inactive_file 40000000\n")
    tree.write(f"{cg}/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    found = tree.effective_limit()
    assert tree.usage() == 660_000_000
    assert limits.cgroup_oom_kills(found.detail) == 1
