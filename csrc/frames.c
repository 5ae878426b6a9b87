/* Owns the version-specific walk over CPython's interpreter frames for cell-line
 * attribution (include/mg_frames.h). Entered from hooks and Python; reads frames only
 * when the calling thread holds the GIL. CPython 3.11 only; other versions return -1. */
#define Py_BUILD_CORE 1
#include <Python.h>

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
#include "internal/pycore_frame.h"
#include "internal/pycore_pystate.h"
#define MG_FRAMES_311 1
#endif

#include <string.h>

#include "mg_frames.h"

/* Written by mg_frames_set_user_globals / mg_frames_set_cell_file (GIL held); read by
 * mg_frames_cell_line only after PyGILState_Check() says this thread holds the GIL, so the
 * GIL orders both. Strong references. */
static PyObject *s_user_globals = NULL;
static PyObject *s_cell_file = NULL;

void mg_frames_set_cell_file(PyObject *filename)
{
    PyObject *old = s_cell_file;

    Py_XINCREF(filename);
    s_cell_file = filename;
    Py_XDECREF(old);
}

void mg_frames_set_user_globals(PyObject *globals)
{
    PyObject *old = s_user_globals;

    Py_XINCREF(globals);
    s_user_globals = globals;
    Py_XDECREF(old);
}

#ifdef MG_FRAMES_311
/* Whether two filename objects name the same file: the same object, or two ready str
 * objects with equal contents. Compares code units with memcmp: no allocation. */
static int frames_same_file(PyObject *a, PyObject *b)
{
    Py_ssize_t n;

    if (a == b)
        return 1;
    if (!PyUnicode_CheckExact(a) || !PyUnicode_CheckExact(b) || !PyUnicode_IS_READY(a) ||
        !PyUnicode_IS_READY(b))
        return 0;
    n = PyUnicode_GET_LENGTH(a);
    return n == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
}

static int frames_line(_PyInterpreterFrame *f)
{
    int addr = _PyInterpreterFrame_LASTI(f) * (int)sizeof(_Py_CODEUNIT);

    return PyCode_Addr2Line(f->f_code, addr);
}

MG_HOOKSAFE int mg_frames_cell_line(void)
{
    PyThreadState *ts;
    _PyInterpreterFrame *top;
    _PyInterpreterFrame *f;
    PyObject *cell_file = NULL;
    PyObject *globals = s_user_globals;

    if (globals == NULL || !PyGILState_Check())
        return -1;
    ts = _PyThreadState_GET();
    if (ts == NULL || ts->cframe == NULL)
        return -1;
    top = ts->cframe->current_frame;
    /* When the running cell's filename is known, the innermost frame compiled from it is
     * the answer in any thread (a worker running a function of this cell included). */
    if (s_cell_file != NULL) {
        for (f = top; f != NULL; f = f->previous) {
            if (!_PyFrame_IsIncomplete(f) && f->f_globals == globals &&
                frames_same_file(f->f_code->co_filename, s_cell_file))
                return frames_line(f);
        }
    }
    /* Otherwise the outermost notebook frame must be module-level code (a cell; not
     * CO_OPTIMIZED, which function bodies are): a thread running a function from an
     * earlier cell has no such frame, and its line would belong to that earlier cell. */
    for (f = top; f != NULL; f = f->previous) {
        if (!_PyFrame_IsIncomplete(f) && f->f_globals == globals)
            cell_file = (f->f_code->co_flags & CO_OPTIMIZED) ? NULL : f->f_code->co_filename;
    }
    if (cell_file == NULL)
        return -1;
    /* Pass 2: the innermost frame compiled from that cell. */
    for (f = top; f != NULL; f = f->previous) {
        if (!_PyFrame_IsIncomplete(f) && f->f_globals == globals &&
            f->f_code->co_filename == cell_file)
            return frames_line(f);
    }
    return -1;
}
#else
MG_HOOKSAFE int mg_frames_cell_line(void)
{
    return -1;
}
#endif
