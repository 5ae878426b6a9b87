"""Reading black boxes, finding them, and setting bad or reported ones aside.

The C side (csrc/blackbox.c, layout in include/mg_blackbox.h) writes one file per kernel,
``$MEMGUARD_DIR/<connection file stem>.mgbox`` (``MEMGUARD_DIR`` defaults to the
``memguard`` folder of the Jupyter runtime directory). This module reads it back with
``struct``, trusting nothing: every size, count, sequence number and string is checked, and
any file that fails is rejected with one line (``BlackBoxError``), never a crash. The same
layout constants are exported by the C module (``_core.blackbox_layout()``); a test checks
that the two agree.
"""

import dataclasses
import os
import struct
import time
import typing

LAYOUT = 2
MAGIC = b"MGBLKBOX"
SUFFIX = ".mgbox"
# Kinds as stored in the box (mg_bb_alert_t.kind): index into this tuple.
KINDS = ("budget", "limit", "sparse_to_dense", "accumulation", "crash_report")
WEEK = 7 * 24 * 3600.0

# Formats mirror include/mg_blackbox.h (little-endian, no padding).
_HEADER = struct.Struct("<8sIIQqdIIIIII200s")
_CELL_HEAD = struct.Struct("<QqqdIIII")
_CELLMAP = struct.Struct("<qq")
_STATE_HEAD = struct.Struct("<Qdqii10qii")
_SITE = struct.Struct("<qiiqq")
_ALERTS_HEAD = struct.Struct("<QQ")
_ALERT = struct.Struct("<qqiiqd200s")
_SAMPLE = struct.Struct("<Qdqqq")
N_CELLS, SOURCE_MAX, N_SITES, N_ALERTS, N_SAMPLES, SAMPLE_MS = 64, 16384, 16, 32, 2048, 100
PARENT_MAX = 1024

OFF_CELL = _HEADER.size
OFF_PARENT = OFF_CELL + _CELL_HEAD.size + N_CELLS * _CELLMAP.size
OFF_SOURCE = OFF_PARENT + PARENT_MAX
CELL_BYTES = OFF_SOURCE + SOURCE_MAX - OFF_CELL
OFF_STATE = OFF_CELL + CELL_BYTES
STATE_BYTES = _STATE_HEAD.size + N_SITES * _SITE.size
OFF_ALERTS = OFF_STATE + 2 * STATE_BYTES
ALERTS_BYTES = _ALERTS_HEAD.size + N_ALERTS * _ALERT.size
OFF_SAMPLES_TOTAL = OFF_ALERTS + ALERTS_BYTES
OFF_SAMPLES = OFF_SAMPLES_TOTAL + 16
# The sequence numbers of the records a writer rewrites in place (seqlocks: odd while
# being written), each the record's first 8 bytes.
_SEQ_OFFSETS = (OFF_CELL, OFF_STATE, OFF_STATE + STATE_BYTES, OFF_ALERTS)
FILE_BYTES = OFF_SAMPLES + N_SAMPLES * _SAMPLE.size
MAX_LINE = 2**21
MAX_BYTES = 2**62


def layout():
    """The offsets and sizes this reader expects, named as _core.blackbox_layout() names
    them (bytes)."""
    return {"layout": LAYOUT, "file_bytes": FILE_BYTES, "header_bytes": _HEADER.size,
            "cell": OFF_CELL, "cell_bytes": CELL_BYTES, "state": OFF_STATE,
            "state_bytes": STATE_BYTES, "alerts": OFF_ALERTS, "alert_bytes": _ALERT.size,
            "samples_total": OFF_SAMPLES_TOTAL, "samples": OFF_SAMPLES,
            "sample_bytes": _SAMPLE.size}


class BlackBoxError(ValueError):
    """A file that is not a usable black box; ``str()`` is one line saying why."""


@dataclasses.dataclass
class BlackBox:
    """What a black box says, sizes in bytes, times in CLOCK_REALTIME seconds."""

    path: str
    pid: int
    connection: str
    started: float
    cell_epoch: int
    cell_count: typing.Optional[int]
    cell_source: typing.Optional[str]  # None when the cell region was being written
    cell_started: float
    cell_parent: typing.Optional[bytes]  # the execute_request header (JSON), None if unknown
    cells: dict  # epoch -> execution count
    state: dict  # the newest complete state copy
    sites: list  # [{"epoch", "line", "bytes", "count"}]
    alerts: list  # [{"epoch", "cell", "kind", "line", "bytes", "t", "message"}], oldest first
    samples: list  # [(t, rss, tracked, epoch)], oldest first


def _text(raw):
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _bad(path, why):
    return BlackBoxError(f"{os.path.basename(path)}: {why}")


def _check_bytes(path, name, value):
    if not -MAX_BYTES <= value <= MAX_BYTES:
        raise _bad(path, f"corrupt: {name} is {value}")
    return value


def _snapshot(path, tries=10):
    """The file's bytes, read so that no record guarded by a sequence number (the cell,
    the two state copies, the alerts) was rewritten while it was copied: a live kernel
    writes its box while the launcher reads it. Each sequence number is read again after the
    whole read; if one moved, the file is read again. After ``tries`` reads that each saw a
    record move, the last one is returned with the moved records marked as being written
    (an odd sequence number), which ``read`` leaves out, as it does a record caught
    mid-write. A dead kernel's box never moves. Raises OSError."""
    with open(path, "rb") as fh:
        for _ in range(tries):
            fh.seek(0)
            data = fh.read(FILE_BYTES + 1)
            if len(data) != FILE_BYTES:
                return data  # not a box this reader can use: read() says why
            moved = [off for off in _SEQ_OFFSETS
                     if os.pread(fh.fileno(), 8, off) != data[off:off + 8]]
            if not moved:
                return data
    data = bytearray(data)
    for off in moved:
        struct.pack_into("<Q", data, off, 1)
    return bytes(data)


def read(path):
    """Parse the black box at ``path``. Raises BlackBoxError (one line) for a file that is
    missing, truncated, foreign, from a newer layout, corrupt or half-written."""
    try:
        data = _snapshot(path)
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror})") from None
    if len(data) < _HEADER.size:
        raise _bad(path, f"truncated ({len(data)} bytes, not even a header)")
    (magic, layout_, header_bytes, file_bytes, pid, started, sample_ms, n_samples, n_sites,
     n_alerts, source_max, n_cells, connection) = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise _bad(path, "not a memguard black box (no magic), or killed while being created")
    if layout_ > LAYOUT:
        raise _bad(path, f"written by a newer memguard (layout {layout_}; this one reads "
                         f"layout {LAYOUT})")
    if layout_ != LAYOUT:
        raise _bad(path, f"written by an older memguard (layout {layout_}; this one reads "
                         f"layout {LAYOUT})")
    if (header_bytes, file_bytes, sample_ms, n_samples, n_sites, n_alerts, source_max,
            n_cells) != (_HEADER.size, FILE_BYTES, SAMPLE_MS, N_SAMPLES, N_SITES, N_ALERTS,
                         SOURCE_MAX, N_CELLS):
        raise _bad(path, f"corrupt header (sizes do not match layout {LAYOUT})")
    if len(data) < FILE_BYTES:
        raise _bad(path, f"truncated ({len(data)} of {FILE_BYTES} bytes)")
    if len(data) > FILE_BYTES:
        raise _bad(path, f"corrupt: longer than {FILE_BYTES} bytes")
    if pid <= 0 or pid > 2**32 or not (0.0 < started < 1e11):
        raise _bad(path, "corrupt header (pid or start time)")

    # The newest complete state copy.
    states = []
    for i in range(2):
        off = OFF_STATE + i * STATE_BYTES
        head = _STATE_HEAD.unpack_from(data, off)
        seq = head[0]
        if seq and seq % 2 == 0:
            states.append((seq, off, head))
    if not states:
        raise _bad(path, "half-written (no complete state was ever recorded)")
    _seq, off, head = max(states)
    (_s, t, epoch, line, n_used, tracked, cell_start, cell_peak, rss, rss_cell_start,
     rss_cell_peak, rss_peak, budget, limit, limit_used, measure, raise_) = head
    if not 0 <= n_used <= N_SITES or epoch < 0 or not -1 <= line < MAX_LINE:
        raise _bad(path, "corrupt state")
    for name, value in (("tracked", tracked), ("cell_start", cell_start),
                        ("cell_peak", cell_peak), ("budget", budget), ("limit", limit)):
        _check_bytes(path, name, value)
    for name, value in (("rss", rss), ("rss_cell_start", rss_cell_start),
                        ("rss_cell_peak", rss_cell_peak), ("rss_peak", rss_peak),
                        ("limit_used", limit_used)):
        if not 0 <= value <= MAX_BYTES:
            raise _bad(path, f"corrupt: {name} is {value}")
    state = {"t": t, "epoch": epoch, "line": line if line > 0 else None, "tracked": tracked,
             "cell_usage": tracked - cell_start, "cell_peak": cell_peak - cell_start,
             "rss": rss, "rss_cell_start": rss_cell_start, "rss_cell_peak": rss_cell_peak,
             "rss_peak": rss_peak, "budget": budget or None, "limit": limit or None,
             "limit_used": limit_used, "limit_measure": measure, "raise": bool(raise_)}
    sites = []
    for i in range(n_used):
        s_epoch, s_line, _pad, s_bytes, s_count = _SITE.unpack_from(
            data, off + _STATE_HEAD.size + i * _SITE.size)
        if s_epoch < 0 or not -1 <= s_line < MAX_LINE or s_count < 0:
            raise _bad(path, "corrupt site table")
        sites.append({"epoch": s_epoch, "line": s_line if s_line > 0 else None,
                      "bytes": _check_bytes(path, "site bytes", s_bytes), "count": s_count})

    # The running cell (its region may have been mid-write: then no source).
    (c_seq, c_epoch, c_count, c_started, source_len, cells_next, parent_len,
     _pad) = _CELL_HEAD.unpack_from(data, OFF_CELL)
    if source_len > SOURCE_MAX or parent_len > PARENT_MAX or c_epoch < 0 or c_count < -1:
        raise _bad(path, "corrupt cell record")
    cells = {}
    for i in range(min(cells_next, N_CELLS)):
        m_epoch, m_count = _CELLMAP.unpack_from(data, OFF_CELL + _CELL_HEAD.size + i * 16)
        if m_epoch > 0 and m_count >= 0:
            cells[m_epoch] = m_count
    source = parent = None
    if c_seq % 2 == 0:
        source = data[OFF_SOURCE:OFF_SOURCE + source_len].decode("utf-8", "replace")
        parent = data[OFF_PARENT:OFF_PARENT + parent_len] or None

    # Alerts, oldest first.
    a_seq, total = _ALERTS_HEAD.unpack_from(data, OFF_ALERTS)
    alerts = []
    if a_seq % 2 == 0:
        first = max(0, total - N_ALERTS)
        for k in range(first, total):
            a_epoch, a_count, kind, a_line, a_bytes, a_t, message = _ALERT.unpack_from(
                data, OFF_ALERTS + _ALERTS_HEAD.size + (k % N_ALERTS) * _ALERT.size)
            if not 0 <= kind < len(KINDS) or not -1 <= a_line < MAX_LINE:
                raise _bad(path, "corrupt alert record")
            alerts.append({"epoch": a_epoch, "cell": a_count if a_count >= 0 else None,
                           "kind": KINDS[kind], "line": a_line if a_line > 0 else None,
                           "bytes": _check_bytes(path, "alert bytes", a_bytes), "t": a_t,
                           "message": _text(message)})

    # Timeline: samples whose stamp says they are complete, oldest first.
    (samples_total,) = struct.unpack_from("<Q", data, OFF_SAMPLES_TOTAL)
    samples = []
    for k in range(max(0, samples_total - N_SAMPLES), samples_total):
        stamp, s_t, s_rss, s_tracked, s_epoch = _SAMPLE.unpack_from(
            data, OFF_SAMPLES + (k % N_SAMPLES) * _SAMPLE.size)
        if stamp == k + 1 and 0 <= s_rss <= MAX_BYTES and abs(s_tracked) <= MAX_BYTES:
            samples.append((s_t, s_rss, s_tracked, s_epoch))
    return BlackBox(path, pid, _text(connection), started, c_epoch,
                    c_count if c_count >= 0 else None, source, c_started, parent, cells,
                    state, sites, alerts, samples)


def default_dir():
    """``$MEMGUARD_DIR``, or the ``memguard`` folder of the Jupyter runtime directory."""
    if os.environ.get("MEMGUARD_DIR"):
        return os.environ["MEMGUARD_DIR"]
    from jupyter_core.paths import jupyter_runtime_dir

    return os.path.join(jupyter_runtime_dir(), "memguard")


def path_for(connection_file, directory=None):
    """The black box of the kernel whose connection file is ``connection_file``."""
    stem = os.path.splitext(os.path.basename(connection_file))[0] or "kernel"
    return os.path.join(directory or default_dir(), stem + SUFFIX)


def pid_alive(pid):
    """True if a process ``pid`` exists (signal 0, kill(2))."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_aside(path, tag):
    """Rename ``path`` to ``<stem>.<tag>-<unix time>.mgbox`` so it is never read as a live
    box again (kept a week for ``python -m memguard report``). Returns the new path, or
    None if it could not be renamed (then it is removed)."""
    stem = path[:-len(SUFFIX)] if path.endswith(SUFFIX) else path
    target = f"{stem}.{tag}-{int(time.time())}{SUFFIX}"
    try:
        os.replace(path, target)
        return target
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return None


def clean_old(directory, now=None, keep=WEEK):
    """Remove black boxes in ``directory`` older than ``keep`` seconds whose kernel is dead
    (or that are set aside). Returns the paths removed. Never raises."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.endswith(SUFFIX):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime < keep:
                continue
            if not _is_set_aside(name):
                try:
                    if pid_alive(read(path).pid):
                        continue
                except BlackBoxError:
                    pass
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    return removed


def _is_set_aside(name):
    return any(f".{tag}-" in name for tag in ("crashed", "bad"))


def newest_dead(directory=None):
    """The newest black box in ``directory`` (live-named or set aside as crashed) whose
    kernel is dead, or None."""
    directory = directory or default_dir()
    try:
        names = [n for n in os.listdir(directory) if n.endswith(SUFFIX) and ".bad-" not in n]
    except OSError:
        return None
    best = None
    for name in names:
        path = os.path.join(directory, name)
        try:
            mtime = os.stat(path).st_mtime
            box = read(path)
        except (OSError, BlackBoxError):
            continue
        if box.pid != os.getpid() and not pid_alive(box.pid):
            if best is None or mtime > best[0]:
                best = (mtime, path)
    return best[1] if best else None
