"""The post-crash report: a black box whose kernel died, turned into a ``crash_report``
alert (docs/interface.md) with a suggestion per detector that had fired. render.py draws it
(text, and HTML with the timeline as an inline SVG).

Used by extension.py when memguard loads after a crash, by ``%memguard report``, and by
``python -m memguard report [FILE]`` in a terminal.
"""

from .sizes import format_size

# What to change, per detector that fired before the death (the product's rules, README).
SUGGESTIONS = {
    "sparse_to_dense": "keep the aggregation sparse (X.mean(axis=0), X.sum(axis=1), "
                       "X.multiply(Y), X @ Y) or densify in row chunks",
    "accumulation": "do not keep every iteration's result: aggregate, write out and clear, "
                    "or preallocate one array and fill it",
    "budget": "work in chunks and del what you no longer need; set a budget with "
              "%memguard budget SIZE and %memguard mode raise to fail cleanly next time",
    "limit": "the kernel was close to the machine's limit: free memory between cells, or "
             "use %memguard mode raise so the allocation fails instead of the kernel",
}
GENERIC = ("set a budget (%memguard budget SIZE) and %memguard mode raise, so the next "
           "allocation that would not fit raises MemoryError instead of killing the kernel")
CONTEXT_LINES = 3  # lines shown on each side of the line that was running


def crash_alert(box, limit=None):
    """The ``crash_report`` alert dict for ``box`` (blackbox.BlackBox). ``limit`` is the
    current effective limit (limits.Limit), used when the box recorded none."""
    st = box.state
    cell = box.cell_count
    line = st["line"] if st["epoch"] == box.cell_epoch else None
    count_of = dict(box.cells)
    count_of.setdefault(box.cell_epoch, cell)
    top = [{"cell": count_of.get(s["epoch"]), "line": s["line"], "bytes": s["bytes"],
            "count": s["count"]} for s in box.sites if s["bytes"] > 0][:5]
    # An alert updated in place was written to the box at each update: keep its last state.
    latest = {}
    for a in box.alerts:
        latest[(a["epoch"], a["kind"], a["line"])] = a
    fired = list(latest.values())
    kinds = []
    for a in fired:
        if a["kind"] not in kinds:
            kinds.append(a["kind"])
    suggestions = [SUGGESTIONS[k] for k in kinds if k in SUGGESTIONS] or [GENERIC]
    limit_bytes = st["limit"] or (limit.bytes if limit else None)
    limit_source = limit.source if limit else None
    died = box.samples[-1][0] if box.samples else st["t"]
    where = f"cell {cell}" if cell is not None else "a cell"
    if line:
        where += f", line {line}"
    of_limit = (f" ({st['rss_peak'] / limit_bytes:.0%} of the {format_size(limit_bytes)} limit)"
                if limit_bytes else "")
    message = (f"The kernel (pid {box.pid}) died while running {where}; its memory (RSS) had "
               f"reached {format_size(st['rss_peak'])}{of_limit}. To change: "
               f"{suggestions[0]}.")
    return {
        "kind": "crash_report",
        "cell": cell,
        "line": line,
        "bytes": int(st["rss_peak"]),
        "budget": st["budget"],
        "limit": limit_bytes,
        "limit_source": limit_source,
        "peak": int(st["rss_peak"]),
        "rss": int(box.samples[-1][1] if box.samples else st["rss"]),
        "pid": box.pid,
        "died": died,
        "tracked_peak": int(st["cell_peak"]),
        "top_sites": top,
        "alerts": [{k: a[k] for k in ("kind", "cell", "line", "bytes", "message")}
                   for a in fired],
        "source": _excerpt(box.cell_source, line),
        "suggestions": suggestions,
        "timeline": _timeline(box),
        "message": message,
    }


def _excerpt(source, line):
    """[(line number, text, is_the_line)] around ``line`` (or the first lines)."""
    if source is None:
        return []
    lines = source.splitlines()
    if not lines:
        return []
    centre = line if line and 1 <= line <= len(lines) else 1
    lo, hi = max(1, centre - CONTEXT_LINES), min(len(lines), centre + CONTEXT_LINES)
    return [[n, lines[n - 1], n == line] for n in range(lo, hi + 1)]


def _timeline(box, points=120):
    """Up to ``points`` (seconds before death, RSS bytes, tracked bytes) samples."""
    samples = box.samples
    if not samples:
        return []
    step = max(1, len(samples) // points)
    picked = samples[::step]
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    end = samples[-1][0]
    return [[round(t - end, 2), int(rss), int(tracked)] for t, rss, tracked, _e in picked]
