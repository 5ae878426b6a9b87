"""memguard: a memory guard inside the Jupyter kernel.

``%load_ext memguard`` counts every cell's memory (Python heap and NumPy data, through the C
extension ``memguard._core``), enforces per-cell budgets and alerts under the running cell
over IOPub. See README.md and the public contract in interface.md.

Nothing here touches IPython or the kernel at import time; the work happens in
``load_ipython_extension``.
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython):
    """Install memguard into ``ipython`` (idempotent: loading twice registers hooks once)."""
    from . import guard

    guard.load(ipython)


def unload_ipython_extension(ipython):
    """Remove every hook memguard installed into ``ipython`` and stop its threads."""
    from . import guard

    guard.unload(ipython)


def configure(sparse_min_bytes=None, sparse_min_ratio=None):
    """Tune the sparse_to_dense rule used when a cell has no budget.

    A densification alerts when the dense array is at least ``sparse_min_bytes`` (bytes, or
    a size string such as ``"256MiB"``; default 256 MiB) *and* at least
    ``sparse_min_ratio`` times the sparse matrix's bytes (default 10). Under a budget the
    rule is instead "dense bytes exceed what is left of the budget". Returns the rule now in
    force as a dict. Raises ValueError for a size that is not positive or a ratio < 1.
    """
    from . import guard

    return guard.configure(sparse_min_bytes, sparse_min_ratio)


def history():
    """Return every cell's record so far as a list of dicts (see ``%memguard history``)."""
    from ._state import STATE

    return [dict(rec) for rec in STATE.history]
