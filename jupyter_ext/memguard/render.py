"""Every MIME bundle memguard shows: alerts, the post-crash report, ``%memguard status`` and
``history`` (``text/plain``, ``text/html`` and, for alerts, the alert JSON), and the text
lines of the per-cell summary.

Every figure is printed with its unit. ``text/plain`` is one line saying what happened where
and one line of key figures (plus tracemalloc's lines for a ``--trace`` cell), for
``jupyter console``, nbclient logs and ``make demo``. ``text/html`` is a compact box: a
heading (what, which cell and line), what happened, a usage bar against the budget or the
limit with a legend in words, the key figures of the kind, and what to do. It uses
JupyterLab's CSS variables with fallbacks, colour tints that read on light and dark
backgrounds and inherited text colour, so it reads in every JupyterLab theme, in Notebook 7
and after ``jupyter nbconvert --to html``; no JavaScript, no IFrame, inline styles only (a
``<style>`` element would leak into the whole page). Every value goes through html.escape.
"""

import html
import io
import time

from .sizes import format_blocks, format_size

ALERT_MIME = "application/vnd.memguard.alert+json"

_TITLES = {
    "budget": "cell budget exceeded",
    "limit": "close to the machine's memory limit",
    "sparse_to_dense": "sparse matrix turned dense",
    "accumulation": "memory kept alive in a loop",
    "crash_report": "the kernel died",
}

# Colours: JupyterLab's theme variables, with its light theme's values as fallbacks (the
# classic nbconvert template and other frontends define none of them). Text colour is never
# set, so it is the frontend's own (dark on light, light on dark); backgrounds are
# translucent tints that keep that text readable on either.
WARN = "var(--jp-warn-color1, #f57c00)"
ERROR = "var(--jp-error-color1, #d32f2f)"
_TINT = {"warn": "rgba(245, 124, 0, 0.10)", "error": "rgba(211, 47, 47, 0.10)"}
_EDGE = {"warn": "rgba(245, 124, 0, 0.45)", "error": "rgba(211, 47, 47, 0.45)"}
_ACCENT = {"warn": WARN, "error": ERROR}
_TRACK = "rgba(128, 128, 128, 0.28)"
_MARK = "var(--jp-ui-font-color0, #000)"
_CALM = "var(--jp-warn-color2, #ffb74d)"  # the part of the usage within the budget/limit


def _hatched(color):
    """A striped fill: memory asked for or about to be allocated, not (yet) in use."""
    return f"repeating-linear-gradient(135deg, {color} 0 3px, transparent 3px 6px)"


def severity(alert):
    """``'error'`` for what will fail or kill the kernel (limit, refusals, crash reports),
    ``'warn'`` for the rest."""
    if alert.get("kind") in ("limit", "crash_report") or alert.get("refused"):
        return "error"
    return "warn"


def title(alert):
    """The heading's words for the alert's kind."""
    kind = alert.get("kind")
    if alert.get("refused"):
        return "allocation refused (raise mode)"
    return _TITLES.get(kind, str(kind))


def where(alert):
    """``'cell 5, line 3'`` (or what of it is known) for an alert dict."""
    parts = []
    if alert.get("cell") is not None:
        parts.append(f"cell {alert['cell']}")
    if alert.get("line") is not None:
        parts.append(f"line {alert['line']}")
    if alert.get("task") is not None:  # a Dask task (memguard.dask): which, and where it ran
        parts.append(f"task {alert['task']!r}"
                     + (f", {alert['function']}()" if alert.get("function") else "")
                     + (f" on worker {alert['worker']}" if alert.get("worker") else ""))
    return ", ".join(parts) or "unknown line"


def _pct(part, whole):
    return f"{100.0 * part / whole:.0f}%" if whole else "n/a"


def _measure(alert):
    """The figure the limit applies to, as a label: ``RSS``, ``address space``, ...
    (limits.MEASURES), or ``used`` when the alert does not say."""
    return alert.get("measure") or "used"


def _limit_text(alert):
    source = alert.get("limit_source")
    return format_size(alert["limit"]) + (f" ({source})" if source else "")


def key_figures(alert):
    """The alert's key figures as ``[(label, value text)]``, units included, most telling
    first: per kind (docs/interface.md), then the cell's peak, budget and the limit."""
    kind = alert.get("kind")
    out = []
    budget, limit, peak = alert.get("budget"), alert.get("limit"), alert.get("peak")
    if kind == "sparse_to_dense":
        rows, cols = alert.get("shape") or (0, 0)
        out.append(("matrix", f"{str(alert.get('format', '?')).upper()} {rows:,} x {cols:,} "
                              f"{alert.get('dtype', '')}".rstrip()))
        if alert.get("density") is not None:
            out.append(("density", f"{alert['density']:.2%} ({alert.get('nnz', 0):,} nonzeros)"))
        out.append(("sparse", format_size(alert.get("sparse_bytes"))))
        dense = f"{format_size(alert.get('dense_bytes'))}"
        if alert.get("sparse_bytes"):
            dense += f" ({alert['dense_bytes'] / alert['sparse_bytes']:.0f}x the sparse size)"
        out.append(("dense", dense))
        if (alert.get("count") or 0) > 1:
            out.append(("densified", f"{alert['count']:,} times in this cell"))
    elif kind == "accumulation":
        out.append(("alive", format_blocks(alert.get("count", 0))))
        out.append(("retained", format_size(alert.get("retained_bytes"))))
    elif kind == "limit":
        if alert.get("used_bytes") is not None:
            used = format_size(alert["used_bytes"])
            if limit:
                used += f" ({_pct(alert['used_bytes'], limit)} of the limit)"
            out.append((_measure(alert), used))
        if alert.get("request_bytes"):
            out.append(("refused" if alert.get("refused") else "asked",
                        format_size(alert["request_bytes"])))
    elif kind == "budget":
        if alert.get("refused") and alert.get("request_bytes"):
            out.append(("refused", format_size(alert["request_bytes"])))
        elif alert.get("request_bytes"):
            out.append(("crossed by", f"an allocation of {format_size(alert['request_bytes'])}"))
        top = alert.get("top_site") or {}
        if top.get("line") is not None and top.get("bytes"):
            out.append((f"line {top['line']} holds",
                        f"{format_size(top['bytes'])} in {format_blocks(top.get('count', 0))}"))
        if alert.get("untracked_bytes"):
            out.append(("untracked", format_size(alert["untracked_bytes"])))
            if alert.get("rss_growth") is not None:
                out.append(("RSS growth", format_size(alert["rss_growth"])))
    if peak is not None:
        out.append(("cell peak", format_size(peak)))
    if budget:
        out.append(("budget", format_size(budget)
                    + (f" ({_pct(peak, budget)} used)" if kind == "budget" and peak else "")))
    if limit:
        out.append(("limit", _limit_text(alert)))
    return out


def figures(alert):
    """The alert's key figures as one line of text, units included."""
    return "; ".join(f"{label} {value}" for label, value in key_figures(alert))


def text(alert):
    """Two lines for terminals and logs: what happened where, then the figures (plus
    tracemalloc's top lines for a ``--trace`` cell)."""
    message = " ".join(str(alert.get("message", "")).split())
    out = f"memguard: {title(alert)} ({where(alert)}): {message}\n  {figures(alert)}"
    for line in _trace_lines(alert):
        out += f"\n  traced: {line}"
    return out


def _trace_lines(alert):
    """Text lines for the alert's tracemalloc top lines (field ``trace``, a ``--trace``
    cell): ``12.0 MB in 3 blocks: cell line 4 <- numpy/_core/numeric.py:213``."""
    out = []
    for row in alert.get("trace") or []:
        frames = " <- ".join(
            f"cell line {f['line']}" if f["cell"] else f"{f['file']}:{f['line']}"
            for f in row["frames"][:4])
        out.append(f"{format_size(row['bytes'])} in {format_blocks(row['count'])}: {frames}")
    return out


def split_message(message):
    """``(what happened, what to do)``: the alert's one sentence cut before its advice
    (the last ". " or else the last "; ", which becomes a full stop), so the box can show
    them apart. Returns ``(message, "")`` when there is no such cut. No word is lost."""
    message = " ".join(str(message or "").split())
    for sep in (". ", "; "):
        cut = message.rfind(sep)
        if cut > 0 and cut + len(sep) < len(message):
            head, tail = message[:cut] + ".", message[cut + len(sep):]
            return head, tail[:1].upper() + tail[1:]
    return message, ""


# --- the usage bar ------------------------------------------------------------------------

def _bar_parts(alert):
    """``(segments, markers, shown)`` for the usage bar: segments ``(bytes, fill, label)``
    laid end to end, markers ``(bytes, label)`` drawn as ticks (budget, limit), and the
    labels of key_figures that the bar's legend already says."""
    kind = alert.get("kind")
    sev = severity(alert)
    budget, limit = alert.get("budget") or 0, alert.get("limit") or 0
    peak = max(0, alert.get("peak") or 0)
    cap = budget or limit
    segments = []

    def used(nbytes, label):
        """In-use memory, calm up to the cap and red past it."""
        within = min(nbytes, cap) if cap else nbytes
        if within > 0:
            segments.append((within, _CALM, f"{label} {format_size(nbytes)}"))
        if cap and nbytes > cap:
            name = "budget" if cap == budget else "limit"
            segments.append((nbytes - cap, ERROR,
                             f"{format_size(nbytes - cap)} of it over the {name}"))

    if kind == "limit":
        cap = limit
        used(max(0, alert.get("used_bytes") or 0), _measure(alert))
        if alert.get("request_bytes"):
            label = "refused" if alert.get("refused") else "asked"
            segments.append((alert["request_bytes"], _hatched(ERROR),
                             f"{label} {format_size(alert['request_bytes'])}"))
        markers = [(limit, f"limit {_limit_text(alert)}")] if limit else []
        return segments, markers, {"limit"} if limit else set()
    if kind == "sparse_to_dense":
        used(peak, "in use")
        segments.append((alert.get("dense_bytes") or 0, _hatched(_ACCENT[sev]),
                         f"dense array {format_size(alert.get('dense_bytes'))}"))
    elif kind == "accumulation":
        retained = min(peak, alert.get("retained_bytes") or 0) if peak else (
            alert.get("retained_bytes") or 0)
        rest = max(0, peak - retained)
        line = alert.get("line")
        segments.append((retained, _ACCENT[sev],
                         f"{'line ' + str(line) if line else 'the line'} keeps "
                         f"{format_size(alert.get('retained_bytes'))}"))
        if rest:
            segments.append((rest, _CALM, f"rest of the cell {format_size(rest)}"))
    elif alert.get("refused"):
        used(peak, "in use")
        segments.append((alert.get("request_bytes") or 0, _hatched(ERROR),
                         f"refused {format_size(alert.get('request_bytes'))}"))
    else:  # budget
        used(peak, "used")
        if alert.get("untracked_bytes"):
            segments.append((alert["untracked_bytes"], _hatched(_ACCENT[sev]),
                             f"untracked {format_size(alert['untracked_bytes'])}"))
    markers, shown = [], set()
    if alert.get("untracked_bytes") and kind == "budget" and not alert.get("refused"):
        shown.add("untracked")
    if budget:
        use = f" ({_pct(peak, budget)} used)" if kind == "budget" and peak else ""
        markers.append((budget, f"budget {format_size(budget)}{use}"))
        shown.add("budget")
    if limit and (not budget or limit <= 4 * max(budget, sum(s[0] for s in segments))):
        markers.append((limit, f"limit {_limit_text(alert)}"))
        shown.add("limit")
    return segments, markers, shown


def _swatch(fill):
    return (f'<span aria-hidden="true" style="display:inline-block;width:0.9em;height:0.9em;'
            f'margin-right:0.3em;vertical-align:-0.1em;border-radius:2px;background:{fill}">'
            f'</span>')


def _bar(alert):
    """The usage bar and its legend (the legend says in words what the colours show)."""
    segments, markers, _ = _bar_parts(alert)
    segments = [s for s in segments if s[0] > 0]
    if not segments:
        return ""
    total = sum(s[0] for s in segments)
    scale = max([total] + [m[0] for m in markers])
    label = "; ".join([s[2] for s in segments] + [m[1] for m in markers])
    parts, left = [], 0.0
    for nbytes, fill, _ in segments:
        width = 100.0 * nbytes / scale
        parts.append(f'<div style="position:absolute;top:0;bottom:0;left:{left:.2f}%;'
                     f'width:{width:.2f}%;min-width:2px;background:{fill}"></div>')
        left += width
    for nbytes, _ in markers:
        pos = min(100.0, 100.0 * nbytes / scale)
        parts.append(f'<div style="position:absolute;top:0;bottom:0;left:calc({pos:.2f}% - 2px);'
                     f'width:2px;background:{_MARK}"></div>')
    legend = [f'<span style="white-space:nowrap;margin-right:1em">{_swatch(fill)}'
              f'{html.escape(text_)}</span>' for _, fill, text_ in segments]
    legend += [f'<span style="white-space:nowrap;margin-right:1em">'
               f'<span aria-hidden="true" style="display:inline-block;width:2px;height:0.9em;'
               f'margin:0 0.45em 0 0.35em;vertical-align:-0.1em;background:{_MARK}"></span>'
               f'{html.escape(text_)}</span>' for _, text_ in markers]
    return (
        f'<div role="img" aria-label="{html.escape(label)}" style="position:relative;'
        f'height:10px;max-width:36em;margin:6px 0 3px;background:{_TRACK};border-radius:3px;'
        f'overflow:hidden">{"".join(parts)}</div>'
        f'<div style="font-size:90%;line-height:1.5">{"".join(legend)}</div>'
    )


# --- the box ------------------------------------------------------------------------------

def box_style(sev):
    """The inline style of an alert box of severity ``'warn'`` or ``'error'`` (the post-crash
    report's box too, so every memguard box looks alike)."""
    return (f"box-sizing:border-box;max-width:60em;margin:4px 0;padding:6px 10px 8px 10px;"
            f"border:1px solid {_EDGE[sev]};border-left:4px solid {_ACCENT[sev]};"
            f"border-radius:4px;background:{_TINT[sev]};line-height:1.45")


def heading(sev, words, place=""):
    """The box's first line: a warning sign, ``memguard: <words>`` and where."""
    where_ = (f' <span style="font-weight:normal;opacity:0.8">&middot; '
              f'{html.escape(place)}</span>' if place else "")
    return (f'<div style="font-weight:600"><span aria-hidden="true" style="color:{_ACCENT[sev]}">'
            f'&#9888;</span> memguard: {html.escape(words)}{where_}</div>')


def advice(todo, label="What to do:"):
    """The box's last line: the suggested fix."""
    if not todo:
        return ""
    return (f'<div style="margin-top:4px"><span style="font-weight:600">{html.escape(label)}'
            f'</span> {html.escape(todo)}</div>')


def _figures_html(alert):
    """The key figures the bar's legend does not already say."""
    segments, _, shown = _bar_parts(alert)
    if not any(s[0] > 0 for s in segments):
        shown = set()
    items = "".join(
        f'<span style="white-space:nowrap;margin-right:1.2em"><span style="opacity:0.8">'
        f'{html.escape(label)}</span> <span style="font-weight:600">{html.escape(value)}'
        f'</span></span> ' for label, value in key_figures(alert) if label not in shown)
    return f'<div style="font-size:90%;margin-top:2px">{items}</div>'


def html_alert(alert):
    """A compact, self-contained HTML box for the alert."""
    sev = severity(alert)
    kind = str(alert.get("kind", "alert"))
    what, todo = split_message(alert.get("message"))
    label = "Then:" if alert.get("refused") else "What to do:"
    return (
        f'<div class="memguard-alert memguard-{html.escape(kind)}" role="alert" '
        f'aria-label="{html.escape("memguard: " + title(alert))}" style="{box_style(sev)}">'
        f"{heading(sev, title(alert), where(alert))}"
        f"<div>{html.escape(what[:1].upper() + what[1:])}</div>"
        f"{_bar(alert)}{_figures_html(alert)}{advice(todo, label)}{_trace_html(alert)}</div>"
    )


def _trace_html(alert):
    lines = _trace_lines(alert)
    if not lines:
        return ""
    items = "".join(f"<li><code>{html.escape(line)}</code></li>" for line in lines)
    return (f'<div style="font-size:90%;margin-top:4px">tracemalloc, largest first:'
            f'<ul style="margin:2px 0">{items}</ul></div>')


def _fallback_html(plain):
    return f'<pre class="memguard-alert">{html.escape(plain)}</pre>'


def alert_bundle(alert):
    """The ``data`` of the IOPub message: the three MIME types of docs/interface.md.

    Rendering runs on the relay thread: a field missing from an alert must not stop the
    alert, so a failed rendering falls back to the message itself."""
    if alert["kind"] == "crash_report":
        return crash_bundle(alert)
    try:
        plain = text(alert)
    except Exception:  # noqa: BLE001 - see the docstring
        plain = f"memguard: {alert.get('kind')} ({where(alert)}): {alert.get('message', '')}"
    try:
        rich = html_alert(alert)
    except Exception:  # noqa: BLE001
        rich = _fallback_html(plain)
    return {"text/plain": plain, "text/html": rich, ALERT_MIME: alert}


# --- the post-crash report ----------------------------------------------------------------

def crash_text(alert):
    """The post-crash report for a terminal: a few lines, units everywhere."""
    out = [f"memguard post-crash report: {alert['message']}"]
    for n, code, here in alert["source"]:
        out.append(f"  {'->' if here else '  '} {n:4d} | {code}")
    if alert["timeline"]:
        first, last = alert["timeline"][0], alert["timeline"][-1]
        out.append(f"  RSS went from {format_size(first[1])} to {format_size(last[1])} in the "
                   f"last {-first[0]:.1f} s (peak {format_size(alert['peak'])})")
    for site in alert["top_sites"]:
        place = f"cell {site['cell']}" if site["cell"] is not None else "an earlier cell"
        place += f", line {site['line']}" if site["line"] else ""
        out.append(f"  held: {format_size(site['bytes'])} in {format_blocks(site['count'])} "
                   f"({place})")
    for a in alert["alerts"]:
        out.append(f"  alert before the death: {a['kind']}{_where(a)}: {a['message']}")
    for s in alert["suggestions"]:
        out.append(f"  to change: {s}")
    return "\n".join(out)


def _where(a):
    """' in cell N, line L' for an alert of a post-crash report (as much as is known)."""
    where = f" in cell {a['cell']}" if a.get("cell") is not None else ""
    if a.get("line"):
        where += f", line {a['line']}" if where else f" at line {a['line']}"
    return where


def _crash_svg(alert):
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


def crash_html(alert):
    """The post-crash report as a self-contained HTML box (no JavaScript, no IFrame), with
    the frame, heading and colours of the alert boxes, readable in light and dark themes."""
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
    alerts = "".join(f"<li><b>{html.escape(a['kind'])}</b>{html.escape(_where(a))}: "
                     f"{html.escape(a['message'])}</li>" for a in alert["alerts"])
    todo = "".join(f"<li>{html.escape(s)}</li>" for s in alert["suggestions"])
    ul = "<ul style='margin:2px 0 4px 0;padding-left:1.5em'>"
    head = "<div style='margin-top:4px;font-weight:600'>"
    place = where(alert) if alert.get("cell") is not None or alert.get("task") else ""
    died = "a Dask worker died" if alert.get("worker") else "the kernel died"  # memguard.dask
    return (
        f'<div class="memguard-alert memguard-crash" role="alert" '
        f'aria-label="memguard: {died}" style="{box_style("error")}">'
        f'{heading("error", died, place)}'
        f"<div>{html.escape(alert['message'])}</div>"
        f"{rows}{_crash_svg(alert)}"
        + (f"{head}Memory still held when it died:</div>{ul}{sites}</ul>" if sites else "")
        + (f"{head}Alerts before the death:</div>{ul}{alerts}</ul>" if alerts else "")
        + f"{head}What to change:</div>{ul}{todo}</ul></div>"
    )


def crash_bundle(alert):
    """The post-crash report's MIME bundle (the ``data`` of its IOPub message)."""
    return {"text/plain": crash_text(alert), "text/html": crash_html(alert), ALERT_MIME: alert}


def crash_age(alert):
    """How long ago the kernel of a post-crash report died, as text."""
    seconds = max(0.0, time.time() - alert.get("died", time.time()))
    return f"{seconds / 60:.0f} min ago" if seconds >= 120 else f"{seconds:.0f} s ago"


# --- %memguard status, history and summary ------------------------------------------------

def status_bundle(rows):
    """``rows``: list of (label, value text). A two-column table and its plain text."""
    plain = "\n".join(f"{label:<18} {value}" for label, value in rows)
    body = "".join(
        f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
        f"<td style='text-align:left'>{html.escape(value)}</td></tr>"
        for label, value in rows
    )
    return {"text/plain": plain, "text/html": f"<table class='memguard-status'>{body}</table>"}


def history_bundle(records):
    """``%memguard history``: ``records`` (memguard.history()'s dicts) as a table
    (text/plain via tabulate, text/html escaped), or one line when there is none."""
    import tabulate

    head = ["cell", "peak", "retained", "native", "untracked", "seconds", "top site", "alerts"]
    rows = [[rec["cell"] if rec["cell"] is not None else "-",
             format_size(rec["peak"]),
             format_size(rec["retained"]),
             format_size(rec.get("native", 0)),
             format_size(rec["untracked"]),
             f"{rec['seconds']:.2f} s",
             _top_site_text(rec["top_site"]) or "-",
             ", ".join(rec["alerts"]) or "-"] for rec in records]
    if not rows:
        return text_bundle("memguard: no cell has finished since memguard was loaded")
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    head_html = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return {
        "text/plain": tabulate.tabulate(rows, headers=head, disable_numparse=True),
        "text/html": f"<table class='memguard-history'><tr>{head_html}</tr>{body}</table>",
    }


def _top_site_text(top):
    """``'line 3: 40 MB'`` for a record's ``top_site``, or '' when its line is unknown."""
    if not top or top["line"] is None:
        return ""
    return f"line {top['line']}: {format_size(top['bytes'])}"


def summary_line(rec):
    """One line for ``%memguard summary on`` from a history record: units always shown,
    growth signed."""
    def signed(n):
        return ("+" if n >= 0 else "") + format_size(n)

    cell = f"cell {rec['cell']}" if rec["cell"] is not None else "cell"
    top = ""
    if rec["top_site"] and rec["top_site"]["line"] is not None:
        top = (f", most retained by line {rec['top_site']['line']} "
               f"({format_size(rec['top_site']['bytes'])})")
    alerts = f", alerts: {', '.join(rec['alerts'])}" if rec["alerts"] else ""
    native = f" (native {signed(rec['native'])})" if rec.get("native") else ""
    return (f"memguard: {cell}: peak {format_size(rec['peak'])}, retained {signed(rec['retained'])}"
            f"{native}, untracked {signed(rec['untracked'])}, {rec['seconds']:.2f} s{top}{alerts}")


def text_bundle(text_):
    """A one-line message as a bundle (text/plain, and the same escaped as text/html)."""
    return {"text/plain": text_, "text/html": html.escape(text_)}
