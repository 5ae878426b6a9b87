"""From the C monitor thread to the notebook: the drain of alert records and their
publication on IOPub.

The C monitor thread (csrc/monitor.c) PUSHes fixed-size records over libzmq to an
``inproc://`` endpoint. ``Relay`` owns the PULL end, on a Python thread of its own, decodes
each record and hands it to a callback. ``Publisher`` sends alerts as IOPub ``display_data`` (first time)
or ``update_display_data`` (same cause again in the same cell), parented to the
``execute_request`` of the cell the alert belongs to, so it appears under that cell even
while the cell is still running.

Why inproc works: ``memguard._core`` links no libzmq; it resolves libzmq's calls from the
copy pyzmq loaded (``load_zmq``), so both ends are sockets of the one pyzmq ``Context`` the
relay owns (``inproc://`` connects sockets of one context only, zmq_inproc(7)), and no file
or directory is needed for the endpoint.
Why a thread of our own rather than a stream on the kernel's IOPub thread: it behaves the
same under ipykernel 6 and 7 and in a terminal IPython (no IOPub at all), and its sends go
through ``kernel.iopub_socket``, which ipykernel documents as safe from any thread; latency
is the same, since any Python relay waits for the GIL.
"""

import hashlib
import struct
import sys
import threading
import uuid

import zmq
import zmq.backend.cython._zmq as _zmq_backend

from . import render


def load_zmq(core):
    """Point ``core`` (memguard._core) at the libzmq pyzmq has loaded: one libzmq per
    process, whichever pyzmq uses (its wheel's bundled copy, or a system one it was built
    against). Raises ImportError with the reason if it cannot be resolved."""
    core.zmq_load(_zmq_backend.__file__)


# The causes (first element) whose alerts come from C monitor records, which memguard's kernel
# launcher (launcher.py) also receives and publishes first, without this process's GIL.
LAUNCHER_CAUSES = frozenset({"budget", "limit", "accumulation"})


def display_id(session, epoch, cause):
    """The ``transient.display_id`` of the alert of ``cause`` (a tuple such as
    ``("budget",)`` or ``("accumulation", 5)``) in cell ``epoch`` of the kernel whose IOPub
    session id is ``session``: derived from what both the kernel and its launcher know, so
    the launcher's first alert and the kernel's later, richer one are one display."""
    key = "\x1f".join([str(session), str(int(epoch))] + [str(c) for c in cause])
    return "memguard-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:32]


class Relay:
    """A PULL socket bound to a private ``inproc://`` endpoint, drained by a daemon thread.

    ``on_record(fields: tuple)`` is called on the relay thread with the fields of each
    record decoded by ``struct.unpack(wire_format, message)``; malformed messages are
    counted in ``bad`` and dropped. ``context`` is the address of the relay's libzmq
    context (``zmq.Context.underlying``), which the C monitor's PUSH socket must share;
    stop the monitor before ``stop()`` terminates it.


    Sockets are not thread-safe (zmq_socket(3)): once started, the socket belongs to the
    relay thread, which closes it on its way out; the context is terminated only after that
    (zmq_ctx_term(3) blocks while a socket of it is open), by ``stop()`` or, when ``stop()``
    gave up waiting, by the thread itself as it ends.

    The thread waits for a record with no timeout: a thread that woke to check a flag
    would take the GIL from the running cell every time (ten times a second at a 100 ms
    timeout), and each take is a forced switch. ``stop()`` wakes it with an empty message
    (``WAKE``; no record is empty) from a socket of its own on the same endpoint.
    """

    WAKE = b""

    def __init__(self, wire_format, on_record):
        self._struct = struct.Struct(wire_format)
        self._on_record = on_record
        self.endpoint = f"inproc://memguard-relay-{uuid.uuid4().hex}"
        self._ctx = zmq.Context()
        self.context = self._ctx.underlying
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.linger = 0
        self._sock.bind(self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memguard-relay", daemon=True)
        self._lock = threading.Lock()
        self._thread_done = False  # the thread has closed its socket (or never ran)
        self._orphaned = False  # stop() gave up waiting: the thread terminates the context
        self.received = 0
        self.bad = 0
        self.processed = 0  # records handed to on_record and finished (or failed)

    def start(self):
        self._thread.start()

    def _run(self):
        try:
            self._drain()
        finally:
            self._sock.close(linger=0)
            with self._lock:
                self._thread_done = True
                orphaned = self._orphaned
            if orphaned:
                self._ctx.term()

    def _drain(self):
        while not self._stop.is_set():
            msg = self._sock.recv()  # blocks, GIL released, until a record or WAKE
            if msg == self.WAKE:
                continue
            if len(msg) != self._struct.size:
                self.bad += 1
                continue
            self.received += 1
            try:
                self._on_record(self._struct.unpack(msg))
            except Exception:  # an alert must never kill the relay
                sys.excepthook(*sys.exc_info())
            finally:
                self.processed += 1

    def _wake(self):
        """Send WAKE to the thread from a socket of this thread's own (closed at once; its
        linger bounds how long ``zmq_ctx_term`` could wait for a WAKE nobody reads)."""
        try:
            sock = self._ctx.socket(zmq.PUSH)
        except zmq.ZMQError:  # the context is already terminated
            return
        try:
            sock.linger = 100  # ms
            sock.connect(self.endpoint)
            sock.send(self.WAKE, zmq.NOBLOCK)
        except zmq.ZMQError:  # a full pipe: the thread has records to read and will see stop
            pass
        finally:
            sock.close()

    def stop(self, timeout=2.0):
        """Stop the thread and terminate the context; stop the C monitor first. Waits up to
        ``timeout`` seconds (the thread sees the request at once, or when the record it is
        handling is done). Returns True when everything is closed; False when the thread
        is still busy: it then closes its socket and terminates the context as it ends."""
        self._stop.set()
        if self._thread.ident is None:  # never started: no other thread has the socket
            self._sock.close(linger=0)
            self._thread_done = True
        elif self._thread is not threading.current_thread():
            self._wake()
            self._thread.join(timeout)
        with self._lock:
            if not self._thread_done:
                self._orphaned = True
                return False
        self._ctx.term()
        return True


class Publisher:
    """Sends alert bundles under the right cell, once per cause, updated in place after.

    ``kernel`` is the ipykernel Kernel, or None outside a kernel (terminal IPython), where
    alerts are written as text to the process's stderr instead. ``launcher``: the kernel runs
    under memguard's launcher, which publishes the first alert of each LAUNCHER_CAUSES cause
    itself (same display_id), so even the first one from here is an ``update_display_data``
    (the launcher turns it into ``display_data`` if it had not published that display).
    Thread-safe.
    """

    def __init__(self, kernel, launcher=False):
        self._kernel = kernel
        self._launcher = launcher
        self._lock = threading.Lock()
        self._display_ids = {}  # (epoch, cause) -> display_id

    def publish(self, alert, epoch, cause, parent):
        """Publish ``alert`` (a dict of the alert schema) for the cell ``epoch``.

        ``cause`` (hashable) identifies what the alert is about within the cell; a second
        publish with the same (epoch, cause) becomes ``update_display_data`` with the same
        transient ``display_id``. ``parent`` is the cell's execute_request message (or None).
        Returns the msg_type used.
        """
        with self._lock:
            key = (epoch, cause)
            shown = self._display_ids.get(key)
            msg_type = "update_display_data" if shown else "display_data"
            if self._launcher and cause and cause[0] in LAUNCHER_CAUSES:
                msg_type = "update_display_data"
            if shown is None:
                session = getattr(getattr(self._kernel, "session", None), "session", "")
                shown = self._display_ids[key] = display_id(session, epoch, cause)
                if len(self._display_ids) > 10_000:
                    self._display_ids.pop(next(iter(self._display_ids)))
        content = {
            "data": render.alert_bundle(alert),
            "metadata": {},
            "transient": {"display_id": shown},
        }
        kernel = self._kernel
        if kernel is None or parent is None:
            print(render.text(alert), file=sys.__stderr__, flush=True)
            return msg_type
        kernel.session.send(
            kernel.iopub_socket, msg_type, content, parent=parent,
            ident=kernel._topic(msg_type),
        )
        return msg_type

