/* Owns the Python module memguard._core: each method parses its arguments, calls one mg_*
 * engine function and converts the result. Every entry point runs with the GIL held. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>

#include "memguard.h"
#include "mg_acct.h"
#include "mg_batch.h"
#include "mg_blackbox.h"
#include "mg_frames.h"
#include "mg_hooks.h"
#include "mg_monitor.h"
#include "mg_native.h"
#include "mg_elf.h"
#include "mg_ring.h"
#include "mg_measures.h"
#include "mg_sites.h"
#include "mg_zmq.h"

#if PY_VERSION_HEX < 0x030A0000 || PY_VERSION_HEX >= 0x030E0000
#error "memguard supports CPython 3.10 to 3.13 (csrc/frames.c walks those frame layouts)"
#endif

static PyObject *core_install(PyObject *self, PyObject *unused)
{
    int rewrapped;

    /* From a disabled state (first load, or a reload after unload), start clean: blocks
     * freed while counting was off were never taken off their sites or the counters, so
     * the old figures would stay charged to their lines for good (mg_sites_reset,
     * mg_acct_reset). No hook counts while disabled, and the monitor is stopped: Python
     * starts it after install. Enabled (pre_run_cell's re-install), nothing is reset. */
    if (!mg_acct_enabled()) {
        mg_sites_reset();
        mg_acct_reset();
        mg_batch_reset();
    }
    rewrapped = mg_hooks_pymem_install();
    mg_acct_set_enabled(1);
    return PyBool_FromLong(rewrapped);
}

static PyObject *core_install_numpy(PyObject *self, PyObject *unused)
{
    int rc = mg_hooks_numpy_install();

    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc == 0);
}

static PyObject *core_uninstall(PyObject *self, PyObject *unused)
{
    mg_acct_set_enabled(0);
    return PyLong_FromLong(mg_hooks_pymem_uninstall());
}

/* Native hooks (csrc/hooks_native.c, csrc/elf_patch.c): GOT slots of every loaded object. */
static PyObject *core_install_native(PyObject *self, PyObject *unused)
{
    int rc = mg_native_install();

    if (rc < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    (void)mg_hooks_numpy_route(1);
    return PyLong_FromLong(rc);
}

static PyObject *core_uninstall_native(PyObject *self, PyObject *unused)
{
    (void)mg_hooks_numpy_route(0);
    return PyLong_FromLong(mg_native_uninstall());
}

static PyObject *core_native_settle(PyObject *self, PyObject *unused)
{
    int64_t rss;

    /* No mapping to measure (the common case, called at every cell's end), or RSS the same
     * as when they were last measured (mg_native_settle_needed: a cell that touched no new
     * page, while a 1 GiB Arrow arena takes ~0.1 ms to measure): keep the GIL, whose
     * release could hand it to another thread for a switch interval. */
    if (!mg_native_has_mappings())
        Py_RETURN_NONE;
    rss = mg_measures_read();
    if (!mg_native_settle_needed(rss, 0))
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    mg_native_settle_at(rss);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *core_native_stats(PyObject *self, PyObject *unused)
{
    mg_native_stats_t st;
    const char *names[MG_ELF_MAX_FAILED];
    int n;
    PyObject *failed;

    mg_native_stats(&st);
    n = mg_elf_failed(names, MG_ELF_MAX_FAILED);
    failed = PyList_New(0);
    for (int i = 0; failed != NULL && i < n; i++) {
        PyObject *s = PyUnicode_DecodeFSDefault(names[i]);

        if (s == NULL || PyList_Append(failed, s) < 0)
            Py_CLEAR(failed);
        Py_XDECREF(s);
    }
    if (failed == NULL)
        return NULL;
    return Py_BuildValue("{sisisisisKsNsisisi}", "installed", mg_native_installed(),
                         "slots", st.slots, "objects", st.objects, "mappings", (int)st.mappings,
                         "map_dropped", (unsigned long long)st.map_dropped, "failed", failed,
                         "numpy_route", mg_hooks_numpy_routed(),
                         "numpy_passing", mg_hooks_numpy_passing(),
                         "usable_header", mg_usable_glibc());
}

static int core_parse_budget(PyObject *obj, int64_t *out)
{
    long long v = PyLong_AsLongLong(obj);

    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "budget must be >= 0 bytes (0 means none)");
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

static PyObject *core_cell_begin(PyObject *self, PyObject *args)
{
    long long epoch;
    PyObject *budget_obj;
    int64_t budget;

    if (!PyArg_ParseTuple(args, "LO:cell_begin", &epoch, &budget_obj))
        return NULL;
    if (epoch <= 0) {
        PyErr_SetString(PyExc_ValueError, "epoch must be > 0");
        return NULL;
    }
    if (core_parse_budget(budget_obj, &budget) < 0)
        return NULL;
    mg_sites_sweep((int64_t)epoch);
    mg_measures_cell_begin();
    /* The cell thread's batch belongs to the cell that ends (include/mg_batch.h). */
    mg_batch_flush();
    mg_acct_cell_begin((int64_t)epoch, budget);
    /* The native domain now, for the cell's record: a full snapshot would read RSS too. */
    mg_acct_snapshot_t s;

    mg_acct_snapshot(&s);
    return PyLong_FromLongLong(s.domain[MG_DOMAIN_NATIVE]);
}

static PyObject *core_set_budget(PyObject *self, PyObject *arg)
{
    int64_t budget;

    if (core_parse_budget(arg, &budget) < 0)
        return NULL;
    mg_acct_set_budget(budget);
    Py_RETURN_NONE;
}

/* A dict of n integers under the names `names`, whose key strings are made and interned on
 * the first call (`keys`, static, GIL held): Py_BuildValue would make and hash every key on
 * every call, and snapshot() runs at least three times per cell and per Dask task
 * (callgrind of sparse_products: that was about 30,000 instructions a cell). NULL with an
 * exception set on failure. */
static PyObject *named_ints(const char *const *names, PyObject **keys, const long long *vals,
                            int n)
{
    PyObject *d = PyDict_New();

    if (d == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *v;

        if (keys[i] == NULL && (keys[i] = PyUnicode_InternFromString(names[i])) == NULL)
            goto fail;
        v = PyLong_FromLongLong(vals[i]);
        if (v == NULL || PyDict_SetItem(d, keys[i], v) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v);
    }
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

static const char *const SNAPSHOT_NAMES[] = {
    "tracked", "raw", "arena", "numpy", "native", "cell_start", "cell_peak", "cell_usage",
    "budget", "epoch", "crossed", "rss", "rss_cell_start", "rss_cell_peak", "vm", "cgroup",
    "raise",
};
#define SNAPSHOT_N ((int)(sizeof(SNAPSHOT_NAMES) / sizeof(SNAPSHOT_NAMES[0])))
static PyObject *s_snapshot_keys[SNAPSHOT_N];

/* A tuple of n items, item(src, i) each (a new reference, NULL with an exception set).
 * NULL with an exception set on failure. */
static PyObject *tuple_of(int n, PyObject *(*item)(const void *src, int i), const void *src)
{
    PyObject *t = PyTuple_New(n);

    if (t == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *v = item(src, i);

        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyObject *int_item(const void *vals, int i)
{
    return PyLong_FromLongLong(((const long long *)vals)[i]);
}

static PyObject *name_item(const void *names, int i)
{
    return PyUnicode_InternFromString(((const char *const *)names)[i]);
}

/* A tuple of the n integers: what the *_values() functions return, in the order of their
 * *_FIELDS names. coreview builds its named tuples from these, with no dict in between
 * (callgrind of one pre_run_cell + post_run_cell, 2026-12-03: a snapshot() dict and its
 * conversion were about 14,000 instructions, a third of memguard's per-cell work). */
static PyObject *ints_tuple(const long long *vals, int n)
{
    return tuple_of(n, int_item, vals);
}

/* Module constant `name`: the names as a tuple of str. -1 with an exception on failure. */
static int add_names(PyObject *m, const char *name, const char *const *names, int n)
{
    PyObject *t = tuple_of(n, name_item, names);
    int rc;

    if (t == NULL)
        return -1;
    rc = PyModule_AddObjectRef(m, name, t);
    Py_DECREF(t);
    return rc;
}

static void snapshot_read(long long vals[SNAPSHOT_N])
{
    mg_acct_snapshot_t s;
    mg_measures_snapshot_t r;
    int64_t rss = mg_measures_read();

    mg_batch_flush(); /* this thread's small blocks, exactly (include/mg_batch.h) */
    mg_acct_snapshot(&s);
    mg_measures_snapshot(&r);
    if (rss < 0)
        rss = r.last;
    long long v[SNAPSHOT_N] = {
        s.tracked, s.domain[MG_DOMAIN_RAW], s.domain[MG_DOMAIN_ARENA],
        s.domain[MG_DOMAIN_NUMPY], s.domain[MG_DOMAIN_NATIVE], s.cell_start, s.cell_peak,
        s.tracked - s.cell_start, s.budget, s.epoch, s.crossed, rss, r.cell_start,
        rss > r.cell_peak ? rss : r.cell_peak, r.vm, r.cgroup, mg_acct_raise(),
    };
    memcpy(vals, v, sizeof(v));
}

static PyObject *core_snapshot(PyObject *self, PyObject *unused)
{
    long long vals[SNAPSHOT_N];

    snapshot_read(vals);
    return named_ints(SNAPSHOT_NAMES, s_snapshot_keys, vals, SNAPSHOT_N);
}

static PyObject *core_snapshot_values(PyObject *self, PyObject *unused)
{
    long long vals[SNAPSHOT_N];

    snapshot_read(vals);
    return ints_tuple(vals, SNAPSHOT_N);
}

static PyObject *core_set_user_globals(PyObject *self, PyObject *arg)
{
    if (arg != Py_None && !PyDict_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_user_globals expects a dict or None");
        return NULL;
    }
    mg_frames_set_user_globals(arg == Py_None ? NULL : arg);
    Py_RETURN_NONE;
}

static PyObject *core_set_cell_file(PyObject *self, PyObject *arg)
{
    if (arg != Py_None && !PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_cell_file expects a str or None");
        return NULL;
    }
    mg_frames_set_cell_file(arg == Py_None ? NULL : arg);
    Py_RETURN_NONE;
}

static PyObject *core_cell_line(PyObject *self, PyObject *unused)
{
    int line = mg_frames_cell_line();

    if (line < 1)
        Py_RETURN_NONE;
    return PyLong_FromLong(line);
}

static PyObject *core_set_raise(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);

    if (on < 0)
        return NULL;
    mg_acct_set_raise(on);
    mg_hooks_numpy_refresh(); /* raise mode needs the handler's own entries */
    Py_RETURN_NONE;
}

static PyObject *core_set_limit(PyObject *self, PyObject *args)
{
    long long bytes;
    int measure;
    double fraction;
    const char *cgroup_file = NULL;

    if (!PyArg_ParseTuple(args, "Lid|z:set_limit", &bytes, &measure, &fraction, &cgroup_file))
        return NULL;
    if (bytes < 0 || measure < MG_MEASURE_RSS || measure > MG_MEASURE_CGROUP ||
        !(fraction > 0.0 && fraction <= 1.0)) {
        PyErr_SetString(PyExc_ValueError,
                        "set_limit(bytes >= 0, measure in MEASURE_*, 0 < fraction <= 1)");
        return NULL;
    }
    if (mg_measures_set_cgroup_file(cgroup_file) < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, cgroup_file);
    mg_acct_set_limit((int64_t)bytes, measure, fraction);
    Py_RETURN_NONE;
}

static PyObject *core_refusal(PyObject *self, PyObject *unused)
{
    mg_acct_refusal_t r;

    mg_acct_refusal(&r);
    return Py_BuildValue("{sKsLsisisLsLsL}", "count", (unsigned long long)r.count,
                         "bytes", (long long)r.bytes, "reason", r.reason, "line", (int)r.line,
                         "epoch", (long long)r.epoch, "used", (long long)r.used,
                         "reserve", (long long)r.reserve);
}

static PyObject *core_blackbox_open(PyObject *self, PyObject *args)
{
    const char *path;
    const char *connection;

    if (!PyArg_ParseTuple(args, "ss:blackbox_open", &path, &connection))
        return NULL;
    if (mg_blackbox_open(path, connection) < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    Py_RETURN_NONE;
}

static PyObject *core_blackbox_close(PyObject *self, PyObject *args)
{
    int remove = 1;

    if (!PyArg_ParseTuple(args, "|p:blackbox_close", &remove))
        return NULL;
    /* Safe while the monitor runs: close waits for a tick in progress (mg_blackbox.h). */
    mg_blackbox_close(remove);
    Py_RETURN_NONE;
}

static PyObject *core_blackbox_set_cell(PyObject *self, PyObject *args)
{
    long long epoch;
    long long count;
    const char *source;
    Py_ssize_t len;
    const char *parent = NULL;
    Py_ssize_t parent_len = 0;

    if (!PyArg_ParseTuple(args, "LLs#|z#:blackbox_set_cell", &epoch, &count, &source, &len,
                          &parent, &parent_len))
        return NULL;
    mg_blackbox_set_cell((int64_t)epoch, (int64_t)count, source, (size_t)len, parent,
                         (size_t)parent_len);
    Py_RETURN_NONE;
}

static PyObject *core_blackbox_add_alert(PyObject *self, PyObject *args)
{
    long long epoch;
    long long count;
    int kind;
    int line;
    long long nbytes;
    const char *message;
    Py_ssize_t len;

    if (!PyArg_ParseTuple(args, "LLiiLs#:blackbox_add_alert", &epoch, &count, &kind, &line,
                          &nbytes, &message, &len))
        return NULL;
    mg_blackbox_add_alert((int64_t)epoch, (int64_t)count, kind, line, (int64_t)nbytes, message,
                          (size_t)len);
    Py_RETURN_NONE;
}

static PyObject *core_blackbox_layout(PyObject *self, PyObject *unused)
{
    const char *names[32];
    int64_t values[32];
    int n = mg_blackbox_layout(names, values, 32);
    PyObject *out = PyDict_New();

    for (int i = 0; out != NULL && i < n; i++) {
        PyObject *v = PyLong_FromLongLong((long long)values[i]);

        if (v == NULL || PyDict_SetItemString(out, names[i], v) < 0)
            Py_CLEAR(out);
        Py_XDECREF(v);
    }
    return out;
}

static PyObject *core_sites(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"epoch", "limit", NULL};
    long long epoch = 0;
    int limit = 20;
    mg_site_info_t *buf;
    PyObject *out = NULL;
    int n;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|Li:sites", kwlist, &epoch, &limit))
        return NULL;
    if (limit < 1 || limit > (int)MG_SITE_SLOTS) {
        PyErr_Format(PyExc_ValueError, "limit must be 1-%u", MG_SITE_SLOTS);
        return NULL;
    }
    buf = PyMem_Malloc(sizeof(*buf) * (size_t)limit);
    if (buf == NULL)
        return PyErr_NoMemory();
    n = mg_sites_list((int64_t)epoch, buf, limit);
    out = PyList_New(n);
    if (out == NULL)
        goto finally;
    for (int i = 0; i < n; i++) {
        PyObject *row = Py_BuildValue("(LiLLL)", (long long)buf[i].epoch, buf[i].line,
                                      (long long)buf[i].live_bytes,
                                      (long long)buf[i].live_count,
                                      (long long)buf[i].reported);
        if (row == NULL) {
            Py_CLEAR(out);
            goto finally;
        }
        PyList_SET_ITEM(out, i, row);
    }
finally:
    PyMem_Free(buf);
    return out;
}

static PyObject *core_sites_config(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"threshold", "min_count", "budget_fraction",
                             "no_budget_bytes", NULL};
    long long threshold = -1;
    long long min_count = -1;
    double fraction = -1.0;
    long long no_budget = -1;
    mg_sites_rule_t rule;
    mg_sites_stats_t st;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|LLdL:sites_config", kwlist, &threshold,
                                     &min_count, &fraction, &no_budget))
        return NULL;
    mg_sites_get_rule(&rule);
    if (PyTuple_GET_SIZE(args) + (kwargs ? PyDict_GET_SIZE(kwargs) : 0) > 0) {
        if ((threshold != -1 && threshold < 4096) || (min_count != -1 && min_count < 1) ||
            (fraction != -1.0 && !(fraction > 0.0 && fraction <= 1.0)) ||
            (no_budget != -1 && no_budget < 1)) {
            PyErr_SetString(PyExc_ValueError,
                            "threshold >= 4096 bytes, min_count >= 1, 0 < budget_fraction <= 1, "
                            "no_budget_bytes >= 1");
            return NULL;
        }
        if (threshold != -1)
            mg_sites_set_threshold((size_t)threshold);
        if (min_count != -1)
            rule.min_count = min_count;
        if (fraction != -1.0)
            rule.budget_fraction = fraction;
        if (no_budget != -1)
            rule.no_budget_bytes = no_budget;
        mg_sites_set_rule(&rule);
    }
    mg_sites_stats(&st);
    return Py_BuildValue("{sKsLsdsLsKsKsK}",
                         "threshold", (unsigned long long)mg_sites_threshold(),
                         "min_count", (long long)rule.min_count,
                         "budget_fraction", rule.budget_fraction,
                         "no_budget_bytes", (long long)rule.no_budget_bytes,
                         "dropped", (unsigned long long)st.dropped,
                         "sites", (unsigned long long)st.sites,
                         "blocks", (unsigned long long)st.blocks);
}

static PyObject *core_zmq_load(PyObject *self, PyObject *args)
{
    const char *path = NULL;
    const char *why = NULL;

    if (!PyArg_ParseTuple(args, "z:zmq_load", &path))
        return NULL;
    if (mg_zmq_load(path, &why) < 0) {
        PyErr_SetString(PyExc_ImportError, why);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *core_monitor_start(PyObject *self, PyObject *args)
{
    const char *endpoint;
    int period_ms = MG_MONITOR_PERIOD_MS;
    PyObject *ctx_obj = Py_None;
    void *ctx = NULL;
    const char *launcher = NULL; /* the kernel launcher's endpoint (MEMGUARD_LAUNCHER_ENDPOINT) */

    if (!PyArg_ParseTuple(args, "s|iOz:monitor_start", &endpoint, &period_ms, &ctx_obj,
                          &launcher))
        return NULL;
    if (ctx_obj != Py_None) {
        ctx = PyLong_AsVoidPtr(ctx_obj);
        if (ctx == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "monitor_start: context must not be 0");
            return NULL;
        }
    }
    if (!mg_zmq_loaded()) {
        PyErr_SetString(PyExc_RuntimeError, "monitor_start: call zmq_load first");
        return NULL;
    }
    if (mg_monitor_set_launcher(launcher) < 0) /* a second PUSH, or none */
        return PyErr_SetFromErrno(errno == ENAMETOOLONG ? PyExc_ValueError : PyExc_OSError);
    if (mg_monitor_start(endpoint, period_ms, ctx) < 0)
        return PyErr_SetFromErrno(errno == EINVAL ? PyExc_ValueError : PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *core_monitor_stop(PyObject *self, PyObject *unused)
{
    Py_BEGIN_ALLOW_THREADS
    mg_monitor_stop();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static const char *const MONITOR_NAMES[] = {
    "launcher_sent", "launcher_dropped", "running", "pending", "sent", "dropped", "ring_dropped",
    "settles", "settle_cpu_ns",
};
#define MONITOR_N ((int)(sizeof(MONITOR_NAMES) / sizeof(MONITOR_NAMES[0])))
static PyObject *s_monitor_keys[MONITOR_N];

static void monitor_read(long long vals[MONITOR_N])
{
    /* Counters since the process began: far below 2^63. */
    long long v[MONITOR_N] = {
        (long long)mg_monitor_launcher_sent(), (long long)mg_monitor_launcher_dropped(),
        mg_monitor_running(), (long long)mg_monitor_pending(), (long long)mg_monitor_sent(),
        (long long)mg_monitor_dropped(), (long long)mg_ring_dropped(),
        (long long)mg_monitor_settles(), (long long)mg_monitor_settle_cpu_ns(),
    };
    memcpy(vals, v, sizeof(v));
}

static PyObject *core_monitor_stats(PyObject *self, PyObject *unused)
{
    long long vals[MONITOR_N];

    monitor_read(vals);
    return named_ints(MONITOR_NAMES, s_monitor_keys, vals, MONITOR_N);
}

static PyObject *core_monitor_values(PyObject *self, PyObject *unused)
{
    long long vals[MONITOR_N];

    monitor_read(vals);
    return ints_tuple(vals, MONITOR_N);
}

static PyMethodDef core_methods[] = {
    {"install", core_install, METH_NOARGS,
     "install() -> bool\n\nWrap the PyMem RAW and pymalloc arena allocators (idempotent) and "
     "enable counting. Returns True if the RAW wrapper had fallen out of the allocator "
     "chain (tracemalloc.stop() restores what tracemalloc saved) and was wrapped again."},
    {"install_numpy", core_install_numpy, METH_NOARGS,
     "install_numpy() -> bool\n\nPoint NumPy's default NEP 49 handler at the 'memguard' "
     "handler. Returns True if the current context's arrays are counted, False if it uses "
     "another non-default handler. Raises ImportError if NumPy is missing or < 1.22."},
    {"uninstall", core_uninstall, METH_NOARGS,
     "uninstall() -> int\n\nDisable counting and restore the allocators memguard wrapped, "
     "where memguard is still the top of the chain. Returns how many were restored (0-2)."},
    {"install_native", core_install_native, METH_NOARGS,
     "install_native() -> int\n\nPoint the GOT slots of malloc, calloc, realloc, free, "
     "posix_memalign, aligned_alloc, memalign, valloc, pvalloc, reallocarray, mmap, munmap, "
     "mremap and dlopen in every loaded object (not memguard's, libc or the loader) at "
     "memguard's native wrappers; objects loaded later are patched by the dlopen wrapper. "
     "Returns the number of slots patched now. Raises OSError."},
    {"uninstall_native", core_uninstall_native, METH_NOARGS,
     "uninstall_native() -> int\n\nPut back every GOT slot patched by install_native in the "
     "objects still loaded. Returns how many were restored."},
    {"native_settle", core_native_settle, METH_NOARGS,
     "native_settle() -> None\n\nCount native anonymous mappings by their resident pages now, "
     "unless RSS is what it was when they were last counted (the monitor thread does it at "
     "RSS samples where RSS moved, at most every 10 ms; the end of a cell or task does it "
     "too)."},
    {"native_stats", core_native_stats, METH_NOARGS,
     "native_stats() -> dict\n\ninstalled, slots (patched now), objects (scanned in the last "
     "pass), mappings (anonymous mappings counted), map_dropped, failed (names of objects "
     "that could not be patched), numpy_route (1 when NumPy's own malloc calls are counted "
     "as NumPy data and its NEP 49 handler passes calls through outside raise mode), "
     "numpy_passing (1 while that handler's malloc, realloc and free are NumPy's own "
     "entries: the route on, outside raise mode)."},
    {"cell_begin", core_cell_begin, METH_VARARGS,
     "cell_begin(epoch: int, budget: int) -> int\n\nStart a cell: epoch > 0, budget in "
     "bytes (0 = none). Usage is measured from the tracked bytes at this moment. Returns the "
     "native domain's tracked bytes at this moment."},
    {"set_budget", core_set_budget, METH_O,
     "set_budget(budget: int) -> None\n\nChange the running cell's budget (bytes, 0 = none)."},
    {"snapshot", core_snapshot, METH_NOARGS,
     "snapshot() -> dict\n\nCounters in bytes: tracked, raw, arena, numpy, cell_start, "
     "cell_peak, cell_usage, budget, rss (read now), rss_cell_start, rss_cell_peak; epoch; "
     "crossed (0/1)."},
    {"snapshot_values", core_snapshot_values, METH_NOARGS,
     "snapshot_values() -> tuple[int, ...]\n\nsnapshot()'s values, in the order of "
     "SNAPSHOT_FIELDS."},
    {"set_user_globals", core_set_user_globals, METH_O,
     "set_user_globals(ns: dict | None) -> None\n\nThe notebook's globals, which mark the "
     "running cell's frames for line attribution."},
    {"set_cell_file", core_set_cell_file, METH_O,
     "set_cell_file(filename: str | None) -> None\n\nThe filename IPython compiles the running "
     "cell under, so threads running the cell's functions are attributed to its lines."},
    {"cell_line", core_cell_line, METH_NOARGS,
     "cell_line() -> int | None\n\n1-based line of the running cell that is executing in "
     "this thread, or None."},
    {"sites", (PyCFunction)(void (*)(void))core_sites, METH_VARARGS | METH_KEYWORDS,
     "sites(epoch: int = 0, limit: int = 20) -> list[tuple]\n\nThe sites holding attributed "
     "blocks, largest first: (epoch, line, live_bytes, live_count, reported_bytes); line is "
     "-1 when unknown, reported_bytes 0 when the site never met the accumulation rule. "
     "epoch 0 lists every cell. Raises ValueError for a limit outside 1-1024."},
    {"sites_config", (PyCFunction)(void (*)(void))core_sites_config,
     METH_VARARGS | METH_KEYWORDS,
     "sites_config(threshold=None, min_count=None, budget_fraction=None, "
     "no_budget_bytes=None) -> dict\n\nSet (any given) and return the attribution threshold "
     "(bytes) and the accumulation rule, plus table stats (dropped, sites, blocks). Raises "
     "ValueError for threshold < 4096, min_count < 1, a fraction outside (0, 1]."},
    {"blackbox_open", core_blackbox_open, METH_VARARGS,
     "blackbox_open(path: str, connection: str) -> None\n\nCreate the black box at path "
     "(< 1 MiB, mapped; the monitor keeps it current). Raises OSError."},
    {"blackbox_close", core_blackbox_close, METH_VARARGS,
     "blackbox_close(remove: bool = True) -> None\n\nUnmap it (and unlink it), after any "
     "write the monitor thread has in progress."},
    {"blackbox_set_cell", core_blackbox_set_cell, METH_VARARGS,
     "blackbox_set_cell(epoch: int, count: int, source: str, parent: str | None = None) -> "
     "None\n\nThe running cell (count -1 if none); source cut to 16 KiB; parent: the JSON "
     "header of its execute_request, dropped if over 1 KiB."},
    {"blackbox_add_alert", core_blackbox_add_alert, METH_VARARGS,
     "blackbox_add_alert(epoch, count, kind: int, line, bytes, message: str) -> None"},
    {"blackbox_layout", core_blackbox_layout, METH_NOARGS,
     "blackbox_layout() -> dict\n\nOffsets and sizes (bytes) of the black-box layout."},
    {"set_raise", core_set_raise, METH_O,
     "set_raise(on: bool) -> None\n\nraise mode: NumPy allocations that would take the cell "
     "over its budget, or the process over its limit, fail (NumPy raises MemoryError)."},
    {"set_limit", core_set_limit, METH_VARARGS,
     "set_limit(bytes: int, measure: int, fraction: float, cgroup_file: str | None = None) "
     "-> None\n\nThe effective limit in bytes (0 = none), what it is compared with "
     "(MEASURE_RSS, MEASURE_VM, MEASURE_CGROUP; the cgroup usage file for the last) and the "
     "fraction at which the limit alert fires. Raises ValueError, or OSError if the file "
     "cannot be opened."},
    {"refusal", core_refusal, METH_NOARGS,
     "refusal() -> dict\n\nThe last allocation raise mode refused: count (refusals so far), "
     "bytes, reason (REFUSE_BUDGET or REFUSE_LIMIT), line (-1 if unknown), epoch, used (the "
     "limit's measure as raise mode judged it then, bytes), reserve (kept below the limit, "
     "bytes)."},
    {"zmq_load", core_zmq_load, METH_VARARGS,
     "zmq_load(path: str | None) -> None\n\nResolve libzmq's calls from the shared object at "
     "path, already loaded (pyzmq's backend extension) or to be loaded; None searches the "
     "global scope. Idempotent. Raises ImportError with the reason."},
    {"monitor_start", core_monitor_start, METH_VARARGS,
     "monitor_start(endpoint: str, period_ms: int = 10, context: int | None = None, "
     "launcher: str | None = None) -> None"
     "\n\nConnect a PUSH socket to endpoint, in the libzmq context at address context "
     "(pyzmq's Context.underlying, kept alive by the caller until monitor_stop) or in one of "
     "its own, and start the monitor thread; with launcher (memguard's kernel launcher's "
     "endpoint), a second PUSH socket sends every record there too. Raises RuntimeError before zmq_load, OSError "
     "(EALREADY if running) or ValueError for a period outside 1-1000 ms."},
    {"monitor_stop", core_monitor_stop, METH_NOARGS,
     "monitor_stop() -> None\n\nStop and join the monitor thread and close its socket."},
    {"monitor_stats", core_monitor_stats, METH_NOARGS,
     "monitor_stats() -> dict\n\nrunning, pending (events not yet forwarded), sent, dropped "
     "(peer absent/slow), ring_dropped, settles (the monitor's measures of native mappings) and "
     "settle_cpu_ns (the CPU time they took, ns)."},
    {"monitor_values", core_monitor_values, METH_NOARGS,
     "monitor_values() -> tuple[int, ...]\n\nmonitor_stats()'s values, in the order of "
     "MONITOR_FIELDS."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    "memguard._core", /* m_name */
    "memguard's allocator hooks, byte accounting and monitor thread (C11).", /* m_doc */
    -1,               /* m_size: process-wide state; hooks are process-wide anyway */
    core_methods,     /* m_methods */
};

/* Py_AtExit runs after the interpreter is finalized: the monitor thread needs no Python,
 * so joining it there is safe, and it is the last moment to close its socket. */
static void core_atexit(void)
{
    mg_acct_set_enabled(0);
    mg_monitor_stop();
    mg_blackbox_close(1); /* a clean exit is not a crash: no report after it */
}

PyMODINIT_FUNC PyInit__core(void)
{
    static int initialized = 0;
    PyObject *m;

#ifdef Py_GIL_DISABLED
    /* The hooks and the frame walk rely on the GIL (include/memguard.h). */
    PyErr_SetString(PyExc_ImportError,
                    "memguard: free-threaded CPython (Py_GIL_DISABLED) is not supported");
    return NULL;
#endif
    m = PyModule_Create(&core_module);

    if (m == NULL)
        return NULL;
    if (!initialized) {
        mg_ring_reset();
        (void)mg_usable_init(); /* before any hook can measure a block */
        if (mg_monitor_atfork_register() != 0 || Py_AtExit(core_atexit) < 0) {
            PyErr_SetString(PyExc_RuntimeError, "memguard: could not register fork/exit handlers");
            Py_DECREF(m);
            return NULL;
        }
        initialized = 1;
    }
    if (PyModule_AddStringConstant(m, "VERSION", MG_VERSION) < 0 ||
        PyModule_AddStringConstant(m, "WIRE_FORMAT", MG_WIRE_FORMAT) < 0 ||
        PyModule_AddIntConstant(m, "WIRE_VERSION", MG_WIRE_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "MONITOR_PERIOD_MS", MG_MONITOR_PERIOD_MS) < 0 ||
        PyModule_AddIntConstant(m, "KIND_BUDGET", MG_KIND_BUDGET) < 0 ||
        PyModule_AddIntConstant(m, "KIND_BUDGET_GROW", MG_KIND_BUDGET_GROW) < 0 ||
        PyModule_AddIntConstant(m, "KIND_ACCUMULATION", MG_KIND_ACCUMULATION) < 0 ||
        PyModule_AddIntConstant(m, "KIND_ACCUMULATION_GROW", MG_KIND_ACCUMULATION_GROW) < 0 ||
        PyModule_AddIntConstant(m, "KIND_BUDGET_RSS", MG_KIND_BUDGET_RSS) < 0 ||
        PyModule_AddIntConstant(m, "KIND_REFUSED", MG_KIND_REFUSED) < 0 ||
        PyModule_AddIntConstant(m, "KIND_LIMIT", MG_KIND_LIMIT) < 0 ||
        PyModule_AddIntConstant(m, "KIND_LIMIT_REQUEST", MG_KIND_LIMIT_REQUEST) < 0 ||
        PyModule_AddIntConstant(m, "REFUSE_BUDGET", MG_REFUSE_BUDGET) < 0 ||
        PyModule_AddIntConstant(m, "REFUSE_LIMIT", MG_REFUSE_LIMIT) < 0 ||
        PyModule_AddIntConstant(m, "MEASURE_RSS", MG_MEASURE_RSS) < 0 ||
        PyModule_AddIntConstant(m, "MEASURE_VM", MG_MEASURE_VM) < 0 ||
        PyModule_AddIntConstant(m, "MEASURE_CGROUP", MG_MEASURE_CGROUP) < 0 ||
        add_names(m, "SNAPSHOT_FIELDS", SNAPSHOT_NAMES, SNAPSHOT_N) < 0 ||
        add_names(m, "MONITOR_FIELDS", MONITOR_NAMES, MONITOR_N) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
