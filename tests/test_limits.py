"""Tests for jupyter_ext/memguard/limits.py on fake /proc and cgroup trees and on this machine.

limits.py is loaded by file path so these tests do not need the memguard package (and
its C extension) to be built or installed.
"""

import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LIMITS_PATH = Path(__file__).resolve().parent.parent / "jupyter_ext" / "memguard" / "limits.py"

MiB = 1 << 20
GiB = 1 << 30
V1_UNSET = "9223372036854771712"  # what cgroup v1 shows for "no limit" with 4 KiB pages


def _load_limits():
    spec = importlib.util.spec_from_file_location("memguard_limits_under_test", LIMITS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


limits = _load_limits()


def _physical_bytes():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _fallback():
    """What effective_limit must return when no cgroup limit applies: (bytes, source)."""
    physical = _physical_bytes()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and 0 < soft < physical:
        return soft, "rlimit"
    return physical, "physical"


def _small(n_mib):
    """A fake cgroup limit of n_mib MiB, which must be below the real rlimit and RAM to win."""
    value = n_mib * MiB
    if value >= _fallback()[0]:
        pytest.skip(f"this machine's own limit ({_fallback()[0]} bytes) is below the fake cgroup limit")
    return value


class FakeTree:
    """A fake root under tmp_path: <root>/proc/self/{cgroup,mountinfo} plus cgroup files."""

    def __init__(self, root: Path):
        self.root = root
        self.proc = root / "proc"
        (self.proc / "self").mkdir(parents=True)
        self._mount_id = 30

    def proc_cgroup(self, text):
        (self.proc / "self" / "cgroup").write_text(text)

    def mountinfo(self, lines):
        (self.proc / "self" / "mountinfo").write_text("".join(line + "\n" for line in lines))

    def mount_line(self, mount_point, fstype, super_options, root="/"):
        self._mount_id += 1
        return (
            f"{self._mount_id} 23 0:{self._mount_id} {root} {mount_point} rw,nosuid,nodev,noexec,relatime "
            f"shared:9 - {fstype} {fstype} {super_options}"
        )

    def write(self, path, text):
        """Write a file at the absolute path ``path`` inside the fake root."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target

    def effective_limit(self):
        return limits.effective_limit(proc_root=str(self.proc), sys_root=str(self.root))

    def usage(self):
        return limits.cgroup_usage_bytes(proc_root=str(self.proc), sys_root=str(self.root))

    def path(self, path):
        return str(self.root / path.lstrip("/"))


@pytest.fixture
def tree(tmp_path):
    return FakeTree(tmp_path)


def _v2(tree, cgroup_path="/user.slice/user-1000.slice/session-3.scope"):
    """A pure cgroup v2 system with the process in ``cgroup_path``."""
    tree.proc_cgroup(f"0::{cgroup_path}\n")
    tree.mountinfo(
        [
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw",
            tree.mount_line("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate,memory_recursiveprot"),
        ]
    )


def _v1(tree, cgroup_path="/docker/abc", memory_root="/"):
    """A cgroup v1 system with the memory controller mounted at /sys/fs/cgroup/memory."""
    tree.proc_cgroup(
        "12:pids:/docker/abc\n"
        "5:cpu,cpuacct:/docker/abc\n"
        f"4:memory:{cgroup_path}\n"
        "1:name=systemd:/docker/abc\n"
    )
    tree.mountinfo(
        [
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw",
            tree.mount_line("/sys/fs/cgroup", "tmpfs", "rw,mode=755"),
            tree.mount_line("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
            tree.mount_line("/sys/fs/cgroup/memory", "cgroup", "rw,memory", root=memory_root),
            tree.mount_line("/sys/fs/cgroup/systemd", "cgroup", "rw,xattr,name=systemd"),
        ]
    )


# --- cgroup v2 -------------------------------------------------------------------------


def test_v2_memory_max_of_the_process_cgroup_is_the_limit(tree):
    value = _small(512)
    _v2(tree)
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max", f"{value}\n")

    limit = tree.effective_limit()

    assert limit == limits.Limit(
        value, "cgroup", tree.path("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max")
    )


def test_v2_max_in_the_leaf_falls_back_to_the_smallest_parent_limit(tree):
    parent, grandparent = _small(300), _small(700)
    _v2(tree)
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max", "max\n")
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/memory.max", f"{parent}\n")
    tree.write("/sys/fs/cgroup/user.slice/memory.max", f"{grandparent}\n")

    limit = tree.effective_limit()

    assert limit.bytes == parent
    assert limit.source == "cgroup"
    assert limit.detail == tree.path("/sys/fs/cgroup/user.slice/user-1000.slice/memory.max")


def test_v2_parent_smaller_than_leaf_wins(tree):
    leaf, parent = _small(800), _small(200)
    _v2(tree)
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max", f"{leaf}\n")
    tree.write("/sys/fs/cgroup/user.slice/memory.max", f"{parent}\n")

    assert tree.effective_limit().bytes == parent


def test_v2_all_max_means_no_cgroup_limit(tree):
    _v2(tree)
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max", "max\n")
    tree.write("/sys/fs/cgroup/user.slice/memory.max", "max\n")

    limit = tree.effective_limit()

    assert (limit.bytes, limit.source) == _fallback()


def test_v2_limit_above_physical_ram_reports_physical(tree):
    _v2(tree)
    tree.write(
        "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max", f"{_physical_bytes() + GiB}\n"
    )

    assert tree.effective_limit().source != "cgroup"


def test_v2_walk_stops_at_the_mount_root(tree):
    # A container sees only its own subtree: files above the mount point are not its ancestors.
    value = _small(256)
    tree.proc_cgroup("0::/\n")
    tree.mountinfo([tree.mount_line("/sys/fs/cgroup", "cgroup2", "rw", root="/")])
    tree.write("/sys/fs/cgroup/memory.max", f"{value}\n")
    tree.write("/sys/fs/memory.max", f"{_small(64)}\n")  # outside the mount: must be ignored

    limit = tree.effective_limit()

    assert limit.bytes == value
    assert limit.detail == tree.path("/sys/fs/cgroup/memory.max")


def test_v2_mount_point_with_escaped_space_is_unescaped(tree):
    value = _small(128)
    tree.proc_cgroup("0::/job\n")
    tree.mountinfo([tree.mount_line("/mnt/cgroup\\040root", "cgroup2", "rw")])
    tree.write("/mnt/cgroup root/job/memory.max", f"{value}\n")

    assert tree.effective_limit().bytes == value


def test_v2_usage_is_read_from_the_cgroup_whose_limit_binds(tree):
    _v2(tree)
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max", "max\n")
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.current", "1000\n")
    tree.write("/sys/fs/cgroup/user.slice/memory.max", f"{_small(300)}\n")
    tree.write("/sys/fs/cgroup/user.slice/memory.current", "5000\n")

    assert tree.usage() == 5000


def test_v2_usage_without_any_limit_is_the_process_cgroup(tree):
    _v2(tree)
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.current", "1234\n")

    assert tree.usage() == 1234


# --- cgroup v1 -------------------------------------------------------------------------


def test_v1_limit_in_bytes_of_the_memory_cgroup_is_the_limit(tree):
    value = _small(1024)
    _v1(tree)
    tree.write("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", f"{value}\n")
    tree.write("/sys/fs/cgroup/memory/docker/memory.limit_in_bytes", V1_UNSET + "\n")
    tree.write("/sys/fs/cgroup/memory/memory.limit_in_bytes", V1_UNSET + "\n")

    limit = tree.effective_limit()

    expected_file = tree.path("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes")
    assert limit == limits.Limit(value, "cgroup", expected_file)


def test_v1_sentinel_everywhere_means_no_cgroup_limit(tree):
    _v1(tree)
    tree.write("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", V1_UNSET + "\n")
    tree.write("/sys/fs/cgroup/memory/docker/memory.limit_in_bytes", str(1 << 60) + "\n")
    tree.write("/sys/fs/cgroup/memory/memory.limit_in_bytes", V1_UNSET + "\n")

    limit = tree.effective_limit()

    assert (limit.bytes, limit.source) == _fallback()


def test_v1_mount_root_field_is_stripped_from_the_cgroup_path(tree):
    # Inside a container without a cgroup namespace, /proc/self/cgroup shows the host path
    # /docker/abc but the mount shows only that subtree (mountinfo root field /docker/abc).
    inner, container = _small(768), _small(900)
    _v1(tree, cgroup_path="/docker/abc/inner", memory_root="/docker/abc")
    tree.write("/sys/fs/cgroup/memory/inner/memory.limit_in_bytes", f"{inner}\n")
    tree.write("/sys/fs/cgroup/memory/memory.limit_in_bytes", f"{container}\n")

    limit = tree.effective_limit()

    assert limit.bytes == inner
    assert limit.detail == tree.path("/sys/fs/cgroup/memory/inner/memory.limit_in_bytes")


def test_v1_parent_without_use_hierarchy_does_not_constrain_children(tree):
    _v1(tree)
    tree.write("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", V1_UNSET + "\n")
    tree.write("/sys/fs/cgroup/memory/docker/memory.use_hierarchy", "0\n")
    tree.write("/sys/fs/cgroup/memory/docker/memory.limit_in_bytes", f"{_small(100)}\n")

    assert tree.effective_limit().source != "cgroup"


def test_v1_parent_with_use_hierarchy_constrains_children(tree):
    value = _small(100)
    _v1(tree)
    tree.write("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", V1_UNSET + "\n")
    tree.write("/sys/fs/cgroup/memory/docker/memory.use_hierarchy", "1\n")
    tree.write("/sys/fs/cgroup/memory/docker/memory.limit_in_bytes", f"{value}\n")

    assert tree.effective_limit().bytes == value


def test_v1_usage_is_memory_usage_in_bytes(tree):
    _v1(tree)
    tree.write("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", f"{_small(100)}\n")
    tree.write("/sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes", "4096\n")

    assert tree.usage() == 4096


# --- hybrid ----------------------------------------------------------------------------


def _hybrid(tree):
    """systemd "hybrid" layout: v1 controllers plus an empty cgroup2 at .../unified."""
    tree.proc_cgroup(
        "4:memory:/user.slice\n"
        "1:name=systemd:/user.slice/session-1.scope\n"
        "0::/user.slice/session-1.scope\n"
    )
    tree.mountinfo(
        [
            tree.mount_line("/sys/fs/cgroup", "tmpfs", "rw,mode=755"),
            tree.mount_line("/sys/fs/cgroup/unified", "cgroup2", "rw,nsdelegate"),
            tree.mount_line("/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
            tree.mount_line("/sys/fs/cgroup/systemd", "cgroup", "rw,xattr,name=systemd"),
        ]
    )
    tree.write("/sys/fs/cgroup/unified/user.slice/session-1.scope/cgroup.procs", "1\n")


def test_hybrid_uses_the_v1_memory_limit_when_unified_has_no_memory_controller(tree):
    value = _small(640)
    _hybrid(tree)
    tree.write("/sys/fs/cgroup/memory/user.slice/memory.limit_in_bytes", f"{value}\n")

    limit = tree.effective_limit()

    expected_file = tree.path("/sys/fs/cgroup/memory/user.slice/memory.limit_in_bytes")
    assert limit == limits.Limit(value, "cgroup", expected_file)


def test_hybrid_with_limits_in_both_hierarchies_takes_the_smaller(tree):
    v1_value, v2_value = _small(640), _small(320)
    _hybrid(tree)
    tree.write("/sys/fs/cgroup/memory/user.slice/memory.limit_in_bytes", f"{v1_value}\n")
    tree.write("/sys/fs/cgroup/unified/user.slice/session-1.scope/memory.max", f"{v2_value}\n")

    limit = tree.effective_limit()

    assert limit.bytes == v2_value
    assert limit.detail == tree.path("/sys/fs/cgroup/unified/user.slice/session-1.scope/memory.max")


# --- garbage and missing files ---------------------------------------------------------


# --- memory_cgroups(pid): the launcher's view of its kernel's cgroup ---------------------


def _as_pid(tree, pid):
    """Move the fake /proc/self files to /proc/<pid>, as the launcher reads its kernel's."""
    (tree.proc / "self").rename(tree.proc / str(pid))


def _memory_cgroups(tree, pid):
    return limits.memory_cgroups(pid, proc_root=str(tree.proc), sys_root=str(tree.root))


def test_memory_cgroups_of_another_pid_v2(tree):
    _v2(tree)
    _as_pid(tree, 4242)
    assert _memory_cgroups(tree, 4242) == [
        (2, tree.path("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope"))]


def test_memory_cgroups_in_a_container_strip_the_mount_root(tree):
    # Inside a container, the v1 memory mount shows the container's own cgroup as its root:
    # /proc/PID/cgroup says /docker/abc, and the directory is the mount point itself.
    _v1(tree, cgroup_path="/docker/abc", memory_root="/docker/abc")
    _as_pid(tree, 7)
    assert _memory_cgroups(tree, 7) == [(1, tree.path("/sys/fs/cgroup/memory"))]


def test_memory_cgroups_hybrid_lists_unified_then_v1(tree):
    _hybrid(tree)
    _as_pid(tree, 99)
    assert _memory_cgroups(tree, 99) == [
        (2, tree.path("/sys/fs/cgroup/unified/user.slice/session-1.scope")),
        (1, tree.path("/sys/fs/cgroup/memory/user.slice"))]


def test_memory_cgroups_of_a_gone_pid_is_empty(tree):
    _v2(tree)
    assert _memory_cgroups(tree, 123456) == []


def test_missing_proc_files_fall_back_to_rlimit_or_physical(tree):
    limit = tree.effective_limit()

    assert (limit.bytes, limit.source) == _fallback()
    assert tree.usage() is None


def test_nonexistent_proc_root_falls_back(tmp_path):
    limit = limits.effective_limit(proc_root=str(tmp_path / "nope"), sys_root=str(tmp_path / "nope"))

    assert (limit.bytes, limit.source) == _fallback()


@pytest.mark.parametrize(
    "content",
    [
        "",
        "\n",
        "abc\n",
        "-5\n",
        "0\n",
        "+5\n",
        "1_000\n",
        "0x100000\n",
        "1e9\n",
        "12 34\n",
        "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\n",  # Arabic-Indic digits, int() accepts them
        "9" * 40 + "\n",
        "MAX\n",
    ],
)
def test_malformed_memory_max_is_ignored(tree, content):
    _v2(tree)
    tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max", content)

    limit = tree.effective_limit()

    assert (limit.bytes, limit.source) == _fallback()


def test_binary_garbage_in_memory_max_is_ignored(tree):
    _v2(tree)
    path = tree.write("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max", "")
    path.write_bytes(b"\xff\xfe\x00123\x00")

    assert tree.effective_limit().source != "cgroup"


def test_memory_max_that_is_a_directory_or_fifo_is_ignored(tree):
    _v2(tree)
    scope = Path(tree.path("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope"))
    (scope / "memory.max").mkdir(parents=True)
    os.mkfifo(scope.parent / "memory.max")  # would block a plain open() with no writer

    assert tree.effective_limit().source != "cgroup"


def test_memory_max_linked_to_an_endless_device_is_ignored(tree):
    # /dev/zero never ends and is not a regular file: the read must neither hang nor trust it.
    _v2(tree)
    scope = Path(tree.path("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope"))
    scope.mkdir(parents=True)
    (scope / "memory.max").symlink_to("/dev/zero")

    assert tree.effective_limit().source != "cgroup"


@pytest.mark.parametrize(
    "cgroup_text",
    [
        "garbage without colons\n",
        "\x00\x01\x02",
        "0::relative/path\n",
        "0::/../../etc\n",
        "0::/./x\n",
    ],
)
def test_garbage_proc_self_cgroup_is_ignored(tree, cgroup_text):
    _v2(tree)
    tree.proc_cgroup(cgroup_text)
    tree.write("/sys/fs/cgroup/memory.max", f"{_small(64)}\n")
    tree.write("/etc/memory.max", f"{_small(64)}\n")

    assert tree.effective_limit().source != "cgroup"


@pytest.mark.parametrize(
    "mountinfo_lines",
    [
        ["complete garbage"],
        ["31 23 0:28 / /sys/fs/cgroup rw - cgroup2"],  # truncated after the separator
        ["31 23 0:28 relative /sys/fs/cgroup rw - cgroup2 cgroup2 rw"],  # root not absolute
        ["31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw"],  # no cgroup mount at all
    ],
)
def test_garbage_mountinfo_is_ignored(tree, mountinfo_lines):
    tree.proc_cgroup("0::/job\n")
    tree.mountinfo(mountinfo_lines)
    tree.write("/sys/fs/cgroup/job/memory.max", f"{_small(64)}\n")

    assert tree.effective_limit().source != "cgroup"


def test_cgroup_outside_the_mount_root_is_not_guessed(tree):
    # The mount shows /docker/other; our cgroup /docker/abc is not inside it, so the
    # limit under the mount point belongs to someone else.
    _v1(tree, cgroup_path="/docker/abc", memory_root="/docker/other")
    tree.write("/sys/fs/cgroup/memory/memory.limit_in_bytes", f"{_small(64)}\n")

    assert tree.effective_limit().source != "cgroup"


def test_oversized_proc_self_cgroup_is_ignored(tree):
    _v2(tree, cgroup_path="/job")
    tree.write("/sys/fs/cgroup/job/memory.max", f"{_small(64)}\n")
    (tree.proc / "self" / "cgroup").write_text("0::/job\n" + "x" * (5 << 20))

    assert tree.effective_limit().source != "cgroup"


def test_limit_is_frozen():
    limit = limits.Limit(1, "physical", "x")

    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.bytes = 2


# --- the real machine ------------------------------------------------------------------


def test_real_machine_limit_is_the_smallest_of_cgroup_rlimit_and_physical_ram():
    limit = limits.effective_limit()

    assert limit.detail
    if limit.source == "cgroup":  # read back from the file it names, and below the others
        assert limit.bytes == int(Path(limit.detail).read_text())
        assert limit.bytes <= _fallback()[0]
    else:
        assert (limit.bytes, limit.source) == _fallback()


def _own_cgroup_usage_file():
    """This process's memory cgroup usage file, found without limits.py: the v2 or v1 memory
    line of /proc/self/cgroup joined to the hierarchy's mount point from /proc/self/mountinfo
    (mount root "/" only). None if there is no memory cgroup mounted that way."""
    cgroups = Path("/proc/self/cgroup").read_text().splitlines()
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for line in cgroups:
        _, controllers, path = line.split(":", 2)
        for fields in mounts:
            sep = fields.index("-")
            fstype, root, point = fields[sep + 1], fields[3], fields[4]
            super_options = fields[sep + 3].split(",")
            if root != "/":
                continue
            if controllers == "" and fstype == "cgroup2":
                name = "memory.current"
            elif "memory" in controllers.split(",") and fstype == "cgroup" \
                    and "memory" in super_options:
                name = "memory.usage_in_bytes"
            else:
                continue
            candidate = Path(point + path) / name
            if candidate.is_file():
                return candidate
    return None


def test_real_machine_cgroup_usage_is_this_process_cgroup_usage():
    """With no cgroup limit, the usage is that of this process's own memory cgroup (the one
    its allocations are charged to); a limit instead binds the limiting cgroup's usage."""
    limit = limits.effective_limit()
    expected_file = (Path(limits.usage_file_for(limit.detail)) if limit.source == "cgroup"
                     else _own_cgroup_usage_file())
    def oom_usage():
        """The usage less memory.stat's reclaimable page cache, as limits.py reads it."""
        usage = int(expected_file.read_text())
        key = "inactive_file" if expected_file.name == "memory.current" else "total_inactive_file"
        stat = expected_file.parent / "memory.stat"
        lines = stat.read_text().splitlines() if stat.exists() else []
        inactive = next((int(v) for k, v in (line.split() for line in lines) if k == key), 0)
        return max(0, usage - inactive)

    before = oom_usage() if expected_file else None
    usage = limits.cgroup_usage_bytes()
    after = oom_usage() if expected_file else None

    if expected_file is None:
        assert usage is None
        return
    # The cgroup's usage moves while we read it (page cache, other processes in it): the
    # answer must lie between the two direct reads, give or take 16 MiB.
    assert usage is not None
    assert min(before, after) - 16 * MiB <= usage <= max(before, after) + 16 * MiB, (
        usage, before, after, str(expected_file))


_PRINT_LIMIT = """
import dataclasses, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("memguard_limits_child", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
print(json.dumps(dataclasses.asdict(module.effective_limit())))
"""


def test_rlimit_as_set_by_prlimit_is_reported_as_rlimit():
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("util-linux prlimit is not installed")
    as_bytes = GiB  # enough address space for a bare Python to start
    if limits.effective_limit().bytes <= as_bytes:
        pytest.skip("this machine's own limit is at or below 1 GiB, so RLIMIT_AS would not be the smallest")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < as_bytes:
        pytest.skip("hard RLIMIT_AS is below 1 GiB and cannot be raised")

    # "N:" sets only the soft limit, which is the one effective_limit must read.
    result = subprocess.run(
        [prlimit, f"--as={as_bytes}:", sys.executable, "-c", _PRINT_LIMIT, str(LIMITS_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    assert reported["source"] == "rlimit"
    assert reported["bytes"] == as_bytes
