#!/usr/bin/env python3
"""memguard's overhead against plain Python and its peers, workload by workload.

What is measured
    Fifteen workloads (bench/overhead_workloads.py), each run as notebook cells in an IPython
    ``InteractiveShell`` (``run_cell``) in a fresh process (bench/overhead_runner.py):

    ======  ===================================================================================
    python  objects (instances, dicts, lists, tuples), binary_trees, json_roundtrip, strings,
            pandas_groupby
    numpy   small_arrays, large_arrays, ufunc_chains, sparse_construct, sparse_products and
            notebook (notebooks/sparse_to_dense.ipynb's code cells: 50,000 x 8,000 CSR, the
            densifying loop and the sparse fix)
    native  arrow_compute, polars_groupby, torch_cpu, sqlite_insert (only when pyarrow,
            polars and torch are installed)
    ======  ===================================================================================

    under these configurations, each as its users run it:

    ============================  =============================================================
    plain                         ``python runner.py``: the same shell and cells, no tool
    memguard                      the same, with ``%load_ext memguard`` as the first cell: hooks,
                                  monitor thread, black box (``MEMGUARD_DIR`` is a temporary
                                  folder) and the 1 ms GIL switch interval memguard sets;
                                  without a kernel its alerts go to stderr
    numpy_imported                plain with ``import numpy`` as the first cell, python group
                                  only: loading memguard imports NumPy (to wrap its allocator),
                                  and that alone changes how long the garbage collector takes
                                  on object-heavy cells; this column separates that from the
                                  hooks' own cost
    tracemalloc                   ``python -X tracemalloc=1 runner.py`` (1 frame)
    memray                        ``python -m memray run -q -o FILE runner.py`` (default mode)
    memray_python_allocators      the same with ``--trace-python-allocators``
    scalene                       ``python -m scalene run --memory -o FILE runner.py`` (CPU and
                                  memory profiling)
    fil                           ``fil-profile -o DIR --no-browser run runner.py``
    ============================  =============================================================

    The peers come from requirements/bench.txt (exact pins), installed by ``make
    bench-overhead``. A peer that is not installed, or that fails on a workload, is reported
    as ``n/a`` with the reason (in the JSON: ``null`` in ``ratio`` and the reason in ``na``)
    and the run goes on.

    Each process times its workload's body cells only (``time.perf_counter()`` around the
    ``run_cell`` calls, after an untimed setup cell with the imports and inputs; see
    bench/overhead_runner.py), so interpreter and tool start-up and the tools' reports at exit
    are not in the figures (the runner leaves with ``os._exit`` right after writing its
    result, so no report is written at all). Runs are interleaved: every round runs every
    (workload, configuration) pair once, workloads and configurations in a fresh seeded
    random order each time (a run is sped up or slowed down by the process before it, which
    just gave pages back to the kernel, so no configuration may always follow the same one).
    plain, memguard and numpy_imported get ``--reps`` rounds (6), tracemalloc and the peers
    2 (their ratios are far from 1 and need less precision).

    Two things are kept the same in every process because they otherwise swamp what is
    measured (see bench/overhead_runner.py): glibc's dynamic mmap threshold is raised to its
    ceiling first, as in any kernel that freed one large array (left to chance, a
    realloc-heavy cell ran 0.4x to 2.5x as fast from one process to the next); and the
    process imports ipykernel's kernel application before the shell starts, so the garbage
    collector sees about as many long-lived objects as in a kernel.

Units
    ``ratio`` = median seconds with the configuration / median seconds plain (1.00 = no
    overhead); ``geomean`` = geometric mean of a configuration's ratios over a group's
    workloads (over those where it ran). Seconds are wall time of the body cells. The JSON
    also has ``ratio_of_minima`` (fastest run / fastest plain run), every run's seconds
    (``runs``) and each configuration's total process wall time (``process_wall_s``). The
    ``notebook`` workload densifies 1.6 GB in fresh pages, so its runs vary by +-15% with
    the kernel's page and huge-page state, whatever the configuration.

memguard's own memory
    ``memguard_rss_bytes``: VmRSS of a real kernel (jupyter_client, kernelspec python3) that
    ran ``%load_ext memguard`` and then the demo notebook's code cells, minus that of a
    kernel that ran the same cells without memguard; median over ``--rss-reps`` pairs
    (fresh kernels, alternating). The same difference right after loading, before the
    notebook, is ``rss.idle_bytes``.

Instruction counts (``--callgrind``)
    Runs a subset of the workloads at a small scale once per configuration under ``valgrind
    --tool=callgrind``, counting instructions (Ir) of the main thread inside the body cells
    only (collection toggled on inside a ctypes callback that runs them: see the runner),
    and reports Ir ratios to plain. These do not drift with machine load. Only the thread
    that runs the cells is counted: memguard's monitor thread (bench/monitor_cost.py
    measures it) and memray's writer thread are not. Scalene samples on CPU-time timers,
    and valgrind runs ~50x slower, so under callgrind it takes ~50x more samples per
    instruction than it does natively: its Ir ratios overstate its real overhead. Written
    to build/bench_callgrind.json; one valgrind process per CPU, about 8 minutes here.

Paired (``--paired``, ``make bench-quick``)
    plain and memguard only, each in a runner that stays up (``--serve``), side by side:
    every run of a workload's bodies in one is followed at once by a run in the other (AB,
    BA, AB, ...), after one warm-up run each, and a workload's figure is the median ratio
    of these neighbouring pairs, pooled over ``--runner-pairs`` pairs of runners (the
    reasons and the measurements behind them: paired_bench). The Python and NumPy
    workloads share their runners; each native workload has runners of its own
    (runner_groups). Where separate processes
    minutes apart put the quick NumPy geomean anywhere between 0.99 and 1.12 on this
    machine, six quick paired runs on CPython 3.11, 3.12 and 3.13 (2026-12-02) put
    small_arrays between 1.060 and 1.082 (between 1.019 and 1.070 once the load imported
    NumPy first: README); a run's geomeans still move by a few percent,
    mostly with the notebook row
    (fresh pages, 0.97 and 1.07 in two runs) and the layout of each runner pair. Every
    configuration runs exactly one cell before its workloads (``%load_ext memguard``,
    ``import numpy`` or ``pass``): see the runner. Each workload's median is printed with
    its 95 % interval (``median_ci95`` in the JSON: bench/paired_stats.py, a bootstrap over
    the pairs of runners and the pairs within each).

Targets (docs/design.md, "Allocator hooks"; reported, not asserted)
    memguard python geomean <= 1.05 with no python workload above 1.15, numpy geomean
    <= 1.01, every native workload <= 1.03 (docs/design.md, "Native memory"; with
    ``--paired`` each native row also gets a verdict from its interval: "met" when the
    whole interval is at or below 1.03, "above", or "not resolved"), memguard_rss_bytes
    <= 8 MiB.

How to run
    make bench-overhead                 # all workloads and configurations (~9.5 min)
    make bench-quick                    # --quick --paired: 9 workloads, smaller inputs,
                                        # plain and memguard, 2 pairs of runners x 5 pairs
                                        # of runs (~2 min)
    .venv/bin/python bench/overhead.py [--quick] [--paired] [--reps N] [--runner-pairs N]
        [--workload NAME]... [--config NAME]... [--rss-reps N] [--no-rss] [--callgrind]
        [--out build/bench.json]

    Prints the table and writes build/bench.json. Other load on the machine shows in the
    figures: the load average before and after is recorded, and a note is printed when it
    was high.
"""

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import overhead_workloads  # noqa: E402
import paired_stats  # noqa: E402

RUNNER = os.path.join(HERE, "overhead_runner.py")
MiB = 2**20
TARGETS = {"python_geomean": 1.05, "python_max": 1.15, "numpy_geomean": 1.01,
           "native_max": 1.03, "memguard_rss_bytes": 8 * MiB}
RUN_TIMEOUT = 600  # s, one process
# The instruction-count subset: fast enough under callgrind, one of each kind.
# --quick: all but two workloads, and the notebook (the longest) only plain and memguard.
QUICK_WORKLOADS = ["objects", "binary_trees", "json_roundtrip", "strings", "pandas_groupby",
                   "small_arrays", "ufunc_chains", "sparse_products", "notebook"]
QUICK_NOTEBOOK_CONFIGS = ("plain", "memguard")
CALLGRIND_WORKLOADS = ["objects", "binary_trees", "json_roundtrip", "strings", "small_arrays",
                       "ufunc_chains", "sparse_products"]


def fil_script():
    return os.path.join(os.path.dirname(sys.executable), "fil-profile")


# name -> (module to find, description, argv builder(tmp, runner_args))
CONFIGS = {
    "plain": (None, "python runner.py",
              lambda tmp, rest: [sys.executable, RUNNER] + rest),
    "memguard": (None, "%load_ext memguard in the same shell",
                 lambda tmp, rest: [sys.executable, RUNNER, "--memguard"] + rest),
    "numpy_imported": (None, "plain, with import numpy in a first cell",
                       lambda tmp, rest: [sys.executable, RUNNER, "--import-numpy"] + rest),
    "tracemalloc": (None, "python -X tracemalloc=1",
                    lambda tmp, rest: [sys.executable, "-X", "tracemalloc=1", RUNNER] + rest),
    "memray": ("memray", "memray run (default)",
               lambda tmp, rest: [sys.executable, "-m", "memray", "run", "-q", "-f", "-o",
                                  os.path.join(tmp, "memray.bin"), RUNNER] + rest),
    "memray_python_allocators": (
        "memray", "memray run --trace-python-allocators",
        lambda tmp, rest: [sys.executable, "-m", "memray", "run", "-q", "-f",
                           "--trace-python-allocators", "-o",
                           os.path.join(tmp, "memray.bin"), RUNNER] + rest),
    "scalene": ("scalene", "scalene run --memory",
                lambda tmp, rest: [sys.executable, "-m", "scalene", "run", "--memory", "-o",
                                   os.path.join(tmp, "scalene.json"), RUNNER, "---"] + rest),
    "fil": ("filprofiler", "fil-profile run",
            lambda tmp, rest: [sys.executable, fil_script(), "-o", os.path.join(tmp, "fil"),
                               "--no-browser", "run", RUNNER] + rest),
}
PEER_PACKAGES = {"memray": "memray", "scalene": "scalene", "filprofiler": "filprofiler"}


def tool_versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("memguard", "numpy", "scipy", "pandas", "ipython", "memray", "scalene",
                 "filprofiler"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": mem,
            "kernel": platform.release(), "os": _os_name()}


def _os_name():
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def unavailable_reason(config):
    module = CONFIGS[config][0]
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return (f"{PEER_PACKAGES[module]} is not installed "
                f"(pip install -r requirements/bench.txt)")
    if config == "fil" and not os.path.exists(fil_script()):
        return "fil-profile script not found next to the interpreter"
    return None


def failure_reason(proc_stderr, rc):
    """One line saying why a run failed: the last non-empty stderr line that is not
    memguard's own output, with the exit status."""
    lines = [ln.strip() for ln in proc_stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("[memguard]")]
    last = lines[-1] if lines else "no output"
    return f"exit status {rc}: {last[:200]}"


class Bench:
    """Runs processes in per-run temporary folders under one bench folder."""

    def __init__(self, scale):
        self.scale = scale
        self.base = tempfile.mkdtemp(prefix="mg-overhead-")
        self.ipython_dir = os.path.join(self.base, "ipython")
        os.makedirs(self.ipython_dir)

    def cleanup(self):
        shutil.rmtree(self.base, ignore_errors=True)

    def env(self, tmp):
        env = dict(os.environ)
        env.update(TMPDIR=tmp, MEMGUARD_DIR=os.path.join(tmp, "box"),
                   IPYTHONDIR=self.ipython_dir, MPLBACKEND="Agg", PYTHONHASHSEED="0")
        for var in ("PYTHONTRACEMALLOC", "PYTHONMALLOC", "LD_PRELOAD"):
            env.pop(var, None)
        return env

    def run(self, config, workloads, extra=(), wrapper=(), scale=None, timeout=RUN_TIMEOUT):
        """Run one process; return (result dict or None, failure reason or None)."""
        tmp = tempfile.mkdtemp(dir=self.base, prefix=f"{config}-")
        result_file = os.path.join(tmp, "result.json")
        rest = ["--workloads", ",".join(workloads), "--scale", scale or self.scale,
                "--result", result_file] + list(extra)
        argv = list(wrapper) + CONFIGS[config][2](tmp, rest)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, env=self.env(tmp), cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp, ignore_errors=True)
            return None, f"timed out after {timeout} s"
        try:
            if proc.returncode != 0 or not os.path.exists(result_file):
                return None, failure_reason(proc.stderr, proc.returncode)
            with open(result_file) as fh:
                result = json.load(fh)
            result["wall_s"] = time.monotonic() - t0
            return result, check_config(config, result)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def check_config(config, result):
    """The runner reports what was active; a configuration that did not take effect is a
    failure, not a figure."""
    state = result["config"]
    if config == "memguard" and not (state["memguard_loaded"] and state["memguard_blackbox"]
                                     and state["switch_interval_s"] <= 0.001):
        return f"memguard not fully active in the runner: {state}"
    if config == "tracemalloc" and state["tracemalloc_frames"] != 1:
        return f"tracemalloc not tracing 1 frame: {state}"
    if config != "memguard" and state["memguard_loaded"]:
        return "memguard loaded where it should not be"
    return None


def geomean(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def fmt_ratio(v):
    return "n/a" if v is None else f"{v:.2f}"


def print_table(rows, geo, configs, value_label, plain_label):
    ratio_configs = [c for c in configs if c != "plain"]
    width = max(len(c) for c in ratio_configs + ["pandas_groupby"])
    head = f"{'workload':<17} {'group':<6} {plain_label:>9} " + " ".join(
        f"{short(c):>{min(width, 11)}}" for c in ratio_configs)
    print(head)
    print("-" * len(head))
    for row in rows:
        base = row.get(value_label)
        base_txt = "n/a" if base is None else (f"{base:.3f}" if isinstance(base, float)
                                               else f"{base:,}")
        print(f"{row['name']:<17} {row['group']:<6} {base_txt:>9} " + " ".join(
            f"{fmt_ratio(row['ratio'].get(c)):>{min(width, 11)}}" for c in ratio_configs))
    for group in ("python", "numpy"):
        if group in geo:
            print(f"{'geomean':<17} {group:<6} {'':>9} " + " ".join(
                f"{fmt_ratio(geo[group].get(c)):>{min(width, 11)}}" for c in ratio_configs))
    by_config = {}
    for row in rows:
        for c, why in sorted(row.get("na", {}).items()):
            by_config.setdefault((c, why), []).append(row["name"])
    reasons = {}
    for (c, why), names in by_config.items():
        reasons.setdefault((why, tuple(names)), []).append(c)
    for (why, names), cs in reasons.items():
        where = "all workloads" if len(names) == len(rows) else ", ".join(names)
        print(f"  n/a {', '.join(cs)} ({where}): {why}")


def print_intervals(rows):
    """--paired: each workload's 95 % interval of its median ratio (paired_stats.median_ci),
    and, for a native workload, its verdict against the per-workload target."""
    print("95 % interval of the median (bootstrap over runner pairs and their pairs):")
    for row in rows:
        ci = row.get("median_ci95")
        if ci is None:
            continue
        judged = (f"   {paired_stats.verdict(ci, TARGETS['native_max'])} "
                  f"(target {TARGETS['native_max']})" if row["group"] == "native" else "")
        print(f"  {row['name']:<17} {ci[0]:.3f}-{ci[1]:.3f}{judged}")


def short(config):
    return {"memray_python_allocators": "memray+pyal", "numpy_imported": "+numpy"}.get(
        config, config)


def timed_bench(args, workloads, configs, bench):
    reps = {c: (args.reps if c in ("plain", "memguard", "numpy_imported") else
                args.reps_tracemalloc if c == "tracemalloc" else args.reps_peers)
            for c in configs}
    times = {(w, c): [] for w in workloads for c in configs}
    walls = {c: 0.0 for c in configs}
    na = {}
    for c in configs:
        why = unavailable_reason(c)
        if why:
            for w in workloads:
                na[(w, c)] = why
    if args.quick:
        for c in configs:
            if "notebook" in workloads and c not in QUICK_NOTEBOOK_CONFIGS:
                na.setdefault(("notebook", c), "not run with --quick (the full run has it)")
    if "numpy_imported" in configs:
        for w in workloads:
            if overhead_workloads.group(w) == "numpy":
                na[(w, "numpy_imported")] = "not run: the numpy workloads import numpy"
    rounds = max(reps.values())
    total = sum(reps[c] for w in workloads for c in configs if (w, c) not in na)
    done = 0
    t_start = time.monotonic()
    order = random.Random(6)  # seeded: the same schedule every time
    for r in range(rounds):
        ws = order.sample(workloads, len(workloads))
        for w in ws:
            # A fresh order per workload and round: a run can be sped up or slowed down by
            # the process before it (the pages and huge pages it just gave back), so no
            # configuration may always follow the same one.
            for c in order.sample(configs, len(configs)):
                if r >= reps[c] or (w, c) in na:
                    continue
                result, why = bench.run(c, [w])
                done += 1
                if why:
                    na[(w, c)] = why
                    print(f"[bench] {w} / {c}: n/a ({why})", flush=True)
                    continue
                times[(w, c)].append(result["seconds"][w])
                walls[c] += result["wall_s"]
        print(f"[bench] round {r + 1}/{rounds} done ({done}/{total} runs, "
              f"{time.monotonic() - t_start:.0f} s)", flush=True)
    rows = []
    for w in workloads:
        med = {c: statistics.median(times[(w, c)]) if times[(w, c)] and (w, c) not in na
               else None for c in configs}
        plain = med.get("plain")
        ratio = {c: (med[c] / plain if med[c] is not None and plain else None)
                 for c in configs if c != "plain"}
        best = {c: min(times[(w, c)]) if times[(w, c)] and (w, c) not in na else None
                for c in configs}
        ratio_min = {c: (best[c] / best["plain"] if best[c] is not None and best["plain"]
                         else None) for c in configs if c != "plain"}
        rows.append({"name": w, "group": overhead_workloads.group(w), "ratio": ratio,
                     "ratio_of_minima": ratio_min, "seconds": med, "plain_s": plain,
                     "runs": {c: times[(w, c)] for c in configs},
                     "na": {c: na[(w, c)] for c in configs if (w, c) in na}})
    return rows, reps, {c: round(v, 1) for c, v in walls.items()}


def summarize(rows, configs):
    geo = {}
    for group in ("python", "numpy"):
        grows = [r for r in rows if r["group"] == group]
        if grows:
            geo[group] = {c: geomean([r["ratio"].get(c) for r in grows])
                          for c in configs if c != "plain"}
    return geo


def targets(rows, geo, rss):
    out = {}
    py = [r["ratio"].get("memguard") for r in rows if r["group"] == "python"]
    py = [v for v in py if v is not None]
    if "python" in geo and geo["python"].get("memguard") is not None:
        out["python_geomean"] = {"value": geo["python"]["memguard"],
                                 "target": TARGETS["python_geomean"],
                                 "met": geo["python"]["memguard"] <= TARGETS["python_geomean"]}
    if py:
        worst = max((r for r in rows if r["group"] == "python"
                     and r["ratio"].get("memguard") is not None),
                    key=lambda r: r["ratio"]["memguard"])
        out["python_max"] = {"value": worst["ratio"]["memguard"], "workload": worst["name"],
                             "target": TARGETS["python_max"],
                             "met": worst["ratio"]["memguard"] <= TARGETS["python_max"]}
    if "numpy" in geo and geo["numpy"].get("memguard") is not None:
        out["numpy_geomean"] = {"value": geo["numpy"]["memguard"],
                                "target": TARGETS["numpy_geomean"],
                                "met": geo["numpy"]["memguard"] <= TARGETS["numpy_geomean"]}
    native = [r for r in rows if r["group"] == "native" and r["ratio"].get("memguard") is not None]
    if native:
        worst = max(native, key=lambda r: r["ratio"]["memguard"])
        out["native_max"] = {"value": worst["ratio"]["memguard"], "workload": worst["name"],
                             "target": TARGETS["native_max"],
                             "met": worst["ratio"]["memguard"] <= TARGETS["native_max"]}
    if rss is not None:
        out["memguard_rss_bytes"] = {"value": rss, "target": TARGETS["memguard_rss_bytes"],
                                     "met": rss <= TARGETS["memguard_rss_bytes"]}
    return out


# --- paired: plain and memguard side by side, in lockstep ----------------------------------

class Server:
    """A runner in ``--serve`` mode (bench/overhead_runner.py) for ``config``."""

    def __init__(self, bench, config, workloads):
        self.config = config
        self.tmp = tempfile.mkdtemp(dir=bench.base, prefix=f"{config}-")
        self.result_file = os.path.join(self.tmp, "result.json")
        read_fd, write_fd = os.pipe()
        rest = ["--workloads", ",".join(workloads), "--scale", bench.scale, "--result",
                self.result_file, "--serve", "--reply-fd", str(write_fd)]
        # stderr to a file: memguard's alerts go there outside a kernel, and a pipe nobody
        # reads until the end would fill and stop the runner.
        self.stderr = open(os.path.join(self.tmp, "stderr"), "w+")
        self.proc = subprocess.Popen(CONFIGS[config][2](self.tmp, rest), env=bench.env(self.tmp),
                                     cwd=self.tmp, stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     text=True, pass_fds=(write_fd,))
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)

    def run(self, workload):
        """Seconds of one run of ``workload``'s bodies; RuntimeError when it failed (then
        ``alive()`` tells whether the runner can still serve another workload)."""
        try:
            self.proc.stdin.write(f"run {workload}\n")
            self.proc.stdin.flush()
            line = self.replies.readline()
        except OSError:  # the runner is gone: its stdin is a broken pipe
            line = ""
        if not line:
            self.proc.wait(timeout=RUN_TIMEOUT)
            raise RuntimeError(failure_reason(self._stderr(), self.proc.returncode))
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["seconds"]

    def alive(self):
        return self.proc.poll() is None

    def finish(self):
        """Stop the runner; its failure reason, or None when memguard (or plain) was what
        ran (check_config)."""
        try:
            if self.alive():
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            rc = self.proc.wait(timeout=RUN_TIMEOUT)
            if rc != 0 or not os.path.exists(self.result_file):
                return failure_reason(self._stderr(), rc)
            with open(self.result_file) as fh:
                return check_config(self.config, json.load(fh))
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            self.proc.kill()
            return f"{type(exc).__name__}: {exc}"
        finally:
            self.replies.close()
            self.stderr.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _stderr(self):
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()


def paired_group(args, group, bench):
    """One pair of runners for the workloads ``group``: ``args.reps`` pairs of runs of each,
    after a warm-up run. Returns ``(times, ratios, na)``: ``times[(w, config)]`` the run
    times (seconds), ``ratios[w]`` the pairs' memguard / plain ratios, ``na[w]`` why a
    workload has no figure (it failed, or a runner died)."""
    times = {(w, c): [] for w in group for c in ("plain", "memguard")}
    ratios = {w: [] for w in group}
    na = {}
    servers = {}
    try:
        for c in ("plain", "memguard"):
            servers[c] = Server(bench, c, group)
        for w in group:
            try:
                for c in servers:
                    servers[c].run(w)  # warm-up, not counted
                for i in range(args.reps):
                    order = ("plain", "memguard") if i % 2 == 0 else ("memguard", "plain")
                    got = {c: servers[c].run(w) for c in order}
                    for c in order:
                        times[(w, c)].append(got[c])
                    ratios[w].append(got["memguard"] / got["plain"])
            except RuntimeError as exc:
                na[w] = str(exc)
                print(f"[bench] {w}: n/a ({exc})", flush=True)
                if not all(s.alive() for s in servers.values()):
                    break  # a runner that died serves nothing more
    finally:
        why = {c: s.finish() for c, s in servers.items()}
    for c, reason in why.items():
        if reason:
            for w in group:
                na.setdefault(w, f"{c}: {reason}")
    return times, ratios, na


def runner_groups(workloads):
    """The workloads that share a pair of runners in ``--paired``: the Python and NumPy
    workloads together, each native workload in runners of its own. Native libraries keep
    process-wide state that ``%reset -f`` does not free (Arrow's memory pool, torch's
    OpenMP threads, the mappings memguard records): measured 2026-12-04, sqlite_insert run
    after arrow_compute, polars_groupby and torch_cpu in the same runners took 0.445-0.513 s
    in plain runners and 0.453-0.458 s in memguard's, so its runner pairs' medians ranged
    0.947-1.105 (six pairs of runners, 2026-12-03); alone in its runners, 1.013-1.043
    (eight pairs)."""
    shared = [w for w in workloads if overhead_workloads.group(w) != "native"]
    return ([shared] if shared else []) + [[w] for w in workloads if w not in shared]


def paired_bench(args, workloads, bench):
    """``--paired``: one plain and one memguard runner stay up side by side, and each run of
    a workload's bodies in one is followed at once by a run in the other, in the order AB,
    BA, AB, ... Each pair gives a ratio (memguard / plain), and a workload's figure is the
    median of its pairs' ratios. On these shared machines the speed of the CPU drifts by up
    to 13 % within minutes but little between neighbouring runs (successive runs of a fixed
    loop correlate at 0.86, and the ratio of two neighbours varies by 2.6 %, against 4.9 %
    for single runs: measured 2026-12-02), so neighbours cancel what separate processes
    minutes apart cannot. Two processes of the same configuration still differ by up to
    3 % in the median of their pairs (their memory layouts differ: plain against plain,
    2026-12-02), so the pairs come from ``--runner-pairs`` pairs of runners, pooled; each
    group of ``runner_groups`` gets pairs of runners of its own. The first run of each
    workload in each runner warms it up and is not counted, so the figure is the steady
    state of a cell run again, with the setup's objects in place."""
    times = {(w, c): [] for w in workloads for c in ("plain", "memguard")}
    by_runner_pair = {w: [] for w in workloads}  # one list of pair ratios per runner pair
    na = {}
    t_start = time.monotonic()
    for k in range(args.runner_pairs):
        for group in runner_groups(workloads):
            group = [w for w in group if w not in na]  # failed in an earlier pair: skipped
            if not group:
                continue
            g_times, g_ratios, g_na = paired_group(args, group, bench)
            for key, runs in g_times.items():
                times[key].extend(runs)
            for w in group:
                by_runner_pair[w].append(g_ratios[w])
            na.update(g_na)
        print(f"[bench] runner pair {k + 1}/{args.runner_pairs} done "
              f"({time.monotonic() - t_start:.0f} s)", flush=True)
    ratios = {w: [r for pair in by_runner_pair[w] for r in pair] for w in workloads}
    for w in workloads:
        if w not in na and len(ratios[w]) != args.reps * args.runner_pairs:
            na[w] = "a runner died before this workload's pairs were done"
    rows = []
    for w in workloads:
        done = w not in na
        rows.append({"name": w, "group": overhead_workloads.group(w),
                     "ratio": {"memguard": statistics.median(ratios[w]) if done else None},
                     "pair_ratios": ratios[w],
                     "median_ci95": paired_stats.median_ci(by_runner_pair[w]) if done else None,
                     "plain_s": statistics.median(times[(w, "plain")]) if done else None,
                     "runs": {c: times[(w, c)] for c in ("plain", "memguard")},
                     "na": {"memguard": na[w]} if w in na else {}})
    return rows


# --- memguard's own memory in a real kernel -----------------------------------------------

def kernel_rss(with_memguard, cells, base):
    """Start a kernel, optionally %load_ext memguard, read VmRSS, run ``cells``, read VmRSS
    again. Returns (idle_rss, after_rss) in bytes."""
    from jupyter_client.manager import start_new_kernel

    tmp = tempfile.mkdtemp(dir=base, prefix="kernel-")
    env = dict(os.environ, MEMGUARD_DIR=os.path.join(tmp, "box"), MPLBACKEND="Agg")
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60, env=env, cwd=tmp,
                              stderr=subprocess.DEVNULL)
    try:
        def execute(code):
            errors = []

            def hook(msg):
                if msg["msg_type"] == "error":
                    errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")
            reply = kc.execute_interactive(code, timeout=300, output_hook=hook,
                                           store_history=True)
            if reply["content"]["status"] != "ok" or errors:
                raise RuntimeError(f"kernel cell failed: {errors or reply['content']}")

        pid_file = os.path.join(tmp, "pid")
        execute(f"import os as _o; open({pid_file!r}, 'w').write(str(_o.getpid()))")
        with open(pid_file) as fh:
            pid = int(fh.read())
        execute("%load_ext memguard" if with_memguard else "pass")
        time.sleep(0.5)
        idle = vm_rss(pid)
        for cell in cells:
            execute(cell)
        time.sleep(0.5)  # the monitor's and relay's last wake-ups
        after = vm_rss(pid)
        return idle, after
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        shutil.rmtree(tmp, ignore_errors=True)


def vm_rss(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def rss_bench(reps, base):
    cells = overhead_workloads.notebook_cells()
    pairs = []
    for r in range(reps):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {}
        for with_mg in order:
            got[with_mg] = kernel_rss(with_mg, cells, base)
        pairs.append({"plain_idle": got[False][0], "plain_after": got[False][1],
                      "memguard_idle": got[True][0], "memguard_after": got[True][1]})
        print(f"[bench] rss pair {r + 1}/{reps}: memguard - plain = "
              f"{(got[True][1] - got[False][1]) / MiB:+.1f} MiB after the notebook, "
              f"{(got[True][0] - got[False][0]) / MiB:+.1f} MiB idle", flush=True)
    after = int(statistics.median(p["memguard_after"] - p["plain_after"] for p in pairs))
    idle = int(statistics.median(p["memguard_idle"] - p["plain_idle"] for p in pairs))
    return after, {"after_notebook_bytes": after, "idle_bytes": idle, "pairs": pairs}


# --- instruction counts under callgrind ---------------------------------------------------

def callgrind_totals(tmp, pid):
    """Ir of each dump part of process ``pid`` in ``tmp``, ordered by part number (the
    runner's workloads, in order). Parts with no instructions (the final dump at exit,
    with collection off) are dropped."""
    parts = []
    for name in os.listdir(tmp):
        m = re.fullmatch(rf"cg\.{pid}(?:\.(\d+))?", name)
        if not m:
            continue
        total = None
        with open(os.path.join(tmp, name), errors="replace") as fh:
            for line in fh:
                if line.startswith(("totals:", "summary:")):
                    total = int(line.split()[1])
                    if line.startswith("totals:"):
                        break
        if total:
            parts.append((int(m.group(1) or 1_000_000), total))
    return [t for _n, t in sorted(parts)]


def callgrind_bench(args, configs, bench):
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    workloads = args.workload or CALLGRIND_WORKLOADS
    counts, na = {}, {}

    def one(c):
        why = unavailable_reason(c)
        if why:
            return c, None, why
        out_dir = tempfile.mkdtemp(dir=bench.base, prefix=f"cg-{c}-")
        wrapper = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                   "--collect-atstart=no", "--toggle-collect=*closure_fcn",
                   "--dump-after=*closure_fcn", "--dump-instr=no",
                   f"--callgrind-out-file={out_dir}/cg.%p"]
        t0 = time.monotonic()
        try:
            result, why = bench.run(c, workloads, extra=["--callgrind"], wrapper=wrapper,
                                    scale="callgrind", timeout=3600)
            totals = None if why else callgrind_totals(out_dir, result["pid"])
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        if totals is not None and len(totals) != len(workloads):
            why = f"expected {len(workloads)} callgrind dumps from the runner, found {len(totals)}"
        route = (result or {}).get("config", {}).get("memguard_numpy_route")
        print(f"[bench] callgrind {c}: {time.monotonic() - t0:.0f} s"
              + (f", NumPy route at load and at the end: {route}" if route else "")
              + (f", n/a ({why})" if why else ""), flush=True)
        return c, (None if why else dict(zip(workloads, totals))), why

    # Instruction counts do not depend on what else runs, so one process per core.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for c, got, why in pool.map(one, configs):
            if why:
                na[c] = why
            else:
                counts[c] = got
    rows = []
    for w in workloads:
        plain = counts.get("plain", {}).get(w)
        ratio = {c: (counts[c][w] / plain if c in counts and plain else None)
                 for c in configs if c != "plain"}
        rows.append({"name": w, "group": overhead_workloads.group(w), "ratio": ratio,
                     "instructions": {c: counts[c][w] for c in counts}, "plain_ir": plain,
                     "na": {c: na[c] for c in configs if c in na}})
    return rows


# --- main ----------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller inputs and fewer rounds (under 3 minutes), same output")
    parser.add_argument("--reps", "--runs", type=int, default=None,
                        help="rounds for plain, memguard and numpy_imported (default 6, "
                             "quick 3; --runs is "
                             "the same, so one BENCH_ARGS serves every benchmark)")
    parser.add_argument("--reps-tracemalloc", type=int, default=None,
                        help="rounds for tracemalloc (default 2, quick 1)")
    parser.add_argument("--reps-peers", type=int, default=None,
                        help="rounds for each peer (default 2, quick 1)")
    parser.add_argument("--workload", action="append",
                        choices=overhead_workloads.names(), help="only this workload "
                        "(repeatable; default all)")
    parser.add_argument("--config", action="append", choices=list(CONFIGS),
                        help="only this configuration (repeatable; plain is always run)")
    parser.add_argument("--rss-reps", type=int, default=None,
                        help="kernel pairs for memguard_rss_bytes (default 3, quick 1)")
    parser.add_argument("--no-rss", action="store_true", help="skip the kernel RSS pairs")
    parser.add_argument("--callgrind", action="store_true",
                        help="instruction counts under valgrind instead of timings")
    parser.add_argument("--paired", action="store_true",
                        help="plain and memguard only, in runners side by side: the median "
                             "ratio of neighbouring runs (paired_bench); --reps pairs per "
                             "workload and runner pair (default 8, quick 5)")
    parser.add_argument("--runner-pairs", type=int, default=None,
                        help="with --paired: pairs of runners, pooled (default 3, quick 2)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="callgrind processes at once (default: one per CPU)")
    parser.add_argument("--out", default=None,
                        help="JSON output (default build/bench.json; with --callgrind "
                             "build/bench_callgrind.json)")
    args = parser.parse_args(argv)
    scale = "quick" if args.quick else "full"
    if args.paired and args.callgrind:
        parser.error("--paired times wall clock; --callgrind counts instructions")
    if args.paired:
        args.config = ["memguard"]
        args.reps = args.reps or (5 if args.quick else 8)
        args.runner_pairs = args.runner_pairs or (2 if args.quick else 3)
        if args.reps < 1 or args.runner_pairs < 1:
            parser.error("--reps and --runner-pairs must be at least 1")
    args.reps = args.reps or (3 if args.quick else 6)
    args.reps_tracemalloc = args.reps_tracemalloc or (1 if args.quick else 2)
    args.reps_peers = args.reps_peers or (1 if args.quick else 2)
    rss_reps = args.rss_reps or (1 if args.quick else 3)
    configs = ["plain"] + [c for c in CONFIGS if c != "plain"
                           and (not args.config or c in args.config)]
    out = args.out or os.path.join(ROOT, "build", "bench_callgrind.json" if args.callgrind
                                   else "bench.json")

    started = time.monotonic()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"[bench] note: load average {load_before[0]:.2f} before starting: other work "
              f"on this machine's {os.cpu_count()} CPUs will show in the figures", flush=True)
    busy = [ln for ln in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                        text=True).stdout.splitlines()
            if "pytest" in ln and "overhead" not in ln]
    if busy:
        print(f"[bench] note: a pytest run is going on ({busy[0][:60]}...): figures taken "
              f"under load", flush=True)
    bench = Bench(scale)
    doc = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine(), "versions": tool_versions(),
           "configs": {c: {"command": CONFIGS[c][1], "na": unavailable_reason(c)}
                       for c in configs}}
    try:
        if args.callgrind:
            rows = callgrind_bench(args, configs, bench)
            geo = summarize(rows, configs)
            print_table(rows, geo, configs, "plain_ir", "plain Ir")
            doc.update(mode="callgrind", unit="instruction-count ratio to plain (Ir, main "
                       "thread, body cells only)", workloads=rows, geomean=geo)
        else:
            workloads = args.workload or (QUICK_WORKLOADS if args.quick
                                          else overhead_workloads.names())
            if args.paired:
                rows, reps, walls = paired_bench(args, workloads, bench), None, None
            else:
                rows, reps, walls = timed_bench(args, workloads, configs, bench)
            geo = summarize(rows, configs)
            rss, rss_detail = (None, None)
            if not args.no_rss:
                try:
                    rss, rss_detail = rss_bench(rss_reps, bench.base)
                except Exception as exc:  # a kernel that cannot start: report, go on
                    rss_detail = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"[bench] memguard_rss_bytes: n/a ({rss_detail['error']})")
            print()
            if args.paired:
                print(f"ratio to plain Python, median of {args.reps * args.runner_pairs} "
                      f"neighbouring pairs' ratios ({args.runner_pairs} pairs of runners, "
                      "--paired); plain s = median seconds of the body cells")
            else:
                print("ratio to plain Python, median of " + ", ".join(
                    f"{n} runs {c}" for c, n in reps.items()) + "; plain s = median seconds "
                    "of the body cells")
            print_table(rows, geo, configs, "plain_s", "plain s")
            if args.paired:
                print_intervals(rows)
            if rss is not None:
                print(f"memguard_rss_bytes: {rss:,} ({rss / MiB:+.1f} MiB after the notebook;"
                      f" {rss_detail['idle_bytes'] / MiB:+.1f} MiB right after loading)")
            unit = ("wall-time ratio to plain (median of the ratios of neighbouring runs "
                    "in two runners side by side, after one warm-up run)" if args.paired else
                    "wall-time ratio to plain (median seconds of the body cells)")
            doc.update(mode=scale + ("-paired" if args.paired else ""), unit=unit,
                       reps=reps or {"pairs": args.reps, "runner_pairs": args.runner_pairs}, process_wall_s=walls, workloads=rows, geomean=geo,
                       memguard_rss_bytes=rss, rss=rss_detail)
            doc["targets"] = targets(rows, geo, rss)
            for name, t in doc["targets"].items():
                where = f" ({t['workload']})" if "workload" in t else ""
                value = (f"{t['value'] / MiB:.1f} MiB" if name == "memguard_rss_bytes"
                         else f"{t['value']:.3f}")
                print(f"target {name}: {value}{where} vs {t['target'] if name != 'memguard_rss_bytes' else '8 MiB'}"
                      f" -> {'met' if t['met'] else 'MISSED'}")
    finally:
        bench.cleanup()
    doc["loadavg_before"] = load_before
    doc["loadavg_after"] = os.getloadavg()
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"[bench] {doc['elapsed_s']:.0f} s; written to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
