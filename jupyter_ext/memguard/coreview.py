"""``memguard._core``'s results by name: the one place that knows the shape of the dicts and
tuples the C module returns, and the one place that does arithmetic on a snapshot.

Each function takes the ``_core`` module (``STATE.core``) so this module imports nothing
and can be used before the extension is loaded. The meanings and units are those of
docs/interface.md; sizes are integer bytes, times seconds.
"""

import functools
import operator
import typing


@functools.lru_cache(maxsize=None)
def _getter(cls, renamed):
    """An itemgetter of ``cls``'s fields, in order, from a dict (``renamed``: a tuple of
    (field, key) pairs). Built once per shape: a generator over the fields was most of a
    conversion's cost (cProfile of 300 cells)."""
    keys = dict(renamed)
    return operator.itemgetter(*(keys.get(name, name) for name in cls._fields))


_ORDERS = {}  # named-tuple class -> itemgetter of its fields from a *_values() tuple


def _from_values(cls, fields, values, renamed=()):
    """The tuple ``values`` (a ``*_values()`` result, in the order of the names ``fields``,
    the module's ``*_FIELDS``) as the named tuple ``cls`` (``renamed`` as for _named): no
    dict in between, for what runs several times per cell. The order is worked out once
    per class. ValueError if ``fields`` lacks a field of ``cls``."""
    get = _ORDERS.get(cls)
    if get is None:
        keys = dict(renamed)
        get = _ORDERS[cls] = operator.itemgetter(
            *(fields.index(keys.get(name, name)) for name in cls._fields))
    return tuple.__new__(cls, get(values))


def _named(cls, raw, renamed=()):
    """The dict ``raw`` as the named tuple ``cls`` (``renamed``: (field, key) pairs for keys
    of ``raw`` that differ from the field's name). KeyError if ``raw`` lacks a field."""
    return tuple.__new__(cls, _getter(cls, renamed)(raw))


class Snapshot(typing.NamedTuple):
    """``_core.snapshot()``: the counters at one moment. Bytes unless said otherwise.

    ``tracked``: live bytes the hooks counted since load; ``raw``, ``arena``, ``numpy``: its
    parts (PyMem RAW, pymalloc arenas, NumPy data); ``native``: native code's malloc family and
    anonymous mmap (csrc/hooks_native.c). ``cell_start``/``cell_peak``: tracked
    bytes when the running cell began and their peak since. ``cell_usage``: tracked minus
    cell_start. ``budget``: the running cell's budget (0 = none). ``epoch``: the running
    cell's number (memguard's own counter, no unit). ``crossed``: whether the budget was
    crossed (bool). ``rss``: resident set size now; ``rss_cell_start``/``rss_cell_peak``:
    at the cell's start and its peak since. ``vm``: address-space size. ``cgroup``: the
    cgroup's usage (0 when not read). ``raising``: raise mode in force (bool).
    """

    tracked: int
    raw: int
    arena: int
    numpy: int
    native: int
    cell_start: int
    cell_peak: int
    cell_usage: int
    budget: int
    epoch: int
    crossed: bool
    rss: int
    rss_cell_start: int
    rss_cell_peak: int
    vm: int
    cgroup: int
    raising: bool

    def of_cell(self, epoch):
        """Whether the cell-relative figures are about cell ``epoch`` (still running)."""
        return self.epoch == epoch

    @property
    def cell_peak_usage(self):
        """The running cell's peak tracked usage (bytes above what it started with)."""
        return self.cell_peak - self.cell_start

    @property
    def python_heap(self):
        """Tracked bytes of the Python heap (RAW domain and pymalloc arenas)."""
        return self.raw + self.arena

    @property
    def rss_growth(self):
        """RSS growth since the running cell began (bytes, may be negative)."""
        return self.rss - self.rss_cell_start

    @property
    def rss_peak_growth(self):
        """The running cell's peak RSS minus its RSS at the start (bytes)."""
        return self.rss_cell_peak - self.rss_cell_start

    @property
    def untracked(self):
        """RSS growth minus tracked growth since the cell began (bytes), never below 0:
        tracked blocks whose pages were not written yet (np.empty, a result being filled)
        are not in RSS yet, which would make the difference negative without meaning
        anything."""
        return max(0, self.rss_growth - self.cell_usage)

    @property
    def outside_hooks(self):
        """RSS minus tracked bytes (bytes): what no hook counted. Taken at load it is the
        baseline the untracked gap of ``%memguard status`` is measured from."""
        return self.rss - self.tracked

    def used(self, measure):
        """The figure ``measure`` (limits.Measure) compares with the limit, in bytes."""
        return getattr(self, measure.field)


def snapshot(core):
    """``core.snapshot()`` as a :class:`Snapshot`."""
    return _from_values(Snapshot, core.SNAPSHOT_FIELDS, core.snapshot_values(),
                        (("raising", "raise"),))


class Site(typing.NamedTuple):
    """One row of ``_core.sites()``: a cell line holding attributed blocks."""

    epoch: int  # the cell the line belongs to (memguard's counter)
    line: int  # 1-based line in that cell, -1 when unknown
    live_bytes: int  # bytes of its blocks still alive
    live_count: int  # how many of its blocks are still alive
    reported_bytes: int  # live bytes when last reported as accumulation; 0 = never

    @property
    def known_line(self):
        """The line, or None when unknown."""
        return self.line if self.line > 0 else None


def sites(core, epoch, limit):
    """``core.sites(epoch, limit)``: up to ``limit`` :class:`Site` rows, largest first."""
    return [Site._make(row) for row in core.sites(epoch, limit)]


def top_site(core, epoch):
    """The :class:`Site` of cell ``epoch`` holding the most live bytes, or None."""
    rows = sites(core, epoch, 1)
    return rows[0] if rows and rows[0].live_bytes > 0 else None


class Record(typing.NamedTuple):
    """One record of the C monitor (mg_wire_t, decoded with ``_core.WIRE_FORMAT``)."""

    version: int  # _core.WIRE_VERSION
    kind: int  # _core.KIND_*
    epoch: int  # the cell it is about
    line: int  # 1-based cell line, -1 when unknown
    count: int  # accumulation: live blocks; refusal: _core.REFUSE_*; else 0
    bytes: int  # the allocation that crossed, the site's live bytes, or the measure (bytes)
    usage: int  # the cell's usage when the record was made (bytes)
    peak: int  # the cell's peak usage so far (bytes)
    budget: int  # the cell's budget (bytes, 0 = none)
    t: float  # CLOCK_MONOTONIC seconds when the hook saw the event


class MonitorStats(typing.NamedTuple):
    """``_core.monitor_stats()``: counts of records and measures (no unit unless named)."""

    running: bool
    pending: int  # events not yet forwarded by the monitor
    sent: int  # records sent since the process began (spans loads)
    dropped: int  # records the relay was not there to take
    ring_dropped: int  # events lost because the ring was full
    settles: int  # the monitor's measures of native mappings (resident pages)
    settle_cpu_ns: int  # the CPU time those measures took (ns)


def monitor_stats(core):
    """``core.monitor_stats()`` as :class:`MonitorStats`."""
    return _from_values(MonitorStats, core.MONITOR_FIELDS, core.monitor_values())


class Refusal(typing.NamedTuple):
    """``_core.refusal()``: the last allocation raise mode refused."""

    count: int  # refusals since the process began
    bytes: int  # the size asked (bytes)
    reason: int  # _core.REFUSE_BUDGET or _core.REFUSE_LIMIT
    line: int  # 1-based cell line, -1 when unknown
    epoch: int  # the cell


def refusal(core):
    """``core.refusal()`` as :class:`Refusal`."""
    return _named(Refusal, core.refusal())


class SitesConfig(typing.NamedTuple):
    """``_core.sites_config()``: line attribution and the accumulation rule."""

    threshold: int  # blocks of at least this many bytes are attributed to a line
    min_count: int  # live blocks a line needs for an accumulation alert
    budget_fraction: float  # share of the budget they must hold (0-1]
    no_budget_bytes: int  # bytes they must hold when the cell has no budget
    dropped: int  # blocks not attributed because the table was full
    sites: int  # lines in the table
    blocks: int  # attributed blocks alive


def sites_config(core, **rule):
    """``core.sites_config(**rule)`` (set any given, then read) as :class:`SitesConfig`."""
    return _named(SitesConfig, core.sites_config(**rule))
