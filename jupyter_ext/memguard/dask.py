"""memguard on every Dask worker: ``install(client, budget=None, mode="warn")``.

What runs where (docs/interface.md, "Dask workers"):

- In every worker process, a ``distributed.WorkerPlugin`` (registered with
  ``Client.register_plugin``, so workers that join later get it too) loads memguard's C core
  the way ``%load_ext`` does in a kernel, without IPython: allocator hooks, NumPy's handler,
  the limit (the worker's ``memory_limit`` as a source next to cgroup/rlimit/RAM), a black
  box, the C monitor thread and its relay, and the sparse_to_dense detector. Each task is a
  unit like a cell: its ``WorkerPlugin.transition`` into ``executing`` begins it (an epoch
  of its own, the per-task budget, the task function's globals and filename for line
  attribution), the transition out of ``executing`` finishes it. The executing thread is
  recorded by a thin wrapper around the task's function, which also turns a refused
  allocation (raise mode) into memguard's MemoryError before distributed serializes it.
- Alerts are the kernel's alerts (records.py, alerts.py) with ``task``, ``function``,
  ``worker`` (and ``file``, ``function_line``) added; the worker sends them with
  ``Worker.log_event("memguard", ...)``.
- In every nanny, a ``distributed.NannyPlugin`` watches its worker's pid: when the worker
  process dies (the nanny's memory termination, the OOM killer), it reads the dead worker's
  black box and sends a ``crash_report`` with ``Nanny.log_event``.
- On the client, ``Client.subscribe_topic("memguard", ...)`` receives them, maps the task
  function's filename to the notebook cell it was defined in (IPython's compiler keeps that
  map), and publishes the bundle under the running cell (memguard's own Publisher and cell
  records when memguard is loaded in the kernel), or as text on stderr outside a kernel.

Tasks are attributed one at a time: the C core has one running unit per process, so
per-task figures are exact with one thread per worker (``threads_per_worker=1``); with more
threads, concurrent tasks share the unit of the task that began last.
"""

import builtins
import collections
import functools
import hashlib
import json
import linecache
import os
import re
import sys
import threading
import time

from . import blackbox, cells, coreview, limits, records, refuse, render, report, sparse
from ._state import STATE, Cell
from .sizes import format_size, parse_size

TOPIC = "memguard"  # distributed event topic of alerts, crash reports and notes
PLUGIN_NAME = "memguard"  # the WorkerPlugin's name
NANNY_PLUGIN_NAME = "memguard-nanny"  # the NannyPlugin's name
LIMIT_SOURCE = "dask worker memory_limit"
BOX_PREFIX = "dask-worker-"  # black boxes: <MEMGUARD_DIR>/dask-worker-<pid>.mgbox
DYNAMIC_CODE = "<dynamic-code>"  # cloudpickle's co_filename for code sent by value
HEADER = "# memguard-dask-task "  # first line of the black box's "cell source" in a worker
NANNY_POLL = 0.05  # seconds between the nanny's looks at its worker's pid
CRASH_WAIT = 10.0  # seconds a cell that got KilledWorker waits for the crash report
# The monitor's period in a worker, ms (the kernel's is 10 ms, MG_MONITOR_PERIOD_MS in
# include/mg_monitor.h, for alerts under a running cell within milliseconds). A worker's
# alerts travel through the scheduler anyway. RSS and native mappings are sampled at every
# wake (MG_RSS_SAMPLE_MS, include/mg_monitor.h), five times as often as the nanny's own
# memory monitor looks (distributed.worker.memory.monitor-interval, 100 ms); raise mode
# judges between samples on tracked growth. Each wake of the thread costs the worker more
# than the thread's own CPU time: with two workers on two cores it preempts a task. At 5 ms,
# a dask.dataframe group-by's workers made 25 % more involuntary context switches than plain
# workers (11,300-11,600 against 9,100-9,300 in 12 rounds), at 20 ms as many (8,800-9,100);
# at 2 ms the thread alone used 0.8 % of a core (README, "Dask"; 2026-12-03).
WORKER_MONITOR_MS = 20
FINISH_DRAIN = 0.5  # seconds a finished task waits for its alerts in flight
MAX_TASKS = 1000  # task records kept per worker for late alerts
_MODES = ("warn", "raise")
# What a worker adds to an alert (docs/interface.md, "Dask workers").
TASK_FIELDS = ("task", "function", "file", "function_line", "code_hash", "worker")

# Kernel wording -> worker wording, for the messages alerts.py and refuse.py write about a
# cell and a kernel (applied in this order).
_WORDING = (
    ("%memguard budget SIZE", "memguard.dask.install(client, budget=SIZE)"),
    ("%memguard mode raise", 'memguard.dask.install(client, mode="raise")'),
    ("the machine's limit", "the worker's memory limit"),
    ("This cell's", "This task's"), ("this cell's", "this task's"),
    ("the cell's budget", "the task's budget"),
    ("This cell", "This task"), ("this cell", "this task"),
    ("A line of this task", "A line of this task's function"),
    ("The cell got", "The task got"),
    ("This kernel's", "This worker's"),
    ("the kernel is fine", "the worker is fine"),
    ("get the kernel killed", "get the worker restarted by its nanny"),
    ("the kernel", "the worker"),
)


def worker_wording(message):
    """``message`` (an alert or refusal message about a cell and a kernel) about a task
    and a worker."""
    for old, new in _WORDING:
        message = message.replace(old, new)
    return message


# --- the task's function ------------------------------------------------------------------

def task_function(spec):
    """The Python function a task's run_spec (dask's ``Task``) calls, unwrapped from
    ``functools.partial`` and fused subgraphs; None when there is none."""
    func = getattr(spec, "func", None)
    for _ in range(8):
        if func is None:
            return None
        if getattr(func, "__name__", "") == "_execute_subgraph" and getattr(spec, "args", ()):
            try:
                inner, out = spec.args[0], spec.args[1]
                spec = inner[out]
                func = getattr(spec, "func", None)
                continue
            except Exception:  # another shape: report the wrapper
                break
        if isinstance(func, functools.partial):
            func = func.func
            continue
        orig = getattr(func, "_memguard_orig", None)
        if orig is not None:
            func = orig
            continue
        break
    return func


def describe(func):
    """``{function, file, function_line}`` of ``func`` (file and line None for what is not
    Python code), and its globals (or None)."""
    code = getattr(func, "__code__", None)
    name = (getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
            or type(func).__name__) if func is not None else None
    globs = getattr(func, "__globals__", None)
    file = code.co_filename if code is not None else None
    return ({"function": name,
             # cloudpickle sends a function defined in the notebook by value, renaming its
             # code's file "<dynamic-code>": the client finds its cell (cell_of_function)
             "file": None if file == DYNAMIC_CODE else file,
             "function_line": code.co_firstlineno if code is not None else None,
             "code_hash": code_hash(code) if code is not None else None},
            globs if isinstance(globs, dict) else None)


def code_hash(code):
    """A short fingerprint of a code object's bytecode, the same in the notebook and in a
    worker that unpickled it."""
    return hashlib.sha1(code.co_code).hexdigest()[:16]


class _Described:
    """describe() of the task functions a worker runs, kept per function: a graph calls the
    same few functions in every one of its tasks, and hashing the bytecode and encoding the
    black box's JSON for each task was half of what memguard added per task (cProfile of a
    worker in bench/dask_overhead.py's chunked reduction). Kept only for Python functions,
    by weak reference, and without their globals: a function closing over a large array
    must not outlive its graph in the worker's memory because memguard described it. Other
    callables (builtins, ufuncs) have no bytecode to hash and are described each time.
    Worker's event loop thread only."""

    def __init__(self):
        import weakref

        self._kept = weakref.WeakKeyDictionary()

    def get(self, func):
        """(fields, globals, code filename, JSON of fields without its closing brace)."""
        code = getattr(func, "__code__", None)
        try:
            hit = self._kept.get(func) if code is not None else None
        except TypeError:  # not weakly referenceable, or unhashable
            hit = None
        if hit is None:
            fields, _globs = describe(func)
            hit = (fields, getattr(code, "co_filename", None), json.dumps(fields)[:-1])
            if code is not None:
                try:
                    self._kept[func] = hit
                except TypeError:
                    pass
        globs = getattr(func, "__globals__", None)
        return hit[0], globs if isinstance(globs, dict) else None, hit[1], hit[2]


def box_path(pid, directory=None):
    """The black box of the dask worker process ``pid``."""
    return os.path.join(directory or blackbox.default_dir(), f"{BOX_PREFIX}{pid}{blackbox.SUFFIX}")


def worker_limit(memory_limit, address=""):
    """The effective limit of a worker process: the smallest of cgroup, rlimit and RAM
    (limits.effective_limit) and the point where the nanny restarts the worker (its
    ``memory_limit`` times ``distributed.worker.memory.terminate``, 0.95 by default)."""
    found = limits.effective_limit()
    if not memory_limit:
        return found
    try:
        import dask

        fraction = dask.config.get("distributed.worker.memory.terminate")
    except Exception:  # noqa: BLE001 - no dask config: the memory_limit itself
        fraction = False
    share = float(fraction) if fraction not in (False, None) and 0 < float(fraction) <= 1 else 1.0
    nbytes = int(memory_limit * share)
    if nbytes >= found.bytes:
        return found
    where = f" of worker {address}" if address else ""
    detail = (f"{share:.0%} of the memory_limit{where} ({format_size(memory_limit)}), where "
              f"its nanny restarts it" if share < 1 else f"memory_limit{where}")
    return limits.Limit(nbytes, LIMIT_SOURCE, detail)


# --- in the worker process ----------------------------------------------------------------

class _TaskNamespace:
    """Stands for the shell in STATE on a worker: records.py reads ``user_global_ns`` to find
    the line a thread is running; here it is the running task function's globals."""

    user_global_ns = None


class _WorkerPublisher:
    """STATE.publisher on a worker: sends each alert to the client with log_event, with the
    task's fields added, in the order published.

    The relay thread publishes; the events leave from the worker's event loop. Worker.
    log_event called from another thread only schedules the send (loop.add_callback), which
    then runs after the transition that ends the task has queued the task's result: a
    refused task's MemoryError reached the client before its alert, whose cell had ended by
    then (one clean-clone CI run, 2026-12-03). So publish() queues the event and schedules
    flush(), and the task's finish (the worker's transition hook, on the event loop, which
    distributed runs before it sends the transition's messages) calls flush() after its
    drain: the alerts go into the batched stream ahead of the result."""

    def __init__(self, guard):
        self._guard = guard
        self._pending = collections.deque()  # appended by the relay, popped by the loop

    def publish(self, alert, epoch, cause, parent):
        guard = self._guard
        info = guard.tasks.get(epoch) or {}
        msg = task_alert(alert, info)
        self._pending.append({"type": "alert", "alert": msg, "epoch": epoch,
                              "cause": [str(c) for c in cause], "pid": os.getpid()})
        try:
            guard.worker.loop.add_callback(self.flush)
        except Exception:  # noqa: BLE001 - an alert must never fail the relay or the task
            self.flush(send=False)  # no loop to send from: the text form on stderr
        return "display_data"

    def flush(self, send=True):
        """The worker's event loop: send every event queued so far, oldest first (log_event
        on the loop's own thread puts it in the batched stream at once). An event that
        cannot be sent (or every one, with ``send=False``) goes to stderr as text."""
        while True:
            try:
                event = self._pending.popleft()
            except IndexError:
                return
            try:
                if not send:
                    raise RuntimeError("not sent")
                self._guard.worker.log_event(TOPIC, event)
            except Exception:  # noqa: BLE001 - as in publish
                print(render.text(event["alert"]), file=sys.__stderr__, flush=True)


def task_alert(alert, info):
    """A copy of ``alert`` (alerts.py's dict) about the task ``info`` (``task``,
    ``function``, ``file``, ``function_line``, ``worker``), its message about a task and a
    worker."""
    out = {k: v for k, v in alert.items() if not k.startswith("_")}
    out.update({k: info.get(k) for k in TASK_FIELDS})
    out["message"] = worker_wording(out.get("message", ""))
    return out


class WorkerGuard:
    """memguard loaded in one worker process (what extension._install does in a kernel,
    without IPython), and the task life cycle. Made by MemguardWorkerPlugin.setup."""

    def __init__(self, worker, budget, mode):
        self.worker = worker
        self.address = getattr(worker, "address", "") or ""
        self.budget_spec = budget
        self.mode = mode
        self.budget = 0
        self.tasks = collections.OrderedDict()  # epoch -> task fields
        self.running = {}  # key -> (cell, run_spec, original func or None)
        self.publisher = _WorkerPublisher(self)  # STATE.publisher while loaded
        self.refusals_seen = 0
        self.undo = None
        self.box = None
        self.described = _Described()
        from dask.utils import funcname

        self.funcname = funcname  # the name distributed's logs give a task's function
        self.address_json = json.dumps(self.address)
        # The black box's "cell source" between tasks: the same every time.
        self.idle_source = HEADER + json.dumps({"worker": self.address})

    # load / unload
    def start(self):
        import contextlib

        from . import _core as core
        from .relay import Relay, load_zmq

        with contextlib.ExitStack() as undo:
            STATE.core = core
            STATE.shell = _TaskNamespace()
            STATE.kernel = None
            memory_limit = getattr(getattr(self.worker, "memory_manager", None),
                                   "memory_limit", None)
            STATE.limit = worker_limit(memory_limit, self.address)
            self.budget = (parse_size(str(self.budget_spec), STATE.limit.bytes)
                           if self.budget_spec else 0)
            STATE.notes = []
            STATE.mode = self.mode
            core.install()
            undo.callback(core.uninstall)
            undo.callback(core.set_raise, False)
            from . import commands

            commands.apply_limit()
            STATE.rss_baseline = coreview.snapshot(core).outside_hooks
            from . import extension

            extension._install_numpy()
            # Native code's memory (pyarrow, dask.dataframe's default string columns, polars,
            # torch) counts per task as in a kernel; it also gives NumPy's own calls the
            # cheaper route. MEMGUARD_NATIVE=0 in the worker's environment turns it off.
            extension._install_native(core, undo)
            undo.callback(core.set_user_globals, None)
            undo.callback(core.set_cell_file, None)
            STATE.publisher = self.publisher
            self._open_box(core)
            undo.callback(self._close_box, core)
            load_zmq(core)
            STATE.relay = Relay(core.WIRE_FORMAT, records.on_record)
            undo.callback(_stop_relay)
            STATE.relay.start()
            STATE.relay_sent_at_start = coreview.monitor_stats(core).sent
            core.monitor_start(STATE.relay.endpoint, WORKER_MONITOR_MS, STATE.relay.context)
            undo.callback(core.monitor_stop)
            self.refusals_seen = coreview.refusal(core).count
            STATE.loaded = True
            undo.callback(_forget_state)
            records.watch_sparse()
            undo.callback(sparse.uninstall)
            self._idle()
            self.undo = undo.pop_all()

    def stop(self):
        for key in list(self.running):
            self._restore(key)
        undo, self.undo = self.undo, None
        if undo is not None:
            undo.close()

    def _open_box(self, core):
        try:
            directory = blackbox.default_dir()
            os.makedirs(directory, mode=0o700, exist_ok=True)
            blackbox.clean_old(directory)
            path = box_path(os.getpid(), directory)
            core.blackbox_open(path, f"dask worker {self.address}")
        except Exception as exc:  # noqa: BLE001 - no box: alerts still work
            STATE.notes.append(f"no black box ({exc})")
            return
        self.box = path

    def _close_box(self, core):
        if self.box is not None:
            core.blackbox_close(True)  # a clean teardown is not a crash
            self.box = None

    # the task life cycle (worker's event loop thread, from WorkerPlugin.transition)
    def begin(self, key):
        ts = self.worker.state.tasks.get(key)
        spec = getattr(ts, "run_spec", None)
        func_fields, globs, code_name, func_json = self.described.get(task_function(spec))
        fields = dict(func_fields)
        fields["task"] = task = key if isinstance(key, str) else str(key)
        fields["worker"] = self.address
        core = STATE.core
        STATE.epoch += 1
        cell = Cell(STATE.epoch, None, None, time.monotonic(), self.budget,
                    code_name=code_name)
        self.tasks[cell.epoch] = fields
        while len(self.tasks) > MAX_TASKS:
            self.tasks.popitem(last=False)
        STATE.add_cell(cell)
        STATE.shell.user_global_ns = globs
        core.set_user_globals(globs)
        core.set_cell_file(code_name)
        core.cell_begin(cell.epoch, self.budget)
        core.set_raise(self.mode == "raise")
        # The same JSON as json.dumps(fields), from the function's part kept by _Described.
        core.blackbox_set_cell(cell.epoch, -1, f"{HEADER}{func_json}, \"task\": "
                               f"{json.dumps(task)}, \"worker\": {self.address_json}}}")
        self.running[key] = (cell, spec, self._wrap(spec, cell))

    def finish(self, key):
        entry = self.running.get(key)
        if entry is None:
            return
        cell = entry[0]
        self._restore(key)
        core = STATE.core
        if STATE.epoch != cell.epoch:
            return  # another task began since (more than one thread): it owns the unit now
        cells.drain(FINISH_DRAIN)
        # records.finish only updates the alerts the task got; most tasks got none, and
        # then the snapshot and the sites it would read are not needed.
        if cell.alerts:
            core.native_settle()  # the pages it touched last (cells.post_run_cell)
            records.finish(cell, coreview.sites(core, cell.epoch, 20), coreview.snapshot(core))
        self.publisher.flush()  # ahead of the task's result (_WorkerPublisher)
        if not self.running:
            self._idle()

    def _idle(self):
        """Between tasks: a unit no alert is published for, no budget, no raise mode."""
        core = STATE.core
        STATE.epoch += 1
        STATE.current = None
        STATE.shell.user_global_ns = None
        core.set_user_globals(None)
        core.set_cell_file(None)
        core.cell_begin(STATE.epoch, 0)
        core.set_raise(False)
        core.blackbox_set_cell(STATE.epoch, -1, self.idle_source)

    def _wrap(self, spec, cell):
        """Replace the task's function by one that records the executing thread and turns
        memguard's refusals into memguard's MemoryError message; returns the original."""
        func = getattr(spec, "func", None)
        if func is None or not callable(func) or getattr(spec, "is_coro", True):
            return None
        if not hasattr(type(spec), "__call__"):
            return None
        guard = self

        # Not functools.wraps: copying every attribute for every task cost more than the
        # rest of the wrapper. distributed calls spec.func and names it in its logs
        # ("Compute Failed ... Task:", by dask.utils.funcname), so the name is kept.
        def guarded(*args, **kwargs):
            cell.thread = threading.get_ident()
            try:
                return func(*args, **kwargs)
            except (builtins.MemoryError, builtins.RuntimeError) as exc:
                # RuntimeError: torch's CPU allocator raises it when the native hook refused
                # its block; one memguard did not cause goes on unchanged (refusal_message
                # gives None when no refusal was counted since the last).
                message = guard.refusal_message(cell, exc)
                if message is None:
                    raise
                raise refuse.MemoryError(message).with_traceback(exc.__traceback__) from None

        guarded._memguard_orig = guarded.__wrapped__ = func
        guarded.__name__ = guarded.__qualname__ = self.funcname(func)
        try:
            spec.func = guarded
        except (AttributeError, TypeError):
            return None
        return func

    def _restore(self, key):
        cell, spec, orig = self.running.pop(key, (None, None, None))
        if orig is not None:
            try:
                spec.func = orig
            except (AttributeError, TypeError):
                pass

    def refusal_message(self, cell, error):
        """memguard's message for a MemoryError (or torch's RuntimeError) of a task that
        raise mode caused (a refused NumPy, Arrow pool or torch allocation, or a densification
        stopped before it allocated), else None."""
        info = self.tasks.get(cell.epoch) or {}
        task = f"task {info.get('task')!r}"
        if info.get("function"):
            task += f" ({info['function']})"
        if isinstance(error, refuse.MemoryError) and str(error).startswith("memguard"):
            text = worker_wording(str(error))
            return text.replace("memguard (raise mode) stopped", f"memguard (raise mode) stopped, "
                                f"in {task} on worker {self.address},", 1)
        core = STATE.core
        ref = coreview.refusal(core)
        if ref.count == self.refusals_seen:
            return None
        self.refusals_seen = ref.count
        what, where = refuse.refused_what_where(ref, error)
        snap = coreview.snapshot(core)
        if ref.reason == core.REFUSE_BUDGET:
            over = (f"would take the task over its budget of {format_size(snap.budget)} (it had "
                    f"used {format_size(max(0, snap.cell_usage))})")
            fix = ("free what the task no longer needs (del), make the tasks smaller (smaller "
                   "chunks, more partitions), or raise the budget: "
                   "memguard.dask.install(client, budget=SIZE)")
        else:
            limit = STATE.limit
            over = (f"would take the worker over its memory limit of {format_size(limit.bytes)} "
                    f"({limit.source}; {STATE.limit_measure.label} now "
                    f"{format_size(snap.used(STATE.limit_measure))})")
            fix = ("make the tasks smaller (smaller chunks, more partitions), or give the "
                   "workers more memory (memory_limit)")
        return (f"memguard (raise mode) refused {what}{where} in {task} on worker "
                f"{self.address}: it {over}. Nothing was allocated and the worker is fine; "
                f"{fix}.")


def _stop_relay():
    relay, STATE.relay = STATE.relay, None
    if relay is not None:
        relay.stop()


def _forget_state():
    STATE.loaded = False
    STATE.current = None
    STATE.publisher = None
    STATE.shell = None


try:
    from distributed.diagnostics.plugin import NannyPlugin as _NannyBase
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerBase
except ImportError:  # distributed is not installed: install() says so
    _WorkerBase = _NannyBase = object


class MemguardWorkerPlugin(_WorkerBase):
    """The WorkerPlugin ``install`` registers: memguard in the worker process, each task a
    unit with ``budget`` (bytes, a size string, or None) in ``mode`` ("warn" or "raise")."""

    idempotent = False

    def __init__(self, budget=None, mode="warn"):
        self.budget = budget
        self.mode = mode
        self._guard = None

    def __getstate__(self):
        return {"budget": self.budget, "mode": self.mode, "_guard": None}

    def setup(self, worker):
        if STATE.loaded:
            why = ("memguard is already loaded in this process (a worker running inside "
                   "the kernel, e.g. LocalCluster(processes=False)); its tasks are not "
                   "guarded separately")
            worker.log_event(TOPIC, {"type": "note", "worker": worker.address, "note": why})
            return
        guard = WorkerGuard(worker, self.budget, self.mode)
        try:
            guard.start()
        except Exception as exc:
            worker.log_event(TOPIC, {"type": "note", "worker": worker.address,
                                     "note": f"memguard not loaded: {type(exc).__name__}: {exc}"})
            raise
        self._guard = guard
        for note in STATE.notes:
            worker.log_event(TOPIC, {"type": "note", "worker": worker.address, "note": note})

    def teardown(self, worker):
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.stop()

    def transition(self, key, start, finish, **kwargs):
        guard = self._guard
        if guard is None:
            return
        if finish == "executing":
            guard.begin(key)
        elif finish != "long-running" and key in guard.running:
            guard.finish(key)  # memory, error, cancelled, released, rescheduled


# --- in the nanny -------------------------------------------------------------------------

class MemguardNannyPlugin(_NannyBase):
    """The NannyPlugin ``install`` registers: when its worker process dies, the worker's
    black box becomes a ``crash_report`` sent with ``Nanny.log_event``."""

    idempotent = False
    restart = False

    def __init__(self):
        self._nanny = None
        self._pid = None
        self._address = None
        self._callback = None

    def __getstate__(self):
        return {"_nanny": None, "_pid": None, "_address": None, "_callback": None}

    def setup(self, nanny):
        from tornado.ioloop import PeriodicCallback

        self._nanny = nanny
        self._pid = nanny.pid
        self._address = nanny.worker_address
        self._callback = PeriodicCallback(self._check, NANNY_POLL * 1000)
        self._callback.start()

    def teardown(self, nanny):
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
        self._check()

    def _check(self):
        nanny = self._nanny
        if nanny is None:
            return
        pid = nanny.pid
        if pid == self._pid:
            self._address = nanny.worker_address or self._address
            return
        dead, address = self._pid, self._address
        self._pid, self._address = pid, nanny.worker_address
        if dead is None:
            return
        path = box_path(dead)
        if not os.path.exists(path) or blackbox.pid_alive(dead) and _same_process(dead):
            return
        try:
            alert = worker_crash_alert(path, dead, address, nanny)
        except blackbox.BlackBoxError as exc:
            blackbox.set_aside(path, "bad")
            nanny.log_event(TOPIC, {"type": "note", "worker": address,
                                    "note": f"a worker's black box was set aside: {exc}"})
            return
        blackbox.set_aside(path, "crashed")
        nanny.log_event(TOPIC, {"type": "crash_report", "alert": alert})


def _same_process(pid):
    """Whether ``pid`` is still a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def worker_crash_alert(path, pid, address, nanny=None):
    """The ``crash_report`` alert of the dead worker whose black box is ``path``, with the
    task it was running (``task``, ``function``, ``file``, ``function_line``, ``worker``)."""
    box = blackbox.read(path)
    memory_limit = getattr(getattr(nanny, "memory_manager", None), "memory_limit", None)
    limit = worker_limit(memory_limit, address or "")
    alert = report.crash_alert(box, limit)
    header = {}
    first = (box.cell_source or "").split("\n", 1)[0]
    if first.startswith(HEADER):
        try:
            header = json.loads(first[len(HEADER):])
        except ValueError:
            header = {}
    if not isinstance(header, dict):
        header = {}
    for k in TASK_FIELDS:
        alert[k] = header.get(k)
    alert["worker"] = header.get("worker") or address
    alert["cell"] = None
    alert["source"] = []
    st = box.state
    running = header.get("task") is not None
    alert["line"] = alert["line"] if running else None
    suggestions = [worker_wording(s) for s in alert["suggestions"] if s != report.GENERIC]
    suggestions.append("make each task smaller (smaller chunks, more partitions) or give the "
                       "workers more memory (memory_limit)")
    suggestions.append('install memguard on the workers with a per-task budget and raise mode '
                       '(memguard.dask.install(client, budget=SIZE, mode="raise")), so the '
                       'allocation that would not fit fails the task with MemoryError instead '
                       'of killing the worker')
    alert["suggestions"] = suggestions
    alert["alerts"] = [dict(a, message=worker_wording(a["message"])) for a in alert["alerts"]]
    alert["top_sites"] = [dict(s, cell=None) for s in alert["top_sites"]]
    of_limit = (f" ({st['rss_peak'] / limit.bytes:.0%} of its {format_size(limit.bytes)} limit, "
                f"{limit.source})" if limit and limit.bytes else "")
    if running:
        what = f"task {header['task']!r}"
        if header.get("function"):
            what += f" (function {header['function']}"
            what += f", line {alert['line']})" if alert["line"] else ")"
    else:
        what = "no task (between tasks)"
    alert["message"] = (f"Dask worker {alert['worker']} (pid {pid}) died while running {what}; "
                        f"its memory (RSS) had reached {format_size(st['rss_peak'])}{of_limit}. "
                        f"To change: {suggestions[0]}.")
    return alert


# --- on the client ------------------------------------------------------------------------

_installs = {}  # client.id -> ClientSide


class ClientSide:
    """The client's end: receives the events, resolves cells and lines, shows them."""

    def __init__(self, client, budget, mode):
        self.client = client
        self.budget = budget
        self.mode = mode
        self.shell = _shell()
        self.kernel = getattr(self.shell, "kernel", None)
        self.lock = threading.Lock()
        self.placed = {}  # (worker, pid, epoch, cause) -> (epoch, parent) of the first display
        self.crashed = set()  # task keys a crash report arrived for
        self.events = []  # every alert dict shown, for tests and scripts (last 1000)
        self.parent = None  # the execute_request of the running cell, without memguard loaded
        self.cell_epoch = 0  # counts cells, without memguard loaded
        self.publisher = None

    # shell events (main thread)
    def pre_run_cell(self, info=None):
        kernel = self.kernel
        if kernel is not None:
            parent = kernel.get_parent("shell")
            if parent and parent.get("header", {}).get("msg_type") == "execute_request":
                self.parent = parent
        self.cell_epoch += 1

    def post_run_cell(self, result=None):
        """A cell that got KilledWorker waits (at most CRASH_WAIT s) for the dead worker's
        crash report, so it is shown under that cell, before its execute_reply."""
        error = getattr(result, "error_in_exec", None)
        if type(error).__name__ != "KilledWorker":
            return
        key = error.args[0] if error.args else None
        key = key if isinstance(key, str) else str(key)
        deadline = time.monotonic() + CRASH_WAIT
        while time.monotonic() < deadline:
            with self.lock:
                if key in self.crashed:
                    return
            time.sleep(0.02)

    # distributed's event handler (the client's event loop thread)
    def on_event(self, event):
        try:
            _, msg = event
            kind = msg.get("type")
            if kind == "note":
                print(f"memguard: worker {msg.get('worker')}: {msg.get('note')}.",
                      file=sys.stderr if self.kernel is None else sys.__stderr__, flush=True)
                return
            alert = dict(msg["alert"])
            self.resolve(alert)
            if kind == "crash_report":
                cause = ("dask-crash", alert.get("worker"), alert.get("pid"))
            else:
                cause = ("dask", alert.get("worker"), msg.get("pid"), msg.get("epoch"),
                         tuple(msg.get("cause") or ()))
            self.show(alert, cause)
            with self.lock:
                if kind == "crash_report" and alert.get("task"):
                    self.crashed.add(alert["task"])
                self.events.append(alert)
                del self.events[:-1000]
        except Exception:  # noqa: BLE001 - a bad event must not stop the client's loop
            sys.excepthook(*sys.exc_info())

    def resolve(self, alert):
        """The notebook cell of the task's function (IPython's compiler maps each cell's
        filename to its execution count), and the source around the line for a crash."""
        cell, file = cell_of_function(self.shell, alert)
        alert["cell"] = cell
        if file is not None:
            alert["file"] = file
        top = alert.get("top_site")
        if isinstance(top, dict):
            top["cell"] = cell
        for site in alert.get("top_sites") or ():
            site["cell"] = cell
        if alert.get("kind") == "crash_report" and alert.get("file"):
            alert["source"] = source_rows(alert["file"],
                                          alert.get("line") or alert.get("function_line"))

    def show(self, alert, cause):
        if STATE.loaded and STATE.publisher is not None and STATE.kernel is not None \
                and STATE.current is not None:
            self._show_in_memguard(alert, cause)
            return
        if self.kernel is None:
            text = render.crash_text(alert) if alert["kind"] == "crash_report" else render.text(alert)
            print(text, file=sys.stderr, flush=True)
            return
        from .relay import Publisher

        if self.publisher is None:
            self.publisher = Publisher(self.kernel)
        with self.lock:
            epoch, parent = self.placed.setdefault(cause, (self.cell_epoch, self.parent))
        self.publisher.publish(alert, epoch, cause, parent)

    def _show_in_memguard(self, alert, cause):
        """memguard is loaded in this kernel: the alert joins the running cell's records
        (its history's alert kinds) and goes out through its Publisher."""
        with self.lock:
            cell = STATE.current
            epoch, _ = self.placed.setdefault(cause, (cell.epoch, None))
        cell = STATE.cell(epoch) or cell
        with STATE.lock:
            for i, old in enumerate(cell.alerts):
                if old.get("_cause") == cause:
                    cell.alerts[i] = dict(alert, _cause=cause)
                    break
            else:
                cell.alerts.append(dict(alert, _cause=cause))
        STATE.publisher.publish(alert, cell.epoch, cause, cell.parent)


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def cell_of_function(shell, alert):
    """``(cell, filename)``: the notebook cell that defines the task's function (its
    execution count and the filename IPython compiled it under), or (None, None).

    A worker cannot know it: cloudpickle renames the code's file. IPython's compiler maps
    each cell's filename to its execution count (``compile._filename_map``), so: first a
    function of the notebook's namespace with the same name, first line and bytecode; else
    the newest cell whose source has ``def <name>`` (or a decorator, or ``lambda``) at the
    function's first line."""
    mapping = getattr(getattr(shell, "compile", None), "_filename_map", None) if shell else None
    name, first, file = alert.get("function"), alert.get("function_line"), alert.get("file")
    if mapping and file in mapping:
        # cloudpickle before 3.1.3 keeps the cell's own filename
        return mapping[file], file
    if not mapping or not name or not first or file:
        return None, None
    for obj in list(getattr(shell, "user_ns", {}).values()):
        code = getattr(obj, "__code__", None)
        if (code is not None and getattr(obj, "__qualname__", None) == name
                and code.co_firstlineno == first and code.co_filename in mapping
                and code_hash(code) == alert.get("code_hash")):
            return mapping[code.co_filename], code.co_filename
    short = name.rsplit(".", 1)[-1]
    pattern = (re.compile(r"\blambda\b") if short == "<lambda>"
               else re.compile(r"^\s*(@|(async\s+)?def\s+" + re.escape(short) + r"\b)"))
    for filename, count in sorted(mapping.items(), key=lambda kv: -(kv[1] or 0)):
        lines = linecache.getlines(filename)
        if isinstance(count, int) and count > 0 and first <= len(lines) \
                and pattern.search(lines[first - 1]):
            return count, filename
    return None, None


def source_rows(filename, line, context=report.CONTEXT_LINES):
    """``[line number, text, is the line]`` rows around ``line`` of ``filename`` (a
    notebook cell's source is in the kernel's linecache)."""
    if not line:
        return []
    lines = linecache.getlines(filename)
    if not lines:
        return []
    lo, hi = max(1, line - context), min(len(lines), line + context)
    return [[n, lines[n - 1].rstrip("\n"), n == line] for n in range(lo, hi + 1)]


def _check(budget, mode):
    if mode not in _MODES:
        raise ValueError(f'mode must be "warn" or "raise", not {mode!r}')
    if budget is None or budget == 0:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ValueError(f"budget must be a number of bytes or a size such as '500MB', "
                         f"not {budget!r}")
    parse_size(str(budget), 2**40)  # raises ValueError for what is not a size
    return budget


def default_client():
    """The notebook's distributed Client (``distributed.default_client()``)."""
    try:
        from distributed import default_client as found
    except ImportError:
        raise RuntimeError("memguard.dask needs dask.distributed (pip install distributed)") \
            from None
    try:
        return found()
    except ValueError:
        raise RuntimeError("no Dask client: create one first (client = "
                           "distributed.Client(...))") from None


def install(client=None, budget=None, mode="warn"):
    """Load memguard in every worker of ``client``'s cluster, and in workers that join
    later: each task is a unit with a budget of ``budget`` (bytes, a size such as
    ``"500MB"``, a percentage of the worker's limit such as ``"25%"``, or None for none) in
    ``mode`` (``"warn"``: alerts only; ``"raise"``: an allocation that would take the task
    over its budget or the worker over its limit fails the task with MemoryError).
    Alerts and crash reports appear under the running cell (text on stderr outside a
    kernel). Installing again replaces the settings. Returns the ClientSide."""
    budget = _check(budget, mode)
    client = client or default_client()
    side = _installs.get(client.id)
    if side is None:
        side = ClientSide(client, budget, mode)
        client.subscribe_topic(TOPIC, side.on_event)
        if side.shell is not None:
            side.shell.events.register("pre_run_cell", side.pre_run_cell)
            side.shell.events.register("post_run_cell", side.post_run_cell)
            if getattr(side.shell.displayhook, "exec_result", None) is not None:
                side.pre_run_cell()  # install() runs in a cell: it is the running one
        _installs[client.id] = side
    side.budget, side.mode = budget, mode
    client.register_plugin(MemguardWorkerPlugin(budget, mode), name=PLUGIN_NAME)
    if _has_nannies(client):
        client.register_plugin(MemguardNannyPlugin(), name=NANNY_PLUGIN_NAME)
    return side


def _has_nannies(client):
    try:
        info = client.scheduler_info()
    except Exception:  # noqa: BLE001
        return True
    return any(w.get("nanny") for w in info.get("workers", {}).values())


def uninstall(client=None):
    """Remove memguard from every worker of ``client``'s cluster (hooks, threads, black
    boxes), stop registering it in new ones, and stop showing its events."""
    client = client or default_client()
    side = _installs.pop(client.id, None)
    for name, nanny in ((PLUGIN_NAME, False), (NANNY_PLUGIN_NAME, True)):
        try:
            client.unregister_worker_plugin(name, nanny=nanny)
        except Exception:  # noqa: BLE001 - not registered (no nannies, or never installed)
            pass
    if side is not None:
        try:
            client.unsubscribe_topic(TOPIC)
        except Exception:  # noqa: BLE001
            pass
        if side.shell is not None:
            for name, handler in (("pre_run_cell", side.pre_run_cell),
                                  ("post_run_cell", side.post_run_cell)):
                try:
                    side.shell.events.unregister(name, handler)
                except ValueError:
                    pass


def magic(action, size=None, raise_=False):
    """``%memguard dask install [SIZE] [--raise]`` / ``%memguard dask uninstall``: the line
    to print."""
    client = default_client()
    if action == "uninstall":
        uninstall(client)
        return f"memguard: removed from the workers of {client.scheduler.address}"
    mode = "raise" if raise_ else "warn"
    install(client, size, mode)
    n = len(client.scheduler_info().get("workers", {}))
    budget = f"budget {size} per task" if size else "no budget"
    return (f"memguard: installed on {n} worker{'s' if n != 1 else ''} of "
            f"{client.scheduler.address} (and any that join), {budget}, mode {mode}")
