"""What the monitor thread and the black box cost: CPU time of memguard's monitor thread
per second of wall time, with and without the black box open.

Run: ``python bench/monitor_cost.py [--seconds S]`` (part of ``make bench``).

The monitor (csrc/monitor.c) wakes every 10 ms (MG_MONITOR_PERIOD_MS), samples RSS at
every wake and, when the black box is open, writes its state and a timeline sample every
100 ms (csrc/blackbox.c). Its CPU time is read from /proc/self/task/<tid>/schedstat
(nanoseconds on a CPU) over ``--seconds`` of wall time, with 200 live sites in the table
so a state write has work to do. The main thread sleeps meanwhile, so the figure is the
monitor's own cost, which on a busy kernel is taken from another core or from the cell.
Writes build/monitor_cost.json.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

import memguard._core as core


def thread_cpu_seconds(tid):
    """Time the thread spent on a CPU: the first field of /proc/self/task/<tid>/schedstat,
    in nanoseconds (Documentation/scheduler/sched-stats.rst), finer than stat's ticks."""
    with open(f"/proc/self/task/{tid}/schedstat") as fh:
        return int(fh.read().split()[0]) / 1e9


def measure(seconds, box):
    tmp = tempfile.mkdtemp(prefix="mg-bench-")
    if box:
        core.blackbox_open(os.path.join(tmp, "bench.mgbox"), "bench.json")
    from memguard.relay import load_zmq

    load_zmq(core)
    core.monitor_start("ipc://" + os.path.join(tmp, "relay"))
    time.sleep(0.05)
    (tid,) = [t for t in os.listdir("/proc/self/task")
              if open(f"/proc/self/task/{t}/comm").read().strip() == "memguard-mon"]
    cpu0, t0 = thread_cpu_seconds(tid), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = thread_cpu_seconds(tid), time.monotonic()
    core.monitor_stop()
    if box:
        core.blackbox_close(True)
    shutil.rmtree(tmp, ignore_errors=True)
    return (cpu1 - cpu0) / (t1 - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="3 s per configuration")
    parser.add_argument("--runs", "--reps", type=int, default=1, help="ignored (one run)")
    parser.add_argument("--out", default="build/monitor_cost.json")
    args = parser.parse_args(argv)
    seconds = 3.0 if args.quick else args.seconds
    core.install()
    core.install_numpy()
    core.set_user_globals(globals())
    core.cell_begin(1, 0)
    keep = [np.ones(20_000 + i) for i in range(200)]  # 200 live blocks >= 128 KiB
    plain = measure(seconds, box=False)
    boxed = measure(seconds, box=True)
    del keep
    print(f"monitor thread CPU: {plain * 1e3:.2f} ms/s without the black box, "
          f"{boxed * 1e3:.2f} ms/s with it ({seconds:.0f} s each; 1 ms/s = 0.1% of a core)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"monitor_cpu_ms_per_s": plain * 1e3, "with_blackbox_ms_per_s": boxed * 1e3,
                   "seconds": seconds}, fh, indent=2)


if __name__ == "__main__":
    main()
