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

#include "mg_frames.h"

/* Written by mg_frames_set_user_globals (GIL held); read by mg_frames_cell_line only after
 * PyGILState_Check() says this thread holds the GIL, so the GIL orders both. */
static PyObject *s_user_globals = NULL;

void mg_frames_set_user_globals(PyObject *globals)
{
    PyObject *old = s_user_globals;

    Py_XINCREF(globals);
    s_user_globals = globals;
    Py_XDECREF(old);
}

#ifdef MG_FRAMES_311
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
    /* Pass 1: the outermost notebook frame is the cell's module-level code. */
    for (f = top; f != NULL; f = f->previous) {
        if (!_PyFrame_IsIncomplete(f) && f->f_globals == globals)
            cell_file = f->f_code->co_filename;
    }
    if (cell_file == NULL)
        return -1;
    /* Pass 2: the innermost frame compiled from that cell. */
    for (f = top; f != NULL; f = f->previous) {
        if (!_PyFrame_IsIncomplete(f) && f->f_globals == globals &&
            f->f_code->co_filename == cell_file) {
            int addr = _PyInterpreterFrame_LASTI(f) * (int)sizeof(_Py_CODEUNIT);
            return PyCode_Addr2Line(f->f_code, addr);
        }
    }
    return -1;
}
#else
MG_HOOKSAFE int mg_frames_cell_line(void)
{
    return -1;
}
#endif
