"""Load, unload and the per-cell life cycle of memguard inside an IPython shell.

``load`` installs the C hooks (memguard._core), the relay from the C monitor thread to
IOPub, the sparse_to_dense detector and the magics; IPython's ``pre_run_cell`` and
``post_run_cell`` events mark cell boundaries. Everything runs on the main thread with the
GIL, except ``_on_record``, which the relay thread calls.
"""

import atexit
import os
import sys
import time

from . import alerts, limits, render, sparse
from ._state import STATE, Cell
from .sizes import format_size

ALERT_CAUSE_BUDGET = ("budget",)


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
    from .relay import Publisher, Relay

    STATE.core = _core
    STATE.shell = shell
    STATE.kernel = getattr(shell, "kernel", None)
    STATE.limit = limits.effective_limit()
    STATE.notes = []
    if os.environ.get("PYTHONMALLOC", "") == "malloc":
        STATE.notes.append("PYTHONMALLOC=malloc: pymalloc is off, so small Python objects "
                           "are not counted (NumPy data and large blocks are)")
    _core.install()
    _install_numpy()
    _core.set_user_globals(shell.user_global_ns)
    STATE.publisher = Publisher(STATE.kernel)
    STATE.relay = Relay(_core.WIRE_FORMAT, _on_record)
    STATE.relay.start()
    _core.relay_start(STATE.relay.endpoint)
    shell.events.register("pre_run_cell", pre_run_cell)
    shell.events.register("post_run_cell", post_run_cell)
    shell.register_magics(MemguardMagics)
    atexit.register(_at_exit)
    STATE.loaded = True
    _install_sparse()
    # The cell that loads memguard is already running: account it from here on.
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
    core.relay_stop()
    STATE.relay.stop()
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
    return (f"limit {format_size(limit.bytes)} ({limit.source}), budget {budget}, mode warn")


def _install_numpy():
    if "numpy" not in sys.modules and not _importable("numpy"):
        STATE.notes.append("NumPy is not installed, so only the Python heap is counted")
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
    cell = Cell(STATE.epoch, count, _current_parent(), time.monotonic(), budget)
    STATE.add_cell(cell)
    STATE.core.cell_begin(cell.epoch, budget)
    return cell


def pre_run_cell(info=None):
    """IPython ``pre_run_cell`` event: start accounting a new cell."""
    _install_sparse()
    _begin_cell(info)


def post_run_cell(result=None):
    """IPython ``post_run_cell`` event: close the cell's record in the history."""
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
    STATE.history.append({
        "epoch": cell.epoch,
        "cell": cell.count,
        "peak": snap["cell_peak"] - snap["cell_start"],
        "retained": snap["tracked"] - snap["cell_start"],
        "budget": cell.budget or None,
        "seconds": time.monotonic() - cell.started,
        "alerts": [a["kind"] for a in cell.alerts],
    })


def set_cell_budget(nbytes):
    """Give the running cell a budget of ``nbytes`` bytes (``%%memguard SIZE``)."""
    cell = STATE.current
    if cell is not None:
        cell.budget = nbytes
    STATE.core.set_budget(nbytes)


def _publish(cell, alert, cause):
    with STATE.lock:
        for i, old in enumerate(cell.alerts):
            if old.get("_cause") == cause:
                cell.alerts[i] = dict(alert, _cause=cause)
                break
        else:
            cell.alerts.append(dict(alert, _cause=cause))
    STATE.publisher.publish(alert, cell.epoch, cause, cell.parent)


def _on_record(fields):
    """Relay thread: one record from the C monitor thread (mg_wire_t)."""
    _version_, kind, epoch, line, _flags, nbytes, usage, peak, budget, _t = fields
    cell = STATE.cell(epoch)
    if cell is None or kind not in (STATE.core.KIND_BUDGET, STATE.core.KIND_BUDGET_GROW):
        return
    if kind == STATE.core.KIND_BUDGET_GROW:
        with STATE.lock:
            first = next((a for a in cell.alerts if a.get("_cause") == ALERT_CAUSE_BUDGET), None)
        nbytes = first["request_bytes"] if first else 0
    alert = alerts.budget_alert(STATE, cell, line, usage, max(peak, usage), budget or cell.budget,
                                nbytes)
    _publish(cell, alert, ALERT_CAUSE_BUDGET)


def _on_densify(matrix):
    """Main (or any) thread, before scipy.sparse allocates a dense array."""
    cell = STATE.current
    if not STATE.loaded or cell is None:
        return
    pred = sparse.predict(matrix)
    snap = STATE.core.snapshot()
    usage = snap["tracked"] - snap["cell_start"]
    budget = snap["budget"]
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


def configure(sparse_min_bytes=None, sparse_min_ratio=None):
    """See memguard.configure."""
    from .sizes import parse_size

    if sparse_min_bytes is not None:
        size = (parse_size(sparse_min_bytes, STATE.limit.bytes if STATE.limit else 0)
                if isinstance(sparse_min_bytes, str) else int(sparse_min_bytes))
        if size < 1:
            raise ValueError("sparse_min_bytes must be a positive size, e.g. '256MiB'")
    if sparse_min_ratio is not None:
        ratio = float(sparse_min_ratio)
        if not ratio >= 1.0 or ratio == float("inf"):
            raise ValueError("sparse_min_ratio must be a finite number >= 1, e.g. 10")
    if sparse_min_bytes is not None:
        STATE.sparse_min_bytes = size
    if sparse_min_ratio is not None:
        STATE.sparse_min_ratio = ratio
    return {"sparse_min_bytes": STATE.sparse_min_bytes, "sparse_min_ratio": STATE.sparse_min_ratio}


def status_rows():
    """(label, text) rows for ``%memguard status``."""
    import psutil

    snap = STATE.core.snapshot()
    limit = STATE.limit
    last = STATE.history[-1] if STATE.history else None
    relay = STATE.core.relay_stats()
    rows = [
        ("memguard", _version()),
        ("limit", f"{format_size(limit.bytes)} ({limit.source}: {limit.detail})"),
        ("budget", format_size(STATE.default_budget) if STATE.default_budget else "off"),
        ("mode", "warn"),
        ("tracked", f"{format_size(snap['tracked'])} since load (Python heap "
                    f"{format_size(snap['raw'] + snap['arena'])}, NumPy "
                    f"{format_size(snap['numpy'])})"),
        ("RSS", format_size(psutil.Process().memory_info().rss)),
        ("last cell peak", f"{format_size(last['peak'])} (cell {last['cell']})" if last else "n/a"),
        ("NumPy arrays", "counted (NEP 49 handler 'memguard')" if STATE.numpy_counted
         else "not counted"),
        ("alerts relayed", f"{relay['sent']} sent, {relay['dropped'] + relay['ring_dropped']} dropped"),
    ]
    rows += [("note", note) for note in STATE.notes]
    return rows


def status_bundle():
    return render.status_bundle(status_rows())
