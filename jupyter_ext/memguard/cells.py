"""The cell life cycle: IPython's ``pre_run_cell`` and ``post_run_cell`` events mark where a
cell begins and ends, and this module knows which cell is running (memguard's epoch,
IPython's execution count, the kernel's execute_request, the filename of its code).

Main thread only (docs/design.md "ipykernel internals").
"""

import sys
import threading
import time

from . import coreview, records
from ._state import STATE, Cell
from .render import summary_line

MAX_HISTORY = 10_000  # cells kept by memguard.history()


def _current_parent():
    kernel = STATE.kernel
    if kernel is None:
        return None
    parent = kernel.get_parent("shell")
    if parent and parent.get("header", {}).get("msg_type") == "execute_request":
        return parent
    return None


def _packed_header(parent):
    """The execute_request's header as JSON bytes (the kernel Session's own packer, which
    knows its dates), for the black box, or None. The launcher parents its alerts with it
    while the kernel's own IOPub messages wait for the GIL."""
    if parent is None:
        return None
    try:
        return STATE.kernel.session.pack(parent["header"])
    except Exception:  # noqa: BLE001 - an odd header must not stop the cell
        return None


def learn_count_offset(shell):
    """Before the first cell, when memguard loads outside any cell (at kernel start,
    ``python -m memguard install``): how far ``shell.execution_count`` will be ahead of the
    running cell's number. IPython >= 9.8 increments it before pre_run_cell
    (ipython/ipython#15088), earlier versions after. Inside a cell, begin() learns it."""
    if getattr(shell.displayhook, "exec_result", None) is None:
        import IPython

        STATE.count_offset = 1 if IPython.version_info[:2] >= (9, 8) else 0


def _running_count():
    """The execution count of the cell running now, from IPython's ExecutionResult, which
    IPython creates before it runs the cell's code; None outside a cell. Also learns how far
    ``shell.execution_count`` is ahead during a cell (see learn_count_offset)."""
    result = getattr(STATE.shell.displayhook, "exec_result", None)
    count = getattr(result, "execution_count", None)
    if count is not None:
        STATE.count_offset = STATE.shell.execution_count - count
    return count


def begin(info=None):
    """Start accounting a cell: from ``pre_run_cell``'s ``info``, or, with None, the cell
    that is running already (the one that loads memguard)."""
    STATE.epoch += 1
    budget = STATE.default_budget
    if info is None:
        count = _running_count()
    elif getattr(info, "store_history", True):
        count = STATE.shell.execution_count - STATE.count_offset
    else:
        count = None  # an execution that IPython does not number
    cell = Cell(STATE.epoch, count, _current_parent(), time.monotonic(), budget,
                thread=threading.get_ident())
    STATE.add_cell(cell)
    STATE.core.set_cell_file(None)  # until IPython compiles the cell (watch_compiler)
    # cell_begin returns the native domain at the start, for the record's "native".
    cell.native_start = STATE.core.cell_begin(cell.epoch, budget)
    raw = getattr(info, "raw_cell", None) or ""
    STATE.core.blackbox_set_cell(cell.epoch, -1 if count is None else count, raw,
                                 _packed_header(cell.parent))
    if STATE.pending_report is not None and (cell.parent is not None or STATE.kernel is None):
        alert, STATE.pending_report = STATE.pending_report, None
        records.publish(cell, alert, ("crash_report",))
    return cell


def watch_compiler(shell):
    """Learn the filename IPython compiles each cell under from the shell compiler's own
    ``get_code_name`` call, made after ``pre_run_cell`` and before any of the cell's code
    runs, so frames of the cell's functions are recognised in any thread. Computing the name
    again would hash the cell twice: ipykernel's compiler hashes it with a pure-Python
    murmur2, about 1 ms for a 3 KB cell (timeit, this repository's venv). Returns the undo
    (a callable), or None when the shell's compiler has no ``get_code_name``; attribution
    then finds the cell from its frames."""
    compiler = getattr(shell, "compile", None)
    original = getattr(compiler, "get_code_name", None)
    if original is None:
        return None
    own = "get_code_name" in vars(compiler)  # an instance attribute to put back as it was

    def get_code_name(raw_code, transformed_code, number):
        name = original(raw_code, transformed_code, number)
        cell = STATE.current
        if STATE.loaded and cell is not None and isinstance(name, str) and \
                cell.thread == threading.get_ident():
            cell.code_name = name
            STATE.core.set_cell_file(name)
        return name

    compiler.get_code_name = get_code_name

    def undo():
        if vars(compiler).get("get_code_name") is get_code_name:  # nobody wrapped it since
            if own:
                compiler.get_code_name = original
            else:
                del compiler.get_code_name

    return undo


def pre_run_cell(info=None):
    """IPython ``pre_run_cell`` event: start accounting a new cell."""
    records.watch_sparse()
    STATE.core.set_raise(STATE.mode == "raise")
    if STATE.core.install():
        print("memguard: its allocator hook had been removed (tracemalloc.stop() puts back "
              "the allocators tracemalloc found when it started) and is installed again; "
              "blocks allocated in between are not counted.", file=sys.stderr)
    begin(info)


def post_run_cell(result=None):
    """IPython ``post_run_cell`` event: bring the cell's alerts up to date, add the cell's
    record to the history and print the summary line if it is on."""
    cell = STATE.current
    if cell is None:
        return
    count = getattr(result, "execution_count", None)
    if count is not None and count != cell.count:
        # Learn the offset when memguard was loaded outside a cell (e.g. at kernel start).
        STATE.count_offset += (cell.count or 0) - count if cell.count is not None else 0
        cell.count = count
    # Native mappings are measured by the monitor at most every 10 ms, less often for
    # large arenas (csrc/monitor.c): measure them now, so the cell's figures include the
    # pages it touched last (about 0.3 ms per GiB of mappings; a read of RSS when RSS has
    # not moved since the last measure; nothing without any mapping).
    STATE.core.native_settle()
    drain()  # before the snapshot, which then includes what the cell's last alerts saw
    snap = coreview.snapshot(STATE.core)
    if not snap.of_cell(cell.epoch):
        return
    if cell.alerts:  # only an alert shown under the cell has figures to bring up to date
        sites = coreview.sites(STATE.core, cell.epoch, 20)
        records.finish(cell, sites, snap)
    else:
        sites = coreview.sites(STATE.core, cell.epoch, 1)
    top = sites[0] if sites and sites[0].live_bytes > 0 else None
    record = {
        "epoch": cell.epoch,
        "cell": cell.count,
        "peak": snap.cell_peak_usage,
        "retained": snap.cell_usage,
        "untracked": snap.untracked,
        "native": snap.native - cell.native_start,
        "rss": snap.rss,
        "rss_peak": snap.rss_cell_peak,
        "budget": cell.budget or None,
        "seconds": time.monotonic() - cell.started,
        "top_site": records.site_dict(cell, top),
        "alerts": [a["kind"] for a in cell.alerts],
    }
    STATE.history.append(record)
    del STATE.history[:-MAX_HISTORY]
    if STATE.summary:
        print(summary_line(record))


def drain(timeout=1.0):
    """Wait (at most ``timeout`` seconds) until every event the hooks pushed so far has been
    sent by the C monitor and published by the relay, so a cell's alerts go out before its
    execute_reply even when the cell ends a moment after the crossing. Returns False on
    timeout (the relay is stuck or gone; the alerts still follow, late). Costs nothing when
    the cell produced no event. Main thread."""
    core, relay = STATE.core, STATE.relay
    if relay is None:
        return True
    deadline = time.monotonic() + timeout
    while True:
        stats = coreview.monitor_stats(core)
        if stats.pending == 0 and relay.processed >= stats.sent - STATE.relay_sent_at_start:
            return True
        if time.monotonic() > deadline or not stats.running:
            return False
        time.sleep(0.002)


def set_budget(nbytes):
    """Give the running cell a budget of ``nbytes`` bytes (``%%memguard SIZE``)."""
    cell = STATE.current
    if cell is not None:
        cell.budget = nbytes
    STATE.core.set_budget(nbytes)


def set_raise():
    """``%%memguard SIZE --raise``: raise mode for the running cell only."""
    STATE.core.set_raise(True)
