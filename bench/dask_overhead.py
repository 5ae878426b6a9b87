"""What memguard on the Dask workers costs: wall time of a dask.array chunked reduction and
a dask.dataframe group-by on a LocalCluster (2 process workers, 1 thread each), plain and
with ``memguard.dask.install(client)``.

Run: ``python bench/dask_overhead.py [--quick] [--rounds N] [--blocks N]`` (``make
bench-dask``, part of ``make bench``).

Each configuration gets a fresh cluster (memguard's NumPy handler stays in a worker after
uninstall, passing through, so a worker that had memguard is not "plain" any more). On a
shared 2-core machine two plain clusters started a minute apart differ by up to 12 % (the
machine's speed drifts, and each cluster places the chunks on its workers its own way), so
one plain and one memguard cluster cannot resolve the 3 % target. The clusters run in
blocks of four, plain, memguard, memguard, plain (ABBA); each block gives two pairs of
neighbours, and each pair a ratio of the two clusters' best rounds (the least disturbed
run of each). The figure is the median of the pairs' ratios, printed with their range;
the target is a median of at most 1.03 (README, "Dask"), reported, not asserted. Beside it,
the workers' CPU time (user + system of the worker processes, all threads) summed over
every round of every cluster of a configuration, which leaves out the waits for a shared
machine's CPUs, not the differences between one cluster and the next.
Writes build/bench_dask.json.

Instruction counts (``--callgrind``): the same workloads on fresh clusters whose worker
processes run under ``valgrind --tool=callgrind`` (multiprocessing's spawn executable is a
wrapper), instrumented only for the measured rounds (``callgrind_control``), one dump per
thread. Each worker's threads fall in four groups: the event loop (the main thread: comms,
the scheduler's messages, memguard's per-task begin and finish), the task thread (the
non-main thread with the most instructions: the tasks' own code, through memguard's hooks),
memguard's threads (the monitor, ``monitor_main``, and the relay, the thread running libzmq)
and the rest. The task thread's count is the same from one run to the next within about 1 %
(the work moved between the two workers changes); the event loop's and memguard's threads'
counts grow with wall time (heartbeats, the monitor's 5 ms tick), which valgrind stretches
about 50 times, so they are printed, not judged; the workers' own periodic callbacks
(watchdog tick, profiler, memory and system monitors) are set 10 s apart for this mode. Clusters run plain, memguard, memguard,
plain. Writes build/bench_dask_callgrind.json.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

TARGET = 1.03


def array_reduction(n, chunk):
    """A chunked reduction: mean of x + x.T over a random n x n array, per column."""
    import dask.array as da

    x = da.random.default_rng(0).random((n, n), chunks=(chunk, chunk))
    return lambda: (x + x.T).mean(axis=0).sum().compute()


def dataframe_groupby(rows, partitions):
    """A group-by: per-key mean and count of a random frame of ``rows`` rows."""
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"key": rng.integers(0, 1000, rows), "a": rng.random(rows),
                        "b": rng.random(rows)})
    from distributed import wait

    df = dd.from_pandas(pdf, npartitions=partitions).persist()
    wait(df)  # the rounds time the group-by, not the upload
    return lambda: df.groupby("key").agg({"a": "mean", "b": "count"}).compute()


def _workers_cpu(pids):
    """CPU seconds (user + system, every thread) the worker processes used so far."""
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def _scheduler_tasks(dask_scheduler):
    return len(dask_scheduler.tasks)


def _settled(client, baseline, deadline_s=10.0):
    """Wait until the scheduler holds no more tasks than ``baseline`` (what was there before
    a round: the persisted inputs), so the next round cannot be served the previous round's
    result. Without it, an identical graph resubmitted before the scheduler processed the
    release of its keys finished in 0.06 s with 0.01 s of the workers' CPU time instead of
    1 s: group-by figures jumped between the two from one cluster to the next."""
    deadline = time.monotonic() + deadline_s
    while client.run_on_scheduler(_scheduler_tasks) > baseline:
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster kept a round's tasks for 10 s")
        time.sleep(0.01)


def run(config, workloads, rounds):
    """Best wall time (s) of each workload over ``rounds`` on a fresh cluster, and the
    workers' CPU time (s) of all its rounds."""
    from distributed import Client, LocalCluster

    with LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                      dashboard_address=None, silence_logs=50) as cluster, \
            Client(cluster) as client:
        if config == "memguard":
            import memguard.dask

            memguard.dask.install(client)
        pids = list(client.run(os.getpid).values())
        best, cpu = {}, {}
        for name, (make, args) in workloads.items():
            compute = make(*args)
            baseline = client.run_on_scheduler(_scheduler_tasks)
            compute()  # warm-up: imports, first-touch of the workers' memory
            times, used = [], 0.0
            for _ in range(rounds):
                _settled(client, baseline)
                c0 = _workers_cpu(pids)
                t0 = time.perf_counter()
                compute()
                times.append(time.perf_counter() - t0)
                used += _workers_cpu(pids) - c0
            best[name] = min(times)
            cpu[name] = used
        if config == "memguard":
            memguard.dask.uninstall(client)
    return best, cpu


ORDER = ("plain", "memguard", "memguard", "plain")  # one block; pairs (0, 1) and (2, 3)

# --- instruction counts under callgrind ---------------------------------------------------

THREAD_GROUPS = ("event loop", "task thread", "memguard threads", "other threads")


def _callgrind_threads(out_dir, pid, dump):
    """{group: instructions} of worker ``pid``'s dump number ``dump`` (one file per thread,
    ``cg.<pid>.<dump>-<thread>``), grouped as in THREAD_GROUPS."""
    import glob

    threads = []
    for path in glob.glob(os.path.join(out_dir, f"cg.{pid}.{dump}-*")):
        total, ours = 0, False
        with open(path, errors="replace") as fh:
            for line in fh:
                if line.startswith(("fn=", "cfn=")) and ("zmq" in line or
                                                         "monitor_main" in line):
                    ours = True
                elif line.startswith("totals:"):
                    total = int(line.split()[1])
        threads.append((path.rsplit("-", 1)[1], total, ours))
    if not threads:
        raise RuntimeError(f"no callgrind dump {dump} of worker {pid} in {out_dir}")
    groups = dict.fromkeys(THREAD_GROUPS, 0)
    rest = [t for t in threads if t[0] != "01"]
    groups["event loop"] = sum(t[1] for t in threads if t[0] == "01")
    task = max((t for t in rest if not t[2]), key=lambda t: t[1], default=None)
    for t in rest:
        group = ("task thread" if t is task else "memguard threads" if t[2]
                 else "other threads")
        groups[group] += t[1]
    return groups


def run_callgrind(config, workloads, rounds, out_dir):
    """{workload: {group: instructions summed over the workers}} of ``rounds`` rounds on a
    fresh cluster whose workers run under callgrind (instrumented for the rounds only)."""
    import multiprocessing
    import subprocess

    import dask
    from distributed import Client, LocalCluster

    wrapper = os.path.join(out_dir, "python-under-callgrind")
    with open(wrapper, "w") as fh:
        fh.write("#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no "
                 "--separate-threads=yes --dump-instr=no "
                 f"--callgrind-out-file={out_dir}/cg.%p {sys.executable} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    multiprocessing.set_executable(wrapper)

    def control(pids, *args):
        for pid in pids:
            subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                           capture_output=True, timeout=600)

    # valgrind runs the workers about 50 times slower: longer timeouts, and the workers'
    # periodic callbacks (their cost grows with wall time, not with the work) far apart:
    # the event loop's watchdog tick (20 ms), the profiler (10 ms samples, 1 s cycles), the
    # memory and system monitors (100 ms, 500 ms). The nannies pass this config on.
    slow = {"distributed.comm.timeouts.connect": "600s", "distributed.comm.timeouts.tcp": "600s",
            "distributed.scheduler.worker-ttl": None,
            "distributed.admin.tick.interval": "10s",
            "distributed.worker.profile.enabled": False,
            "distributed.worker.memory.monitor-interval": "10s",
            "distributed.admin.system-monitor.interval": "10s"}
    try:
        with dask.config.set(slow), \
                LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                             dashboard_address=None, silence_logs=50, timeout=600) as cluster, \
                Client(cluster, timeout=600) as client:
            client.wait_for_workers(2, timeout=600)
            if config == "memguard":
                import memguard.dask

                memguard.dask.install(client)
            pids = list(client.run(os.getpid).values())
            counts = {}
            for dump, (name, (make, args)) in enumerate(workloads.items(), start=1):
                compute = make(*args)
                baseline = client.run_on_scheduler(_scheduler_tasks)
                compute()  # warm-up, uninstrumented
                _settled(client, baseline, 600)
                control(pids, "--instr=on")
                control(pids, "--zero")
                for _ in range(rounds):
                    _settled(client, baseline, 600)
                    compute()
                control(pids, "--dump")
                control(pids, "--instr=off")
                counts[name] = dict.fromkeys(THREAD_GROUPS, 0)
                for pid in pids:
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            groups = _callgrind_threads(out_dir, pid, dump)
                            break
                        except RuntimeError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.5)
                    for group, n in groups.items():
                        counts[name][group] += n
            if config == "memguard":
                memguard.dask.uninstall(client)
    finally:
        multiprocessing.set_executable(sys.executable)
    return counts


def callgrind_main(workloads, rounds, blocks):
    """Instruction counts of plain and memguard workers (ORDER blocks): prints, per workload,
    each group's memguard / plain ratio of the counts summed over the clusters."""
    import shutil
    import tempfile

    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("--callgrind needs valgrind (Debian's valgrind package; `make test` installs it)")
    runs = []
    for _ in range(blocks):
        for config in ORDER:
            with tempfile.TemporaryDirectory(prefix="memguard-dask-cg-") as out_dir:
                t0 = time.monotonic()
                counts = run_callgrind(config, workloads, rounds, out_dir)
            runs.append((config, counts))
            print(f"  {config} ({time.monotonic() - t0:.0f} s): " + "; ".join(
                f"{name}: " + ", ".join(f"{g} {n / 1e6:.0f} M" for g, n in groups.items())
                for name, groups in counts.items()), file=sys.stderr)
    table = {}
    print(f"{'workload':32} {'task thread':>12} {'event loop':>11} {'all threads':>12}   "
          f"memguard threads")
    for name in workloads:
        sums = {c: dict.fromkeys(THREAD_GROUPS, 0) for c in ("plain", "memguard")}
        for config, counts in runs:
            for group, n in counts[name].items():
                sums[config][group] += n
        plain, mg = sums["plain"], sums["memguard"]
        row = {"plain": plain, "memguard": mg,
               "task_thread": mg["task thread"] / plain["task thread"],
               "event_loop": mg["event loop"] / plain["event loop"],
               "all_threads": sum(mg.values()) / sum(plain.values()),
               "memguard_threads_share": mg["memguard threads"] / sum(mg.values())}
        table[name] = row
        print(f"{name:32} {row['task_thread']:11.3f}x {row['event_loop']:10.3f}x "
              f"{row['all_threads']:11.3f}x   {100 * row['memguard_threads_share']:.1f} % of "
              f"memguard's workers' count")
    os.makedirs("build", exist_ok=True)
    with open(os.path.join("build", "bench_dask_callgrind.json"), "w") as fh:
        json.dump({"rounds": rounds, "blocks": blocks, "runs": runs, "workloads": table}, fh,
                  indent=2)


def summarize(clusters, names):
    """Per workload, from ``clusters`` (a list of (config, best wall by name, CPU by name)
    in ORDER blocks): the pairs' wall ratios, their median, and the summed CPU ratio."""
    table = {}
    for name in names:
        ratios = []
        for i in range(0, len(clusters) - 1, 2):
            pair = {c[0]: c[1][name] for c in clusters[i:i + 2]}
            ratios.append(pair["memguard"] / pair["plain"])
        ratios.sort()
        cpu = {config: sum(c[2][name] for c in clusters if c[0] == config)
               for config in ("plain", "memguard")}
        table[name] = {"pair_ratios": ratios, "ratio": statistics.median(ratios),
                       "plain_cpu_total_s": cpu["plain"], "memguard_cpu_total_s": cpu["memguard"],
                       "cpu_total_ratio": cpu["memguard"] / cpu["plain"]}
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per cluster")
    parser.add_argument("--blocks", type=int, default=None,
                        help="ABBA blocks of four clusters (default 3; 1 with --quick "
                             "or --callgrind)")
    parser.add_argument("--callgrind", action="store_true",
                        help="instruction counts of the workers' threads under callgrind "
                             "(quick inputs, 2 rounds per cluster by default)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sending large graph")  # from_pandas's frame
    args.quick = args.quick or args.callgrind
    rounds = args.rounds if args.rounds is not None else (
        2 if args.callgrind else 3 if args.quick else 5)
    blocks = args.blocks if args.blocks is not None else (1 if args.quick else 3)
    if rounds < 1 or blocks < 1:
        parser.error("--rounds and --blocks must be at least 1")
    workloads = {
        "dask.array chunked reduction": (array_reduction, (4000, 500) if args.quick
                                         else (8000, 1000)),
        "dask.dataframe group-by": (dataframe_groupby, (1_000_000, 8) if args.quick
                                    else (4_000_000, 16)),
    }
    if args.callgrind:
        callgrind_main(workloads, rounds, blocks)
        return
    clusters = []
    for _ in range(blocks):
        for config in ORDER:
            wall, used = run(config, workloads, rounds)
            clusters.append((config, wall, used))
            print(f"  {config}: " + ", ".join(f"{k} {v:.3f} s (workers' CPU {used[k]:.3f} s)"
                                              for k, v in wall.items()), file=sys.stderr)
    table = summarize(clusters, workloads)
    print(f"{'workload':32} {'ratio':>7} {'pairs':>15}   {'CPU, all rounds':>15}")
    for name, row in table.items():
        flag = "" if row["ratio"] <= TARGET else f"  (above the {TARGET} target)"
        spread = f"{row['pair_ratios'][0]:.3f}-{row['pair_ratios'][-1]:.3f}"
        print(f"{name:32} {row['ratio']:6.3f}x {spread:>15}   {row['cpu_total_ratio']:14.3f}x"
              f"{flag}")
    os.makedirs("build", exist_ok=True)
    with open(os.path.join("build", "bench_dask.json"), "w") as fh:
        json.dump({"rounds": rounds, "blocks": blocks, "quick": args.quick, "target": TARGET,
                   "clusters": clusters, "workloads": table}, fh, indent=2)


if __name__ == "__main__":
    main()
