"""The post-crash report: a black box whose kernel died, turned into a ``crash_report``
alert (interface.md) with a text, an HTML rendering (timeline as inline SVG drawn by
matplotlib) and a suggestion per detector that had fired.

Used by guard.py after a restart, by ``%memguard report``, and by
``python -m memguard report [FILE]`` in a terminal.
"""

import html
import io
import time

from .render import ALERT_MIME
from .sizes import format_blocks, format_size

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


def text(alert):
    """The report for a terminal: a few lines, units everywhere."""
    out = [f"memguard post-crash report: {alert['message']}"]
    for n, code, here in alert["source"]:
        out.append(f"  {'->' if here else '  '} {n:4d} | {code}")
    if alert["timeline"]:
        first, last = alert["timeline"][0], alert["timeline"][-1]
        out.append(f"  RSS went from {format_size(first[1])} to {format_size(last[1])} in the "
                   f"last {-first[0]:.1f} s (peak {format_size(alert['peak'])})")
    for site in alert["top_sites"]:
        where = f"cell {site['cell']}" if site["cell"] is not None else "an earlier cell"
        where += f", line {site['line']}" if site["line"] else ""
        out.append(f"  held: {format_size(site['bytes'])} in {format_blocks(site['count'])} "
                   f"({where})")
    for a in alert["alerts"]:
        out.append(f"  alert before the death: {a['kind']}: {a['message']}")
    for s in alert["suggestions"]:
        out.append(f"  to change: {s}")
    return "\n".join(out)


def _svg(alert):
    """The timeline as an inline SVG (matplotlib's Agg-free SVG backend), or ''."""
    timeline = alert["timeline"]
    if len(timeline) < 2:
        return ""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(5.5, 1.8), dpi=72)
    ax = fig.add_subplot()
    t = [p[0] for p in timeline]
    ax.plot(t, [p[1] / 1e9 for p in timeline], label="RSS")
    ax.plot(t, [p[2] / 1e9 for p in timeline], label="tracked")
    if alert.get("limit"):
        ax.axhline(alert["limit"] / 1e9, color="red", linestyle="--", linewidth=1, label="limit")
    ax.set_xlabel("seconds before the kernel died")
    ax.set_ylabel("GB")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.find("<svg"):]


def html_report(alert):
    """A self-contained HTML box (no JavaScript, no IFrame), in the style of render.py's
    alert boxes: the same frame, heading and colours, readable in light and dark themes."""
    from . import render

    mark = "background:rgba(245, 124, 0, 0.30);font-weight:600;"
    rows = "".join(
        f"<div style='{mark if here else ''}'>{'&rarr;' if here else '&nbsp;'} {n:4d} | "
        f"{html.escape(code)}</div>" for n, code, here in alert["source"])
    if rows:
        rows = (f"<div style='font-family:var(--jp-code-font-family, monospace);font-size:90%;"
                f"white-space:pre;overflow-x:auto;margin:4px 0'>{rows}</div>")
    sites = "".join(
        f"<li>{html.escape(format_size(s['bytes']))} in {format_blocks(s['count'])} "
        f"({html.escape('cell ' + str(s['cell']) if s['cell'] is not None else 'an earlier cell')}"
        f"{', line ' + str(s['line']) if s['line'] else ''})</li>" for s in alert["top_sites"])
    alerts = "".join(f"<li><b>{html.escape(a['kind'])}</b>: {html.escape(a['message'])}</li>"
                     for a in alert["alerts"])
    todo = "".join(f"<li>{html.escape(s)}</li>" for s in alert["suggestions"])
    ul = "<ul style='margin:2px 0 4px 0;padding-left:1.5em'>"
    head = "<div style='margin-top:4px;font-weight:600'>"
    place = render.where(alert) if alert.get("cell") is not None else ""
    return (
        f'<div class="memguard-alert memguard-crash" role="alert" '
        f'aria-label="memguard: the kernel died" style="{render.box_style("error")}">'
        f'{render.heading("error", "the kernel died", place)}'
        f"<div>{html.escape(alert['message'])}</div>"
        f"{rows}{_svg(alert)}"
        + (f"{head}Memory still held when it died:</div>{ul}{sites}</ul>" if sites else "")
        + (f"{head}Alerts before the death:</div>{ul}{alerts}</ul>" if alerts else "")
        + f"{head}What to change:</div>{ul}{todo}</ul></div>"
    )


def bundle(alert):
    """The ``data`` of the IOPub message."""
    return {"text/plain": text(alert), "text/html": html_report(alert), ALERT_MIME: alert}


def age(alert):
    """How long ago the kernel died, as text."""
    seconds = max(0.0, time.time() - alert.get("died", time.time()))
    return f"{seconds / 60:.0f} min ago" if seconds >= 120 else f"{seconds:.0f} s ago"
