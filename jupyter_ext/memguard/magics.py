"""The ``%memguard`` line magic and the ``%%memguard`` cell magic (interface.md).

Arguments are parsed with argparse; any mistake raises IPython's ``UsageError`` with an
accepted example and changes no setting.
"""

import argparse
import ast
import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from . import guard
from ._state import STATE
from .sizes import EXAMPLE, format_size, parse_size

LINE_USAGE = """%memguard [status]         show limit, budget, mode, tracked, RSS and untracked bytes
%memguard budget SIZE|off  default budget for every following cell (SIZE: 500MB, 2GiB, 25%, ...)
%memguard mode warn|raise  raise: an allocation that would cross the budget or the limit fails (MemoryError)
%memguard summary on|off   one line after each cell: peak, retained, untracked, seconds
%memguard history          a table of every cell so far (memguard.history() returns it)
%memguard report           the post-crash report of the kernel that died before this one"""
CELL_USAGE = """%%memguard SIZE [--raise] [--trace]  run this cell with budget SIZE (e.g. %%memguard 500MB)
  --raise  raise mode for this cell: an allocation that would cross SIZE fails with MemoryError
  --trace  run it under tracemalloc and add its top lines to the cell's alerts"""


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
            from IPython.display import display

            display(guard.status_bundle(), raw=True)
        elif args.command == "budget":
            if args.size.lower() in ("off", "none", "0"):
                STATE.default_budget = 0
                print("memguard: budget off for the following cells")
            else:
                STATE.default_budget = _size(args.size)
                print(f"memguard: budget {format_size(STATE.default_budget)} per cell from the next cell on")
        elif args.command == "mode":
            guard.set_mode(args.mode)
            print(f"memguard: mode {args.mode}" + (
                " (an allocation that would cross the budget or the limit fails with MemoryError)"
                if args.mode == "raise" else ""))
        elif args.command == "summary":
            STATE.summary = args.state == "on"
            print(f"memguard: summary {args.state}")
        elif args.command == "history":
            from IPython.display import display

            display(guard.history_bundle(), raw=True)
        elif args.command == "report":
            from IPython.display import display

            display(guard.report_bundle(), raw=True)

    def _cell(self, line, cell):
        args = _cell_parser().parse_args(_split(line, CELL_USAGE))
        guard.set_cell_budget(_size(args.size))
        if args.raise_:
            guard.set_cell_raise()
        filename = _cell_filename(self.shell)
        running = STATE.current
        if not args.trace or running is None:
            return _run_body(self.shell, cell, filename)
        from .trace import CellTrace

        running.trace = CellTrace(filename)
        try:
            return _run_body(self.shell, cell, filename)
        finally:
            guard.drain()  # alerts still in flight get the traced top lines too
            running.trace.stop()
            running.trace = None


def _cell_filename(shell):
    """The filename object of the running cell's code (the outermost notebook frame), so
    the body compiled here shares it and line attribution sees the body as the cell."""
    frame = sys._getframe(1)
    found = None
    while frame is not None:
        if frame.f_globals is shell.user_global_ns:
            found = frame.f_code.co_filename
        frame = frame.f_back
    return found or "<memguard-cell>"


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
