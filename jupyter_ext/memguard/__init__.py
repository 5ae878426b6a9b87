"""memguard: a memory guard inside the Jupyter kernel.

``%load_ext memguard`` counts every cell's memory (Python heap and NumPy data, through the C
extension ``memguard._core``), enforces per-cell budgets and alerts under the running cell
over IOPub. See README.md and the public contract in docs/interface.md.

Nothing here touches IPython or the kernel at import time; the work happens in
``load_ipython_extension``.
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython):
    """Install memguard into ``ipython`` (idempotent: loading twice registers hooks once).
    If a step fails, the steps done are undone and the error is raised."""
    _import_numpy_first()
    from . import extension, magics

    extension.load(ipython, magics.MemguardMagics)


def _import_numpy_first():
    """Import NumPy, which the load imports anyway, before memguard's own modules. Imported
    after them, NumPy's small-array loops ran slower for the rest of the kernel's life with
    no hook running differently: small_arrays against plain 1.084 on CPython 3.12 and
    1.078-1.083 on 3.11 when loaded that way, 1.038 and 1.067 with this import first
    (bench/overhead.py's paired runners, three pairs each, 2026-12-02). Why the order
    matters is not known (the heap layout the imports leave is the likely cause). A NumPy
    that is missing or fails to import is left to the load, which says so."""
    try:
        import numpy  # noqa: F401
    except Exception:  # noqa: BLE001 - reported by the load (extension._install_numpy)
        pass


def unload_ipython_extension(ipython):
    """Remove every hook memguard installed into ``ipython`` and stop its threads."""
    from . import extension

    extension.unload(ipython)


def configure(sparse_min_bytes=None, sparse_min_ratio=None, attribution_threshold=None,
              accumulation_min_count=None, accumulation_budget_fraction=None,
              accumulation_min_bytes=None, limit_fraction=None):
    """Tune memguard's detectors; arguments left as None keep their value.

    sparse_to_dense, used when a cell has no budget: a densification alerts when the dense
    array is at least ``sparse_min_bytes`` (bytes, or a size string such as ``"256MiB"``;
    default 256 MiB) *and* at least ``sparse_min_ratio`` times the sparse matrix's bytes
    (default 10). Under a budget the rule is "dense bytes exceed what is left of it".

    Line attribution: blocks of at least ``attribution_threshold`` bytes (default 128 KiB,
    glibc's default mmap threshold; pymalloc's 1 MiB arenas are above it) are attributed
    to the cell line that allocated them. Smaller blocks are counted but not attributed.

    accumulation: a line alerts when at least ``accumulation_min_count`` of its attributed
    blocks (default 3) are alive at once and they hold at least
    ``accumulation_budget_fraction`` of the cell's budget (default 0.25), or
    ``accumulation_min_bytes`` (default 256 MiB) when the cell has no budget.

    limit: the ``limit`` alert fires when the figure the effective limit applies to (RSS for
    physical RAM, the address-space size for RLIMIT_AS, the cgroup's usage for a cgroup
    limit) passes ``limit_fraction`` of it (default 0.9).

    Returns every setting now in force as a dict. Raises ValueError, changing nothing, for
    a size that is not positive, a ratio < 1, a threshold < 4096 bytes, a count < 1 or a
    fraction outside (0, 1].
    """
    from . import commands

    return commands.configure(sparse_min_bytes, sparse_min_ratio, attribution_threshold,
                           accumulation_min_count, accumulation_budget_fraction,
                           accumulation_min_bytes, limit_fraction)


def history():
    """Return every finished cell's record since load, oldest first, as a list of dicts:
    ``epoch`` (memguard's cell counter), ``cell`` (execution count or None), ``peak``
    (peak tracked usage), ``retained`` (tracked growth at the end), ``untracked`` (RSS growth
    minus tracked growth), ``rss`` and ``rss_peak`` (bytes), ``budget`` (bytes or None),
    ``seconds`` (wall time), ``top_site`` (``{cell, line, bytes, count}`` of the line still
    holding the most attributed bytes, or None) and ``alerts`` (kinds, in order). All sizes
    are integer bytes. The same table is shown by ``%memguard history``."""
    from . import commands

    return commands.history()
