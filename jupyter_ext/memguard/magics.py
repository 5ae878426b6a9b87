"""The ``%memguard`` line magic and the ``%%memguard`` cell magic (docs/interface.md).

Arguments are parsed with argparse; any mistake raises IPython's ``UsageError`` with an
accepted example and changes no setting. What each subcommand does is in commands.py (and
cells.py for the running cell); what it shows is drawn by render.py.
"""

import argparse
import ast
import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from . import cells, commands, frames, render
from ._state import STATE
from .sizes import parse_size

LINE_USAGE = """%memguard [status]         show limit, budget, mode, tracked, RSS and untracked bytes
%memguard budget SIZE|off  default budget for every following cell (SIZE: 500MB, 2GiB, 25%, ...)
%memguard mode warn|raise  raise: an allocation that would cross the budget or the limit fails (MemoryError)
%memguard summary on|off   one line after each cell: peak, retained, untracked, seconds
%memguard history          a table of every cell so far (memguard.history() returns it)
%memguard report           the post-crash report of the kernel that died before this one
%memguard dask install [SIZE] [--raise]  memguard on every Dask worker of the notebook's client
%memguard dask uninstall   remove it from the workers"""
CELL_USAGE = """%%memguard SIZE [--raise] [--trace]  run this cell with budget SIZE (e.g. %%memguard 500MB)
  --raise  raise mode for this cell: an allocation that would cross SIZE fails with MemoryError
  --trace  run it under tracemalloc and add its top lines to the cell's alerts"""


DASK_USAGE = ("%memguard dask install [SIZE] [--raise] | %memguard dask uninstall   "
              "e.g. %memguard dask install 500MB --raise")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (with the magic's usage) instead of exiting."""

    def __init__(self, usage, **kwargs):
        # argparse %-formats usage, and magics are full of '%'.
        kwargs.setdefault("prog", "memguard")
        super().__init__(usage=usage.replace("%", "%%"), add_help=False, **kwargs)
        self.usage_text = usage

    def error(self, message):
        raise UsageError(f"{message}\nUsage:\n{self.usage_text}")


def _line_parser():
    parser = _Parser(LINE_USAGE)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("status", usage=LINE_USAGE)
    budget = sub.add_parser("budget", usage="%memguard budget SIZE|off   e.g. %memguard budget 2GB")
    budget.add_argument("size")
    mode = sub.add_parser("mode", usage="%memguard mode warn|raise   e.g. %memguard mode raise")
    mode.add_argument("mode", choices=("warn", "raise"))
    summary = sub.add_parser("summary", usage="%memguard summary on|off   e.g. %memguard summary on")
    summary.add_argument("state", choices=("on", "off"))
    sub.add_parser("history", usage="%memguard history")
    sub.add_parser("report", usage="%memguard report")
    dask = sub.add_parser("dask", usage=DASK_USAGE)
    dask.add_argument("action", choices=("install", "uninstall"))
    dask.add_argument("size", nargs="?")
    dask.add_argument("--raise", dest="raise_", action="store_true")
    return parser


def _cell_parser():
    parser = _Parser(CELL_USAGE)
    parser.add_argument("size")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--raise", dest="raise_", action="store_true")
    return parser


def _split(line, usage):
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse {line!r}: {exc}\nUsage:\n{usage}") from None


def _size(text):
    try:
        return parse_size(text, STATE.limit.bytes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@magics_class
class MemguardMagics(Magics):
    """memguard's magics."""

    @line_cell_magic
    def memguard(self, line, cell=None):
        """Per-cell memory budgets and status.

        Line magic:
          %memguard [status]         show limit, budget, mode, tracked, RSS and untracked bytes
          %memguard budget SIZE|off  default budget for every following cell
          %memguard mode warn|raise  raise: allocations that would cross the budget or the
                                     limit fail with MemoryError (the kernel lives on)
          %memguard summary on|off   one line after each cell: peak, retained, untracked, time
          %memguard history          a table of every cell so far
          %memguard report           the post-crash report of the kernel that died before

        Cell magic:
          %%memguard SIZE [--raise] [--trace]
                                     run this cell with budget SIZE; --raise: raise mode for
                                     this cell; --trace: run it under tracemalloc and add its
                                     top lines to the cell's alerts

        SIZE: a number of bytes with an optional decimal or binary unit (500MB, 2GiB, 1.5G,
        800M, 1e9) or a percentage of the effective memory limit (25%). A cell's usage is
        the peak of tracked live bytes (Python heap + NumPy data) during the cell minus the
        tracked bytes when it started.
        """
        if cell is None:
            return self._line(line)
        return self._cell(line, cell)

    def _line(self, line):
        args = _line_parser().parse_args(_split(line, LINE_USAGE))
        if args.command in (None, "status"):
            display(render.status_bundle(commands.status_rows()), raw=True)
        elif args.command == "budget":
            off = args.size.lower() in ("off", "none", "0")
            print(commands.set_default_budget(0 if off else _size(args.size)))
        elif args.command == "mode":
            print(commands.set_mode(args.mode))
        elif args.command == "summary":
            print(commands.set_summary(args.state == "on"))
        elif args.command == "history":
            display(render.history_bundle(commands.history()), raw=True)
        elif args.command == "report":
            found = commands.crash_report()
            display(render.text_bundle(found) if isinstance(found, str)
                    else render.crash_bundle(found), raw=True)
        elif args.command == "dask":
            print(_dask(args))

    def _cell(self, line, cell):
        args = _cell_parser().parse_args(_split(line, CELL_USAGE))
        cells.set_budget(_size(args.size))
        if args.raise_:
            cells.set_raise()
        filename = _cell_filename(self.shell)
        running = STATE.current
        if not args.trace or running is None:
            return _run_body(self.shell, cell, filename)
        from .trace import CellTrace

        running.trace = CellTrace(filename)
        try:
            return _run_body(self.shell, cell, filename)
        finally:
            cells.drain()  # alerts still in flight get the traced top lines too
            # Stopped, not dropped: an alert of this cell that the relay publishes later
            # still gets the top lines taken at stop().
            running.trace.stop()


def _dask(args):
    """``%memguard dask install [SIZE] [--raise]`` / ``uninstall`` (memguard.dask)."""
    from . import dask as mg_dask

    if args.action == "uninstall" and (args.size or args.raise_):
        raise UsageError(f"%memguard dask uninstall takes no argument\nUsage:\n{DASK_USAGE}")
    if args.size:
        _size(args.size)
    try:
        return mg_dask.magic(args.action, args.size, args.raise_)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _cell_filename(shell):
    """The filename of the running cell's code (frames.cell_file), so the body compiled
    here shares it and line attribution sees the body as the cell."""
    return frames.cell_file(sys._getframe(1), shell.user_global_ns) or "<memguard-cell>"


def _run_body(shell, body, filename):
    """Execute a cell magic's body in the user namespace and return its last expression's
    value (so the cell displays it like a normal cell). The body is compiled one line down,
    so its line numbers are the cell's own (line 1 is the %%memguard line)."""
    source = "\n" + shell.transform_cell(body)
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    glob, loc = shell.user_global_ns, shell.user_ns
    exec(compile(tree, filename, "exec"), glob, loc)
    if last is not None:
        return eval(compile(ast.Expression(last.value), filename, "eval"), glob, loc)
    return None
