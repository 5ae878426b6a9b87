#!/usr/bin/env python3
"""What memguard's kernel launcher (jupyter_ext/memguard/launcher.py) costs IOPub traffic.

Two kernels run the same cells, both with memguard loaded: one from the plain ``python3``
kernelspec (``%load_ext memguard``), one from the launcher kernelspec that ``python -m
memguard install --kernelspec`` writes (into a temporary prefix), whose IOPub messages all
pass through the launcher. The cell prints 10,000 lines, flushing each, so each is its own
IOPub ``stream`` message carrying the kernel's ``time.time()``:

- **cell time**: the client's arrival time of the cell's ``idle`` minus that of its
  ``busy`` (ms), median over the runs; target: launcher / plain <= 1.05;
- **IOPub latency** of each stream message of a paced cell (``--paced`` lines, 5 ms apart,
  so that no backlog builds up in the client, which deserialises and checks every message
  in Python and is the slowest part of a 10,000-message flood): client ``time.time()`` on
  arrival minus the stamp in the text (ms), p99 over every message of every run; target:
  launcher p99 minus plain p99 <= 1 ms.

Runs alternate between the two kernels. Usage: ``make bench-launcher`` or
``.venv/bin/python bench/launcher_cost.py [--runs N] [--lines N] [--out FILE]``.
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
CELL = "import time\nfor _i in range({n}):\n    print(time.time(), flush=True)\n"
PACED = ("import time\nfor _i in range({n}):\n    print(time.time(), flush=True)\n"
         "    time.sleep(0.005)\n")


def pct(values, q):
    vals = sorted(values)
    pos = (len(vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def start(name, ksm):
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=90)
    return km, kc


def run_cell(kc, code, timeout=300):
    """(busy arrival, idle arrival, [latency ms of each stream line])"""
    msg_id = kc.execute(code)
    busy = idle = None
    lat = []
    deadline = time.monotonic() + timeout
    while idle is None:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError("cell timed out")
            continue
        now_m, now_w = time.monotonic(), time.time()
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status":
            if msg["content"]["execution_state"] == "busy":
                busy = now_m
            elif msg["content"]["execution_state"] == "idle":
                idle = now_m
        elif msg["msg_type"] == "stream":
            for line in msg["content"]["text"].split():
                try:
                    lat.append((now_w - float(line)) * 1e3)
                except ValueError:
                    pass
    while kc.get_shell_msg(timeout=timeout)["parent_header"].get("msg_id") != msg_id:
        pass  # a reply to an earlier request
    return busy, idle, lat


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--paced", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "launcher_cost.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as prefix:
        subprocess.run([sys.executable, "-m", "memguard", "install", "--kernelspec",
                        "bench-launcher", "--prefix", prefix], check=True, capture_output=True)
        ksm = KernelSpecManager(kernel_dirs=[os.path.join(prefix, "share/jupyter/kernels")]
                                + KernelSpecManager().kernel_dirs)
        kernels = {"plain": start("python3", ksm), "launcher": start("bench-launcher", ksm)}
        try:
            run_cell(kernels["plain"][1], "%load_ext memguard")
            cell = CELL.format(n=args.lines)
            times = {k: [] for k in kernels}
            lats = {k: [] for k in kernels}
            for k in kernels:  # warm-up
                run_cell(kernels[k][1], cell)
            for _ in range(args.runs):
                for k in kernels:
                    busy, idle, lat = run_cell(kernels[k][1], cell)
                    times[k].append((idle - busy) * 1e3)
                    if len(lat) != args.lines:
                        print(f"[bench] {k}: {len(lat)} of {args.lines} lines", file=sys.stderr)
                    lats[k].extend(run_cell(kernels[k][1], PACED.format(n=args.paced))[2])
        finally:
            for km, kc in kernels.values():
                kc.stop_channels()
                km.shutdown_kernel(now=False)
    cell_ms = {k: pct(v, 50) for k, v in times.items()}
    p99 = {k: pct(v, 99) for k, v in lats.items()}
    p50 = {k: pct(v, 50) for k, v in lats.items()}
    ratio = cell_ms["launcher"] / cell_ms["plain"]
    added = p99["launcher"] - p99["plain"]
    print(f"{args.lines:,} stream messages per cell (cell time), {args.paced} paced ones "
          f"(IOPub latency), {args.runs} runs each (ms)")
    print(f"{'kernel':<9} {'cell p50':>9} {'iopub p50':>10} {'iopub p99':>10}")
    for k in kernels:
        print(f"{k:<9} {cell_ms[k]:9.1f} {p50[k]:10.2f} {p99[k]:10.2f}")
    print(f"cell time launcher/plain {ratio:.3f} (target <= 1.05: "
          f"{'ok' if ratio <= 1.05 else 'MISSED'}); added p99 IOPub latency {added:+.2f} ms "
          f"(target <= 1: {'ok' if added <= 1.0 else 'MISSED'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "lines": args.lines, "runs": args.runs,
        "cell_ms": times, "cell_p50_ms": cell_ms, "iopub_p50_ms": p50, "iopub_p99_ms": p99,
        "ratio": ratio, "added_p99_ms": added, "loadavg": os.getloadavg()}, indent=1) + "\n")
    return 0 if ratio <= 1.05 and added <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
