/* Owns the Python module memguard._core: each method parses its arguments, calls one mg_*
 * engine function and converts the result. Every entry point runs with the GIL held. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>

#include "memguard.h"
#include "mg_acct.h"
#include "mg_frames.h"
#include "mg_hooks.h"
#include "mg_relay.h"
#include "mg_ring.h"

static PyObject *core_install(PyObject *self, PyObject *unused)
{
    mg_hooks_pymem_install();
    mg_acct_set_enabled(1);
    Py_RETURN_NONE;
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

static PyObject *core_set_enabled(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);

    if (on < 0)
        return NULL;
    mg_acct_set_enabled(on);
    Py_RETURN_NONE;
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
    mg_acct_cell_begin((int64_t)epoch, budget);
    Py_RETURN_NONE;
}

static PyObject *core_set_budget(PyObject *self, PyObject *arg)
{
    int64_t budget;

    if (core_parse_budget(arg, &budget) < 0)
        return NULL;
    mg_acct_set_budget(budget);
    Py_RETURN_NONE;
}

static PyObject *core_snapshot(PyObject *self, PyObject *unused)
{
    mg_acct_snapshot_t s;

    mg_acct_snapshot(&s);
    return Py_BuildValue("{sLsLsLsLsLsLsLsLsLsi}",
                         "tracked", (long long)s.tracked,
                         "raw", (long long)s.domain[MG_DOMAIN_RAW],
                         "arena", (long long)s.domain[MG_DOMAIN_ARENA],
                         "numpy", (long long)s.domain[MG_DOMAIN_NUMPY],
                         "cell_start", (long long)s.cell_start,
                         "cell_peak", (long long)s.cell_peak,
                         "cell_usage", (long long)(s.tracked - s.cell_start),
                         "budget", (long long)s.budget,
                         "epoch", (long long)s.epoch,
                         "crossed", s.crossed);
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

static PyObject *core_cell_line(PyObject *self, PyObject *unused)
{
    int line = mg_frames_cell_line();

    if (line < 1)
        Py_RETURN_NONE;
    return PyLong_FromLong(line);
}

static PyObject *core_relay_start(PyObject *self, PyObject *args)
{
    const char *endpoint;
    int period_ms = 2;

    if (!PyArg_ParseTuple(args, "s|i:relay_start", &endpoint, &period_ms))
        return NULL;
    if (mg_relay_start(endpoint, period_ms) < 0)
        return PyErr_SetFromErrno(errno == EINVAL ? PyExc_ValueError : PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *core_relay_stop(PyObject *self, PyObject *unused)
{
    Py_BEGIN_ALLOW_THREADS
    mg_relay_stop();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *core_relay_stats(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{sisKsKsK}",
                         "running", mg_relay_running(),
                         "sent", (unsigned long long)mg_relay_sent(),
                         "dropped", (unsigned long long)mg_relay_dropped(),
                         "ring_dropped", (unsigned long long)mg_ring_dropped());
}

static PyMethodDef core_methods[] = {
    {"install", core_install, METH_NOARGS,
     "install() -> None\n\nWrap the PyMem RAW and pymalloc arena allocators (idempotent) and "
     "enable counting."},
    {"install_numpy", core_install_numpy, METH_NOARGS,
     "install_numpy() -> bool\n\nPoint NumPy's default NEP 49 handler at the 'memguard' "
     "handler. Returns True if the current context's arrays are counted, False if it uses "
     "another non-default handler. Raises ImportError if NumPy is missing or < 1.22."},
    {"uninstall", core_uninstall, METH_NOARGS,
     "uninstall() -> int\n\nDisable counting and restore the allocators memguard wrapped, "
     "where memguard is still the top of the chain. Returns how many were restored (0-2)."},
    {"set_enabled", core_set_enabled, METH_O,
     "set_enabled(on: bool) -> None\n\nTurn counting on or off; off, hooks pass through."},
    {"cell_begin", core_cell_begin, METH_VARARGS,
     "cell_begin(epoch: int, budget: int) -> None\n\nStart a cell: epoch > 0, budget in "
     "bytes (0 = none). Usage is measured from the tracked bytes at this moment."},
    {"set_budget", core_set_budget, METH_O,
     "set_budget(budget: int) -> None\n\nChange the running cell's budget (bytes, 0 = none)."},
    {"snapshot", core_snapshot, METH_NOARGS,
     "snapshot() -> dict\n\nCounters in bytes: tracked, raw, arena, numpy, cell_start, "
     "cell_peak, cell_usage, budget; epoch; crossed (0/1)."},
    {"set_user_globals", core_set_user_globals, METH_O,
     "set_user_globals(ns: dict | None) -> None\n\nThe notebook's globals, which mark the "
     "running cell's frames for line attribution."},
    {"cell_line", core_cell_line, METH_NOARGS,
     "cell_line() -> int | None\n\n1-based line of the running cell that is executing in "
     "this thread, or None."},
    {"relay_start", core_relay_start, METH_VARARGS,
     "relay_start(endpoint: str, period_ms: int = 2) -> None\n\nConnect a PUSH socket to "
     "endpoint and start the monitor thread. Raises OSError (EALREADY if running) or "
     "ValueError for a period outside 1-1000 ms."},
    {"relay_stop", core_relay_stop, METH_NOARGS,
     "relay_stop() -> None\n\nStop and join the monitor thread and close its socket."},
    {"relay_stats", core_relay_stats, METH_NOARGS,
     "relay_stats() -> dict\n\nrunning, sent, dropped (peer absent/slow), ring_dropped."},
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
    mg_relay_stop();
}

PyMODINIT_FUNC PyInit__core(void)
{
    static int initialized = 0;
    PyObject *m = PyModule_Create(&core_module);

    if (m == NULL)
        return NULL;
    if (!initialized) {
        mg_ring_reset();
        if (mg_relay_atfork_register() != 0 || Py_AtExit(core_atexit) < 0) {
            PyErr_SetString(PyExc_RuntimeError, "memguard: could not register fork/exit handlers");
            Py_DECREF(m);
            return NULL;
        }
        initialized = 1;
    }
    if (PyModule_AddStringConstant(m, "VERSION", MG_VERSION) < 0 ||
        PyModule_AddStringConstant(m, "WIRE_FORMAT", MG_WIRE_FORMAT) < 0 ||
        PyModule_AddIntConstant(m, "WIRE_VERSION", MG_WIRE_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "KIND_BUDGET", MG_KIND_BUDGET) < 0 ||
        PyModule_AddIntConstant(m, "KIND_BUDGET_GROW", MG_KIND_BUDGET_GROW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
