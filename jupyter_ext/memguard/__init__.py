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


def history():
    """Return every cell's record so far as a list of dicts (see ``%memguard history``)."""
    from ._state import STATE

    return [dict(rec) for rec in STATE.history]
