"""From what the hooks saw to the alert under the cell: monitor records, the sparse_to_dense
detector, and the updates in place that bring an alert to the cell's final figures.

``on_record`` runs on the relay thread (one record of the C monitor, docs/design.md "Alert
latency"); ``on_densify`` on the thread that densifies a sparse matrix; ``finish`` on the
main thread at the end of a cell. Each alert is recorded in its cell under a *cause* (what
it is about within the cell): a second alert of the same cause replaces the first, and the
relay's Publisher sends it as ``update_display_data`` of the same display.
"""

from . import alerts, blackbox, coreview, frames, refuse, sparse
from ._state import STATE
from .sizes import format_size

CAUSE_BUDGET = ("budget",)
CAUSE_LIMIT = ("limit",)


def publish(cell, alert, cause, **private):
    """Record ``alert`` in the cell (replacing the one of the same ``cause``) and publish
    it. ``private`` keys (``_by_rss``) stay in the record, never in the message. A refusal
    is its cause's last word: an alert that is not one does not replace it (a growth record
    the monitor sent before the refusal, or after it as RSS settled, reached the relay after
    it in a Dask worker and turned the task's refused alert back into a plain budget one)."""
    tracer = cell.trace
    if tracer is not None:
        alert["trace"] = tracer.top()
    with STATE.lock:
        for i, old in enumerate(cell.alerts):
            if old.get("_cause") == cause:
                if old.get("refused") and not alert.get("refused"):
                    return
                if "trace" in old and "trace" not in alert:
                    alert["trace"] = old["trace"]  # tracing ended: keep the last top lines
                cell.alerts[i] = dict(alert, _cause=cause, **private)
                break
        else:
            cell.alerts.append(dict(alert, _cause=cause, **private))
    STATE.publisher.publish(alert, cell.epoch, cause, cell.parent)
    kind = blackbox.KINDS.index(alert["kind"]) if alert["kind"] in blackbox.KINDS else None
    if kind is not None and alert["kind"] != "crash_report":
        STATE.core.blackbox_add_alert(cell.epoch, -1 if cell.count is None else cell.count,
                                      kind, alert["line"] or -1, int(alert["bytes"]),
                                      alert["message"])


def _shown(cell, cause):
    """The alert of ``cause`` already recorded in ``cell``, or None."""
    with STATE.lock:
        return next((a for a in cell.alerts if a.get("_cause") == cause), None)


def site_dict(cell, site):
    """A coreview.Site as the alert schema's ``{cell, line, bytes, count}``, or None."""
    if site is None:
        return None
    return {"cell": cell.count, "line": site.known_line, "bytes": int(site.live_bytes),
            "count": int(site.live_count)}


def _gap(snap):
    """RSS now, its growth since the cell began, and the part of that growth no hook
    counted (bytes); see alerts.budget_alert."""
    return {"rss_bytes": snap.rss, "rss_growth": snap.rss_growth,
            "untracked_bytes": snap.untracked}


def _cell_figures(snap, cell, peak_after):
    """``(budget, peak)`` of ``cell`` in bytes: from ``snap`` while the cell still runs,
    else its own budget and ``peak_after`` (the snapshot is about a later cell)."""
    if snap.of_cell(cell.epoch):
        return snap.budget, snap.cell_peak_usage
    return cell.budget, peak_after


def _running_line(cell):
    """The line the cell's thread is executing (frames.py), or -1: used when the monitor,
    which reads no frames, is the one that saw the budget or the limit crossed."""
    ns = STATE.shell.user_global_ns if STATE.shell is not None else None
    return frames.thread_cell_line(cell.thread, ns, cell.code_name) or -1


def on_record(fields):
    """Relay thread: one record of the C monitor (coreview.Record's fields)."""
    rec = coreview.Record._make(fields)
    core = STATE.core
    cell = STATE.cell(rec.epoch)
    if cell is None:
        return
    if rec.kind in (core.KIND_ACCUMULATION, core.KIND_ACCUMULATION_GROW):
        _publish_accumulation(cell, _site_line(cell, rec.line), rec.count, rec.bytes)
    elif rec.kind in (core.KIND_REFUSED, core.KIND_LIMIT, core.KIND_LIMIT_REQUEST):
        _on_limit_record(cell, rec)
    elif rec.kind in (core.KIND_BUDGET, core.KIND_BUDGET_GROW, core.KIND_BUDGET_RSS):
        _on_budget_record(cell, rec)


def _site_line(cell, line):
    """A site's line for its alert. Line 0 (MG_NATIVE_LINE_CELL_THREAD) is native memory the
    cell's own thread allocated inside a call that released the GIL (torch, Arrow compute):
    the line that thread is running, resolved once per cell, as every such block shares
    the one site of line 0."""
    if line != 0:
        return line
    resolved = getattr(cell, "native_line", None)
    if resolved is None:
        resolved = _running_line(cell)
        cell.native_line = resolved
    return resolved


def _on_budget_record(cell, rec):
    """The cell's budget crossed (by an allocation, or by RSS), or its peak grew since."""
    core = STATE.core
    snap = coreview.snapshot(core)
    first = _shown(cell, CAUSE_BUDGET)
    by_rss = rec.kind == core.KIND_BUDGET_RSS or (first is not None and first.get("_by_rss"))
    line, nbytes, peak = rec.line, rec.bytes, rec.peak
    if rec.kind == core.KIND_BUDGET_RSS:
        line, nbytes = _running_line(cell), 0
    elif rec.kind == core.KIND_BUDGET and line < 1:
        # Crossed by native code without the GIL (sqlite, polars release it), where the hook
        # reads no frames: the line the cell's thread is running, as for the RSS rule.
        line = _running_line(cell)
    elif rec.kind == core.KIND_BUDGET_GROW and first is not None:
        line, nbytes = first["line"] or -1, first["request_bytes"]
    same = snap.of_cell(cell.epoch)
    if same:
        peak = max(peak, snap.cell_peak_usage, snap.rss_growth if by_rss else 0)
    top = site_dict(cell, coreview.top_site(core, cell.epoch))
    tracked = snap.cell_usage if same else rec.usage
    alert = alerts.budget_alert(STATE, cell, line, rec.usage, max(peak, rec.usage),
                                rec.budget or cell.budget, nbytes, _gap(snap), top, tracked)
    publish(cell, alert, CAUSE_BUDGET, _by_rss=by_rss)


def _on_limit_record(cell, rec):
    """A refusal (raise mode), the limit's measure past its fraction, or one request
    beyond what is left under the limit."""
    core = STATE.core
    snap = coreview.snapshot(core)
    budget, peak = _cell_figures(snap, cell, 0)
    measure = STATE.limit_measure
    if rec.kind == core.KIND_REFUSED:
        by_budget = rec.count == core.REFUSE_BUDGET
        alert = alerts.refused_alert(STATE, cell, rec.line, rec.bytes, by_budget, peak, budget,
                                     snap.used(measure), measure.label)
        publish(cell, alert, CAUSE_BUDGET if by_budget else CAUSE_LIMIT)
        return
    if rec.kind == core.KIND_LIMIT:  # bytes: the measure now
        line, used, request = _running_line(cell), rec.bytes, 0
    else:  # KIND_LIMIT_REQUEST, bytes: the request
        # Line 0: a NumPy request flagged on the cell's thread without the GIL.
        line, used, request = _site_line(cell, rec.line), snap.used(measure), rec.bytes
    alert = alerts.limit_alert(STATE, cell, line, used, measure.label, peak, budget, request)
    publish(cell, alert, CAUSE_LIMIT)


def _publish_accumulation(cell, line, count, retained, snap=None):
    """Publish (or update) the accumulation alert of ``line`` in ``cell``."""
    snap = snap or coreview.snapshot(STATE.core)
    budget, peak = _cell_figures(snap, cell, retained)
    alert = alerts.accumulation_alert(STATE, cell, line, count, retained, max(peak, retained),
                                      budget)
    publish(cell, alert, ("accumulation", alert["line"]))


def finish(cell, sites, snap):
    """Main thread, at the end of a cell (``sites``: its coreview.Site rows, ``snap`` a
    coreview.Snapshot): bring its alerts to the final figures, which the C side only reports
    in steps of MG_GROW_STEP, so the alert left under the cell says how much the cell used
    and each loop kept in the end."""
    with STATE.lock:
        shown = {a["line"]: a for a in cell.alerts if a["kind"] == "accumulation"}
    for site in sites:
        line = site.line if site.line != 0 else getattr(cell, "native_line", None) or -1
        alert = shown.get(line if line > 0 else None)
        if site.reported_bytes and alert is not None and site.live_bytes > alert["retained_bytes"]:
            _publish_accumulation(cell, line, site.live_count, site.live_bytes, snap)
    _finish_budget(cell, snap)


def _finish_budget(cell, snap):
    alert = _shown(cell, CAUSE_BUDGET)
    if alert is None or alert.get("refused"):
        return
    peak = max(snap.cell_peak_usage, snap.rss_peak_growth if alert.get("_by_rss") else 0)
    # Only a change a reader would notice (1%): not another message for a few KB.
    if (peak <= alert["peak"] * 1.01 and
            snap.untracked <= alert.get("untracked_bytes", 0) + 0.01 * max(1, alert["peak"])):
        return
    core = STATE.core
    on_record(coreview.Record(version=core.WIRE_VERSION, kind=core.KIND_BUDGET_GROW,
                              epoch=cell.epoch, line=alert["line"] or -1, count=0, bytes=0,
                              usage=peak, peak=peak, budget=snap.budget, t=0.0))


def watch_sparse():
    """Wrap scipy.sparse now, or as soon as the user or a library imports it."""
    if not sparse.installed():
        sparse.install_when_imported(on_densify)


def on_densify(matrix):
    """Main (or any) thread, before scipy.sparse allocates a dense array."""
    cell = STATE.current
    if not STATE.loaded or cell is None:
        return
    pred = sparse.predict(matrix)
    snap = coreview.snapshot(STATE.core)
    try:
        _densify_alert(cell, pred, snap)
    finally:
        refuse.sparse_refusal(pred, snap.budget, snap.cell_usage)  # raise mode: fail first


def _densify_alert(cell, pred, snap):
    dense, usage, budget = pred["dense_bytes"], snap.cell_usage, snap.budget
    if budget:
        remaining = max(0, budget - usage)
        if dense <= remaining:
            return
        reason = (f"more than the {format_size(remaining)} left of this cell's budget of "
                  f"{format_size(budget)}")
    else:
        ratio = dense / max(1, pred["sparse_bytes"])
        if dense < STATE.sparse_min_bytes or ratio < STATE.sparse_min_ratio:
            return
        reason = f"{ratio:.0f}x its sparse size"
    line = STATE.core.cell_line()
    cause = ("sparse_to_dense", line)
    previous = _shown(cell, cause)
    count = previous["count"] + 1 if previous else 1
    if previous and previous["dense_bytes"] > dense:
        pred = {k: previous[k] for k in pred}  # keep showing the largest conversion
    peak = max(snap.cell_peak_usage, usage + dense)
    alert = alerts.sparse_to_dense_alert(STATE, cell, line, pred, peak, budget, count, reason)
    publish(cell, alert, cause)
