"""Which frame is the running cell's, for the two cases the C rule cannot serve.

The rule lives in csrc/frames.c (``_core.cell_line()``, docs/design.md "Frames and line
attribution"): with the cell's filename known, the innermost frame compiled from it;
otherwise the outermost frame whose globals are the notebook's must be module-level code
(a cell, not a function body), and the answer is the innermost frame compiled from that
cell. ``_core.cell_line()`` reads the calling thread only, so the relay thread, which wants
the line another thread is executing, and the cell magic, which wants the cell's filename
rather than a line, use this Python copy of the same rule. Nothing else may.
"""

import inspect
import sys


def _notebook_frames(frame, user_globals):
    """The frames from ``frame`` outwards whose globals are ``user_globals``, innermost
    first."""
    out = []
    while frame is not None:
        if frame.f_globals is user_globals:
            out.append(frame)
        frame = frame.f_back
    return out


def _outermost_cell_file(notebook):
    """The filename of the outermost of the ``notebook`` frames if it is module-level code
    (a cell), else None."""
    if not notebook or notebook[-1].f_code.co_flags & inspect.CO_OPTIMIZED:
        return None
    return notebook[-1].f_code.co_filename


def cell_file(frame, user_globals):
    """The filename of the cell whose code runs in ``frame`` or a frame further out: that
    of the outermost notebook frame, if it is module-level code; None otherwise."""
    return _outermost_cell_file(_notebook_frames(frame, user_globals))


def cell_line(frame, user_globals, code_name=None):
    """The 1-based line of the cell being executed at ``frame``: that of the innermost
    frame compiled from the cell (named ``code_name`` when known; else, or when no frame
    has that name, the cell :func:`cell_file` finds), or None when that stack is not
    running the cell's code."""
    notebook = _notebook_frames(frame, user_globals)
    for filename in (code_name, _outermost_cell_file(notebook)):
        for f in notebook:
            if filename is not None and f.f_code.co_filename == filename:
                return f.f_lineno
    return None


def thread_cell_line(thread_id, user_globals, code_name=None):
    """:func:`cell_line` for the thread ``thread_id`` (threading.get_ident()), read from
    another thread through ``sys._current_frames``."""
    return cell_line(sys._current_frames().get(thread_id), user_globals, code_name)
