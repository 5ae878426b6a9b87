"""Alert records (the ``application/vnd.memguard.alert+json`` schema of docs/interface.md).

Each function returns a plain dict with at least ``kind``, ``cell``, ``line``, ``bytes``,
``budget``, ``limit``, ``limit_source``, ``peak`` and ``message``; sizes are integer bytes.
"""

from .sizes import format_blocks, format_size


def _base(kind, state, cell, line, nbytes, peak, budget):
    limit = state.limit
    return {
        "kind": kind,
        "cell": cell.count if cell is not None else None,
        "line": line if line is not None and line > 0 else None,
        "bytes": int(nbytes),
        "budget": int(budget) if budget else None,
        "limit": int(limit.bytes) if limit else None,
        "limit_source": limit.source if limit else None,
        "peak": int(peak),
        "message": "",
    }


def budget_alert(state, cell, line, usage, peak, budget, request, gap, top_site=None,
                 tracked=None):
    """The cell's usage (bytes) crossed ``budget`` (bytes); ``request`` is the size of the
    allocation that crossed it (bytes, 0 if unknown) and ``line`` where it was made.

    ``gap`` is a dict ``{"rss_bytes", "rss_growth", "untracked_bytes"}``: RSS now, RSS
    growth since the cell began, and the part of that growth no hook counted (native code,
    threads outside Python's allocators, allocator retention), all in bytes. When the
    untracked part is what crossed the budget (RSS growth over the budget, and untracked
    growth larger than tracked usage), the message says so. ``top_site`` is
    ``{"cell", "line", "bytes", "count"}`` for the line holding the most live attributed
    bytes in this cell, or None.
    """
    alert = _base("budget", state, cell, line, usage, peak, budget)
    alert["request_bytes"] = int(request)
    alert.update({k: int(v) for k, v in gap.items()})
    alert["top_site"] = top_site
    untracked = gap["untracked_bytes"]
    tracked = usage if tracked is None else tracked
    at = f" at line {line}" if alert["line"] else ""
    # The RSS wording only while RSS growth is over the budget: an alert brought up to date
    # after the cell freed its memory keeps the tracked wording and its peak.
    if untracked > max(tracked, 0) and gap["rss_growth"] > budget:
        alert["message"] = (
            f"This cell's memory (RSS) grew by {format_size(gap['rss_growth'])}, over its budget "
            f"of {format_size(budget)}{at}, and {format_size(untracked)} of it is untracked: "
            f"allocated by native code or threads outside Python's and NumPy's allocators "
            f"(memguard counted {format_size(max(tracked, 0))}); look at C extensions, "
            f"databases and thread pools in this cell, and close or chunk them."
        )
        return alert
    most = ""
    if top_site and top_site.get("line") is not None and top_site["bytes"] > 0:
        most = (f"; most of it is held by line {top_site['line']} "
                f"({format_size(top_site['bytes'])} in {format_blocks(top_site['count'])})")
    alert["message"] = (
        f"This cell has used {format_size(peak)}, over its budget of {format_size(budget)} "
        f"(crossed{at}){most}; free what you no longer need (del), work in chunks, "
        f"or raise the budget with %memguard budget SIZE."
    )
    return alert


def accumulation_alert(state, cell, line, count, retained, peak, budget):
    """Line ``line`` keeps ``count`` blocks alive, ``retained`` bytes in all, within one cell:
    the accumulation rule (``memguard.configure``) was met."""
    alert = _base("accumulation", state, cell, line, retained, peak, budget)
    alert["count"] = int(count)
    alert["retained_bytes"] = int(retained)
    share = (f", {retained / budget:.0%} of the cell's budget of {format_size(budget)}"
             if budget else "")
    at = f"Line {line}" if alert["line"] else "A line of this cell (not known)"
    alert["message"] = (
        f"{at} has allocated {count:,} blocks that are all still alive, "
        f"{format_size(retained)} in all{share}: something built in a loop is being kept. "
        f"Keep only what you need per iteration (aggregate, write out and clear, or del), "
        f"or preallocate one array and fill it."
    )
    return alert


def sparse_to_dense_alert(state, cell, line, pred, peak, budget, count, reason):
    """A sparse matrix is about to be densified; ``pred`` comes from sparse.predict and
    ``count`` is how many such conversions this line made in this cell."""
    alert = _base("sparse_to_dense", state, cell, line, pred["dense_bytes"], peak, budget)
    alert.update(pred)
    alert["count"] = count
    rows, cols = pred["shape"]
    times = f" ({count} times in this cell)" if count > 1 else ""
    alert["message"] = (
        f"{pred['format'].upper()} matrix {rows:,}x{cols:,} (density {pred['density']:.2%}) "
        f"is being turned into a {format_size(pred['dense_bytes'])} dense {pred['dtype']} "
        f"array{times}, {reason}; keep it sparse (X.mean(axis=0), X.sum(axis=1), "
        f"X.multiply(Y), X @ Y) or densify in row chunks."
    )
    return alert


def limit_alert(state, cell, line, used, measure, peak, budget, request=0):
    """The kernel's ``measure`` (a limits.Measure label: ``"RSS"``, ``"address space"`` or
    ``"cgroup usage"``, the figure the effective limit applies to) reached ``used`` bytes, past
    the alert fraction of the limit; or, with ``request`` > 0, one allocation of ``request``
    bytes asked for more than is left under the limit (flagged before it was made)."""
    alert = _base("limit", state, cell, line, request or used, peak, budget)
    limit = state.limit
    alert["used_bytes"] = int(used)
    alert["measure"] = measure
    alert["request_bytes"] = int(request)
    share = used / limit.bytes if limit and limit.bytes else 0.0
    at = f" at line {line}" if alert["line"] else ""
    if request:
        alert["message"] = (
            f"An allocation of {format_size(request)}{at} asks for more than the "
            f"{format_size(max(0, limit.bytes - used))} left under the machine's limit of "
            f"{format_size(limit.bytes)} ({limit.source}); it will fail or get the kernel killed. "
            f"Work in chunks, or turn on %memguard mode raise to have it fail cleanly."
        )
    else:
        alert["message"] = (
            f"This kernel's {measure} is {format_size(used)}, {share:.0%} of the machine's limit "
            f"of {format_size(limit.bytes)} ({limit.source}){at}; the next large allocation may "
            f"get the kernel killed. Free what you no longer need (del), save your results, "
            f"or restart the kernel."
        )
    return alert


def refused_alert(state, cell, line, request, reason_budget, peak, budget, used, measure):
    """raise mode refused an allocation of ``request`` bytes at ``line``: over the budget
    (``reason_budget``) or over the limit (``used`` bytes of ``measure`` so far)."""
    kind = "budget" if reason_budget else "limit"
    alert = _base(kind, state, cell, line, request, peak, budget)
    alert["request_bytes"] = int(request)
    alert["refused"] = True
    at = f" at line {line}" if alert["line"] else ""
    if reason_budget:
        over = f"it would have taken this cell over its budget of {format_size(budget)}"
    else:
        limit = state.limit
        alert["used_bytes"] = int(used)
        alert["measure"] = measure
        over = (f"it would have taken the kernel over the machine's limit of "
                f"{format_size(limit.bytes)} ({limit.source}; {measure} {format_size(used)})")
    alert["message"] = (
        f"raise mode refused an allocation of {format_size(request)}{at}: {over}. The cell got "
        f"a MemoryError, nothing was allocated, and the kernel is fine."
    )
    return alert
