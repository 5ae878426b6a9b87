"""What the ``%memguard`` subcommands and ``memguard.configure`` do, as data: settings
changed, the lines they print, the rows ``status`` shows and the records ``history``
shows. magics.py parses the arguments; render.py draws the tables.
"""

from . import coreview, limits
from ._state import STATE
from .sizes import format_size, parse_size


def setting_line():
    """``limit 16 GB (physical), budget off, mode warn``: the settings in one line."""
    limit = STATE.limit
    budget = format_size(STATE.default_budget) if STATE.default_budget else "off"
    return (f"limit {format_size(limit.bytes)} ({limit.source}), budget {budget}, "
            f"mode {STATE.mode}")


def set_default_budget(nbytes):
    """``%memguard budget SIZE|off``: the budget of every following cell (bytes, 0 = off).
    Returns the line to print."""
    STATE.default_budget = nbytes
    if not nbytes:
        return "memguard: budget off for the following cells"
    return f"memguard: budget {format_size(nbytes)} per cell from the next cell on"


def set_mode(mode):
    """``%memguard mode warn|raise``: the mode of every following cell (and this one).
    Returns the line to print."""
    STATE.mode = mode
    STATE.core.set_raise(mode == "raise")
    return f"memguard: mode {mode}" + (
        " (an allocation that would cross the budget or the limit fails with MemoryError)"
        if mode == "raise" else "")


def set_summary(on):
    """``%memguard summary on|off``. Returns the line to print."""
    STATE.summary = on
    return f"memguard: summary {'on' if on else 'off'}"


def history():
    """Every finished cell's record since load, oldest first (see memguard.history)."""
    return [dict(rec) for rec in STATE.history]


def crash_report():
    """``%memguard report``: the post-crash report found when memguard loaded (an alert
    dict), or the line saying there is none."""
    if STATE.last_report is None:
        return ("memguard: no post-crash report: the kernel that ran before this one (same "
                "connection file) did not die with memguard loaded")
    return STATE.last_report


def status_rows():
    """(label, text) rows for ``%memguard status``."""
    core = STATE.core
    snap = coreview.snapshot(core)
    limit = STATE.limit
    last = STATE.history[-1] if STATE.history else None
    relay = coreview.monitor_stats(core)
    sites = coreview.sites_config(core)
    gap = snap.outside_hooks - STATE.rss_baseline
    this_cell = " (this cell: raise)" if snap.raising and STATE.mode != "raise" else ""
    rows = [
        ("memguard", core.VERSION),
        ("limit", f"{format_size(limit.bytes)} ({limit.source}: {limit.detail})"),
        ("budget", format_size(STATE.default_budget) if STATE.default_budget else "off"),
        ("mode", STATE.mode + this_cell),
        ("limit alert", f"at {STATE.limit_fraction:.0%} of the limit; "
                        f"{STATE.limit_measure.label} now "
                        f"{format_size(snap.used(STATE.limit_measure))}"),
        ("tracked", f"{format_size(snap.tracked)} since load (Python heap "
                    f"{format_size(snap.python_heap)}, NumPy {format_size(snap.numpy)}, "
                    f"native {format_size(snap.native)})"),
        ("RSS", f"{format_size(snap.rss)} (baseline at load {format_size(STATE.rss_baseline)})"),
        ("untracked", f"{format_size(gap)} (RSS - baseline - tracked: native code, threads "
                      f"outside Python's allocators, allocator free lists)"),
        ("last cell peak", f"{format_size(last['peak'])} (cell {last['cell']})" if last else "n/a"),
        ("NumPy arrays", _numpy_row(core)),
        ("native memory", _native_row(core)),
        ("attribution", f"blocks >= {format_size(sites.threshold)}; accumulation at "
                        f">= {sites.min_count} live blocks and >= "
                        f"{sites.budget_fraction:.0%} of the budget "
                        f"({format_size(sites.no_budget_bytes)} without one)"),
        ("summary", "on" if STATE.summary else "off"),
        ("alerts relayed", f"{relay.sent} sent, {relay.dropped + relay.ring_dropped} dropped"),
    ]
    rows += [("note", note) for note in STATE.notes]
    return rows


def _numpy_row(core):
    """How NumPy data is counted: by the NEP 49 handler, and with the NumPy route
    (docs/design.md) at NumPy's own malloc calls, the handler then judging only raise
    mode's and large requests."""
    if not STATE.numpy_counted:
        return "not counted"
    if core.native_stats().get("numpy_route"):
        return "counted (NEP 49 handler 'memguard', blocks at NumPy's own malloc calls)"
    return "counted (NEP 49 handler 'memguard')"


def _native_row(core):
    """What the native hooks cover (docs/design.md, "Native memory"), naming every shared
    object memguard could not patch."""
    stats = core.native_stats() if hasattr(core, "native_stats") else None
    if not stats or not stats["installed"]:
        return "not counted (native hooks off)"
    text = (f"counted (malloc family and anonymous mmap; {stats['slots']} GOT slots "
            f"patched, {stats['mappings']} mappings)")
    if stats["failed"]:
        text += "; not patched: " + ", ".join(stats["failed"])
    return text


def _size(value, name, example):
    """A size argument of configure: bytes, or a size string (sizes.parse_size)."""
    if isinstance(value, str):
        try:
            return parse_size(value, STATE.limit.bytes if STATE.limit else 0)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
        raise ValueError(f"{name} must be a positive size, e.g. {example!r}")
    return int(value)


def _fraction(value, name, example):
    """A fraction argument of configure, in (0, 1]."""
    fraction = float(value)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], e.g. {example}")
    return fraction


def configure(sparse_min_bytes=None, sparse_min_ratio=None, attribution_threshold=None,
              accumulation_min_count=None, accumulation_budget_fraction=None,
              accumulation_min_bytes=None, limit_fraction=None):
    """See memguard.configure."""
    new = {}
    if sparse_min_bytes is not None:
        new["sparse_min_bytes"] = _size(sparse_min_bytes, "sparse_min_bytes", "256MiB")
    if sparse_min_ratio is not None:
        ratio = float(sparse_min_ratio)
        if not ratio >= 1.0 or ratio == float("inf"):
            raise ValueError("sparse_min_ratio must be a finite number >= 1, e.g. 10")
        new["sparse_min_ratio"] = ratio
    rule = {}
    if attribution_threshold is not None:
        rule["threshold"] = _size(attribution_threshold, "attribution_threshold", "128KiB")
        if rule["threshold"] < 4096:
            raise ValueError("attribution_threshold must be at least 4096 bytes, e.g. '128KiB'")
    if accumulation_min_count is not None:
        if isinstance(accumulation_min_count, bool) or not isinstance(accumulation_min_count, int) \
                or accumulation_min_count < 1:
            raise ValueError("accumulation_min_count must be a whole number >= 1, e.g. 3")
        rule["min_count"] = accumulation_min_count
    if accumulation_budget_fraction is not None:
        rule["budget_fraction"] = _fraction(accumulation_budget_fraction,
                                            "accumulation_budget_fraction", 0.25)
    if accumulation_min_bytes is not None:
        rule["no_budget_bytes"] = _size(accumulation_min_bytes, "accumulation_min_bytes",
                                        "256MiB")
    if limit_fraction is not None:
        new["limit_fraction"] = _fraction(limit_fraction, "limit_fraction", 0.9)
    # Everything was checked: only now change anything.
    for key, value in new.items():
        setattr(STATE, key, value)
    if limit_fraction is not None and STATE.loaded:
        apply_limit()
    from . import _core  # the C settings are process-wide: they apply before load too

    current = coreview.sites_config(_core, **rule)
    return {
        "sparse_min_bytes": STATE.sparse_min_bytes,
        "sparse_min_ratio": STATE.sparse_min_ratio,
        "attribution_threshold": current.threshold,
        "accumulation_min_count": current.min_count,
        "accumulation_budget_fraction": current.budget_fraction,
        "accumulation_min_bytes": current.no_budget_bytes,
        "limit_fraction": STATE.limit_fraction,
    }


def apply_limit():
    """Hand the effective limit, its measure and the alert fraction to the C side."""
    STATE.limit_measure, note = limits.apply(STATE.core, STATE.limit, STATE.limit_fraction)
    if note:
        STATE.notes.append(note)
