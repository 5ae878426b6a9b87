"""Mime bundles for alerts and status: ``text/plain``, ``text/html`` and the alert JSON.

Every figure is printed with its unit. HTML uses JupyterLab's CSS variables (with fallbacks)
so it reads in light and dark themes, needs no JavaScript, and survives HTML export.
"""

import html

from .sizes import format_size

ALERT_MIME = "application/vnd.memguard.alert+json"

_TITLES = {
    "budget": "cell budget exceeded",
    "limit": "close to the machine's memory limit",
    "sparse_to_dense": "sparse matrix turned dense",
    "accumulation": "memory kept alive in a loop",
    "crash_report": "the kernel died",
}


def where(alert):
    """``'cell 5, line 3'`` (or what of it is known) for an alert dict."""
    parts = []
    if alert.get("cell") is not None:
        parts.append(f"cell {alert['cell']}")
    if alert.get("line") is not None:
        parts.append(f"line {alert['line']}")
    return ", ".join(parts) or "unknown line"


def figures(alert):
    """The alert's key figures as one line of text, units included."""
    parts = [f"peak {format_size(alert.get('peak'))}"]
    if alert.get("budget"):
        parts.append(f"budget {format_size(alert['budget'])}")
    if alert.get("limit"):
        parts.append(f"limit {format_size(alert['limit'])} ({alert.get('limit_source')})")
    if alert["kind"] == "accumulation":
        parts.insert(0, f"{alert['count']:,} live blocks, {format_size(alert['retained_bytes'])} "
                        f"retained")
    if alert["kind"] == "budget" and alert.get("rss_bytes") is not None:
        parts.append(f"RSS {format_size(alert['rss_bytes'])}, untracked growth "
                     f"{format_size(alert['untracked_bytes'])}")
    if alert["kind"] == "sparse_to_dense":
        rows, cols = alert["shape"]
        parts.insert(0, f"{alert['format']} {rows:,}x{cols:,} {alert['dtype']}, "
                        f"nnz {alert['nnz']:,}, {format_size(alert['sparse_bytes'])} sparse -> "
                        f"{format_size(alert['dense_bytes'])} dense")
    return "; ".join(parts)


def text(alert):
    """Two lines for terminals and logs: what happened where, then the figures (plus
    tracemalloc's top lines for a ``--trace`` cell)."""
    title = _TITLES.get(alert["kind"], alert["kind"])
    out = f"memguard: {title} ({where(alert)}): {alert['message']}\n  {figures(alert)}"
    for line in _trace_lines(alert):
        out += f"\n  traced: {line}"
    return out


def _trace_lines(alert):
    from .trace import format_top

    return format_top(alert.get("trace") or [])


def _bar(alert):
    used = alert.get("peak") or 0
    cap = alert.get("budget") or alert.get("limit") or 0
    if alert["kind"] == "sparse_to_dense":
        used = alert["dense_bytes"]
    if cap <= 0:
        return ""
    pct = min(100.0, 100.0 * used / cap)
    color = "var(--jp-error-color1, #d32f2f)" if used > cap else "var(--jp-warn-color1, #f57c00)"
    label = html.escape(f"{format_size(used)} of {format_size(cap)} ({100.0 * used / cap:.0f}%)")
    return (
        '<div style="margin-top:4px;height:8px;width:100%;max-width:32em;'
        'background:var(--jp-layout-color3, #ddd);border-radius:4px" role="meter" '
        f'aria-valuemin="0" aria-valuemax="{cap}" aria-valuenow="{used}" aria-label="{label}">'
        f'<div style="height:8px;width:{pct:.1f}%;background:{color};border-radius:4px"></div>'
        f'</div><div style="font-size:90%">{label}</div>'
    )


def html_alert(alert):
    """A compact, self-contained HTML box for the alert."""
    title = html.escape(_TITLES.get(alert["kind"], alert["kind"]))
    return (
        '<div class="memguard-alert" style="border-left:4px solid '
        'var(--jp-warn-color1, #f57c00);padding:4px 8px;margin:2px 0;'
        'color:var(--jp-ui-font-color1, inherit);background:var(--jp-layout-color2, #fff8e1)">'
        f"<b>memguard: {title}</b> <span>({html.escape(where(alert))})</span>"
        f"<div>{html.escape(alert['message'])}</div>"
        f'<div style="font-size:90%">{html.escape(figures(alert))}</div>'
        f"{_bar(alert)}{_trace_html(alert)}</div>"
    )


def _trace_html(alert):
    lines = _trace_lines(alert)
    if not lines:
        return ""
    items = "".join(f"<li><code>{html.escape(line)}</code></li>" for line in lines)
    return f'<div style="font-size:90%">tracemalloc, largest first:<ul>{items}</ul></div>'



def alert_bundle(alert):
    """The ``data`` of the IOPub message: the three MIME types of interface.md."""
    if alert["kind"] == "crash_report":
        from . import report

        return report.bundle(alert)
    return {"text/plain": text(alert), "text/html": html_alert(alert), ALERT_MIME: alert}


def status_bundle(rows):
    """``rows``: list of (label, value text). A two-column table and its plain text."""
    plain = "\n".join(f"{label:<18} {value}" for label, value in rows)
    body = "".join(
        f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
        f"<td style='text-align:left'>{html.escape(value)}</td></tr>"
        for label, value in rows
    )
    return {"text/plain": plain, "text/html": f"<table class='memguard-status'>{body}</table>"}
