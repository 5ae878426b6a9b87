#!/usr/bin/env python3
"""memguard alert latency: from the allocation that crosses a cell's budget to the alert
arriving at a Jupyter client.

What is measured
    A real kernel is started with ``jupyter_client.manager.start_new_kernel(kernel_name=
    "python3")`` (inside the venv this is the venv's Python with memguard installed) and
    ``%load_ext memguard`` is run. Each measured cell starts with ``%%memguard 200MB``, reads
    ``time.clock_gettime(CLOCK_MONOTONIC)`` (t0) and then makes the crossing allocation, a
    400 MB ``np.empty`` (50,000,000 float64), after which the main thread does one of the
    scenario's things for about a second:

    ============  =============================================================================
    python_loop   a pure-Python loop (bytecode; the GIL changes hands every switch interval)
    numpy_sort    ``np.sort`` of 40,000,000 float64 (one thread, GIL released)
    numpy_matmul  ``A @ A`` with A 3,500 x 3,500 float64 (OpenBLAS threads on every core, GIL
                  released)
    sleep         ``time.sleep(1)`` (GIL released, CPU idle)
    scipy_gil     ``scipy.sparse.random(4000, 4000, density=0.01, random_state=
                  np.random.RandomState(0))``: the legacy RandomState's ``choice(replace=
                  False)`` first fills ``np.arange(16 M)`` (GIL released, ~0.05-0.2 s), then
                  shuffles it in C holding the GIL (~0.8 s)
    c_holds_gil   the GIL-holding core of that call without its GIL-free start:
                  ``np.random.RandomState(0).shuffle`` of 16,000,000 int64 (~1 s), entered
                  microseconds after the crossing, so C code holds the GIL throughout
    ============  =============================================================================

    The client (this process, same machine, same CLOCK_MONOTONIC) blocks in
    ``get_iopub_msg`` and stamps each message as it returns. The **latency** of a run is the
    client's stamp of the first IOPub ``display_data`` parented to that cell whose
    ``application/vnd.memguard.alert+json`` has ``kind == "budget"``, minus t0. It is split
    into **publish** (t0 to the alert message's header ``date``, stamped when memguard's relay
    thread calls ``session.send``; wall clock, compared with ``time.time()`` read next to t0)
    and **delivery** (the rest: serialising and signing, the kernel's IOPub thread, ZeroMQ,
    deserialising in the client).
    The alert's ``line`` is checked against the line of the crossing allocation.

    Every run waits for its cell's ``execute_reply`` (and IOPub ``idle``) before the next one
    starts, and deletes its arrays so the memory returns. One warm-up run per scenario is not
    counted. An alert that has not arrived when the cell is idle is waited for a little
    longer and counted as ``late``; one that never comes is counted as ``missing``.

Units
    Milliseconds in the table and in the JSON (``*_ms``); p50/p99 are percentiles with
    linear interpolation (with 20 runs p99 is essentially the maximum).

Target (docs/design.md, "Alert latency")
    p99 <= 50 ms wherever the GIL is released or Python bytecode runs (the first four
    scenarios). Where C code holds the GIL (``scipy_gil``, ``c_holds_gil``) a Python relay
    has to wait for it: those figures are measured and reported, not held to the target.

How to run
    make bench-latency                      # or `make bench` (all benchmarks)
    .venv/bin/python bench/alert_latency.py [--runs N] [--quick] [--scenario NAME]...
                                            [--warmup N] [--out build/alert_latency.json]

    Prints a table and writes the figures (per run and summarised) to
    ``build/alert_latency.json``. A full run (6 scenarios x 21 cells) takes about 3 minutes
    on 2 cores; ``--quick`` does 5 runs per scenario (under a minute). The kernel's peak is
    about 1.3 GB (550 MB of inputs, at most 720 MB per cell). Other load on the machine shows
    in the figures: the load average before and after is recorded.

    Exit status 0 when every run produced its alert (late or not), 1 when an alert was
    missing or a cell failed, whatever the latencies (they are reported, not enforced).
"""

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

ROOT = Path(__file__).resolve().parent.parent
MIME = "application/vnd.memguard.alert+json"
BUDGET = "200MB"
TARGET_MS = 50.0
CELL_TIMEOUT = 120.0  # s, one measured cell
LATE_WAIT = 3.0  # s, how long to keep listening for an alert after the cell is idle


def mono():
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# Run once after %load_ext memguard (no budget): imports and the scenarios' input data
# (~550 MB), so the measured cells allocate only what they are about.
SETUP = """\
import json as _b_json, sys as _b_sys, time as _b_time_mod, os as _b_os
import numpy as _b_np, scipy, scipy.sparse as _b_sp
import memguard as _b_mg
_b_clock = _b_time_mod.clock_gettime
_b_MONO = _b_time_mod.CLOCK_MONOTONIC
_b_time = _b_time_mod.time
_b_sortdata = _b_np.random.default_rng(0).random(40_000_000)
_b_A = _b_np.random.default_rng(1).random((3500, 3500))
_b_perm = _b_np.arange(16_000_000)
print(_b_json.dumps({"executable": _b_sys.executable, "python": _b_sys.version.split()[0],
                     "memguard": _b_mg.__version__, "numpy": _b_np.__version__,
                     "scipy": scipy.__version__, "switch_interval_s": _b_sys.getswitchinterval(),
                     "cpus": _b_os.cpu_count()}))
"""

# Lines 1-3 are fixed: the crossing allocation is on CROSS_LINE.
CELL_HEAD = f"""\
%%memguard {BUDGET}
_b_t0 = _b_clock(_b_MONO); _b_w0 = _b_time()
_b_x = _b_np.empty(50_000_000)  # 400 MB: crosses the {BUDGET} budget
"""
CROSS_LINE = 3
CELL_TAIL = """\
_b_t1 = _b_clock(_b_MONO)
del _b_x{dels}
print(_b_json.dumps({{"t0": _b_t0, "w0": _b_w0, "t1": _b_t1}}))
"""

# name -> (what the main thread does after crossing, the GIL meanwhile, whether the 50 ms
# target applies, body, extra names to delete)
SCENARIOS = {
    "python_loop": (
        "pure-Python loop, 1 s", "bytecode", True,
        "_b_end = _b_t0 + 1.0\n_b_k = 0\nwhile _b_clock(_b_MONO) < _b_end:\n    _b_k += 1\n",
        ["_b_end", "_b_k"]),
    "numpy_sort": (
        "np.sort, 40 M float64", "released", True,
        "_b_y = _b_np.sort(_b_sortdata)\n", ["_b_y"]),
    "numpy_matmul": (
        "A @ A, 3500^2 (BLAS threads)", "released", True,
        "_b_y = _b_A @ _b_A\n", ["_b_y"]),
    "sleep": (
        "time.sleep(1)", "released", True,
        "_b_time_mod.sleep(1.0)\n", []),
    # The scipy case. Its first ~0.05-0.2 s (np.arange of the 16 M candidate indices
    # inside RandomState.choice) runs without the GIL; the ~0.8 s shuffle after it holds it.
    "scipy_gil": (
        "sp.random(4000^2, RandomState)", "free,held", False,
        "_b_y = _b_sp.random(4000, 4000, density=0.01, format='csr',\n"
        "                    random_state=_b_np.random.RandomState(0))\n", ["_b_y"]),
    # The GIL-holding core of that call with no GIL-free lead-in: C code holds the GIL from
    # the crossing on (legacy RandomState.shuffle of 16 M int64, ~1 s).
    "c_holds_gil": (
        "RandomState.shuffle, 16 M int64", "held by C", False,
        "_b_np.random.RandomState(0).shuffle(_b_perm)\n", []),
}


def cell_source(name):
    _what, _gil, _target, body, extra = SCENARIOS[name]
    dels = "".join(", " + n for n in extra)
    return CELL_HEAD + body + CELL_TAIL.format(dels=dels)


class CellFailed(RuntimeError):
    pass


class _Skip(Exception):
    """Only the launcher row was asked for."""


def execute(kc, code, timeout=CELL_TIMEOUT):
    """Run ``code``, wait for IOPub idle and the execute_reply; return what was seen.

    Client-side CLOCK_MONOTONIC stamps are taken as soon as ``get_iopub_msg`` returns.
    """
    msg_id = kc.execute(code)
    deadline = mono() + timeout
    out = {"stdout": "", "stderr": "", "alert": None, "alert_recv": None, "alert_header_date": None,
           "alert_msg_type": None, "budget_messages": 0, "other_alerts": [], "error": None,
           "late": False}

    def on_iopub(msg, recv):
        mtype = msg["msg_type"]
        content = msg["content"]
        if mtype == "stream":
            out[content["name"]] = out.get(content["name"], "") + content["text"]
        elif mtype == "error":
            out["error"] = f"{content['ename']}: {content['evalue']}"
        elif mtype in ("display_data", "update_display_data"):
            alert = content.get("data", {}).get(MIME)
            if alert is None:
                return
            if alert.get("kind") != "budget":
                out["other_alerts"].append(alert.get("kind"))
                return
            out["budget_messages"] += 1
            if out["alert"] is None:
                out["alert"] = alert
                out["alert_recv"] = recv
                out["alert_msg_type"] = mtype
                date = msg["header"].get("date")
                out["alert_header_date"] = date.timestamp() if hasattr(date, "timestamp") else None

    idle = False
    while not idle:
        remaining = deadline - mono()
        if remaining <= 0:
            raise CellFailed(f"no idle within {timeout:.0f} s")
        try:
            msg = kc.get_iopub_msg(timeout=remaining)
        except queue.Empty:
            continue
        recv = mono()
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        on_iopub(msg, recv)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    while True:
        remaining = deadline - mono()
        if remaining <= 0:
            raise CellFailed(f"no execute_reply within {timeout:.0f} s")
        try:
            reply = kc.get_shell_msg(timeout=remaining)
        except queue.Empty:
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    out["reply_recv"] = mono()
    out["status"] = reply["content"]["status"]
    if out["status"] != "ok" and out["error"] is None:
        out["error"] = f"{reply['content'].get('ename')}: {reply['content'].get('evalue')}"
    if out["alert"] is None:  # not (yet): an alert may still come once the kernel can send it
        until = mono() + LATE_WAIT
        while out["alert"] is None and mono() < until:
            try:
                msg = kc.get_iopub_msg(timeout=max(0.0, until - mono()))
            except queue.Empty:
                break
            recv = mono()
            if msg["parent_header"].get("msg_id") == msg_id:
                on_iopub(msg, recv)
        out["late"] = out["alert"] is not None
    return out


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise CellFailed(f"no JSON line in the cell's output: {text!r}")


def measure(kc, name):
    """One run of scenario ``name``: a dict of times (ms) and checks."""
    out = execute(kc, cell_source(name))
    if out["error"] or out["status"] != "ok":
        raise CellFailed(f"{name}: the cell failed: {out['error']}\nstderr: {out['stderr']}")
    stamps = last_json_line(out["stdout"])
    t0, w0, t1 = stamps["t0"], stamps["w0"], stamps["t1"]
    run = {"body_ms": (t1 - t0) * 1e3, "reply_ms": (out["reply_recv"] - t0) * 1e3,
           "late": out["late"], "budget_messages": out["budget_messages"],
           "other_alerts": out["other_alerts"], "stderr": out["stderr"][-500:] or None}
    alert = out["alert"]
    if alert is None:
        run.update(latency_ms=None, publish_ms=None, delivery_ms=None, line=None,
                   line_ok=False, before_body_end=False, missing=True)
        return run
    latency = (out["alert_recv"] - t0) * 1e3
    publish = (out["alert_header_date"] - w0) * 1e3 if out["alert_header_date"] else None
    run.update(
        missing=False,
        latency_ms=latency,
        publish_ms=publish,
        delivery_ms=latency - publish if publish is not None else None,
        msg_type=out["alert_msg_type"],
        line=alert.get("line"),
        line_ok=alert.get("line") == CROSS_LINE,
        before_body_end=out["alert_recv"] < t1,
    )
    return run


def percentile(values, q):
    """``q``-th percentile (0-100) with linear interpolation (NumPy's default method)."""
    vals = sorted(values)
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def summarise(name, runs):
    what, gil, has_target, _body, _extra = SCENARIOS[name]
    lat = [r["latency_ms"] for r in runs if r["latency_ms"] is not None]
    pub = [r["publish_ms"] for r in runs if r.get("publish_ms") is not None]
    dlv = [r["delivery_ms"] for r in runs if r.get("delivery_ms") is not None]
    body = [r["body_ms"] for r in runs]
    target = TARGET_MS if has_target else None
    p99 = percentile(lat, 99)
    return {
        "scenario": name, "main_thread": what, "gil": gil, "runs": len(runs),
        "alerts": len(lat), "missing": sum(r["missing"] for r in runs),
        "late": sum(r["late"] for r in runs),
        "line_wrong": sum(1 for r in runs if not r["missing"] and not r["line_ok"]),
        "after_body_end": sum(1 for r in runs if not r["missing"] and not r["before_body_end"]),
        "p50_ms": percentile(lat, 50), "p99_ms": p99, "max_ms": max(lat) if lat else None,
        "min_ms": min(lat) if lat else None,
        "publish_p50_ms": percentile(pub, 50), "publish_max_ms": max(pub) if pub else None,
        "delivery_p50_ms": percentile(dlv, 50), "delivery_max_ms": max(dlv) if dlv else None,
        "body_p50_ms": percentile(body, 50),
        "target_p99_ms": target,
        "meets_target": (None if target is None else
                         (p99 is not None and p99 <= target and len(lat) == len(runs))),
    }


def fmt(v, width=7, digits=1):
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{digits}f}"


def print_table(summaries):
    head = (f"{'scenario':<13} {'main thread after crossing':<32} {'GIL':<10} {'n':>3} "
            f"{'p50':>7} {'p99':>7} {'max':>7} | {'publ50':>7} {'dlv50':>6} | {'body':>6}  target")
    print(head)
    print("-" * len(head))
    for s in summaries:
        if s["target_p99_ms"] is None:
            verdict = "n/a (GIL held)"
        else:
            verdict = "ok" if s["meets_target"] else "MISSED"
            verdict += f" (p99<={s['target_p99_ms']:.0f})"
        notes = []
        if s["missing"]:
            notes.append(f"{s['missing']} missing")
        if s["late"]:
            notes.append(f"{s['late']} after reply")
        if s["line_wrong"]:
            notes.append(f"{s['line_wrong']} wrong line")
        print(f"{s['scenario']:<13} {s['main_thread']:<32} {s['gil']:<10} {s['alerts']:>3} "
              f"{fmt(s['p50_ms'])} {fmt(s['p99_ms'])} {fmt(s['max_ms'])} | "
              f"{fmt(s['publish_p50_ms'])} {fmt(s['delivery_p50_ms'], 6)} | "
              f"{fmt(s['body_p50_ms'], 6, 0)}  {verdict}"
              + (f"  [{', '.join(notes)}]" if notes else ""))
    print("ms; latency = client receives the budget alert - t0 (just before the crossing "
          "allocation);\npubl50/dlv50 = medians of its two parts (t0 -> relay's session.send, "
          "and send -> client); body = cell work after t0.")


# --- the GIL-held row through memguard's kernel launcher ------------------------------------
# json.loads of a 230 MB document building about 1.5 GB of Python objects (C holding the GIL
# for several seconds) under a 200 MB budget, in a kernel started from the launcher
# kernelspec (`python -m memguard install --kernelspec`, into a temporary prefix). Latency is
# from the crossing (the C record's CLOCK_MONOTONIC stamp, which the launcher puts in the
# message's metadata as memguard.t_event) to the client receiving the first budget alert.
LAUNCHER_SETUP = ("import json\n"
                  "doc = '[' + ','.join(['[1234567,1234568,\"abcdefgh\"]'] * 7_000_000) + ']'")
LAUNCHER_CELL = f"%%memguard {BUDGET}\nobj = json.loads(doc)\ndel obj\n"


def launcher_gil_row(runs):
    """Run the json.loads cell ``runs`` times behind the launcher; returns its summary."""
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    with tempfile.TemporaryDirectory() as prefix:
        subprocess.run([sys.executable, "-m", "memguard", "install", "--kernelspec",
                        "bench-launcher", "--prefix", prefix], check=True, capture_output=True)
        ksm = KernelSpecManager(kernel_dirs=[os.path.join(prefix, "share/jupyter/kernels")])
        km = KernelManager(kernel_name="bench-launcher", kernel_spec_manager=ksm)
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        lat, in_call = [], 0
        try:
            kc.wait_for_ready(timeout=90)
            execute(kc, LAUNCHER_SETUP)
            for i in range(runs + 1):  # the first is a warm-up
                msg_id = kc.execute(LAUNCHER_CELL)
                first = idle = None
                deadline = mono() + CELL_TIMEOUT
                while idle is None and mono() < deadline:
                    try:
                        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - mono()))
                    except queue.Empty:
                        continue
                    recv = mono()
                    if msg["parent_header"].get("msg_id") != msg_id:
                        continue
                    alert = msg["content"].get("data", {}).get(MIME) or {}
                    if first is None and alert.get("kind") == "budget":
                        first = (recv, msg["metadata"].get("memguard", {}).get("t_event"))
                    if msg["msg_type"] == "status" and \
                            msg["content"]["execution_state"] == "idle":
                        idle = recv
                kc.get_shell_msg(timeout=CELL_TIMEOUT)
                if i == 0 or first is None or first[1] is None:
                    continue
                lat.append((first[0] - first[1]) * 1e3)
                in_call += first[0] < idle - 0.5
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
    p99 = percentile(lat, 99)
    return {"scenario": "launcher_json", "main_thread": "json.loads ~1.5 GB (launcher)",
            "gil": "held by C", "runs": runs, "alerts": len(lat), "missing": runs - len(lat),
            "late": runs - in_call, "line_wrong": 0, "after_body_end": runs - in_call,
            "p50_ms": percentile(lat, 50), "p99_ms": p99, "max_ms": max(lat) if lat else None,
            "min_ms": min(lat) if lat else None, "publish_p50_ms": None,
            "publish_max_ms": None, "delivery_p50_ms": None, "delivery_max_ms": None,
            "body_p50_ms": None, "target_p99_ms": TARGET_MS,
            "meets_target": p99 is not None and p99 <= TARGET_MS and len(lat) == runs,
            "latency_from": "the crossing (C record's t_event)"}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Latency from a budget-crossing allocation to memguard's IOPub alert "
                    "at a jupyter_client client.")
    parser.add_argument("--runs", type=int, default=20,
                        help="measured runs per scenario (default 20)")
    parser.add_argument("--quick", action="store_true",
                        help="5 runs per scenario (a smoke test; p99 means little)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="uncounted runs per scenario before measuring (default 1)")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                        help="run only this scenario (repeatable; default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "alert_latency.json",
                        help="where to write the JSON figures (default build/alert_latency.json)")
    parser.add_argument("--kernel", default="python3", help="kernelspec name (default python3)")
    parser.add_argument("--launcher-runs", type=int, default=10,
                        help="runs of the GIL-held json.loads row through memguard's launcher "
                             "(default 10; 0 skips it)")
    parser.add_argument("--launcher-only", action="store_true",
                        help="run only the launcher row")
    args = parser.parse_args(argv)
    runs = 5 if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be >= 1")
    names = [] if args.launcher_only else (args.scenario or list(SCENARIOS))

    started = time.monotonic()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"[bench] note: load average {load_before[0]:.2f} before starting: other work on "
              f"this machine's {os.cpu_count()} CPUs will show in the figures", flush=True)
    results = {}
    env = None
    failed = False
    if names:
        print(f"[bench] starting kernel {args.kernel!r}", flush=True)
        km, kc = start_new_kernel(kernel_name=args.kernel, startup_timeout=60)
    try:
        if not names:
            raise _Skip()
        load = execute(kc, "%load_ext memguard")
        if "loaded" not in load["stdout"]:
            raise CellFailed(f"memguard did not load: {load['stdout']!r} {load['stderr']!r} "
                             f"{load['error']!r}")
        print(f"[bench] {load['stdout'].strip()}", flush=True)
        setup = execute(kc, SETUP)
        if setup["error"]:
            raise CellFailed(f"setup cell failed: {setup['error']}")
        env = last_json_line(setup["stdout"])
        print(f"[bench] kernel: {env}", flush=True)
        for name in names:
            t_scn = time.monotonic()
            for _ in range(args.warmup):
                measure(kc, name)
            results[name] = [measure(kc, name) for _ in range(runs)]
            lat = [r["latency_ms"] for r in results[name] if r["latency_ms"] is not None]
            print(f"[bench] {name}: {len(lat)}/{runs} alerts, "
                  f"median {fmt(percentile(lat, 50), 0)} ms, "
                  f"{time.monotonic() - t_scn:.0f} s", flush=True)
    except _Skip:
        pass
    except CellFailed as exc:
        print(f"[bench] error: {exc}", file=sys.stderr)
        failed = True
    finally:
        if names:
            kc.stop_channels()
            km.shutdown_kernel(now=False)

    summaries = [summarise(n, results[n]) for n in names if n in results]
    if args.launcher_runs > 0:
        print(f"[bench] launcher_json: {args.launcher_runs} runs behind memguard's launcher",
              flush=True)
        row = launcher_gil_row(args.launcher_runs)
        summaries.append(row)
        if not row["meets_target"]:
            failed = True
    print()
    print_table(summaries)
    elapsed = time.monotonic() - started
    report = {
        "what": "ms from just before the allocation crossing a %%memguard budget to the "
                "client receiving the IOPub display_data of the memguard budget alert",
        "budget": BUDGET, "crossing_allocation": "np.empty(50_000_000) float64, 400 MB",
        "runs_per_scenario": runs, "warmup_per_scenario": args.warmup,
        "target_p99_ms": TARGET_MS,
        "client": {"python": platform.python_version(), "host_cpus": os.cpu_count()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "kernel": env,
        "elapsed_s": round(elapsed, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": summaries,
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[bench] {elapsed:.0f} s; figures written to {args.out}")
    missing = sum(s["missing"] for s in summaries)
    if missing:
        print(f"[bench] {missing} alert(s) never arrived", file=sys.stderr)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
