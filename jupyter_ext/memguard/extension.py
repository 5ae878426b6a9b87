"""Loading memguard into an IPython shell, and unloading it.

``load`` installs, in order: the C hooks (memguard._core, docs/design.md "Allocator
hooks"), NumPy's handler ("NumPy NEP 49 handler"), the black box, the relay from the C
monitor thread to IOPub ("libzmq"), the cell events, the magics, raise mode's exception
handler, the GIL switch interval and the sparse_to_dense detector. Each step registers its
undo as it completes; if any step fails, the undos of the completed ones run in reverse and
the error propagates, so a failed load leaves nothing behind and a later ``%load_ext``
starts afresh. ``unload`` runs the same undos. Main thread only.
"""

import atexit
import contextlib
import os
import sys

from . import blackbox, cells, commands, limits, records, refuse, report, sparse
from ._state import STATE
from .coreview import monitor_stats, snapshot

# While memguard is loaded the interpreter's GIL switch interval is at most 1 ms (Python's
# default is 5 ms, sys.setswitchinterval): an alert has to take the GIL several times on
# its way out (memguard's relay thread, then ipykernel's IOPub thread), and while the cell
# runs bytecode each take waits up to one interval (docs/design.md "Alert latency").
# Threads that only wait on I/O are not affected; CPU-bound Python threads switch more often.
SWITCH_INTERVAL = 0.001


def _env_problem():
    """Why hooks cannot be installed in this interpreter, or None."""
    pymalloc = os.environ.get("PYTHONMALLOC", "")
    if sys.flags.dev_mode or "debug" in pymalloc:
        return ("the Python debug allocator is active (PYTHONMALLOC=%s%s), whose blocks "
                "cannot be measured; start the kernel without it to use memguard"
                % (pymalloc or "debug", ", -X dev" if sys.flags.dev_mode else ""))
    return None


def load(shell, magics):
    """Install memguard into ``shell`` with ``magics`` (the Magics class of ``%memguard``)
    and print one line; harmless when already loaded. Raises what made a step fail, after
    undoing the steps done."""
    if STATE.loaded:
        print(f"memguard {STATE.core.VERSION} is already loaded; {commands.setting_line()}")
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
    try:
        with contextlib.ExitStack() as undo:
            _install(shell, _core, magics, undo)
            STATE.teardown = undo.pop_all()
    except BaseException as exc:
        print(f"memguard: not loaded: {type(exc).__name__}: {exc}; what it had installed "
              f"was removed.")
        raise
    print(f"memguard {_core.VERSION} loaded; {commands.setting_line()}")
    for note in STATE.notes:
        print(f"memguard: {note}.")


def _install(shell, core, magics, undo):
    """Every step of ``load``, each followed by its undo on ``undo`` (an ExitStack)."""
    from .relay import Publisher, Relay, load_zmq

    STATE.core = core
    STATE.shell = shell
    STATE.kernel = getattr(shell, "kernel", None)
    STATE.limit = limits.effective_limit()
    STATE.notes = []
    STATE.mode = "warn"
    if os.environ.get("PYTHONMALLOC", "") == "malloc":
        STATE.notes.append("PYTHONMALLOC=malloc: pymalloc is off, so small Python objects "
                           "are not counted (NumPy data and large blocks are)")
    core.install()
    undo.callback(core.uninstall)  # NumPy's handler stays, passing through: arrays keep it
    undo.callback(core.set_raise, False)
    commands.apply_limit()
    # Everything the process held before the hooks went in is the baseline: from here on,
    # RSS - baseline - tracked is memory no hook counted (the untracked gap).
    STATE.rss_baseline = snapshot(core).outside_hooks
    _install_numpy()
    _install_native(core, undo)
    core.set_user_globals(shell.user_global_ns)
    undo.callback(core.set_user_globals, None)
    launcher = _launcher_endpoint() if STATE.kernel is not None else None
    STATE.publisher = Publisher(STATE.kernel, launcher=launcher is not None)
    _open_blackbox(core)
    undo.callback(_close_blackbox, core)
    load_zmq(core)
    STATE.relay = Relay(core.WIRE_FORMAT, records.on_record)
    undo.callback(_stop_relay)
    STATE.relay.start()
    STATE.relay_sent_at_start = monitor_stats(core).sent
    core.monitor_start(STATE.relay.endpoint, core.MONITOR_PERIOD_MS, STATE.relay.context,
                       launcher)
    undo.callback(core.monitor_stop)  # before the relay's context ends, and the black box
    for name, handler in (("pre_run_cell", cells.pre_run_cell),
                          ("post_run_cell", cells.post_run_cell)):
        shell.events.register(name, handler)
        undo.callback(_unregister, shell, name, handler)
    restore_compiler = cells.watch_compiler(shell)
    if restore_compiler is not None:
        undo.callback(restore_compiler)
    shell.register_magics(magics)
    undo.callback(_remove_magics, shell)
    refuse.install(shell)
    undo.callback(refuse.uninstall, shell)
    saved = sys.getswitchinterval()
    sys.setswitchinterval(min(saved, SWITCH_INTERVAL))
    undo.callback(_restore_switch_interval, saved)
    atexit.register(_at_exit)
    undo.callback(atexit.unregister, _at_exit)
    STATE.loaded = True
    undo.callback(setattr, STATE, "loaded", False)
    records.watch_sparse()
    undo.callback(sparse.uninstall)
    # The cell that loads memguard is already running: account it from here on.
    cells.learn_count_offset(shell)
    cells.begin()


def _install_native(core, undo):
    """Patch every loaded shared object's GOT slots of the malloc family, anonymous mmap and
    dlopen (docs/design.md, "Native memory"); ``MEMGUARD_NATIVE=0`` leaves native code
    uncounted. Objects memguard could not patch are named by ``%memguard status`` ("not
    patched: ..."), not at load: on an interpreter that links libpython statically (Debian's,
    conda's) the main program is one of them on every load, and a line at every load that
    needs no action would teach users to skip memguard's lines."""
    if os.environ.get("MEMGUARD_NATIVE", "1") == "0" or not hasattr(core, "install_native"):
        STATE.notes.append("MEMGUARD_NATIVE=0: native allocations are not counted")
        return
    core.install_native()
    undo.callback(core.uninstall_native)


def unload(shell):
    """Remove every hook, restore the allocators where memguard is still on top, stop the
    monitor and relay threads, and remove the magics: the undos of ``load``, in reverse.
    Harmless when not loaded."""
    if not STATE.loaded or STATE.teardown is None:
        return
    teardown, STATE.teardown = STATE.teardown, None
    teardown.close()


def _at_exit():
    if STATE.loaded and STATE.shell is not None:
        unload(STATE.shell)


def _unregister(shell, name, handler):
    try:
        shell.events.unregister(name, handler)
    except ValueError:
        pass


def _remove_magics(shell):
    for kind in ("line", "cell"):
        shell.magics_manager.magics[kind].pop("memguard", None)


def _restore_switch_interval(saved):
    """Put back the switch interval found at load, unless someone changed it since."""
    if sys.getswitchinterval() == min(saved, SWITCH_INTERVAL):
        sys.setswitchinterval(saved)


_LAUNCHER_ENDPOINT = []  # [endpoint or None], read once per process


def _launcher_endpoint():
    """The endpoint of memguard's kernel launcher (launcher.py), which started this kernel
    with ``MEMGUARD_LAUNCHER_ENDPOINT`` set, or None. Read once and removed from the
    environment, so processes this kernel starts do not send it records of their own."""
    if not _LAUNCHER_ENDPOINT:
        _LAUNCHER_ENDPOINT.append(os.environ.pop("MEMGUARD_LAUNCHER_ENDPOINT", None) or None)
    return _LAUNCHER_ENDPOINT[0]


def _stop_relay():
    relay, STATE.relay = STATE.relay, None
    relay.stop()


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


def _close_blackbox(core):
    core.blackbox_close(True)  # a clean unload is not a crash
    STATE.blackbox_path = None


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
