"""One fresh process of bench/overhead.py: run workloads as notebook cells in an IPython
shell and write how long their bodies took.

Run by bench/overhead.py, directly or under a profiler (memray, scalene, fil-profile,
valgrind), as ``python bench/overhead_runner.py --workloads W[,W...] --scale S --result F
[--memguard] [--callgrind]``.

The shell is ``InteractiveShell.instance()`` in a process that has imported ipykernel's
kernel application (so the garbage collector sees roughly what it sees in a kernel), whose
cells get file names as in an ipykernel kernel (``$TMPDIR/ipykernel_<pid>/<hash>.py``, so a
profiler that only traces the user's own files sees the cells), with an in-memory history. With
``--memguard`` the first cell is ``%load_ext memguard``, so its hooks, monitor thread,
black box (in ``$MEMGUARD_DIR``) and 1 ms switch interval are active, as a user runs it.
The process first puts glibc's malloc in the state a kernel reaches once it freed a large
array (``prime_malloc``) and starts an idle thread, as a kernel has threads besides the
one running cells (``start_kernel_thread``), the same in every configuration. Each
workload's setup cell runs untimed, then ``gc.collect()``, then its body cells are run
with ``run_cell`` one after the other; the time of a workload is ``time.perf_counter()``
around those ``run_cell`` calls (so memguard's ``pre_run_cell``/``post_run_cell`` are in
it). With ``--callgrind`` the bodies run inside a ctypes callback, so callgrind started with
``--collect-atstart=no --toggle-collect=*closure_fcn --dump-after=*closure_fcn`` counts
exactly the bodies, one dump per workload, in order.

The result file is JSON: ``{"seconds": {workload: s}, "config": {...what was active}}``.

``--serve`` (bench/overhead.py ``--paired``): the process stays up and takes one command per
line on stdin: ``run W`` runs workload W's bodies once more (its setup first when W is not
the workload set up last, after ``%reset -f`` of the one before) and answers
``{"seconds": s}``; ``quit`` writes the result file (``seconds`` empty) and leaves. Answers
are JSON lines on the file descriptor ``--reply-fd`` (stdout is the cells' own).
"""

import argparse
import ctypes
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import overhead_workloads  # noqa: E402


# glibc's malloc raises its mmap threshold (M_MMAP_THRESHOLD, and the trim threshold with it)
# to the size of any mmap'd block that is freed, up to 32 MiB on 64-bit (mallopt(3)). Which
# block happens to be freed first during imports and loading then decides for the rest of
# the process whether a 200 KB realloc is a copy on the heap or an mremap, and a
# realloc-heavy cell runs 0.4x to 2.5x as fast for reasons that have nothing to do with the
# tool being measured. A kernel that has freed one large array is in the raised state, so
# every process starts there: one block just under 32 MiB, malloc'd and freed.
PRIME_BYTES = 32 * 2**20 - 2**16


def prime_malloc():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(PRIME_BYTES))


# A kernel process always runs other threads beside the one running cells (ipykernel's
# IOPub, heartbeat and control threads), and glibc 2.34+ makes every pthread mutex
# operation atomic once a process has a second thread (SINGLE_THREAD_P: a single-threaded
# process locks and unlocks with plain stores). A bare runner is single-threaded, so any
# tool that starts a thread, as memguard's monitor does, would be charged for a cost every
# kernel already pays: 0.7 % of the instructions of sqlite_insert, whose rows take about a
# dozen mutexes each (callgrind, 2026-12-03: plain 39.65 M, plain with one idle thread
# 39.92 M). Every configuration starts one idle thread standing for the kernel's.
def start_kernel_thread():
    import threading

    threading.Thread(target=threading.Event().wait, name="stands-for-kernel-threads",
                     daemon=True).start()


def make_shell():
    """An InteractiveShell whose cells are named like ipykernel's (XCachingCompiler:
    ``$TMPDIR/ipykernel_<pid>/<hash>.py``) and written there, so tools that read or filter
    by file name see cells as in a kernel; ipykernel itself is not imported."""
    import tempfile
    import zlib

    from IPython.core.compilerop import CachingCompiler
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    cell_dir = os.path.join(tempfile.gettempdir(), f"ipykernel_{os.getpid()}")
    os.makedirs(cell_dir, exist_ok=True)

    class KernelNamedCompiler(CachingCompiler):
        def get_code_name(self, raw_code, code, number):
            path = os.path.join(cell_dir, f"{zlib.crc32(raw_code.encode())}.py")
            with open(path, "w") as fh:
                fh.write(raw_code)
            return path

    # What a kernel process holds before the first cell: ipykernel and what it imports
    # (zmq, tornado, jupyter_client, ...), about 37,000 objects for the garbage collector
    # instead of the bare shell's 22,000 (a live kernel has 53,000). Object-heavy cells
    # spend up to half their time in gen-2 collections, whose cost grows with every
    # long-lived object, so a bare shell would overstate what any import costs there.
    import ipykernel.kernelapp  # noqa: F401

    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    return InteractiveShell.instance(config=cfg, compiler_class=KernelNamedCompiler)


def run(shell, source, what):
    result = shell.run_cell(source, store_history=True)
    if not result.success:
        err = result.error_in_exec or result.error_before_exec
        raise RuntimeError(f"{what} failed: {type(err).__name__}: {err}")


def time_bodies(shell, name, bodies, callgrind):
    """Seconds the body cells of workload ``name`` take, run one after the other."""
    if callgrind:
        failure = []

        def bodies_in_callback():
            try:
                for i, body in enumerate(bodies):
                    run(shell, body, f"{name} body {i + 1}")
            except BaseException as exc:  # a ctypes callback cannot raise
                failure.append(exc)

        callback = ctypes.CFUNCTYPE(None)(bodies_in_callback)
        t0 = time.perf_counter()
        callback()
        t1 = time.perf_counter()
        if failure:
            raise failure[0]
    else:
        t0 = time.perf_counter()
        for i, body in enumerate(bodies):
            run(shell, body, f"{name} body {i + 1}")
        t1 = time.perf_counter()
    return t1 - t0


def serve(shell, scale, reply_fd):
    """The ``--serve`` loop (module docstring)."""
    reply = os.fdopen(reply_fd, "w", buffering=1)
    current, bodies = None, None
    for line in sys.stdin:
        command = line.split()
        if command == ["quit"]:
            break
        if len(command) != 2 or command[0] != "run":
            reply.write(json.dumps({"error": f"unknown command {line.strip()!r}"}) + "\n")
            continue
        name = command[1]
        try:
            if name != current:
                if current is not None:
                    run(shell, "%reset -f", "reset")
                setup, bodies = overhead_workloads.cells(name, scale)
                run(shell, setup, f"{name} setup")
                current = name
            gc.collect()
            reply.write(json.dumps({"seconds": time_bodies(shell, name, bodies, False)}) + "\n")
        except Exception as exc:  # noqa: BLE001 - the coordinator reports it as n/a
            current = None
            reply.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", required=True, help="comma-separated names")
    parser.add_argument("--scale", default="full", choices=("full", "quick", "callgrind"))
    parser.add_argument("--result", required=True, help="JSON file to write")
    parser.add_argument("--memguard", action="store_true", help="%%load_ext memguard first")
    parser.add_argument("--import-numpy", action="store_true",
                        help="import numpy in a first cell (what %%load_ext memguard "
                             "imports, without memguard)")
    parser.add_argument("--callgrind", action="store_true",
                        help="run each workload's bodies inside a ctypes callback")
    parser.add_argument("--serve", action="store_true",
                        help="stay up and run workloads on command (module docstring)")
    parser.add_argument("--reply-fd", type=int, default=None,
                        help="with --serve: where the answers go")
    args = parser.parse_args(argv)
    if args.serve and args.reply_fd is None:
        parser.error("--serve needs --reply-fd")

    prime_malloc()
    start_kernel_thread()
    shell = make_shell()
    # Exactly one first cell in every configuration: each cell leaves its input in the
    # user namespace (_i1, _ih, ...), the namespace the workloads' cell-level variables live
    # in, and one key more or less changes which lookups of ``a``, ``b``, ``i`` collide. With
    # one cell fewer than memguard's, plain did 100 dict-probe instructions per small_arrays
    # iteration less than memguard (callgrind, 2026-12-02): 0.3 % charged to memguard that
    # was not its own; with the same first cells, the two differ by none.
    route_at_load = None
    if args.memguard:
        run(shell, "%load_ext memguard", "%load_ext memguard")
        route_at_load = _numpy_route()
    elif args.import_numpy:
        run(shell, "import numpy", "import numpy")
    else:
        run(shell, "pass", "first cell")
    seconds = {}
    if args.serve:
        serve(shell, args.scale, args.reply_fd)
    else:
        for name in args.workloads.split(","):
            setup, bodies = overhead_workloads.cells(name, args.scale)
            run(shell, setup, f"{name} setup")
            gc.collect()
            seconds[name] = time_bodies(shell, name, bodies, args.callgrind)
            run(shell, "%reset -f", "reset")
            gc.collect()

    import tracemalloc

    state = {"switch_interval_s": sys.getswitchinterval(),
             "tracemalloc_frames": tracemalloc.get_traceback_limit()
             if tracemalloc.is_tracing() else 0,
             "memguard_loaded": False, "modules": sorted(
                 m for m in ("memray", "scalene", "_filpreload", "filprofiler")
                 if m in sys.modules)}
    if args.memguard:
        from memguard._state import STATE

        state["memguard_loaded"] = bool(STATE.loaded)
        state["memguard_blackbox"] = STATE.blackbox_path is not None
        # The NumPy route (README, "Overhead") at load and at the end: without it, small
        # arrays cost about 2 % more instructions.
        state["memguard_numpy_route"] = [route_at_load, _numpy_route()]
    with open(args.result, "w") as fh:
        json.dump({"seconds": seconds, "config": state, "pid": os.getpid()}, fh)
    # Leave now: the figures are written, and the profilers' reports at exit (flame graphs,
    # capture files) would only lengthen the benchmark.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _numpy_route():
    """Whether memguard's NumPy route is on (None when native counting is off)."""
    from memguard._state import STATE

    stats = STATE.core.native_stats() if STATE.core is not None else {}
    return bool(stats["numpy_route"]) if stats.get("installed") else None


if __name__ == "__main__":
    main()
