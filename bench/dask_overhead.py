"""What memguard on the Dask workers costs: wall time of a dask.array chunked reduction and
a dask.dataframe group-by on a LocalCluster (2 process workers, 1 thread each), plain and
with ``memguard.dask.install(client)``.

Run: ``python bench/dask_overhead.py [--quick] [--reps N] [--cluster-pairs N]`` (``make
bench-dask``, part of ``make bench``); ``--callgrind [--rounds N] [--blocks N]`` for
instruction counts; ``--per-task [--rounds N]`` (``make bench-dask-per-task``) for
memguard's CPU time per task in the workers and its monitor's measures of native mappings
(per_task_main); ``--pool FILE...`` to pool several runs' JSON (pool_main).

Wall time is measured in lockstep: a plain and a memguard driver process stay up side by
side, each with its own cluster (``--serve``), and each round of a workload on one is
followed at once by a round on the other, in the order AB, BA, AB, ... Each pair of
neighbouring rounds gives a ratio (memguard / plain), and a workload's figure is the median
of its pairs' ratios, pooled over ``--cluster-pairs`` pairs of drivers, printed with the
95 % interval of that median (paired_stats.median_ci: a bootstrap over the pairs of drivers and the
pairs within them) and the middle half of the ratios. On a shared 2-core machine the speed drifts by up to 13 % within
minutes (bench/overhead.py, paired_bench) and two clusters differ by the way they place
chunks on their workers (the group-by's partitions are therefore placed alike on every
cluster: dataframe_groupby), so separate clusters minutes apart could not resolve the 3 %
target: one plain cluster's best reduction round was 1.26 s, the next one's 2.20 s
(2026-12-03). The target is a median of at most 1.03 (README, "Dask"), reported, not
asserted: "met" when the whole interval is at or below it, "above" when the whole interval
is above it, "not resolved" when it holds the target. Beside it, the workers' CPU time (user + system of the worker processes, all
threads) summed over every counted round of a configuration, which leaves out the waits
for a shared machine's CPUs. A memguard driver's workers had memguard from their start
(memguard's NumPy handler stays in a worker after uninstall, passing through, so a worker
that had memguard is not "plain" any more). Writes build/bench_dask.json.

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
import subprocess
import sys
import time
import warnings

import paired_stats

TARGET = 1.03


def array_reduction(n, chunk):
    """A chunked reduction: mean of x + x.T over a random n x n array, per column."""
    import dask.array as da

    x = da.random.default_rng(0).random((n, n), chunks=(chunk, chunk))
    return lambda: (x + x.T).mean(axis=0).sum().compute()


def dataframe_groupby(rows, partitions):
    """A group-by: per-key mean and count of a random frame of ``rows`` rows, in
    ``partitions`` partitions placed on the workers in turn (sorted by address), so that
    every cluster holds the same number on each worker. Left to ``persist``, the placement
    differed from one cluster to the next (8/8 to 2/14 of 16 partitions on two workers,
    2026-12-03) and a round on a lopsided cluster took longer: a pair of drivers whose two
    clusters were placed differently kept that difference in all its rounds (pairs of
    drivers' medians 0.915-1.193 in one run)."""
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd
    from distributed import get_client, wait

    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"key": rng.integers(0, 1000, rows), "a": rng.random(rows),
                        "b": rng.random(rows)})
    client = get_client()
    workers = sorted(client.scheduler_info()["workers"])
    bounds = np.linspace(0, rows, partitions + 1).astype(int)
    parts = [client.scatter(pdf.iloc[bounds[i]:bounds[i + 1]], workers=[workers[i % len(workers)]])
             for i in range(partitions)]
    wait(parts)  # the rounds time the group-by, not the upload
    df = dd.from_delayed(parts, meta=pdf.iloc[:0], verify_meta=False)
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


def serve(config, workloads, reply_fd, n_workers=2):
    """``--serve CONFIG``: one cluster (2 process workers, 1 thread each), with memguard on
    its workers for ``memguard``, and every workload set up on it; then one command per
    line on stdin: ``run NAME`` runs one round of NAME and answers ``{"seconds": s, "cpu":
    s}`` (wall time, and the workers' CPU time in the round), ``quit`` leaves. Answers are
    JSON lines on ``reply_fd``; the first is ``{"ready": true}`` once set up."""
    from distributed import Client, LocalCluster

    replies = os.fdopen(reply_fd, "w", buffering=1)
    with LocalCluster(processes=True, n_workers=n_workers, threads_per_worker=1,
                      dashboard_address=None, silence_logs=50) as cluster, \
            Client(cluster) as client:
        if config == "memguard":
            import memguard.dask

            memguard.dask.install(client)
        pids = list(client.run(os.getpid).values())
        computes = {name: make(*args) for name, (make, args) in workloads.items()}
        baseline = client.run_on_scheduler(_scheduler_tasks)  # the persisted inputs
        replies.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            command, _, name = line.strip().partition(" ")
            if command == "quit":
                break
            try:
                _settled(client, baseline)
                c0 = _workers_cpu(pids)
                t0 = time.perf_counter()
                computes[name]()
                seconds = time.perf_counter() - t0
                reply = {"seconds": seconds, "cpu": _workers_cpu(pids) - c0}
            except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            replies.write(json.dumps(reply) + "\n")
        if config == "memguard":
            memguard.dask.uninstall(client)


class Driver:
    """A ``--serve`` process of this script for ``config``."""

    def __init__(self, config, quick, tmp, n_workers=2):
        read_fd, write_fd = os.pipe()
        self.config = config
        self.stderr = open(os.path.join(tmp, f"{config}.stderr"), "w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", config,
               "--reply-fd", str(write_fd), "--workers", str(n_workers)] + (
                   ["--quick"] if quick else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, text=True, pass_fds=(write_fd,))
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)
        self._answer()  # {"ready": true}

    def _answer(self):
        line = self.replies.readline()
        if not line:
            self.proc.wait(timeout=60)
            self.stderr.seek(0)
            tail = self.stderr.read()[-2000:]
            raise RuntimeError(f"the {self.config} driver exited ({self.proc.returncode}): "
                               f"{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.config}: {reply['error']}")
        return reply

    def run(self, name):
        """(wall seconds, workers' CPU seconds) of one round of workload ``name``."""
        self.proc.stdin.write(f"run {name}\n")
        self.proc.stdin.flush()
        reply = self._answer()
        return reply["seconds"], reply["cpu"]

    def finish(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.replies.close()
            self.stderr.close()


def verdict(row):
    """``met``, ``above`` or ``not resolved`` (paired_stats.verdict) against TARGET."""
    return paired_stats.verdict(row["median_ci95"], TARGET)


def paired(names, quick, cluster_pairs, reps, n_workers=2):
    """Per workload (summarize): the pairs' ratios (memguard / plain, neighbouring rounds),
    their median, and the workers' CPU time summed over the counted rounds of each
    configuration. The first round of each workload on each driver warms it up (imports,
    first touch of the workers' memory) and is not counted."""
    import tempfile

    by_driver_pair = {n: [] for n in names}
    walls = {(n, c): [] for n in names for c in ("plain", "memguard")}
    cpu = {(n, c): 0.0 for n in names for c in ("plain", "memguard")}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="memguard-dask-bench-") as tmp:
        for k in range(cluster_pairs):
            drivers = {}
            try:
                for c in ("plain", "memguard"):
                    drivers[c] = Driver(c, quick, tmp, n_workers)
                for name in names:
                    by_driver_pair[name].append([])
                    for c in drivers:
                        drivers[c].run(name)  # warm-up, not counted
                    for i in range(reps):
                        order = ("plain", "memguard") if i % 2 == 0 else ("memguard", "plain")
                        got = {c: drivers[c].run(name) for c in order}
                        for c in order:
                            walls[(name, c)].append(got[c][0])
                            cpu[(name, c)] += got[c][1]
                        by_driver_pair[name][-1].append(got["memguard"][0] / got["plain"][0])
            finally:
                for d in drivers.values():
                    d.finish()
            print(f"  driver pair {k + 1}/{cluster_pairs} done "
                  f"({time.monotonic() - t_start:.0f} s)", file=sys.stderr)
    return {name: summarize(by_driver_pair[name],
                            {c: walls[(name, c)] for c in ("plain", "memguard")},
                            cpu[(name, "plain")], cpu[(name, "memguard")])
            for name in names}


def summarize(by_driver_pair, walls, plain_cpu_s, memguard_cpu_s):
    """A workload's row from its pairs' ratios, grouped by pair of drivers, its rounds' wall
    times ``walls[config]`` (seconds) and its workers' CPU seconds per configuration: the
    median ratio with its 95 % interval (paired_stats.median_ci), the middle half, the
    median plain round, the CPU ratio and the verdict against TARGET."""
    r = sorted(x for group in by_driver_pair for x in group)
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0], r[0], r[0]]
    row = {"ratio": statistics.median(r), "pair_ratios": r, "middle_half": [q[0], q[2]],
           "median_ci95": paired_stats.median_ci(by_driver_pair),
           "by_driver_pair": by_driver_pair, "plain_s": statistics.median(walls["plain"]),
           "walls": walls, "plain_cpu_total_s": plain_cpu_s,
           "memguard_cpu_total_s": memguard_cpu_s,
           "cpu_total_ratio": memguard_cpu_s / plain_cpu_s}
    row["verdict"] = verdict(row)
    return row


def print_table(table, title=""):
    """The rows of ``table`` (workload name -> summarize's row), one line each."""
    print(f"{'workload':32} {'pairs':>5} {'ratio':>7} {'95 % CI':>13} {'middle half':>13} "
          f"{'plain s':>8}   {'CPU, all rounds':>15}   target {TARGET}{title}")
    for name, row in table.items():
        ci = f"{row['median_ci95'][0]:.3f}-{row['median_ci95'][1]:.3f}"
        half = f"{row['middle_half'][0]:.3f}-{row['middle_half'][1]:.3f}"
        print(f"{name:32} {len(row['pair_ratios']):5d} {row['ratio']:6.3f}x {ci:>13} "
              f"{half:>13} {row['plain_s']:8.3f}   {row['cpu_total_ratio']:14.3f}x   "
              f"{row['verdict']}")


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


def _instrument_guard(dask_worker):
    """In a memguard worker: wrap its guard's ``begin`` and ``finish`` to sum their thread
    CPU time (ns) and calls (``--per-task``)."""
    from memguard.dask import PLUGIN_NAME

    guard = dask_worker.plugins[PLUGIN_NAME]._guard
    acc = guard._bench_acc = dict.fromkeys(("begin_ns", "begin_calls", "finish_ns",
                                            "finish_calls"), 0)
    for name in ("begin", "finish"):
        def timed(key, _orig=getattr(guard, name), _name=name):
            t0 = time.thread_time_ns()
            try:
                return _orig(key)
            finally:
                acc[f"{_name}_ns"] += time.thread_time_ns() - t0
                acc[f"{_name}_calls"] += 1
        setattr(guard, name, timed)


def _per_task_counters(dask_worker):
    """The instrumented guard's sums, the process's CPU seconds and the monitor's measures of
    native mappings (count, CPU ns)."""
    import psutil
    from memguard import _core
    from memguard.dask import PLUGIN_NAME

    t = psutil.Process().cpu_times()
    stats = _core.monitor_stats()
    return dict(dask_worker.plugins[PLUGIN_NAME]._guard._bench_acc, cpu=t.user + t.system,
                settles=stats["settles"], settle_cpu_ns=stats["settle_cpu_ns"])


def per_task_main(workloads, rounds, n_workers=2):
    """``--per-task``: what memguard costs a worker per task, in situ. One memguard cluster;
    per workload, a warm-up round, then ``rounds`` rounds with the thread CPU time of each
    ``WorkerGuard.begin`` and ``finish`` summed in the workers (the event loop runs them
    before a task starts and after it ends), against the workers' CPU time over the same
    rounds; and the monitor thread's measures of native mappings (_core.monitor_stats).
    Reported, not judged. Writes build/bench_dask_per_task.json."""
    from distributed import Client, LocalCluster

    import memguard.dask

    table = {}
    with LocalCluster(processes=True, n_workers=n_workers, threads_per_worker=1,
                      dashboard_address=None, silence_logs=50) as cluster, \
            Client(cluster) as client:
        memguard.dask.install(client)
        client.run(_instrument_guard)
        print(f"{'workload':32} {'tasks/worker/round':>18} {'begin us':>9} {'finish us':>10} "
              f"{'of CPU':>7}   monitor's native measures")
        for name, (make, args) in workloads.items():
            compute = make(*args)
            baseline = client.run_on_scheduler(_scheduler_tasks)
            compute()
            _settled(client, baseline)
            before = client.run(_per_task_counters)
            for _ in range(rounds):
                compute()
                _settled(client, baseline)
            after = client.run(_per_task_counters)
            d = {k: sum(after[w][k] - before[w][k] for w in after)
                 for k in next(iter(after.values()))}
            tasks = d["begin_calls"]
            row = {"tasks": tasks, "rounds": rounds, "workers": n_workers,
                   "begin_us": d["begin_ns"] / 1e3 / max(tasks, 1),
                   "finish_us": d["finish_ns"] / 1e3 / max(tasks, 1),
                   "per_task_cpu_share": (d["begin_ns"] + d["finish_ns"]) / 1e9 / d["cpu"],
                   "workers_cpu_s": d["cpu"], "settles": d["settles"],
                   "settle_cpu_share": d["settle_cpu_ns"] / 1e9 / d["cpu"]}
            table[name] = row
            print(f"{name:32} {tasks / rounds / n_workers:18.1f} {row['begin_us']:9.1f} "
                  f"{row['finish_us']:10.1f} {100 * row['per_task_cpu_share']:6.2f}%   "
                  f"{d['settles']} ({100 * row['settle_cpu_share']:.2f} % of the workers' CPU)")
        memguard.dask.uninstall(client)
    os.makedirs("build", exist_ok=True)
    with open(os.path.join("build", "bench_dask_per_task.json"), "w") as fh:
        json.dump({"mode": "per-task", "workloads": table}, fh, indent=2)


def pool_main(paths):
    """``--pool FILE...``: the paired figures of several runs' build/bench_dask.json files
    pooled, as if one run had all their pairs of drivers (summarize over them all). Runs on
    different days or machine states differ by more than one run's interval allows
    (2026-12-04: the group-by read 1.019 and 0.996, same code), so their pool is the better
    figure. Prints the table; writes nothing."""
    runs = []
    for path in paths:
        try:
            with open(path) as fh:
                run = json.load(fh)
        except (OSError, ValueError) as exc:
            sys.exit(f"{path}: {exc}")
        if not isinstance(run, dict) or run.get("mode") != "paired":
            sys.exit(f"{path}: not a paired run's bench_dask.json")
        runs.append(run)
    table = {}
    for name in runs[0]["workloads"]:
        rows = [r["workloads"][name] for r in runs if name in r["workloads"]]
        table[name] = summarize(
            [g for row in rows for g in row["by_driver_pair"]],
            {c: [t for row in rows for t in row["walls"][c]] for c in ("plain", "memguard")},
            sum(row["plain_cpu_total_s"] for row in rows),
            sum(row["memguard_cpu_total_s"] for row in rows))
    print_table(table, f"  ({len(runs)} runs pooled)")


def make_workloads(quick):
    return {
        "dask.array chunked reduction": (array_reduction, (4000, 500) if quick
                                         else (8000, 1000)),
        # 16 partitions in both: from 16 on, dask.dataframe's group-by aggregates through a
        # shuffle (P2P on a cluster) instead of a tree reduction (dask 2026.8, measured
        # 2026-12-04), and the quick inputs (--callgrind's) must take the full run's path.
        "dask.dataframe group-by": (dataframe_groupby, (1_000_000, 16) if quick
                                    else (4_000_000, 16)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer rounds")
    parser.add_argument("--reps", type=int, default=None,
                        help="pairs of rounds per workload and pair of drivers (default 36, "
                             "quick 4)")
    parser.add_argument("--cluster-pairs", type=int, default=None,
                        help="pairs of drivers (one plain, one memguard cluster each), "
                             "pooled (default 12, quick 1)")
    parser.add_argument("--callgrind", action="store_true",
                        help="instruction counts of the workers' threads under callgrind "
                             "(quick inputs, 2 rounds per cluster by default)")
    parser.add_argument("--per-task", action="store_true",
                        help="memguard's per-task CPU time in the workers and the monitor's "
                             "native measures, in situ (10 rounds by default)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="with --callgrind: rounds per cluster (default 2); with "
                             "--per-task: rounds per workload (default 10)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="with --callgrind: blocks of four clusters, plain, memguard, "
                             "memguard, plain (default 1)")
    parser.add_argument("--workers", type=int, default=2,
                        help="process workers per cluster, 1 thread each (default 2)")
    parser.add_argument("--pool", nargs="+", metavar="FILE",
                        help="pool the paired figures of several runs' bench_dask.json files "
                             "(copies of build/bench_dask.json) and print them")
    parser.add_argument("--serve", choices=("plain", "memguard"), help=argparse.SUPPRESS)
    parser.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sending large graph")  # from_pandas's frame
    if args.serve:
        serve(args.serve, make_workloads(args.quick), args.reply_fd, args.workers)
        return
    if args.pool:
        pool_main(args.pool)
        return
    if args.per_task:
        rounds = args.rounds if args.rounds is not None else 10
        if rounds < 1 or args.workers < 1:
            parser.error("--rounds and --workers must be at least 1")
        per_task_main(make_workloads(args.quick), rounds, args.workers)
        return
    if args.callgrind:
        rounds = args.rounds if args.rounds is not None else 2
        blocks = args.blocks if args.blocks is not None else 1
        if rounds < 1 or blocks < 1:
            parser.error("--rounds and --blocks must be at least 1")
        callgrind_main(make_workloads(True), rounds, blocks)
        return
    # 432 pairs per workload, from 12 pairs of drivers x 36: a pair's ratio spreads by
    # 11-15 % (standard deviation of its logarithm) while, with the group-by's partitions
    # placed alike, pairs of drivers hardly differ (0.000-0.019 beyond what their own
    # pairs' spread explains, three runs, 2026-12-04); so the interval narrows with the
    # number of pairs, not of drivers: about +-1.5 % with 432 pairs, +-2.5 % with 144.
    # About 22 minutes.
    reps = args.reps if args.reps is not None else (4 if args.quick else 36)
    pairs = args.cluster_pairs if args.cluster_pairs is not None else (1 if args.quick else 12)
    if reps < 1 or pairs < 1:
        parser.error("--reps and --cluster-pairs must be at least 1")
    names = list(make_workloads(args.quick))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    table = paired(names, args.quick, pairs, reps, args.workers)
    print_table(table)
    os.makedirs("build", exist_ok=True)
    with open(os.path.join("build", "bench_dask.json"), "w") as fh:
        json.dump({"mode": "paired", "reps": reps, "cluster_pairs": pairs, "workers": args.workers,
                   "quick": args.quick, "target": TARGET, "workloads": table}, fh, indent=2)


if __name__ == "__main__":
    main()
