"""Discover the effective memory limit of this process.

The effective limit is the smallest of three sources, each in bytes:

- ``"cgroup"``: the memory limit of the process's cgroup or of any ancestor up to the
  root of the visible cgroup mount. cgroup v2 ``memory.max``
  (Documentation/admin-guide/cgroup-v2.rst, "Memory Interface Files") and cgroup v1
  ``memory.limit_in_bytes`` (Documentation/admin-guide/cgroup-v1/memory.rst), found
  through ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` (proc(5)).
- ``"rlimit"``: the soft ``RLIMIT_AS`` from getrlimit(2). It caps virtual address space,
  not resident memory, so the real headroom is smaller than the number suggests.
- ``"physical"``: ``SC_PAGE_SIZE * SC_PHYS_PAGES`` from sysconf(3).

Everything read from /proc and /sys is treated as untrusted: a file that is missing,
unreadable, not a regular file, oversized or malformed contributes nothing, and the next
source is used. Nothing here raises for such input, and importing the module has no side
effects.
"""

import os
import posixpath
import stat
import sys
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

__all__ = ["Limit", "effective_limit", "cgroup_usage_bytes", "usage_file_for",
           "cgroup_oom_kills", "Measure", "MEASURES", "apply"]

# Values at or above this mean "no limit". cgroup v1 reports an unset limit as
# PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB pages); no real machine has
# 1 EiB of memory, so anything this large is a sentinel, not a limit.
_NO_LIMIT_THRESHOLD = 1 << 60

# Read caps, so that a garbage tree (or /dev/zero behind a symlink) cannot make us read
# forever. A single-value cgroup file holds at most 20 digits plus a newline.
_VALUE_FILE_MAX = 64
# /proc/self/mountinfo on a host with thousands of mounts is a few hundred KiB.
_LIST_FILE_MAX = 4 << 20


@dataclass(frozen=True)
class Limit:
    """The effective memory limit of this process.

    ``bytes``: the limit in bytes (int, > 0).
    ``source``: ``"cgroup"``, ``"rlimit"`` or ``"physical"``.
    ``detail``: human-readable origin, e.g. ``"/sys/fs/cgroup/user.slice/memory.max"``
    or ``"RLIMIT_AS soft limit (getrlimit)"``.
    """

    bytes: int
    source: str
    detail: str


class _Mount(NamedTuple):
    root: str  # path of the mount's root inside its cgroup hierarchy
    mount_point: str  # absolute path where it is mounted
    fstype: str
    super_options: Tuple[str, ...]


class _Files(NamedTuple):
    limit: str  # the limit file of a cgroup of this version
    usage: str  # the usage file next to it


# Per cgroup version: v2 memory.max / memory.current (cgroup-v2.rst), v1
# memory.limit_in_bytes / memory.usage_in_bytes (cgroup-v1/memory.rst).
_FILES = {2: _Files("memory.max", "memory.current"),
          1: _Files("memory.limit_in_bytes", "memory.usage_in_bytes")}


# The memory.stat key of the page cache the kernel reclaims before its OOM killer acts:
# v2 ``inactive_file``; v1 ``total_inactive_file`` (the subtree's, as usage_in_bytes counts
# the subtree). memory.stat holds about 1.5 KiB on Linux 6.x.
_INACTIVE_KEY = {2: "inactive_file", 1: "total_inactive_file"}
_STAT_FILE_MAX = 64 << 10


def _stat_value(text: Optional[str], key: str) -> Optional[int]:
    """The value of ``key`` in memory.stat / memory.events text ("key value" lines)."""
    for line in (text or "").splitlines():
        fields = line.split(" ")
        if len(fields) == 2 and fields[0] == key:
            return _parse_bytes(fields[1])
    return None


def _usage_less_reclaimable(usage_file: str) -> Optional[int]:
    """The cgroup's usage as its OOM killer sees it: the usage file minus memory.stat's
    reclaimable page cache (``_INACTIVE_KEY``), as csrc/measures.c samples it; the usage
    alone when memory.stat is missing or malformed; None if the usage file is."""
    usage = _parse_bytes(_read_text(usage_file, _VALUE_FILE_MAX))
    if usage is None:
        return None
    directory, filename = posixpath.split(usage_file)
    key = _INACTIVE_KEY[2 if filename == _FILES[2].usage else 1]
    inactive = _stat_value(_read_text(posixpath.join(directory, "memory.stat"), _STAT_FILE_MAX), key)
    return max(0, usage - inactive) if inactive is not None else usage


class _Hierarchy(NamedTuple):
    version: int  # 1 or 2
    dirs: Tuple[str, ...]  # the process's cgroup directory first, then each ancestor up to the mount root


def _read_text(path: str, max_bytes: int) -> Optional[str]:
    """Return the content of regular file ``path`` (at most ``max_bytes``), or None.

    None for anything that is not a readable regular file no larger than ``max_bytes``.
    O_NONBLOCK keeps a FIFO planted in a fake tree from blocking the open; procfs and
    cgroupfs files ignore the flag. Undecodable bytes are kept as surrogates, as
    os.fsdecode does, so paths read from /proc round-trip to open().
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        total = 0
        while total <= max_bytes:
            # procfs seq_files hand out a page or so per read, so loop until EOF.
            chunk = os.read(fd, max_bytes + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            return None
        return b"".join(chunks).decode("utf-8", "surrogateescape")
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _parse_bytes(text: Optional[str]) -> Optional[int]:
    """Parse a single-value cgroup file holding a decimal byte count; None if malformed.

    Only ASCII digits with optional surrounding whitespace are accepted: ``int()`` alone
    would also take "+5", "1_000" and non-ASCII digits, none of which the kernel writes.
    """
    if text is None:
        return None
    value = text.strip()
    if not value or len(value) > 20 or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def _parse_limit(text: Optional[str]) -> Optional[int]:
    """Parse ``memory.max`` / ``memory.limit_in_bytes``: bytes, or None for no limit.

    ``"max"`` (v2) and values >= 2**60 (the v1 sentinel) mean no limit. Zero is rejected
    too: a running process cannot live under a zero limit, so it is not trusted.
    """
    if text is not None and text.strip() == "max":
        return None
    value = _parse_bytes(text)
    if value is None or value <= 0 or value >= _NO_LIMIT_THRESHOLD:
        return None
    return value


def _unescape_mountinfo(field: str) -> str:
    r"""Undo the octal escapes (``\040`` space, ``\011`` tab, ``\012`` newline,
    ``\134`` backslash) that the kernel applies to paths in mountinfo."""
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _parse_mountinfo(text: str) -> List[_Mount]:
    """Return the cgroup and cgroup2 mounts listed in /proc/self/mountinfo text.

    Line format (proc(5)): ``id parent major:minor root mount-point options
    [optional fields...] - fstype source super-options``. Malformed lines are skipped.
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        root = _unescape_mountinfo(fields[3])
        mount_point = _unescape_mountinfo(fields[4])
        if not root.startswith("/") or not mount_point.startswith("/"):
            continue
        mounts.append(_Mount(root, mount_point, fstype, tuple(fields[sep + 3].split(","))))
    return mounts


def _parse_proc_cgroup(text: str) -> Tuple[Optional[str], Optional[str]]:
    """Return ``(v2_path, v1_memory_path)`` from /proc/self/cgroup text.

    Each line is ``hierarchy-ID:controller-list:cgroup-path`` (cgroups(7)). The v2 line
    is ``0::/path``; the v1 memory line is the one whose controller list contains
    ``memory``. The path may itself contain ':', hence maxsplit=2.
    """
    v2_path = None
    v1_path = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            if v2_path is None:
                v2_path = path
        elif "memory" in controllers.split(","):
            if v1_path is None:
                v1_path = path
    return v2_path, v1_path


def _split_path(path: str) -> Optional[List[str]]:
    """Split an absolute cgroup path into components; None if it is not a plain path.

    Paths with '.' or '..' components (which cgroup namespaces produce for cgroups
    outside the namespace) or with NUL bytes are refused, so a path can never escape
    the mount it is joined to.
    """
    if not path.startswith("/") or "\0" in path:
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    return parts


def _hierarchy_dirs(mount: _Mount, cgroup_path: str, sys_root: str) -> Optional[Tuple[str, ...]]:
    """Directories of ``cgroup_path`` and its ancestors as seen through ``mount``.

    The mount shows the subtree of the hierarchy rooted at ``mount.root`` (in containers
    this is often the container's own cgroup, e.g. ``/docker/<id>``), so the directory is
    ``mount_point + (cgroup_path - mount.root)``. None if the cgroup lies outside that
    subtree: then this mount cannot show it, and guessing a directory could read a
    sibling's limit.
    """
    path_parts = _split_path(cgroup_path)
    root_parts = _split_path(mount.root)
    if path_parts is None or root_parts is None:
        return None
    if path_parts[: len(root_parts)] != root_parts:
        return None
    relative = path_parts[len(root_parts) :]
    base = posixpath.join(sys_root, mount.mount_point.lstrip("/"))
    dirs = []
    for depth in range(len(relative), -1, -1):
        dirs.append(posixpath.join(base, *relative[:depth]) if depth else base)
    return tuple(dirs)


def _hierarchies(proc_root: str, sys_root: str, pid: str = "self") -> List[_Hierarchy]:
    """Process ``pid``'s cgroup v2 hierarchy and v1 memory hierarchy, whichever exist."""
    cgroup_text = _read_text(posixpath.join(proc_root, pid, "cgroup"), _LIST_FILE_MAX)
    mountinfo_text = _read_text(posixpath.join(proc_root, pid, "mountinfo"), _LIST_FILE_MAX)
    if cgroup_text is None or mountinfo_text is None:
        return []
    v2_path, v1_path = _parse_proc_cgroup(cgroup_text)
    mounts = _parse_mountinfo(mountinfo_text)
    wanted = (
        (2, v2_path, lambda m: m.fstype == "cgroup2"),
        (1, v1_path, lambda m: m.fstype == "cgroup" and "memory" in m.super_options),
    )
    result = []
    for version, path, matches in wanted:
        if path is None:
            continue
        # A hierarchy can be mounted more than once with different roots; prefer the
        # most specific root, and among equals the first whose directory exists.
        candidates = []
        for mount in mounts:
            if matches(mount):
                dirs = _hierarchy_dirs(mount, path, sys_root)
                if dirs is not None:
                    candidates.append((len(mount.root.rstrip("/")), dirs))
        candidates.sort(key=lambda c: -c[0])
        existing = [dirs for _, dirs in candidates if os.path.isdir(dirs[0])]
        chosen = existing[0] if existing else (candidates[0][1] if candidates else None)
        if chosen is not None:
            result.append(_Hierarchy(version, chosen))
    return result


def memory_cgroups(pid="self", proc_root: str = "/proc",
                   sys_root: str = "/") -> List[Tuple[int, str]]:
    """``[(version, directory)]`` of the cgroups of process ``pid`` (a number or "self")
    that can hold its memory: the v2 one first, then v1's memory hierarchy, each found
    through the process's own /proc/PID/cgroup and mountinfo as the limit is. The
    directory may lack the memory controller's files (v2 without it enabled)."""
    return [(h.version, h.dirs[0]) for h in _hierarchies(proc_root, sys_root, str(pid))]


def _v1_parent_is_hierarchical(parent_dir: str) -> bool:
    """Whether a v1 parent charges its children (``memory.use_hierarchy``).

    On old kernels a parent with ``use_hierarchy`` 0 does not account its children, so
    neither its limit nor any above it applies to them (cgroup-v1/memory.rst section 6).
    Newer kernels always report 1. A missing or malformed file counts as hierarchical,
    the modern behaviour.
    """
    return _parse_bytes(_read_text(posixpath.join(parent_dir, "memory.use_hierarchy"), _VALUE_FILE_MAX)) != 0


def _cgroup_limit(proc_root: str, sys_root: str) -> Optional[Tuple[int, str]]:
    """Smallest cgroup memory limit over the process's cgroups and their ancestors.

    Returns ``(bytes, limit_file_path)`` or None if no cgroup sets a limit. Ties go to
    the cgroup closest to the process, v2 before v1.
    """
    best: Optional[Tuple[int, str]] = None
    for hierarchy in _hierarchies(proc_root, sys_root):
        filename = _FILES[hierarchy.version].limit
        for index, directory in enumerate(hierarchy.dirs):
            if hierarchy.version == 1 and index > 0 and not _v1_parent_is_hierarchical(directory):
                break
            path = posixpath.join(directory, filename)
            value = _parse_limit(_read_text(path, _VALUE_FILE_MAX))
            if value is not None and (best is None or value < best[0]):
                best = (value, path)
    return best


def _rlimit_as() -> Optional[int]:
    """Soft RLIMIT_AS in bytes from getrlimit(2), or None if unlimited or unavailable."""
    try:
        import resource
    except ImportError:
        return None
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError, AttributeError):
        return None
    if soft == resource.RLIM_INFINITY or soft <= 0 or soft >= _NO_LIMIT_THRESHOLD:
        return None
    return int(soft)


def _physical_memory(proc_root: str) -> Optional[Tuple[int, str]]:
    """Physical RAM in bytes with its origin: sysconf(3), else MemTotal in /proc/meminfo."""
    try:
        page_size = os.sysconf("SC_PAGE_SIZE")
        pages = os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        page_size = pages = -1
    if page_size > 0 and pages > 0:
        return page_size * pages, "SC_PAGE_SIZE * SC_PHYS_PAGES (sysconf)"
    meminfo_path = posixpath.join(proc_root, "meminfo")
    text = _read_text(meminfo_path, _LIST_FILE_MAX)
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "MemTotal:" and fields[2] == "kB":
            kib = _parse_bytes(fields[1])
            if kib:
                return kib * 1024, f"MemTotal in {meminfo_path}"
    return None


def effective_limit(proc_root: str = "/proc", sys_root: str = "/") -> Limit:
    """Return the effective memory limit of this process as a :class:`Limit` (bytes).

    The smallest of the cgroup limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``
    of the process's cgroup and every ancestor up to the mount root), the soft
    ``RLIMIT_AS``, and physical RAM. A cgroup limit larger than physical RAM therefore
    reports ``"physical"``. On ties the more specific source wins: cgroup, then rlimit,
    then physical.

    ``proc_root`` and ``sys_root`` relocate ``/proc`` and ``/`` (the prefix for mount
    points from mountinfo) so tests can use a fake tree; RLIMIT_AS and sysconf always
    describe the real process. Never raises for missing or malformed files. If even
    physical RAM cannot be determined, returns ``sys.maxsize`` bytes with source
    ``"physical"`` and a detail saying it is unknown.
    """
    candidates: List[Tuple[int, str, str]] = []
    cgroup = _cgroup_limit(proc_root, sys_root)
    if cgroup is not None:
        candidates.append((cgroup[0], "cgroup", cgroup[1]))
    rlimit = _rlimit_as()
    if rlimit is not None:
        candidates.append((rlimit, "rlimit", "RLIMIT_AS soft limit (getrlimit)"))
    physical = _physical_memory(proc_root)
    if physical is not None:
        candidates.append((physical[0], "physical", physical[1]))
    if not candidates:
        return Limit(sys.maxsize, "physical", "unknown: sysconf and /proc/meminfo unavailable")
    # min() keeps the first of equal values, and candidates are in tie-break order.
    value, source, detail = min(candidates, key=lambda c: c[0])
    return Limit(value, source, detail)


def usage_file_for(limit_file: str) -> str:
    """The usage file next to a cgroup limit file: v2 ``memory.max`` -> ``memory.current``,
    v1 ``memory.limit_in_bytes`` -> ``memory.usage_in_bytes`` (cgroup-v2.rst, cgroup-v1
    memory.rst). For a :class:`Limit` with source ``"cgroup"``, pass its ``detail``."""
    directory, filename = posixpath.split(limit_file)
    version = 2 if filename == _FILES[2].limit else 1
    return posixpath.join(directory, _FILES[version].usage)


def cgroup_usage_bytes(proc_root: str = "/proc", sys_root: str = "/") -> Optional[int]:
    """Return current memory usage in bytes of the cgroup that matters, or None.

    The cgroup that matters is the one whose limit is binding (the one
    :func:`effective_limit` would report), because its usage, siblings included, is what
    reaches the limit; with no cgroup limit it is the process's own cgroup. Reads v2
    ``memory.current`` or v1 ``memory.usage_in_bytes`` (the latter is approximate; see
    cgroup-v1/memory.rst section 5.5), less the reclaimable page cache of ``memory.stat``
    (v2 ``inactive_file``, v1 ``total_inactive_file``): what the cgroup's OOM killer acts
    on, as the C monitor samples it (docs/design.md, "Limits and measures"). None if no
    such file is readable and well formed.
    """
    limit = _cgroup_limit(proc_root, sys_root)
    if limit is not None:
        return _usage_less_reclaimable(usage_file_for(limit[1]))
    for hierarchy in _hierarchies(proc_root, sys_root):
        usage_name = _FILES[hierarchy.version].usage
        value = _usage_less_reclaimable(posixpath.join(hierarchy.dirs[0], usage_name))
        if value is not None:
            return value
    return None


def cgroup_oom_kills(limit_file: str) -> Optional[int]:
    """How many processes the OOM killer of the cgroup of ``limit_file`` (a :class:`Limit`'s
    ``detail`` when its source is ``"cgroup"``) has killed: ``oom_kill`` in v2
    ``memory.events`` or in v1 ``memory.oom_control``. None if unreadable."""
    directory, filename = posixpath.split(limit_file)
    name = "memory.events" if filename == _FILES[2].limit else "memory.oom_control"
    return _stat_value(_read_text(posixpath.join(directory, name), _VALUE_FILE_MAX * 64), "oom_kill")


class Measure(NamedTuple):
    """What a limit source limits, hence the figure compared with it (docs/design.md,
    "Limits and measures"): RSS for physical RAM, the address-space size for RLIMIT_AS,
    the cgroup's usage for a cgroup limit."""

    label: str  # as alerts (field ``measure``) and %memguard status name it
    field: str  # the coreview.Snapshot field that holds it, in bytes
    core_name: str  # the memguard._core constant that names it to the C side


# The one mapping from a limit's source to its measure.
MEASURES = {"physical": Measure("RSS", "rss", "MEASURE_RSS"),
            "rlimit": Measure("address space", "vm", "MEASURE_VM"),
            "cgroup": Measure("cgroup usage", "cgroup", "MEASURE_CGROUP")}
RSS = MEASURES["physical"]


def apply(core, limit: Limit, fraction: float) -> Tuple[Measure, Optional[str]]:
    """Hand ``limit``, its measure and the alert ``fraction`` (0-1] to the C side (``core``
    is memguard._core). Returns the measure in force and a note, or None: when the cgroup's
    usage file cannot be opened, the limit is compared with RSS and the note says why."""
    measure = MEASURES.get(limit.source, RSS)
    usage_file = usage_file_for(limit.detail) if limit.source == "cgroup" else None
    try:
        core.set_limit(limit.bytes, getattr(core, measure.core_name), fraction, usage_file)
    except OSError as exc:
        core.set_limit(limit.bytes, getattr(core, RSS.core_name), fraction, None)
        return RSS, f"cannot read the cgroup's usage ({exc}); the limit alert uses RSS"
    return measure, None
