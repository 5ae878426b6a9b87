"""tracemalloc for one cell: ``%%memguard SIZE --trace``.

memguard attributes big blocks to one line of the cell. When that is not enough (the
memory is allocated deep inside a library), ``--trace`` runs the cell under the standard
library's tracemalloc (https://docs.python.org/3/library/tracemalloc.html) with a few
frames per trace, and every alert of that cell carries tracemalloc's top tracebacks,
library frames included (field ``trace``).

tracemalloc is started only for that cell and stopped after it, unless it was already
tracing, in which case it is left running and the cell's allocations are told apart by
comparing against a snapshot taken when the cell began. tracemalloc's own tables are
allocated through the RAW domain memguard counts, so a traced cell's usage includes them
(``tracemalloc.get_tracemalloc_memory()``, typically tens of bytes per live block).
"""

import os
import tracemalloc

# Frames per trace: enough to go from a library's allocation up to the cell's line.
NFRAMES = 10
TOP = 5
_HERE = os.path.dirname(os.path.abspath(__file__))
# memguard's own work while the cell runs (the relay thread building and sending alerts,
# these snapshots) is not the cell's: leave it out of the top lines. That is every module
# of the package but magics.py, under which the cell's body runs, and sparse.py, whose
# wrapped toarray allocates the cell's dense array: one pattern, "not starting with m or s"
# (sizes.py only ever runs under another module), since each filter costs a pass over every
# trace of every snapshot.
_OWN = [tracemalloc.Filter(False, os.path.join(_HERE, "[!ms]*.py"), all_frames=True),
        tracemalloc.Filter(False, tracemalloc.__file__, all_frames=True)]


class CellTrace:
    """tracemalloc around one cell. ``top()`` may be called from any thread (it takes a
    snapshot, which needs the GIL only); ``stop()`` from the thread that started it."""

    def __init__(self, cell_filename, nframes=NFRAMES):
        self.cell_filename = cell_filename
        self.started_here = not tracemalloc.is_tracing()
        if self.started_here:
            tracemalloc.start(nframes)
            self._base = None
        else:
            self._base = tracemalloc.take_snapshot()
        self.active = True
        self._final = []

    def top(self, limit=TOP):
        """tracemalloc's largest live tracebacks allocated during the cell, as a list of
        ``{"bytes": int, "count": int, "frames": [{"file": str, "line": int, "cell": bool}]}``
        (innermost frame first). Once stopped, the top lines taken at ``stop()``: an alert of
        this cell that the relay publishes after the cell (a loaded machine can delay it past
        the drain) still carries them. Empty when tracemalloc stopped by itself while the
        cell ran: the snapshot is taken, not checked for first, so no alert is lost to a race."""
        if not self.active:
            return self._final
        try:
            snap = tracemalloc.take_snapshot()
        except RuntimeError:  # "the tracemalloc module must be tracing memory ..."
            return []
        snap = snap.filter_traces(_OWN)
        if self._base is not None:
            stats = [s for s in snap.compare_to(self._base, "traceback") if s.size_diff > 0]
            stats.sort(key=lambda s: s.size_diff, reverse=True)
            rows = [(s.size_diff, s.count_diff, s.traceback) for s in stats[:limit]]
        else:
            rows = [(s.size, s.count, s.traceback) for s in snap.statistics("traceback")[:limit]]
        return [{"bytes": int(size), "count": int(count), "frames": self._frames(tb)}
                for size, count, tb in rows]

    def _frames(self, tb):
        """Innermost first, up to the cell's outermost line: the frames further out are
        IPython's and memguard's machinery, the same for every cell."""
        out = []
        for frame in reversed(tb):  # tracemalloc orders oldest first (Python >= 3.7)
            row = self._frame(frame)
            if out and out[-1]["cell"] and not row["cell"]:
                break
            out.append(row)
        return out

    def _frame(self, frame):
        in_cell = frame.filename == self.cell_filename
        name = "cell" if in_cell else _short(frame.filename)
        return {"file": name, "line": frame.lineno, "cell": in_cell}

    def stop(self):
        """Keep the cell's final top lines, then stop tracemalloc if this cell started it."""
        self._final = self.top()
        self.active = False
        if self.started_here and tracemalloc.is_tracing():
            tracemalloc.stop()


def _short(path):
    """``numpy/_core/fromnumeric.py`` rather than the full site-packages path."""
    parts = path.replace(os.sep, "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1:])
    return "/".join(parts[-2:])

