"""Fixtures that start a real ipykernel with jupyter_client and talk to it over ZeroMQ.

``kernel`` is a fresh kernel per test (so load/unload and ContextVar state never leak
between tests) with memguard loaded; ``bare_kernel`` is one without it. Every wait has an
explicit timeout (ipykernel's tests/utils.py does the same).
"""

import json
import os
import sys
import tempfile
import time

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager, start_new_kernel

ALERT_MIME = "application/vnd.memguard.alert+json"
TIMEOUT = 120  # seconds for one cell
# Cell code binding get_handler_name (the NEP 49 handler's name) on NumPy 2 (numpy._core)
# and on NumPy 1.x (numpy.core, Debian 12's 1.24 in `make test-compat`).
IMPORT_GET_HANDLER_NAME = (
    "try:\n"
    "    from numpy._core.multiarray import get_handler_name\n"
    "except ImportError:  # NumPy 1.x\n"
    "    from numpy.core.multiarray import get_handler_name\n"
)


class Execution:
    """What one execute_request produced: IOPub messages (with arrival times) and the reply."""

    def __init__(self, msg_id, messages, reply, reply_time, sent_time, others=(), status=()):
        self.msg_id = msg_id
        self.messages = messages  # list of (arrival monotonic seconds, msg)
        self.reply = reply
        self.reply_time = reply_time
        self.sent_time = sent_time
        self.others = list(others)  # (arrival, msg): shell replies to other requests meanwhile
        self.status = list(status)  # (arrival, msg): this request's busy/idle status messages

    @property
    def alerts(self):
        """(arrival time, msg_type, alert dict, msg) for every memguard alert message."""
        out = []
        for t, msg in self.messages:
            data = msg["content"].get("data") or {}
            if msg["msg_type"] in ("display_data", "update_display_data") and ALERT_MIME in data:
                out.append((t, msg["msg_type"], data[ALERT_MIME], msg))
        return out

    def alerts_of(self, kind):
        return [a for a in self.alerts if a[2]["kind"] == kind]

    def sent_before_reply(self, msg):
        """Whether the kernel sent IOPub message ``msg`` before this request's execute_reply,
        by the kernel's own clock (the headers' dates). Arrival times cannot say: execute
        polls IOPub and the shell channel in turn, so a message the kernel sent a fraction
        of a millisecond before the reply (an alert published by post_run_cell's drain)
        may be read after it."""
        return msg["header"]["date"] <= self.reply["header"]["date"]

    @property
    def stdout(self):
        return "".join(m["content"]["text"] for _, m in self.messages
                       if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")

    @property
    def stderr(self):
        return "".join(m["content"]["text"] for _, m in self.messages
                       if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")

    @property
    def error(self):
        """ename/evalue/traceback of a failed cell, from its execute_reply (IPython shows a
        UsageError on stderr, not as an IOPub error message), else None."""
        content = self.reply["content"]
        return content if content.get("status") == "error" else None

    @property
    def execution_count(self):
        return self.reply["content"].get("execution_count")


class Kernel:
    """A real ipykernel. ``prefix``: a command put before the kernel's own (e.g.
    ``["prlimit", "--as=6442450944", "--"]``), through a temporary kernelspec."""

    def __init__(self, env=None, prefix=None):
        kw = {"env": {**os.environ, **env}} if env else {}
        if prefix is None:
            self.km, self.kc = start_new_kernel(kernel_name="python3", startup_timeout=60, **kw)
            return
        self._specdir = tempfile.TemporaryDirectory(prefix="memguard-spec-")
        spec = os.path.join(self._specdir.name, "prefixed")
        os.makedirs(spec)
        with open(os.path.join(spec, "kernel.json"), "w") as fh:
            json.dump({"argv": list(prefix) + [sys.executable, "-m", "ipykernel_launcher",
                                               "-f", "{connection_file}"],
                       "display_name": "memguard test kernel", "language": "python"}, fh)
        ksm = KernelSpecManager(kernel_dirs=[self._specdir.name])
        self.km = KernelManager(kernel_name="prefixed", kernel_spec_manager=ksm)
        self.km.start_kernel(**kw)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code, timeout=TIMEOUT, ok=True, on_message=None):
        """Run ``code`` and collect its IOPub messages until idle and its execute_reply.
        With ok=True an error in the cell fails the test, with its traceback. With ok=False
        the error does not abort the requests that follow: ipykernel 6 stays in its abort
        state for a moment after an error, so the test's next cell could be aborted.
        ``on_message(channel, msg)``, if given, is called in this thread as each message
        arrives, while the cell may still run: ``"iopub"`` for this request's IOPub
        messages (status included), ``"shell"`` for replies to other requests."""
        sent = time.monotonic()
        msg_id = self.kc.execute(code, stop_on_error=ok)
        messages, reply, reply_time, idle = [], None, None, False
        others, status = [], []
        deadline = sent + timeout
        while not (idle and reply is not None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code[:80]!r}")
            if not idle:
                try:
                    msg = self.kc.get_iopub_msg(timeout=0.05)
                except Exception:
                    msg = None
                if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                    if on_message is not None:
                        on_message("iopub", msg)
                    if msg["msg_type"] == "status":
                        status.append((time.monotonic(), msg))
                        idle = msg["content"]["execution_state"] == "idle"
                    else:
                        messages.append((time.monotonic(), msg))
            if reply is None:
                try:
                    r = self.kc.get_shell_msg(timeout=0.01)
                except Exception:
                    r = None
                if r is not None and r["parent_header"].get("msg_id") == msg_id:
                    reply, reply_time = r, time.monotonic()
                elif r is not None:
                    others.append((time.monotonic(), r))
                    if on_message is not None:
                        on_message("shell", r)
        ex = Execution(msg_id, messages, reply, reply_time, sent, others, status)
        if ok and ex.error:
            pytest.fail(f"cell failed: {ex.error['ename']}: {ex.error['evalue']}\n"
                        + "\n".join(ex.error.get("traceback", [])))
        return ex

    def shutdown(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture
def bare_kernel():
    k = Kernel()
    yield k
    k.shutdown()


@pytest.fixture
def kernel(bare_kernel):
    ex = bare_kernel.execute("%load_ext memguard")
    assert "memguard" in ex.stdout and "loaded" in ex.stdout, ex.stdout
    return bare_kernel


def pytest_configure(config):
    config.addinivalue_line("markers", "stack: needs the pinned PyPI stack (anndata, nbclient 0.11)")


def last_alert(ex, kind):
    """The last alert of ``kind`` an execution got (its data dict); fails when it got none."""
    found = ex.alerts_of(kind)
    assert found, f"no {kind} alert; got {[a[2]['kind'] for a in ex.alerts]}"
    return found[-1][2]
