"""The one state object of the memguard extension in this process (``STATE``).

Written by the main thread (load/unload, IPython events, magics); the relay thread only
reads ``cells`` entries, ``limit`` and ``limit_measure`` and appends to a cell's ``alerts``
list.
"""

import collections
import dataclasses
import threading
import typing

from . import limits

# The sparse_to_dense rule used when the cell has no budget: alert when the dense result
# is at least MIN_RATIO times the sparse matrix's bytes and at least MIN_BYTES. The figures
# are the product's design rule (docs/design.md, "Limits and measures"): below ~256 MiB a
# densification rarely threatens a notebook machine, and below 10x the sparse form saved
# little to begin with.
SPARSE_MIN_BYTES = 256 * 2**20
SPARSE_MIN_RATIO = 10.0
# The limit alert fires when the limit's measure passes this fraction of the limit
# (docs/design.md, "Limits and measures": 90%, configurable with
# memguard.configure(limit_fraction=...)).
LIMIT_FRACTION = 0.9
# How many cells' records (parents, alerts) are kept for late alerts and history.
MAX_CELLS = 1000


@dataclasses.dataclass
class Cell:
    """One executed cell: ``epoch`` is memguard's own counter (silent executions included),
    ``count`` IPython's execution count, ``parent`` the kernel's execute_request message."""

    epoch: int
    count: typing.Optional[int]
    parent: typing.Optional[dict]
    started: float  # time.monotonic() seconds
    budget: int  # bytes, 0 = none
    alerts: list = dataclasses.field(default_factory=list)
    thread: typing.Optional[int] = None  # threading.get_ident() of the thread running it
    code_name: typing.Optional[str] = None  # the filename IPython compiles it under, if known
    trace: typing.Any = None  # trace.CellTrace while a %%memguard --trace cell runs
    native_start: int = 0  # bytes of the native domain when the cell began


@dataclasses.dataclass
class State:
    loaded: bool = False
    shell: typing.Any = None
    kernel: typing.Any = None
    core: typing.Any = None  # the memguard._core module once loaded
    relay: typing.Any = None
    publisher: typing.Any = None
    limit: typing.Any = None  # limits.Limit
    default_budget: int = 0  # bytes, 0 = none
    sparse_min_bytes: int = SPARSE_MIN_BYTES
    sparse_min_ratio: float = SPARSE_MIN_RATIO
    epoch: int = 0
    count_offset: int = 0  # shell.execution_count minus the running cell's count
    current: typing.Optional[Cell] = None
    cells: "collections.OrderedDict[int, Cell]" = dataclasses.field(
        default_factory=collections.OrderedDict)
    history: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)  # reduced-mode explanations
    numpy_counted: bool = False
    rss_baseline: int = 0  # bytes: RSS minus tracked at load; the gap is measured from it
    summary: bool = False  # %memguard summary on|off
    mode: str = "warn"  # %memguard mode warn|raise (a --raise cell overrides it for itself)
    limit_fraction: float = LIMIT_FRACTION
    limit_measure: limits.Measure = limits.RSS  # what the limit is compared with
    refusals_seen: int = 0  # coreview.Refusal.count already turned into a message
    blackbox_path: typing.Optional[str] = None  # this kernel's black box while loaded
    last_report: typing.Optional[dict] = None  # the crash_report found at load, for %memguard report
    pending_report: typing.Optional[dict] = None  # not yet shown under a cell
    saved_switch_interval: typing.Optional[float] = None  # sys.getswitchinterval() at load
    saved_custom_exc: typing.Any = None  # (custom_exceptions, CustomTB) before load
    relay_sent_at_start: int = 0  # coreview.MonitorStats.sent when this load's relay began
    teardown: typing.Any = None  # contextlib.ExitStack undoing each step of the load, in reverse
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add_cell(self, cell):
        with self.lock:
            self.cells[cell.epoch] = cell
            while len(self.cells) > MAX_CELLS:
                self.cells.popitem(last=False)
        self.current = cell

    def cell(self, epoch):
        with self.lock:
            return self.cells.get(epoch)


STATE = State()
