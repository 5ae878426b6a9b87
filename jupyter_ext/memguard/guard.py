"""Load, unload and the per-cell life cycle of memguard inside an IPython shell.

``load`` installs the C hooks (memguard._core), the relay from the C monitor thread to
IOPub, the sparse_to_dense detector and the magics; IPython's ``pre_run_cell`` and
``post_run_cell`` events mark cell boundaries. Everything runs on the main thread with the
GIL, except ``_on_record``, which the relay thread calls.
"""

import atexit
import os
import sys
import threading
import time

from . import alerts, blackbox, limits, refuse, render, report, sparse
from ._state import STATE, Cell
from .sizes import format_size

# While memguard is loaded the interpreter's GIL switch interval is at most 1 ms (Python's
# default is 5 ms, sys.setswitchinterval): an alert has to take the GIL several times on
# its way out (memguard's relay thread, then ipykernel's IOPub thread), and while the cell
# runs bytecode each take waits up to one interval. Measured by bench/alert_latency.py on
# this machine, pure-Python loop: p99 75.5 ms at 5 ms, 11.8 ms at 1 ms. Threads that only
# wait on I/O are not affected; CPU-bound Python threads switch more often.
SWITCH_INTERVAL = 0.001
ALERT_CAUSE_BUDGET = ("budget",)
ALERT_CAUSE_LIMIT = ("limit",)


def _env_problem():
    """Why hooks cannot be installed in this interpreter, or None."""
    pymalloc = os.environ.get("PYTHONMALLOC", "")
    if sys.flags.dev_mode or "debug" in pymalloc:
        return ("the Python debug allocator is active (PYTHONMALLOC=%s%s), whose blocks "
                "cannot be measured; start the kernel without it to use memguard"
                % (pymalloc or "debug", ", -X dev" if sys.flags.dev_mode else ""))
    return None


def load(shell):
    """Install memguard into ``shell`` and print one line; harmless when already loaded."""
    if STATE.loaded:
        print(f"memguard {_version()} is already loaded; {_setting_line()}")
        return
    problem = _env_problem()
    if problem:
        print(f"memguard: not loaded: {problem}.")
        return
    try:
        from . import _core
    except ImportError as exc:
        print(f"memguard: not loaded: its C extension cannot be imported ({exc}).")
        return
    from .magics import MemguardMagics
    from .relay import Publisher, Relay, load_zmq

    STATE.core = _core
    STATE.shell = shell
    STATE.kernel = getattr(shell, "kernel", None)
    STATE.limit = limits.effective_limit()
    STATE.notes = []
    STATE.mode = "warn"
    if os.environ.get("PYTHONMALLOC", "") == "malloc":
        STATE.notes.append("PYTHONMALLOC=malloc: pymalloc is off, so small Python objects "
                           "are not counted (NumPy data and large blocks are)")
    _core.install()
    _configure_limit(_core)
    snap = _core.snapshot()
    # Everything the process held before the hooks went in is the baseline: from here on,
    # RSS - baseline - tracked is memory no hook counted (the untracked gap).
    STATE.rss_baseline = snap["rss"] - snap["tracked"]
    _install_numpy()
    _core.set_user_globals(shell.user_global_ns)
    STATE.publisher = Publisher(STATE.kernel)
    _open_blackbox(_core)
    load_zmq(_core)
    STATE.relay = Relay(_core.WIRE_FORMAT, _on_record)
    STATE.relay.start()
    STATE.relay_sent_at_start = _core.monitor_stats()["sent"]
    _core.monitor_start(STATE.relay.endpoint, 2, STATE.relay.context)
    shell.events.register("pre_run_cell", pre_run_cell)
    shell.events.register("post_run_cell", post_run_cell)
    shell.register_magics(MemguardMagics)
    refuse.install(shell)
    STATE.saved_switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(STATE.saved_switch_interval, SWITCH_INTERVAL))
    atexit.register(_at_exit)
    STATE.loaded = True
    _install_sparse()
    # The cell that loads memguard is already running: account it from here on. Loaded
    # outside any cell (at kernel start, `python -m memguard install`), the first cell's
    # number must still come out right: IPython >= 9.8 increments execution_count before
    # pre_run_cell (ipython/ipython#15088), earlier versions after.
    if getattr(shell.displayhook, "exec_result", None) is None:
        import IPython

        STATE.count_offset = 1 if IPython.version_info[:2] >= (9, 8) else 0
    _begin_cell()
    print(f"memguard {_version()} loaded; {_setting_line()}")
    for note in STATE.notes:
        print(f"memguard: {note}.")


def unload(shell):
    """Remove every hook, restore the allocators where memguard is still on top, stop the
    monitor and relay threads, and remove the magics. Harmless when not loaded."""
    if not STATE.loaded:
        return
    core = STATE.core
    for name, handler in (("pre_run_cell", pre_run_cell), ("post_run_cell", post_run_cell)):
        try:
            shell.events.unregister(name, handler)
        except ValueError:
            pass
    core.monitor_stop()
    STATE.relay.stop()
    core.blackbox_close(True)  # a clean unload is not a crash
    STATE.blackbox_path = None
    core.set_raise(False)
    refuse.uninstall(shell)
    if STATE.saved_switch_interval is not None:
        if sys.getswitchinterval() == min(STATE.saved_switch_interval, SWITCH_INTERVAL):
            sys.setswitchinterval(STATE.saved_switch_interval)  # unless someone changed it since
        STATE.saved_switch_interval = None
    core.uninstall()  # NumPy's handler stays, passing through: arrays keep it for life
    core.set_user_globals(None)
    sparse.uninstall()
    for kind in ("line", "cell"):
        shell.magics_manager.magics[kind].pop("memguard", None)
    atexit.unregister(_at_exit)
    STATE.loaded = False
    STATE.relay = None


def _at_exit():
    if STATE.loaded and STATE.shell is not None:
        unload(STATE.shell)


def _version():
    from . import __version__

    return __version__


def _setting_line():
    limit = STATE.limit
    budget = format_size(STATE.default_budget) if STATE.default_budget else "off"
    return (f"limit {format_size(limit.bytes)} ({limit.source}), budget {budget}, "
            f"mode {STATE.mode}")


# What each limit source limits, hence what it is compared with (mg_measures.h mg_measure_t).
_MEASURES = {"physical": ("RSS", "MEASURE_RSS"), "rlimit": ("address space", "MEASURE_VM"),
             "cgroup": ("cgroup usage", "MEASURE_CGROUP")}


def _configure_limit(core):
    """Hand the effective limit, its measure and the alert fraction to the C side."""
    limit = STATE.limit
    name, const = _MEASURES.get(limit.source, _MEASURES["physical"])
    usage_file = limits.usage_file_for(limit.detail) if limit.source == "cgroup" else None
    try:
        core.set_limit(limit.bytes, getattr(core, const), STATE.limit_fraction, usage_file)
    except OSError as exc:  # cgroup usage unreadable: compare RSS instead
        STATE.notes.append(f"cannot read the cgroup's usage ({exc}); the limit alert uses RSS")
        name = "RSS"
        core.set_limit(limit.bytes, core.MEASURE_RSS, STATE.limit_fraction, None)
    STATE.limit_measure = name


def _connection_file():
    """The kernel's connection file (its name is the black box's), or a per-process name
    outside a kernel."""
    if STATE.kernel is not None:
        try:
            from ipykernel.kernelapp import IPKernelApp

            if IPKernelApp.initialized() and IPKernelApp.instance().connection_file:
                return IPKernelApp.instance().connection_file
        except Exception:  # another kernel application: fall back to the pid
            pass
    return f"ipython-{os.getpid()}.json"


def _open_blackbox(core):
    """Read the black box a dead predecessor of this kernel left (same connection file),
    turn it into the pending crash report, set it or any bad box aside, clean boxes of
    dead kernels older than a week, and open this kernel's box. Never fails the load:
    problems become notes."""
    connection = _connection_file()
    try:
        directory = blackbox.default_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except Exception as exc:
        STATE.notes.append(f"no black box (cannot create its folder: {exc})")
        return
    path = blackbox.path_for(connection, directory)
    if os.path.exists(path):
        try:
            box = blackbox.read(path)
        except blackbox.BlackBoxError as exc:
            blackbox.set_aside(path, "bad")
            STATE.notes.append(f"a black box was set aside, not trusted: {exc}")
        else:
            if box.pid != os.getpid() and not blackbox.pid_alive(box.pid):
                STATE.last_report = STATE.pending_report = report.crash_alert(box, STATE.limit)
                blackbox.set_aside(path, "crashed")
            elif box.pid != os.getpid():  # a live kernel with the same connection file name
                path = path[:-len(blackbox.SUFFIX)] + f".{os.getpid()}{blackbox.SUFFIX}"
    blackbox.clean_old(directory)
    try:
        core.blackbox_open(path, os.path.basename(connection))
    except OSError as exc:
        STATE.notes.append(f"no black box ({exc})")
        return
    STATE.blackbox_path = path


def report_bundle():
    """``%memguard report``: the post-crash report found when memguard loaded, again."""
    if STATE.last_report is None:
        text = ("memguard: no post-crash report: the kernel that ran before this one (same "
                "connection file) did not die with memguard loaded")
        return {"text/plain": text, "text/html": text}
    return report.bundle(STATE.last_report)


def set_mode(mode):
    """``%memguard mode warn|raise``: the mode of every following cell (and this one)."""
    STATE.mode = mode
    STATE.core.set_raise(mode == "raise")


def set_cell_raise():
    """``%%memguard SIZE --raise``: raise mode for the running cell only."""
    STATE.core.set_raise(True)


def _install_numpy():
    if sys.modules.get("numpy", False) is None or (
            "numpy" not in sys.modules and not _importable("numpy")):
        STATE.notes.append("NumPy cannot be imported, so only the Python heap is counted")
        return
    try:
        STATE.numpy_counted = STATE.core.install_numpy()
    except ImportError as exc:
        STATE.notes.append(f"NumPy arrays are not counted: {exc}")
        return
    if not STATE.numpy_counted:
        STATE.notes.append("this context uses another NumPy memory handler, so NumPy "
                           "arrays created here are not counted")


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _install_sparse():
    """Wrap scipy.sparse now, or as soon as the user or a library imports it."""
    if not sparse.installed():
        sparse.install_when_imported(_on_densify)


def _current_parent():
    kernel = STATE.kernel
    if kernel is None:
        return None
    parent = kernel.get_parent("shell")
    if parent and parent.get("header", {}).get("msg_type") == "execute_request":
        return parent
    return None


def _running_count():
    """The execution count of the cell running now, from IPython's ExecutionResult, which
    IPython creates before it runs the cell's code; None outside a cell. Also learns how far
    ``shell.execution_count`` is ahead during a cell: IPython >= 9.8 increments it before
    running the cell (ipython/ipython#15088), earlier versions after."""
    result = getattr(STATE.shell.displayhook, "exec_result", None)
    count = getattr(result, "execution_count", None)
    if count is not None:
        STATE.count_offset = STATE.shell.execution_count - count
    return count


def _begin_cell(info=None):
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
    STATE.core.set_cell_file(_code_name(info, count))
    STATE.core.cell_begin(cell.epoch, budget)
    raw = getattr(info, "raw_cell", None) or ""
    STATE.core.blackbox_set_cell(cell.epoch, -1 if count is None else count, raw)
    if STATE.pending_report is not None and (cell.parent is not None or STATE.kernel is None):
        alert, STATE.pending_report = STATE.pending_report, None
        _publish(cell, alert, ("crash_report",))
    return cell


def _code_name(info, count):
    """The filename IPython's compiler will give this cell's code (ipykernel names it after
    a hash of the raw source), so frames of the cell's functions are recognised in any
    thread; None when unknown, and attribution then finds the cell from its frames."""
    raw = getattr(info, "raw_cell", None)
    get = getattr(getattr(STATE.shell, "compile", None), "get_code_name", None)
    if raw is None or get is None:
        return None
    try:
        name = get(raw, raw, count or 0)
    except Exception:  # a compiler of another shape: fall back to the frame rule
        return None
    return name if isinstance(name, str) else None


def pre_run_cell(info=None):
    """IPython ``pre_run_cell`` event: start accounting a new cell."""
    _install_sparse()
    STATE.core.set_raise(STATE.mode == "raise")
    if STATE.core.install():
        print("memguard: its allocator hook had been removed (tracemalloc.stop() puts back "
              "the allocators tracemalloc found when it started) and is installed again; "
              "blocks allocated in between are not counted.", file=sys.stderr)
    _begin_cell(info)


def post_run_cell(result=None):
    """IPython ``post_run_cell`` event: bring the cell's accumulation alerts up to date,
    add the cell's record to the history and print the summary line if it is on."""
    cell = STATE.current
    if cell is None:
        return
    snap = STATE.core.snapshot()
    if snap["epoch"] != cell.epoch:
        return
    count = getattr(result, "execution_count", None)
    if count is not None and count != cell.count:
        # Learn the offset when memguard was loaded outside a cell (e.g. at kernel start).
        STATE.count_offset += (cell.count or 0) - count if cell.count is not None else 0
        cell.count = count
    drain()
    snap = STATE.core.snapshot()
    sites = STATE.core.sites(cell.epoch, 20)
    _finish_accumulation(cell, sites, snap)
    _finish_budget(cell, snap)
    top = _site_dict(cell, sites[0]) if sites and sites[0][2] > 0 else None
    retained = snap["tracked"] - snap["cell_start"]
    record = {
        "epoch": cell.epoch,
        "cell": cell.count,
        "peak": snap["cell_peak"] - snap["cell_start"],
        "retained": retained,
        "untracked": _untracked(snap),
        "rss": snap["rss"],
        "rss_peak": snap["rss_cell_peak"],
        "budget": cell.budget or None,
        "seconds": time.monotonic() - cell.started,
        "top_site": top,
        "alerts": [a["kind"] for a in cell.alerts],
    }
    STATE.history.append(record)
    del STATE.history[:-MAX_HISTORY]
    if STATE.summary:
        print(summary_line(record))


MAX_HISTORY = 10_000  # cells kept by memguard.history()


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
        stats = core.monitor_stats()
        if stats["pending"] == 0 and relay.processed >= relay_sent_baseline(stats):
            return True
        if time.monotonic() > deadline or not stats["running"]:
            return False
        time.sleep(0.002)


def relay_sent_baseline(stats):
    """Records the relay must have processed: all the C side sent since this relay started
    (the C counter spans loads, so the count at relay start is subtracted)."""
    return stats["sent"] - STATE.relay_sent_at_start


def summary_line(rec):
    """One line for ``%memguard summary on``: units always shown, growth signed."""
    def signed(n):
        return ("+" if n >= 0 else "") + format_size(n)

    cell = f"cell {rec['cell']}" if rec["cell"] is not None else "cell"
    top = ""
    if rec["top_site"] and rec["top_site"]["line"] is not None:
        top = (f", most retained by line {rec['top_site']['line']} "
               f"({format_size(rec['top_site']['bytes'])})")
    alerts = f", alerts: {', '.join(rec['alerts'])}" if rec["alerts"] else ""
    return (f"memguard: {cell}: peak {format_size(rec['peak'])}, retained {signed(rec['retained'])}, "
            f"untracked {signed(rec['untracked'])}, {rec['seconds']:.2f} s{top}{alerts}")


def set_cell_budget(nbytes):
    """Give the running cell a budget of ``nbytes`` bytes (``%%memguard SIZE``)."""
    cell = STATE.current
    if cell is not None:
        cell.budget = nbytes
    STATE.core.set_budget(nbytes)


def _publish(cell, alert, cause, **private):
    """Record ``alert`` in the cell (replacing the one of the same ``cause``) and publish
    it. ``private`` keys (``_by_rss``) stay in the record, never in the message."""
    tracer = cell.trace
    if tracer is not None:
        alert["trace"] = tracer.top()
    with STATE.lock:
        for i, old in enumerate(cell.alerts):
            if old.get("_cause") == cause:
                if "trace" in old and "trace" not in alert:
                    alert["trace"] = old["trace"]  # tracing ended: keep the last top lines
                cell.alerts[i] = dict(alert, _cause=cause, **private)
                break
        else:
            cell.alerts.append(dict(alert, _cause=cause, **private))
    STATE.publisher.publish(alert, cell.epoch, cause, cell.parent)
    kind = blackbox.KINDS.index(alert["kind"]) if alert["kind"] in blackbox.KINDS else None
    if kind is not None and alert["kind"] != "crash_report":
        STATE.core.blackbox_add_alert(cell.epoch, -1 if cell.count is None else cell.count,
                                      kind, alert["line"] or -1, int(alert["bytes"]),
                                      alert["message"])


def _site_dict(cell, row):
    """A row of _core.sites() as the alert schema's ``{cell, line, bytes, count}``."""
    _epoch, line, live, count, _reported = row
    return {"cell": cell.count, "line": line if line > 0 else None, "bytes": int(live),
            "count": int(count)}


def _gap(snap):
    """RSS now, its growth since the cell began, and the part of that growth no hook
    counted (bytes); see alerts.budget_alert."""
    rss_growth = snap["rss"] - snap["rss_cell_start"]
    return {"rss_bytes": snap["rss"], "rss_growth": rss_growth,
            "untracked_bytes": _untracked(snap)}


def _untracked(snap):
    """RSS growth minus tracked growth since the cell began, in bytes, never below 0: tracked
    blocks whose pages were not written yet (np.empty, a result being filled) are not in RSS
    yet, which would make the difference negative without meaning anything."""
    return max(0, (snap["rss"] - snap["rss_cell_start"]) - (snap["tracked"] - snap["cell_start"]))


def _running_line(cell):
    """The line the cell's thread is executing, read from another thread (the relay) via
    sys._current_frames; None if that thread is not in the cell's code. Used when the
    monitor, which reads no frames, is the one that saw the budget crossed."""
    frame = sys._current_frames().get(cell.thread)
    ns = STATE.shell.user_global_ns if STATE.shell is not None else None
    frames = []
    while frame is not None:
        if frame.f_globals is ns:
            frames.append(frame)
        frame = frame.f_back
    if not frames:
        return None
    cell_file = frames[-1].f_code.co_filename  # outermost: the cell's module-level code
    return next(f.f_lineno for f in frames if f.f_code.co_filename == cell_file)


def _on_record(fields):
    """Relay thread: one record from the C monitor thread (mg_wire_t)."""
    _version_, kind, epoch, line, count, nbytes, usage, peak, budget, _t = fields
    core = STATE.core
    cell = STATE.cell(epoch)
    if cell is None:
        return
    if kind in (core.KIND_ACCUMULATION, core.KIND_ACCUMULATION_GROW):
        _publish_accumulation(cell, line, count, nbytes)
        return
    if kind in (core.KIND_REFUSED, core.KIND_LIMIT, core.KIND_LIMIT_REQUEST):
        _on_limit_record(cell, kind, line, count, nbytes)
        return
    if kind not in (core.KIND_BUDGET, core.KIND_BUDGET_GROW, core.KIND_BUDGET_RSS):
        return
    snap = core.snapshot()
    gap = _gap(snap)
    with STATE.lock:
        first = next((a for a in cell.alerts if a.get("_cause") == ALERT_CAUSE_BUDGET), None)
    by_rss = kind == core.KIND_BUDGET_RSS or (first is not None and first.get("_by_rss"))
    if kind == core.KIND_BUDGET_RSS:
        line, nbytes = _running_line(cell) or -1, 0
    elif kind == core.KIND_BUDGET_GROW and first is not None:
        line, nbytes = first["line"] or -1, first["request_bytes"]
    if snap["epoch"] == epoch:
        tracked_peak = snap["cell_peak"] - snap["cell_start"]
        peak = max(peak, tracked_peak, gap["rss_growth"] if by_rss else 0)
    top_rows = core.sites(epoch, 1)
    top = _site_dict(cell, top_rows[0]) if top_rows and top_rows[0][2] > 0 else None
    tracked = snap["tracked"] - snap["cell_start"] if snap["epoch"] == epoch else usage
    alert = alerts.budget_alert(STATE, cell, line, usage, max(peak, usage), budget or cell.budget,
                                nbytes, gap, top, tracked)
    _publish(cell, alert, ALERT_CAUSE_BUDGET, _by_rss=by_rss)


def _on_limit_record(cell, kind, line, count, nbytes):
    """Relay thread: a refusal (raise mode), the limit's measure past its fraction, or one
    request beyond what is left under the limit."""
    core = STATE.core
    snap = core.snapshot()
    same = snap["epoch"] == cell.epoch
    budget = snap["budget"] if same else cell.budget
    peak = snap["cell_peak"] - snap["cell_start"] if same else 0
    used = refuse.limit_used(snap)
    if kind == core.KIND_REFUSED:
        by_budget = count == core.REFUSE_BUDGET
        alert = alerts.refused_alert(STATE, cell, line, nbytes, by_budget, peak, budget, used,
                                     STATE.limit_measure)
        _publish(cell, alert, ALERT_CAUSE_BUDGET if by_budget else ALERT_CAUSE_LIMIT)
        return
    if kind == core.KIND_LIMIT:
        line = _running_line(cell) or -1
        used = nbytes
    alert = alerts.limit_alert(STATE, cell, line, used, STATE.limit_measure, peak, budget,
                               nbytes if kind == core.KIND_LIMIT_REQUEST else 0)
    _publish(cell, alert, ALERT_CAUSE_LIMIT)


def _publish_accumulation(cell, line, count, retained, snap=None):
    """Publish (or update) the accumulation alert of ``line`` in ``cell``."""
    snap = snap or STATE.core.snapshot()
    same = snap["epoch"] == cell.epoch
    budget = snap["budget"] if same else cell.budget
    peak = snap["cell_peak"] - snap["cell_start"] if same else retained
    alert = alerts.accumulation_alert(STATE, cell, line, count, retained, max(peak, retained),
                                      budget, STATE.core.sites_config())
    _publish(cell, alert, ("accumulation", alert["line"]))


def _finish_budget(cell, snap):
    """At the end of a cell, bring its budget alert to the final peak (and untracked gap),
    which the monitor only reports in steps of MG_GROW_STEP."""
    with STATE.lock:
        alert = next((a for a in cell.alerts if a.get("_cause") == ALERT_CAUSE_BUDGET), None)
    if alert is None or alert.get("refused"):
        return
    tracked_peak = snap["cell_peak"] - snap["cell_start"]
    rss_peak = snap["rss_cell_peak"] - snap["rss_cell_start"]
    peak = max(tracked_peak, rss_peak if alert.get("_by_rss") else 0)
    # Only a change a reader would notice (1%): not another message for a few KB.
    if (peak <= alert["peak"] * 1.01 and
            _untracked(snap) <= alert.get("untracked_bytes", 0) + 0.01 * max(1, alert["peak"])):
        return
    core = STATE.core
    kind = core.KIND_BUDGET_GROW
    _on_record((core.WIRE_VERSION, kind, cell.epoch, alert["line"] or -1, 0, 0, peak, peak,
                snap["budget"], 0.0))


def _finish_accumulation(cell, sites, snap):
    """At the end of a cell, bring each accumulation alert to the site's final figures, so
    the alert left under the cell says how much the loop kept in the end (the C side only
    reports growth in steps of MG_GROW_STEP)."""
    with STATE.lock:
        shown = {a["line"]: a for a in cell.alerts if a["kind"] == "accumulation"}
    for _epoch, line, live, count, reported in sites:
        key = line if line > 0 else None
        alert = shown.get(key)
        if reported and alert is not None and live > alert["retained_bytes"]:
            _publish_accumulation(cell, line, count, live, snap)


def _on_densify(matrix):
    """Main (or any) thread, before scipy.sparse allocates a dense array."""
    cell = STATE.current
    if not STATE.loaded or cell is None:
        return
    pred = sparse.predict(matrix)
    snap = STATE.core.snapshot()
    usage = snap["tracked"] - snap["cell_start"]
    budget = snap["budget"]
    try:
        _densify_alert(cell, pred, snap, usage, budget)
    finally:
        refuse.sparse_refusal(pred, budget, usage)  # raise mode: fail before allocating


def _densify_alert(cell, pred, snap, usage, budget):
    dense = pred["dense_bytes"]
    if budget:
        remaining = max(0, budget - usage)
        if dense <= remaining:
            return
        reason = (f"more than the {format_size(remaining)} left of this cell's budget of "
                  f"{format_size(budget)}")
    else:
        ratio = dense / max(1, pred["sparse_bytes"])
        if dense < STATE.sparse_min_bytes or ratio < STATE.sparse_min_ratio:
            return
        reason = f"{ratio:.0f}x its sparse size"
    line = STATE.core.cell_line()
    cause = ("sparse_to_dense", line)
    with STATE.lock:
        previous = [a for a in cell.alerts if a.get("_cause") == cause]
    count = previous[0]["count"] + 1 if previous else 1
    if previous and previous[0]["dense_bytes"] > dense:
        pred = {k: previous[0][k] for k in pred}  # keep showing the largest conversion
    peak = max(snap["cell_peak"] - snap["cell_start"], usage + dense)
    alert = alerts.sparse_to_dense_alert(STATE, cell, line, pred, peak, budget, count, reason)
    _publish(cell, alert, cause)


def configure(sparse_min_bytes=None, sparse_min_ratio=None, attribution_threshold=None,
              accumulation_min_count=None, accumulation_budget_fraction=None,
              accumulation_min_bytes=None, limit_fraction=None):
    """See memguard.configure."""
    def size_of(value, name, example):
        if isinstance(value, str):
            try:
                return parse_size(value, STATE.limit.bytes if STATE.limit else 0)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
            raise ValueError(f"{name} must be a positive size, e.g. {example!r}")
        return int(value)

    from .sizes import parse_size

    new = {}
    if sparse_min_bytes is not None:
        new["sparse_min_bytes"] = size_of(sparse_min_bytes, "sparse_min_bytes", "256MiB")
    if sparse_min_ratio is not None:
        ratio = float(sparse_min_ratio)
        if not ratio >= 1.0 or ratio == float("inf"):
            raise ValueError("sparse_min_ratio must be a finite number >= 1, e.g. 10")
        new["sparse_min_ratio"] = ratio
    rule = {}
    if attribution_threshold is not None:
        rule["threshold"] = size_of(attribution_threshold, "attribution_threshold", "128KiB")
        if rule["threshold"] < 4096:
            raise ValueError("attribution_threshold must be at least 4096 bytes, e.g. '128KiB'")
    if accumulation_min_count is not None:
        if isinstance(accumulation_min_count, bool) or not isinstance(accumulation_min_count, int) \
                or accumulation_min_count < 1:
            raise ValueError("accumulation_min_count must be a whole number >= 1, e.g. 3")
        rule["min_count"] = accumulation_min_count
    if accumulation_budget_fraction is not None:
        fraction = float(accumulation_budget_fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError("accumulation_budget_fraction must be in (0, 1], e.g. 0.25")
        rule["budget_fraction"] = fraction
    if accumulation_min_bytes is not None:
        rule["no_budget_bytes"] = size_of(accumulation_min_bytes, "accumulation_min_bytes",
                                          "256MiB")
    if limit_fraction is not None:
        fraction = float(limit_fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError("limit_fraction must be in (0, 1], e.g. 0.9")
        new["limit_fraction"] = fraction
    # Everything was checked: only now change anything.
    for key, value in new.items():
        setattr(STATE, key, value)
    if limit_fraction is not None and STATE.loaded:
        _configure_limit(STATE.core)
    from . import _core  # the C settings are process-wide: they apply before load too

    current = _core.sites_config(**rule)
    return {
        "sparse_min_bytes": STATE.sparse_min_bytes,
        "sparse_min_ratio": STATE.sparse_min_ratio,
        "attribution_threshold": current.get("threshold"),
        "accumulation_min_count": current.get("min_count"),
        "accumulation_budget_fraction": current.get("budget_fraction"),
        "accumulation_min_bytes": current.get("no_budget_bytes"),
        "limit_fraction": STATE.limit_fraction,
    }


def status_rows():
    """(label, text) rows for ``%memguard status``."""
    snap = STATE.core.snapshot()
    limit = STATE.limit
    last = STATE.history[-1] if STATE.history else None
    relay = STATE.core.monitor_stats()
    sites = STATE.core.sites_config()
    gap = snap["rss"] - STATE.rss_baseline - snap["tracked"]
    rows = [
        ("memguard", _version()),
        ("limit", f"{format_size(limit.bytes)} ({limit.source}: {limit.detail})"),
        ("budget", format_size(STATE.default_budget) if STATE.default_budget else "off"),
        ("mode", STATE.mode + (" (this cell: raise)" if snap["raise"] and STATE.mode != "raise"
                               else "")),
        ("limit alert", f"at {STATE.limit_fraction:.0%} of the limit; {STATE.limit_measure} now "
                        f"{format_size(refuse.limit_used(snap))}"),
        ("tracked", f"{format_size(snap['tracked'])} since load (Python heap "
                    f"{format_size(snap['raw'] + snap['arena'])}, NumPy "
                    f"{format_size(snap['numpy'])})"),
        ("RSS", f"{format_size(snap['rss'])} (baseline at load {format_size(STATE.rss_baseline)})"),
        ("untracked", f"{format_size(gap)} (RSS - baseline - tracked: native code, threads "
                      f"outside Python's allocators, allocator free lists)"),
        ("last cell peak", f"{format_size(last['peak'])} (cell {last['cell']})" if last else "n/a"),
        ("NumPy arrays", "counted (NEP 49 handler 'memguard')" if STATE.numpy_counted
         else "not counted"),
        ("attribution", f"blocks >= {format_size(sites['threshold'])}; accumulation at "
                        f">= {sites['min_count']} live blocks and >= "
                        f"{sites['budget_fraction']:.0%} of the budget "
                        f"({format_size(sites['no_budget_bytes'])} without one)"),
        ("summary", "on" if STATE.summary else "off"),
        ("alerts relayed", f"{relay['sent']} sent, {relay['dropped'] + relay['ring_dropped']} dropped"),
    ]
    rows += [("note", note) for note in STATE.notes]
    return rows


def history_bundle():
    """``%memguard history``: every cell's record as a table (text/plain via tabulate,
    text/html escaped with html.escape)."""
    import html

    import tabulate

    head = ["cell", "peak", "retained", "untracked", "seconds", "top site", "alerts"]
    rows = []
    for rec in STATE.history:
        top = rec["top_site"]
        rows.append([
            rec["cell"] if rec["cell"] is not None else "-",
            format_size(rec["peak"]),
            format_size(rec["retained"]),
            format_size(rec["untracked"]),
            f"{rec['seconds']:.2f} s",
            (f"line {top['line']}: {format_size(top['bytes'])}"
             if top and top["line"] is not None else "-"),
            ", ".join(rec["alerts"]) or "-",
        ])
    if not rows:
        text = "memguard: no cell has finished since memguard was loaded"
        return {"text/plain": text, "text/html": html.escape(text)}
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    head_html = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return {
        "text/plain": tabulate.tabulate(rows, headers=head, disable_numparse=True),
        "text/html": f"<table class='memguard-history'><tr>{head_html}</tr>{body}</table>",
    }


def status_bundle():
    return render.status_bundle(status_rows())
