"""What line attribution and the black box cost: memguard with attribution on (default
threshold, 128 KiB) against memguard with attribution off (threshold 2**40 bytes), plain
Python, and memguard as a kernel runs it (``box``: attribution on, the monitor thread
polling every 10 ms and writing the black box every 100 ms).

Run: ``python bench/attribution_overhead.py [--reps N] [--quick]`` (``make bench-attribution``).

Each (workload, configuration) pair runs in a fresh interpreter, the pairs are interleaved,
and each is repeated ``--reps`` times; the table shows median seconds and two ratios:
``on/off`` (the cost of attribution itself), ``on/plain`` (the hooks as a whole) and
``box/on`` (the monitor thread and the black box). Blocks
below the threshold never walk frames, so ``on/off`` should be 1.00 within noise for them;
the ``above`` workloads show what a frame walk per block costs where it does happen.
The workload runs as the module-level code of a script whose globals are registered as the
notebook's (``_core.set_user_globals``), so attribution finds "cell" frames as in a kernel.
Figures are written to ``build/attribution_overhead.json``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

WORKLOADS = {
    # 64 KiB arrays: below the threshold, the common case for small NumPy data.
    "numpy_below_64KiB": """
        for i in range({n}):
            a = np.ones(8192)
            a += 1.0
            del a
    """,
    # Python objects: dicts and lists, pymalloc small blocks (arenas are attributed, one
    # walk per 1 MiB arena).
    "python_objects": """
        for r in range({n} // 100):
            rows = [{{"id": i, "name": str(i), "v": [i, i + 1]}} for i in range(2000)]
            del rows
    """,
    # 1 MiB arrays: above the threshold, one frame walk and one table insert per block.
    "numpy_above_1MiB": """
        for i in range({n} // 10):
            a = np.empty(131072)
            del a
    """,
}
QUICK_N = 20000
FULL_N = 100000

RUNNER = """
import sys, time
import numpy as np  # imported before timing in every mode
mode = sys.argv[1]
if mode != "plain":
    import memguard._core as core
    core.install()
    core.install_numpy()
    core.set_user_globals(globals())
    core.cell_begin(1, 0)
    if mode == "off":
        core.sites_config(threshold=2**40)
    if mode == "box":  # as a kernel runs it: monitor thread (10 ms) and black box (100 ms)
        import os, tempfile
        box_dir = tempfile.mkdtemp(prefix="mg-bench-")
        core.blackbox_open(os.path.join(box_dir, "bench.mgbox"), "bench.json")
        from memguard.relay import load_zmq

        load_zmq(core)
        core.monitor_start("ipc://" + os.path.join(box_dir, "relay"))
t0 = time.perf_counter()
{body}
t1 = time.perf_counter()
if mode == "box":
    import shutil
    core.monitor_stop()
    core.blackbox_close(True)
    shutil.rmtree(box_dir, ignore_errors=True)
print(t1 - t0)
"""


def run_once(workload, mode, n):
    body = textwrap.dedent(WORKLOADS[workload].format(n=n))
    code = RUNNER.format(body=body)
    out = subprocess.run([sys.executable, "-c", code, mode], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", "--runs", type=int, default=7,
                        help="repetitions per pair (default 7; --runs is the same, so one "
                             "BENCH_ARGS serves every benchmark)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, 3 repetitions")
    parser.add_argument("--out", default="build/attribution_overhead.json")
    args = parser.parse_args(argv)
    reps = 3 if args.quick else args.reps
    n = QUICK_N if args.quick else FULL_N
    modes = ("plain", "off", "on", "box")
    times = {(w, m): [] for w in WORKLOADS for m in modes}
    for _ in range(reps):
        for w in WORKLOADS:
            for m in modes:
                times[(w, m)].append(run_once(w, m, n))
    rows = []
    for w in WORKLOADS:
        med = {m: statistics.median(times[(w, m)]) for m in modes}
        rows.append({"workload": w, "seconds": med, "on_over_off": med["on"] / med["off"],
                     "on_over_plain": med["on"] / med["plain"],
                     "box_over_on": med["box"] / med["on"], "reps": reps, "n": n})
    print(f"{'workload':<20} {'plain s':>9} {'off s':>9} {'on s':>9} {'box s':>9} "
          f"{'on/off':>7} {'on/plain':>9} {'box/on':>7}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['workload']:<20} {s['plain']:>9.3f} {s['off']:>9.3f} {s['on']:>9.3f} "
              f"{s['box']:>9.3f} {r['on_over_off']:>7.3f} {r['on_over_plain']:>9.3f} "
              f"{r['box_over_on']:>7.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"workloads": rows, "threshold_bytes": 131072}, fh, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
