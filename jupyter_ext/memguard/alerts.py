"""Alert records (the ``application/vnd.memguard.alert+json`` schema of interface.md).

Each function returns a plain dict with at least ``kind``, ``cell``, ``line``, ``bytes``,
``budget``, ``limit``, ``limit_source``, ``peak`` and ``message``; sizes are integer bytes.
"""

from .sizes import format_size


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


def budget_alert(state, cell, line, usage, peak, budget, request):
    """The cell's usage (bytes) crossed ``budget`` (bytes); ``request`` is the size of the
    allocation that crossed it (bytes, 0 if unknown) and ``line`` where it was made."""
    alert = _base("budget", state, cell, line, usage, peak, budget)
    alert["request_bytes"] = int(request)
    at = f" at line {line}" if alert["line"] else ""
    alert["message"] = (
        f"This cell has used {format_size(peak)}, over its budget of {format_size(budget)} "
        f"(crossed{at}); free what you no longer need (del), work in chunks, "
        f"or raise the budget with %memguard budget SIZE."
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
