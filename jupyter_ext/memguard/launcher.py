"""memguard's kernel launcher: a small process between the kernel manager and ipykernel that
owns IOPub, so memguard's alerts never wait for the kernel's GIL and a kernel's death is
announced under its cell as it happens.

``python -m memguard.launcher -f CONNECTION_FILE [ARGS...]`` (the argv of the kernelspec
``python -m memguard install --kernelspec`` writes):

1. reads the connection file and binds its IOPub port itself (an XPUB socket);
2. writes a private copy of the connection file (same name, in a private 0700 folder) in
   which only IOPub differs: a private port (or ipc path). Shell, control, stdin, heartbeat,
   key and signature scheme are unchanged, so the frontend talks to the kernel directly;
3. starts ``python -m ipykernel_launcher -f PRIVATE_FILE [ARGS...]`` with
   ``MEMGUARD_LAUNCHER_ENDPOINT=ipc://.../records`` in its environment, in its own process
   group, with ``PR_SET_PDEATHSIG`` = SIGKILL (it dies with the launcher);
4. forwards every IOPub message of the kernel unchanged (raw multipart frames; an XSUB
   socket connected to the private endpoint, subscriptions forwarded back), watching the
   ``status`` and ``execute_input`` messages go by to know the running ``execute_request``;
5. receives the C monitor's records (memguard's ``mg_wire_t``, ``_core.WIRE_FORMAT``) on a
   PULL socket bound to that endpoint and publishes the alert of each under its cell at
   once (the cell's ``execute_request`` header comes from the kernel's black box, which
   memguard writes when the cell starts: the kernel's own ``status`` message for it may
   still wait for the GIL) (``display_data`` signed with jupyter_client's ``Session``, with the
   ``display_id`` of ``relay.display_id``, which the kernel's own, richer alert then
   updates in place);
6. forwards SIGINT and SIGTERM to the kernel, and exits with the kernel's status: its exit
   code, or the same signal. When the kernel died by a signal it first reads the kernel's
   black box and the cgroup's ``oom_kill`` counter and publishes a ``kernel_died`` alert
   under the cell that was running (docs/interface.md).

It never imports the kernel: only memguard's rendering (alerts, render, report), the black
box reader and ``memguard._core``'s constants.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types

import zmq
from jupyter_client.session import Session

from . import alerts, blackbox, limits, render, report
from .relay import display_id
from .sizes import format_size

ENV_ENDPOINT = "MEMGUARD_LAUNCHER_ENDPOINT"
DELIM = b"<IDS|MSG>"
PR_SET_PDEATHSIG = 1
# How long the launcher keeps publishing updates of an alert itself: until the kernel's own
# relay has sent something for that display (then the kernel follows it, with more detail).
CGROUP_EVERY = 1.0  # seconds between two looks at the kernel's memory cgroup
MAX_BATCH = 1000  # messages moved per socket per turn of the loop, so none starves


# --- connection files ---------------------------------------------------------------------

def _endpoint(transport, ip, port):
    if transport == "ipc":
        return f"ipc://{ip}-{port}"
    return f"{transport}://{ip}:{port}"


def _free_port(transport, ip):
    """A port (tcp: free on ``ip`` now; ipc: a path suffix not in use) for the private
    IOPub endpoint."""
    if transport == "ipc":
        for n in range(100):
            port = 40000 + (os.getpid() * 7 + n) % 20000
            if not os.path.exists(f"{ip}-{port}"):
                return port
        raise RuntimeError("no free ipc path for the private IOPub endpoint")
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def private_connection(info, directory, name):
    """Write the kernel's private connection file: ``info`` with a private IOPub port, as
    ``directory/name`` (mode 0600). Returns (path, private IOPub endpoint to connect to)."""
    transport = info.get("transport", "tcp")
    ip = info["ip"]
    port = _free_port(transport, ip)
    private = dict(info, iopub_port=port)
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(private, fh, indent=1)
    connect_ip = {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1"}.get(ip, ip)
    return path, _endpoint(transport, connect_ip, port)


# --- the kernel's memory cgroup -----------------------------------------------------------

def _read(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _field(text, name):
    """The integer after ``name`` in a ``key value`` file (memory.events, oom_control)."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            try:
                return int(parts[1])
            except ValueError:
                return None
    return None


def cgroup_of(pid):
    """``(version, directory)`` of the memory cgroup of process ``pid`` whose OOM killer
    would end it (v1's memory hierarchy, else v2 with the memory controller), or None."""
    found = None
    for version, d in limits.memory_cgroups(pid):
        if version == 1 and os.path.exists(os.path.join(d, "memory.oom_control")):
            return (1, d)
        if version == 2 and os.path.exists(os.path.join(d, "memory.events")):
            found = (2, d)
    return found


def oom_kills(cgroup):
    """The cgroup's ``oom_kill`` counter (v1 ``memory.oom_control``, v2 ``memory.events``),
    or None when it has none."""
    version, d = cgroup
    name = "memory.oom_control" if version == 1 else "memory.events"
    return _field(_read(os.path.join(d, name)), "oom_kill")


def cgroup_limit(cgroup):
    """The cgroup's own memory limit in bytes, or None when unlimited or unreadable."""
    version, d = cgroup
    raw = _read(os.path.join(d, "memory.limit_in_bytes" if version == 1 else "memory.max"))
    try:
        value = int((raw or "").strip())
    except ValueError:
        return None
    return value if 0 < value < 2**60 else None


def system_oom_kills():
    """The kernel-wide ``oom_kill`` counter of /proc/vmstat (Linux 4.13+), or None."""
    return _field(_read("/proc/vmstat"), "oom_kill")


# --- alerts from monitor records -----------------------------------------------------------

_MEASURE_SOURCE = {0: "physical", 1: "rlimit", 2: "cgroup"}


def _limit_from_box(box):
    if box is None or not box.state.get("limit"):
        return None
    source = _MEASURE_SOURCE.get(box.state.get("limit_measure"), "physical")
    return limits.Limit(int(box.state["limit"]), source, "as the kernel recorded it")


def _measure_label(box):
    source = _MEASURE_SOURCE.get(box.state.get("limit_measure"), "physical") if box else "physical"
    return limits.MEASURES[source].label


def record_alert(core, rec, count, box, first_budget=None):
    """The alert dict (alerts.py) for monitor record ``rec`` (a dict of the wire fields) of
    the cell numbered ``count``, with figures the record lacks from the kernel's black box
    ``box`` (or None). ``first_budget``: the first budget alert of that cell, if any, whose
    line and request a growth record keeps. Returns ``(alert, cause)``."""
    state = types.SimpleNamespace(limit=_limit_from_box(box))
    cell = types.SimpleNamespace(count=count)
    kind = rec["kind"]
    same = box is not None and box.state.get("epoch") == rec["epoch"]
    peak = max(rec["peak"], rec["usage"])
    if kind in (core.KIND_BUDGET, core.KIND_BUDGET_GROW, core.KIND_BUDGET_RSS):
        line, request = rec["line"], rec["bytes"]
        rss = box.state["rss"] if same else 0
        growth = rss - box.state["rss_cell_start"] if same else 0
        untracked = max(0, growth - rec["usage"])
        if kind == core.KIND_BUDGET_RSS:
            line, request, untracked = -1, 0, rec["bytes"]
        elif kind == core.KIND_BUDGET_GROW:
            line = first_budget["line"] or -1 if first_budget else rec["line"]
            request = first_budget["request_bytes"] if first_budget else 0
        top = None
        if same:
            mine = [s for s in box.sites if s["epoch"] == rec["epoch"] and s["bytes"] > 0]
            if mine:
                s = max(mine, key=lambda s: s["bytes"])
                top = {"cell": count, "line": s["line"], "bytes": s["bytes"], "count": s["count"]}
        gap = {"rss_bytes": rss, "rss_growth": growth, "untracked_bytes": untracked}
        alert = alerts.budget_alert(state, cell, line, rec["usage"], peak, rec["budget"],
                                    request, gap, top, rec["usage"])
        return alert, ("budget",)
    if kind in (core.KIND_ACCUMULATION, core.KIND_ACCUMULATION_GROW):
        alert = alerts.accumulation_alert(state, cell, rec["line"], rec["count"], rec["bytes"],
                                          max(peak, rec["bytes"]), rec["budget"])
        return alert, ("accumulation", alert["line"])
    used = box.state["limit_used"] if box is not None else 0
    if kind == core.KIND_REFUSED:
        by_budget = rec["count"] == core.REFUSE_BUDGET
        alert = alerts.refused_alert(state, cell, rec["line"], rec["bytes"], by_budget, peak,
                                     rec["budget"], used, _measure_label(box))
        return alert, ("budget",) if by_budget else ("limit",)
    if state.limit is None:
        return None, None  # a limit alert needs the limit: the kernel's relay sends it
    if kind == core.KIND_LIMIT:
        alert = alerts.limit_alert(state, cell, -1, rec["bytes"], _measure_label(box), peak,
                                   rec["budget"])
    else:  # KIND_LIMIT_REQUEST
        alert = alerts.limit_alert(state, cell, rec["line"], used, _measure_label(box), peak,
                                   rec["budget"], rec["bytes"])
    return alert, ("limit",)


# --- the death notice -----------------------------------------------------------------------

def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def death_alert(signum, pid, box, count, oom, limit_bytes, limit_source):
    """The ``kernel_died`` alert: the kernel (``pid``) was killed by ``signum`` while running
    the cell numbered ``count``; ``box`` is its black box (or None), ``oom`` a text saying
    which OOM killer fired (or None), ``limit_bytes``/``limit_source`` the limit it died
    against (or None)."""
    limit = limits.Limit(limit_bytes, limit_source, "") if limit_bytes else None
    if box is not None:
        alert = report.crash_alert(box, limit)
        if limit_bytes:
            alert["limit"], alert["limit_source"] = limit_bytes, limit_source
    else:
        alert = {"cell": count, "line": None, "bytes": 0, "budget": None, "limit": limit_bytes,
                 "limit_source": limit_source, "peak": 0, "rss": 0, "pid": pid,
                 "died": time.time(), "tracked_peak": 0, "top_sites": [], "alerts": [],
                 "source": [], "timeline": [],
                 "suggestions": [report.GENERIC if not oom else report.SUGGESTIONS["limit"]]}
    if alert.get("cell") is None:
        alert["cell"] = count
    alert["kind"] = "kernel_died"
    alert["signal"] = _signal_name(signum)
    alert["oom_killer"] = oom is not None
    alert["died"] = time.time()
    how = f"killed by {oom} ({alert['signal']})" if oom else f"killed by {alert['signal']}"
    where = f"cell {alert['cell']}" if alert["cell"] is not None else "a cell"
    if alert.get("line"):
        where += f", line {alert['line']}"
    peak = alert["peak"]
    figures = ""
    if peak:
        figures = f"; its memory (RSS) had reached {format_size(peak)}"
        if alert.get("limit"):
            figures += (f", {peak / alert['limit']:.0%} of its {format_size(alert['limit'])} "
                        f"limit ({alert.get('limit_source') or 'unknown'})")
    alert["message"] = (f"The kernel (pid {pid}) was {how} while running {where}{figures}. "
                        f"It will be restarted, and the full report shown under the next cell; "
                        f"to change: {alert['suggestions'][0]}.")
    return alert


def death_bundle(alert):
    """The death notice's MIME bundle: the post-crash report's text and HTML (without the
    timeline chart, which would need matplotlib in a hurry), the alert JSON."""
    text = render.crash_text(alert).replace("memguard post-crash report: ",
                                            "memguard: the kernel died: ", 1)
    rich = render.crash_html(dict(alert, timeline=[]))
    return {"text/plain": text, "text/html": rich, render.ALERT_MIME: alert}


# --- the launcher ---------------------------------------------------------------------------

def _preexec(prctl, launcher_pid):
    """In the kernel before exec: its own process group (the launcher forwards signals to
    it, once), and SIGKILL when the launcher dies."""
    def setup():
        os.setpgid(0, 0)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != launcher_pid:  # the launcher died before prctl
            os._exit(1)
    return setup


class Launcher:
    def __init__(self, connection_file, kernel_args):
        from . import _core

        self.core = _core
        self.wire = struct.Struct(_core.WIRE_FORMAT)
        self.fields = ("version", "kind", "epoch", "line", "count", "bytes", "usage", "peak",
                       "budget", "t")
        with open(connection_file) as fh:
            self.info = json.load(fh)
        self.connection_file = connection_file
        self.dir = tempfile.mkdtemp(prefix="memguard-launch-")
        self.private_file, self.private_iopub = private_connection(
            self.info, self.dir, os.path.basename(connection_file))
        self.records_endpoint = f"ipc://{self.dir}/records"
        transport = self.info.get("transport", "tcp")
        self.public_iopub = _endpoint(transport, self.info["ip"], self.info["iopub_port"])
        key = self.info.get("key", "")
        self.session = Session(key=key.encode() if isinstance(key, str) else key,
                               signature_scheme=self.info.get("signature_scheme",
                                                              "hmac-sha256"),
                               username="memguard-launcher")
        self.kernel_args = kernel_args
        self.proc = None
        # What the launcher learns from the IOPub traffic it forwards.
        self.kernel_session = None  # the kernel's Session id (header.session)
        self.running = None  # parent header of the execute_request running now
        self.last_exec = None  # of the last execute_request that ran
        self.counts = {}  # execute_request msg_id -> execution_count
        self.epoch_parent = {}  # memguard epoch -> parent header
        self.shown = {}  # display_id -> "launcher" | "kernel"
        self.first_budget = {}  # epoch -> the first budget alert the launcher rendered
        self.cgroup = None  # (version, dir) of the kernel's memory cgroup
        self.cgroup_oom0 = None  # its oom_kill counter when first seen
        self.cgroup_seen = 0.0
        self.cgroup_text = None  # /proc/PID/cgroup when the cgroup was last resolved
        self.cgroup_due = False  # a new cell started: look again once its busy is sent
        self.vmstat_oom0 = system_oom_kills()
        self.published = 0
        self.forwarded = set()  # signals the launcher passed on: a death by them is asked for

    # -- process -----------------------------------------------------------------------

    def start_kernel(self):
        libc = ctypes.CDLL(None, use_errno=True)
        env = dict(os.environ)
        env[ENV_ENDPOINT] = self.records_endpoint
        cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", self.private_file]
        self.proc = subprocess.Popen(cmd + self.kernel_args, env=env,
                                     preexec_fn=_preexec(libc.prctl, os.getpid()))

    def _forward_signal(self, signum, frame):
        if self.proc is not None and self.proc.poll() is None:
            self.forwarded.add(signum)
            try:
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def _wait_kernel(self, wfd):
        """Thread: wait for the kernel to end without reaping it (its /proc entry stays for
        the death notice), then wake the loop."""
        while True:
            try:
                os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
        os.write(wfd, b"x")

    # -- sockets -----------------------------------------------------------------------

    def open_sockets(self):
        self.ctx = zmq.Context()
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every client's subscription reaches the kernel
        self.xpub.linger = 2000
        self.xpub.sndhwm = 0  # like ipykernel's IOPub: never drop for a slow client
        self.xpub.bind(self.public_iopub)
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xsub.linger = 0
        self.xsub.rcvhwm = 0
        self.xsub.connect(self.private_iopub)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.linger = 0
        self.pull.bind(self.records_endpoint)

    def close_sockets(self):
        for s in (self.xsub, self.pull):
            s.close(linger=0)
        self.xpub.close(linger=2000)  # what was published reaches the clients
        self.ctx.term()

    # -- IOPub traffic -------------------------------------------------------------------

    def _inspect(self, frames):
        """Learn from one kernel IOPub message (its frames, bytes). Returns replacement frames
        (bytes) for it, or None to forward it as it is."""
        topic = frames[0] if len(frames) > 1 else b""
        if not (topic.endswith(b".status") or topic.endswith(b".execute_input")
                or topic.endswith(b"display_data")):
            return None
        try:
            d = next(i for i, f in enumerate(frames[:8]) if f == DELIM)
            header = json.loads(frames[d + 2])
        except (StopIteration, IndexError, ValueError):
            return None
        msg_type = header.get("msg_type")
        self.kernel_session = header.get("session", self.kernel_session)
        if msg_type == "status":
            parent = json.loads(frames[d + 3])
            state = json.loads(frames[d + 5]).get("execution_state")
            if parent.get("msg_type") == "execute_request":
                if state == "busy":
                    self.running = self.last_exec = parent
                    self.cgroup_due = True  # after the message is on its way
                elif state == "idle" and self.running is not None and \
                        self.running.get("msg_id") == parent.get("msg_id"):
                    self.running = None
        elif msg_type == "execute_input":
            parent = json.loads(frames[d + 3])
            count = json.loads(frames[d + 5]).get("execution_count")
            self.counts[parent.get("msg_id")] = count
            if len(self.counts) > 10_000:
                self.counts.pop(next(iter(self.counts)))
        elif msg_type in ("display_data", "update_display_data") and \
                b'"memguard-' in frames[d + 5]:
            content = json.loads(frames[d + 5])
            did = (content.get("transient") or {}).get("display_id") or ""
            if not did.startswith("memguard-"):
                return None
            known = did in self.shown
            self.shown[did] = "kernel"
            if msg_type == "update_display_data" and not known:
                # The kernel's relay was first (the launcher had not published this display):
                # show it, as display_data, re-signed.
                msg = self.session.deserialize(frames[d + 1:])
                out = self.session.msg("display_data", content, parent=msg["parent_header"],
                                       metadata=msg["metadata"])
                return [topic.replace(b"update_display_data", b"display_data")] + \
                    self.session.serialize(out)
        return None

    def forward_iopub(self):
        for _ in range(MAX_BATCH):
            try:
                # Copied frames: IOPub messages are small, and pyzmq moves small messages
                # faster as bytes than as zero-copy Frames.
                frames = self.xsub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                replaced = self._inspect(frames)
            except Exception:  # noqa: BLE001 - never stop forwarding
                replaced = None
            if replaced is None:
                self.xpub.send_multipart(frames)
            else:
                self.xpub.send_multipart(replaced)

    def forward_subscriptions(self):
        for _ in range(MAX_BATCH):
            try:
                self.xsub.send(self.xpub.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    # -- records and alerts --------------------------------------------------------------

    def _box(self):
        """The kernel's black box now, or None."""
        directory = blackbox.default_dir()
        stem = blackbox.path_for(self.connection_file, directory)
        paths = [stem]
        if self.proc is not None:
            paths.append(stem[:-len(blackbox.SUFFIX)] + f".{self.proc.pid}{blackbox.SUFFIX}")
        for path in reversed(paths):
            try:
                box = blackbox.read(path)
            except blackbox.BlackBoxError:
                continue
            if self.proc is None or box.pid == self.proc.pid:
                return box
        return None

    def _cell_parent(self, epoch, box):
        """The header of the execute_request that cell ``epoch`` answers, or None.

        The kernel writes it into its black box when the cell starts; that is the source
        to trust, since the kernel's own ``status: busy`` for the cell is sent by its IOPub
        thread, which needs the GIL: a cell that enters a C call holding the GIL at once
        (``json.loads``, ``pickle.load``) can run for seconds before the launcher sees it.
        Without a box (or for an older cell) it is the request running now, or the last
        one that ran."""
        if box is not None and box.cell_epoch == epoch and box.cell_parent:
            try:
                header = json.loads(box.cell_parent)
            except ValueError:  # read while being written: try the traffic instead
                header = None
            if isinstance(header, dict) and isinstance(header.get("msg_id"), str):
                for known in (self.running, self.last_exec):
                    if known is not None and known.get("msg_id") == header["msg_id"]:
                        return known
                return header
        return self.running or self.last_exec

    def _cell_count(self, epoch, parent, box):
        """The execution count of cell ``epoch`` (from its execute_input, else from the
        black box's cell map), or None."""
        count = self.counts.get(parent.get("msg_id"))
        if count is None and box is not None:
            count = box.cells.get(epoch)
        return count

    def _publish(self, msg_type, data, parent, did, metadata=None):
        topic = f"kernel.memguard-launcher.{msg_type}".encode()
        content = {"data": data, "metadata": {}, "transient": {"display_id": did}}
        self.session.send(self.xpub, msg_type, content, parent=parent, ident=topic,
                          metadata=metadata or {})
        self.published += 1

    def handle_records(self):
        recs = []
        for _ in range(MAX_BATCH):
            try:
                msg = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(msg) == self.wire.size:
                recs.append(dict(zip(self.fields, self.wire.unpack(msg))))
        if not recs:
            return
        box = None
        for rec in recs:
            if box is None:
                box = self._box() or False
            if rec["epoch"] not in self.epoch_parent:
                parent = self._cell_parent(rec["epoch"], box or None)
                if parent is None:
                    continue
                self.epoch_parent[rec["epoch"]] = parent
                if len(self.epoch_parent) > 1000:
                    self.epoch_parent.pop(next(iter(self.epoch_parent)))
            parent = self.epoch_parent[rec["epoch"]]
            count = self._cell_count(rec["epoch"], parent, box or None)
            try:
                alert, cause = record_alert(self.core, rec, count, box or None,
                                            self.first_budget.get(rec["epoch"]))
            except Exception:  # noqa: BLE001 - a bad record must not stop IOPub
                continue
            if alert is None or self.kernel_session is None:
                continue
            if cause == ("budget",) and rec["epoch"] not in self.first_budget:
                self.first_budget[rec["epoch"]] = alert
            did = display_id(self.kernel_session, rec["epoch"], cause)
            owner = self.shown.get(did)
            if owner == "kernel":
                continue  # the kernel's relay publishes this one, with more detail
            self.shown[did] = "launcher"
            self._publish("update_display_data" if owner else "display_data",
                          render.alert_bundle(alert), parent, did,
                          {"memguard": {"from": "launcher", "t_event": rec["t"]}})

    # -- cgroup and death ------------------------------------------------------------------

    def _look_at_cgroup(self, force=False, recheck=False):
        """Find the kernel's memory cgroup again (it may have been moved into one), at most
        every CGROUP_EVERY seconds unless ``force``. Runs in the forwarding loop, so the
        common case is one read of /proc/PID/cgroup (tens of microseconds): the hierarchy
        is resolved through mountinfo (0.3-0.8 ms here, more on a host with many mounts)
        only when that file changed, or always with ``recheck``."""
        now = time.monotonic()
        if self.proc is None or (not force and now - self.cgroup_seen < CGROUP_EVERY):
            return
        self.cgroup_seen = now
        text = _read(f"/proc/{self.proc.pid}/cgroup")
        if text is None or (text == self.cgroup_text and not recheck):
            return
        stat = _read(f"/proc/{self.proc.pid}/stat") or ""
        if stat[stat.rfind(")") + 2:][:1] in ("Z", "X", ""):
            return  # an exiting task is moved to the root cgroup: keep where it lived
        self.cgroup_text = text
        found = cgroup_of(self.proc.pid)
        if found is not None and found != self.cgroup:
            self.cgroup, self.cgroup_oom0 = found, oom_kills(found)

    def announce_death(self, signum):
        """Publish the kernel_died alert under the cell that was running."""
        box = self._box()
        parent = self._cell_parent(box.cell_epoch, box) if box is not None else \
            self.running or self.last_exec
        if parent is None or self.kernel_session is None:
            return
        if self.cgroup is None:  # never seen: the zombie may still say where it was
            self._look_at_cgroup(force=True, recheck=True)
        oom = None
        counted = False  # the kernel's own cgroup counts OOM kills of its tasks
        limit_bytes = limit_source = None
        if self.cgroup is not None:
            n = oom_kills(self.cgroup)
            counted = n is not None and self.cgroup_oom0 is not None
            if counted and n > self.cgroup_oom0:
                oom = f"the OOM killer of its memory cgroup ({self.cgroup[1]})"
            limit_bytes = cgroup_limit(self.cgroup)
            limit_source = "cgroup" if limit_bytes else None
        # The system-wide counter only where the cgroup's cannot say: the kernel charges
        # every OOM kill, global or a cgroup's, to the victim's memory cgroup (mm/oom_kill.c,
        # MEMCG_OOM_KILL), while /proc/vmstat also moves for any other process on the host.
        if oom is None and not counted and signum == signal.SIGKILL:
            n = system_oom_kills()
            if n is not None and self.vmstat_oom0 is not None and n > self.vmstat_oom0:
                oom = "the OOM killer (system-wide; /proc/vmstat oom_kill moved)"
        if limit_bytes is None and box is not None and box.state.get("limit"):
            limit_bytes = box.state["limit"]
            limit_source = _MEASURE_SOURCE.get(box.state.get("limit_measure"), "physical")
        count = self._cell_count(box.cell_epoch, parent, box) if box is not None else \
            self.counts.get(parent.get("msg_id"))
        alert = death_alert(signum, self.proc.pid, box, count, oom, limit_bytes, limit_source)
        epoch = box.cell_epoch if box is not None else 0
        did = display_id(self.kernel_session, epoch, ("kernel_died",))
        self._publish("display_data", death_bundle(alert), parent, did)

    # -- main loop ---------------------------------------------------------------------------

    def run(self):
        """Start the kernel, forward until it ends; returns its waitid status
        ``(si_code, si_status)``."""
        self.start_kernel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._forward_signal)
        self.open_sockets()
        rfd, wfd = os.pipe()
        threading.Thread(target=self._wait_kernel, args=(wfd,), daemon=True,
                         name="memguard-launcher-wait").start()
        poller = zmq.Poller()
        for s in (self.xsub, self.xpub, self.pull):
            poller.register(s, zmq.POLLIN)
        poller.register(rfd, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(1000))
            if self.pull in ready:  # before IOPub: the launcher's alert goes out first
                self.handle_records()
            if self.xsub in ready:
                self.forward_iopub()
            if self.xpub in ready:
                self.forward_subscriptions()
            self._look_at_cgroup(force=self.cgroup_due)
            self.cgroup_due = False
            if rfd in ready:
                break
        info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
        # What the kernel sent before it ended goes out first.
        time.sleep(0.01)
        self.handle_records()
        self.forward_iopub()
        if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) and \
                info.si_status not in self.forwarded:
            try:
                self.announce_death(info.si_status)
            except Exception as exc:  # noqa: BLE001 - the exit status matters more
                print(f"memguard launcher: no death notice: {exc!r}", file=sys.stderr)
        self.proc.wait()  # reap
        self.close_sockets()
        shutil.rmtree(self.dir, ignore_errors=True)
        return info.si_code, info.si_status


def exit_like(si_code, si_status):
    """Exit with the kernel's status: its exit code, or death by the same signal."""
    if si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        try:
            signal.signal(si_status, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), si_status)
        time.sleep(1)
        os._exit(128 + si_status)
    sys.exit(si_status)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m memguard.launcher",
        description="Start an IPython kernel behind a launcher that owns its IOPub socket "
                    "(memguard alerts without the kernel's GIL, death notices).")
    parser.add_argument("-f", dest="connection_file", required=True,
                        help="the connection file the kernel manager wrote")
    args, kernel_args = parser.parse_known_args(argv)
    launcher = Launcher(args.connection_file, kernel_args)
    try:
        si_code, si_status = launcher.run()
    except BaseException:
        if launcher.proc is not None and launcher.proc.poll() is None:
            launcher.proc.kill()
        shutil.rmtree(launcher.dir, ignore_errors=True)
        raise
    exit_like(si_code, si_status)


if __name__ == "__main__":
    main()
