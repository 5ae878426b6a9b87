"""raise mode: the allocation that would cross the budget or the limit fails with a clear
``MemoryError`` instead of the kernel dying.

The C hooks refuse the NumPy data allocation (the NEP 49 handler returns NULL, which NumPy
turns into ``MemoryError: Unable to allocate 1 GiB for an array with shape (125000000,) and
data type float64``) and record what they refused (``_core.refusal()``). The message is
rewritten here, on the main thread, through IPython's ``set_custom_exc`` for
``MemoryError``: it names the budget (or the limit), the size asked, the shape and dtype
NumPy reported, and the cell line. Other MemoryErrors are shown unchanged. A sparse
conversion that would not fit raises the same kind of message *before* it allocates
(``records.on_densify``).
"""

import builtins
import re
import sys
import traceback

from . import coreview
from ._state import STATE
from .sizes import format_size

_NUMPY_MSG = re.compile(r"shape (\([^)]*\)) and data type (\S+)")


class MemoryError(builtins.MemoryError):  # noqa: A001 - shown to users as "MemoryError"
    """The MemoryError a refused allocation ends up as: NumPy's own subclass
    (``_ArrayMemoryError``) builds its message from the shape and dtype, ignoring ``args``,
    so the exception's class is switched to this one, whose message is ``args[0]``.
    ``isinstance(e, MemoryError)`` still holds."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _numpy_memory_errors():
    """NumPy's MemoryError subclass (numpy/_core/_exceptions.py, numpy/core in 1.x): IPython
    matches custom exception types exactly, so it must be listed besides MemoryError."""
    for name in ("numpy._core._exceptions", "numpy.core._exceptions"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "_ArrayMemoryError"):
            return (module._ArrayMemoryError,)
    return ()


def install(shell):
    """Add MemoryError to the shell's custom exception handlers, keeping any the user or
    another extension registered (they still get their exceptions)."""
    prev_types = tuple(getattr(shell, "custom_exceptions", ()) or ())
    prev_tb = getattr(shell, "CustomTB", None)
    STATE.saved_custom_exc = (prev_types, prev_tb)
    STATE.refusals_seen = coreview.refusal(STATE.core).count

    def handler(self, etype, value, tb, tb_offset=None):
        if issubclass(etype, builtins.MemoryError) or issubclass(etype, builtins.RuntimeError):
            message = refusal_message(value)
            if message:
                value.args = (message,)
                try:
                    value.__class__ = MemoryError  # so str(value), hence evalue, is ours
                    etype = MemoryError
                except TypeError:  # an extension type with its own layout: keep it
                    pass
            if issubclass(etype, builtins.MemoryError) or message or prev_tb is None or \
                    not issubclass(etype, prev_types):
                return show(self, etype, value, tb, tb_offset)
        return prev_tb(etype, value, tb, tb_offset=tb_offset)

    # RuntimeError: torch's CPU allocator raises it (or its subclass torch.OutOfMemoryError)
    # when the native hook refused its block (docs/design.md, "Native memory"); one that
    # memguard did not cause is shown unchanged.
    ours = (builtins.MemoryError, builtins.RuntimeError) + _numpy_memory_errors()
    shell.set_custom_exc(tuple(t for t in prev_types if t not in ours) + ours, handler)


def show(shell, etype, value, tb, tb_offset=None):
    """Show the exception as IPython shows any other, and return its structured traceback.

    IPython's ``run_code`` discards what a ``set_custom_exc`` handler returns, so the
    handler must display the traceback itself: ``_get_exc_info`` stores it in
    ``sys.last_*`` (for ``%tb`` and ``%debug``) and ``_showtraceback`` is the method
    ipykernel overrides to publish the IOPub ``error`` message and keep the traceback for
    the ``execute_reply`` (``shell._last_traceback``); the terminal IPython prints it.
    This runs after the cell's code has unwound, so what it allocates is never refused
    (the limit's reserve covers it: docs/design.md, "Limits and measures")."""
    try:
        stb = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
    except Exception:
        # IPython 8.5's stack_data cannot always place the code of a cell magic's body
        # (NotOneValueFound); a plain traceback still shows the message.
        stb = traceback.format_exception(etype, value, tb)
    if hasattr(shell, "_get_exc_info") and hasattr(shell, "_showtraceback"):
        shell._get_exc_info((etype, value, tb))
        shell._showtraceback(etype, value, stb)
    else:  # a shell without IPython's private methods: the public one
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
    return stb


def uninstall(shell):
    """Put back the custom exception handlers found at load."""
    saved = STATE.saved_custom_exc
    if saved is None:
        return
    types, tb = saved
    shell.custom_exceptions = types
    if tb is not None:
        shell.CustomTB = tb
    STATE.saved_custom_exc = None


def refusal_message(error):
    """The message for a MemoryError that memguard caused (a refusal not yet reported), or
    None for any other MemoryError. Also publishes nothing: the alert was already sent by
    the relay when the hook refused."""
    ref = coreview.refusal(STATE.core)
    if ref.count == STATE.refusals_seen:
        return None
    STATE.refusals_seen = ref.count
    cell = STATE.current
    what, where = refused_what_where(ref, error)
    if cell is not None and cell.count is not None:
        where += f" of cell {cell.count}"
    snap = coreview.snapshot(STATE.core)
    if ref.reason == STATE.core.REFUSE_BUDGET:
        over = (f"would take this cell over its budget of {format_size(snap.budget)} "
                f"(it has used {format_size(max(0, snap.cell_usage))})")
        fix = ("free what you no longer need (del), work in chunks, or raise the budget "
               "(%memguard budget SIZE, or %%memguard SIZE for one cell)")
    else:
        limit = STATE.limit
        raw = STATE.core.refusal()  # used and reserve: the figures the hook judged by
        used = raw.get("used") or snap.used(STATE.limit_measure)
        reserve = raw.get("reserve") or 0
        over = (f"would take the kernel over the machine's limit of {format_size(limit.bytes)} "
                f"({limit.source}; {STATE.limit_measure.label} {format_size(used)}")
        over += (f", and {format_size(reserve)} of the limit is kept for what cannot be "
                 f"refused)" if reserve else ")")
        fix = "free memory (del), work in chunks, or use a machine with more memory"
    return (f"memguard (raise mode) refused {what}{where}: it {over}. Nothing was allocated "
            f"and the kernel is fine; {fix}.")


def refused_what_where(ref, error):
    """The phrases naming what a refusal (coreview.refusal's ``ref``) refused and where, for
    the MemoryError ``error`` it caused: ("an allocation of 2 GB[ for an array with shape
    (..) and dtype ..]", " at line N" or ""). Shared by the kernel's and the Dask workers'
    messages."""
    what = f"an allocation of {format_size(ref.bytes)}"
    found = _NUMPY_MSG.search(str(error))
    if found:
        what += f" for an array with shape {found.group(1)} and dtype {found.group(2)}"
    line = ref.line if ref.line > 0 else _traceback_line(error)
    return what, (f" at line {line}" if line and line > 0 else "")


def _traceback_line(error):
    """The cell line in ``error``'s traceback (its innermost frame running the notebook's
    globals), or None: for a refusal made by a native hook in a call that released the GIL
    (torch, Arrow), where the hook could read no frame (docs/design.md, "Native memory")."""
    ns = STATE.shell.user_global_ns if STATE.shell is not None else None
    line, tb = None, getattr(error, "__traceback__", None)
    while tb is not None:
        if ns is not None and tb.tb_frame.f_globals is ns:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def sparse_refusal(pred, budget, usage):
    """Raise MemoryError before a sparse matrix is densified, in raise mode, when the dense
    array (``pred`` from sparse.predict) would not fit in what is left of the budget or
    under the limit. ``budget``/``usage`` in bytes (budget 0 = none)."""
    snap = coreview.snapshot(STATE.core)
    if not snap.raising:
        return
    dense = pred["dense_bytes"]
    rows, cols = pred["shape"]
    what = (f"turning a {pred['format'].upper()} matrix {rows:,}x{cols:,} (nnz {pred['nnz']:,}) "
            f"into a {format_size(dense)} dense {pred['dtype']} array")
    if budget and usage + dense > budget:
        raise MemoryError(
            f"memguard (raise mode) stopped {what}: it would take this cell over its budget of "
            f"{format_size(budget)} (it has used {format_size(max(0, usage))}). Nothing was "
            f"allocated; keep it sparse (X.mean(axis=0), X.sum(axis=1), X.multiply(Y), X @ Y) "
            f"or densify in row chunks.")
    limit = STATE.limit
    # The same line as the hooks: keep the reserve below the limit (mg_acct_reserve_for).
    reserve = STATE.core.refusal().get("reserve") or 0
    if limit is not None and snap.used(STATE.limit_measure) + dense > limit.bytes - reserve:
        raise MemoryError(
            f"memguard (raise mode) stopped {what}: it would take the kernel over the machine's "
            f"limit of {format_size(limit.bytes)} ({limit.source}). Nothing was allocated; keep "
            f"it sparse or densify in row chunks.")
