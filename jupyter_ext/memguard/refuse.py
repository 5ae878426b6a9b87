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
        if issubclass(etype, builtins.MemoryError):
            message = refusal_message(value)
            if message:
                value.args = (message,)
                try:
                    value.__class__ = MemoryError  # so str(value), hence evalue, is ours
                    etype = MemoryError
                except TypeError:  # an extension type with its own layout: keep it
                    pass
            try:
                return self.InteractiveTB.structured_traceback(etype, value, tb,
                                                               tb_offset=tb_offset)
            except Exception:
                # IPython 8.5's stack_data cannot always place the code of a cell magic's
                # body (NotOneValueFound); a plain traceback still shows our message.
                return traceback.format_exception(etype, value, tb)
        return prev_tb(etype, value, tb, tb_offset=tb_offset)

    ours = (builtins.MemoryError,) + _numpy_memory_errors()
    shell.set_custom_exc(tuple(t for t in prev_types if t not in ours) + ours, handler)


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
    what = f"an allocation of {format_size(ref.bytes)}"
    found = _NUMPY_MSG.search(str(error))
    if found:
        what += f" for an array with shape {found.group(1)} and dtype {found.group(2)}"
    where = f" at line {ref.line}" if ref.line > 0 else ""
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
        over = (f"would take the kernel over the machine's limit of {format_size(limit.bytes)} "
                f"({limit.source}; {STATE.limit_measure.label} now "
                f"{format_size(snap.used(STATE.limit_measure))})")
        fix = "free memory (del), work in chunks, or use a machine with more memory"
    return (f"memguard (raise mode) refused {what}{where}: it {over}. Nothing was allocated "
            f"and the kernel is fine; {fix}.")


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
    if limit is not None and snap.used(STATE.limit_measure) + dense > limit.bytes:
        raise MemoryError(
            f"memguard (raise mode) stopped {what}: it would take the kernel over the machine's "
            f"limit of {format_size(limit.bytes)} ({limit.source}). Nothing was allocated; keep "
            f"it sparse or densify in row chunks.")
