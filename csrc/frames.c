/* Owns the version-specific walk over CPython's interpreter frames for cell-line
 * attribution (include/mg_frames.h): the only file that knows a frame's layout. Entered
 * from hooks and from Python; reads frames only when the calling thread holds the GIL.
 *
 * Each supported CPython keeps its frames differently; the walk below is written once over
 * five accessors (frames_top, frames_next, frames_usable, frames_code, frames_globals,
 * frames_line) defined per version:
 *   3.10: PyFrameObject chain from tstate->frame through f_back (Include/cpython/
 *         frameobject.h); the line from PyFrame_GetLineNumber, which reads the line table.
 *   3.11, 3.12: _PyInterpreterFrame chain from tstate->cframe->current_frame through
 *         previous (Include/internal/pycore_frame.h), code in f_code; incomplete frames
 *         (not yet past RESUME) and C-stack shim frames (3.12) are skipped.
 *   3.13: _PyInterpreterFrame chain from tstate->current_frame; code in f_executable,
 *         which may be None for shim frames, so it is type-checked.
 * None of these allocate (docs/design.md, "Frames and line attribution": 0 nested
 * allocations measured on 3.11, where PyThreadState_GetFrame allocates 600k times). */
#include <Python.h>

#if PY_VERSION_HEX >= 0x030B0000
/* The internal headers need Py_BUILD_CORE, which must not be set while Python.h itself
 * is read (it would select the core's own API); define it for them only. */
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#define MG_FRAMES_INTERP 1
#else
#include <frameobject.h>
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

/* ---- per-version accessors ----------------------------------------------------------- */
#ifdef MG_FRAMES_INTERP
typedef _PyInterpreterFrame mg_frame_t;

static PyThreadState *frames_tstate(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyThreadState_GetUnchecked();
#else
    return _PyThreadState_UncheckedGet();
#endif
}

static mg_frame_t *frames_top(PyThreadState *ts)
{
#if PY_VERSION_HEX >= 0x030D0000
    return ts->current_frame;
#else
    return ts->cframe == NULL ? NULL : ts->cframe->current_frame;
#endif
}

static mg_frame_t *frames_next(mg_frame_t *f)
{
    return f->previous;
}

/* A frame whose code object, globals and instruction pointer may be read. */
static int frames_usable(mg_frame_t *f)
{
#if PY_VERSION_HEX >= 0x030D0000
    if (f->owner == FRAME_OWNED_BY_CSTACK || f->f_executable == NULL ||
        !PyCode_Check(f->f_executable))
        return 0;
#elif PY_VERSION_HEX >= 0x030C0000
    if (f->owner == FRAME_OWNED_BY_CSTACK)
        return 0;
#endif
    return !_PyFrame_IsIncomplete(f);
}

static PyCodeObject *frames_code(mg_frame_t *f)
{
#if PY_VERSION_HEX >= 0x030D0000
    return (PyCodeObject *)f->f_executable;
#else
    return f->f_code;
#endif
}

static PyObject *frames_globals(mg_frame_t *f)
{
    return f->f_globals;
}

static int frames_line(mg_frame_t *f)
{
    int addr = _PyInterpreterFrame_LASTI(f) * (int)sizeof(_Py_CODEUNIT);

    return PyCode_Addr2Line(frames_code(f), addr);
}
#else /* 3.10 */
typedef PyFrameObject mg_frame_t;

static PyThreadState *frames_tstate(void)
{
    return _PyThreadState_UncheckedGet();
}

static mg_frame_t *frames_top(PyThreadState *ts)
{
    return ts->frame;
}

static mg_frame_t *frames_next(mg_frame_t *f)
{
    return f->f_back;
}

static int frames_usable(mg_frame_t *f)
{
    return f->f_code != NULL;
}

static PyCodeObject *frames_code(mg_frame_t *f)
{
    return f->f_code;
}

static PyObject *frames_globals(mg_frame_t *f)
{
    return f->f_globals;
}

static int frames_line(mg_frame_t *f)
{
    return PyFrame_GetLineNumber(f);
}
#endif

/* ---- the walk, the same on every version --------------------------------------------- */

/* Whether two filename objects name the same file: the same object, or two ready str
 * objects with equal contents. Compares code units with memcmp: no allocation. */
static int frames_same_file(PyObject *a, PyObject *b)
{
    Py_ssize_t n;

    if (a == b)
        return 1;
    if (!PyUnicode_CheckExact(a) || !PyUnicode_CheckExact(b))
        return 0;
#if PY_VERSION_HEX < 0x030C0000
    /* Before 3.12 a str may still be in the legacy wchar_t form, with no kind or data. */
    if (!PyUnicode_IS_READY(a) || !PyUnicode_IS_READY(b))
        return 0;
#endif
    n = PyUnicode_GET_LENGTH(a);
    return n == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
}

/* A usable frame running code of the notebook (its globals are the user namespace). */
static int frames_is_notebook(mg_frame_t *f, PyObject *globals)
{
    return frames_usable(f) && frames_globals(f) == globals;
}

MG_HOOKSAFE int mg_frames_cell_line(void)
{
    PyThreadState *ts;
    mg_frame_t *top;
    mg_frame_t *f;
    PyObject *cell_file = NULL;
    PyObject *globals;

    /* The GIL first: s_user_globals and s_cell_file are ordered by it. */
    if (!PyGILState_Check())
        return -1;
    globals = s_user_globals;
    if (globals == NULL)
        return -1;
    ts = frames_tstate();
    if (ts == NULL)
        return -1;
    top = frames_top(ts);
    /* When the running cell's filename is known, the innermost frame compiled from it is
     * the answer in any thread (a worker running a function of this cell included). */
    if (s_cell_file != NULL) {
        for (f = top; f != NULL; f = frames_next(f)) {
            if (frames_is_notebook(f, globals) &&
                frames_same_file(frames_code(f)->co_filename, s_cell_file))
                return frames_line(f);
        }
    }
    /* Otherwise the outermost notebook frame must be module-level code (a cell; not
     * CO_OPTIMIZED, which function bodies are): a thread running a function from an
     * earlier cell has no such frame, and its line would belong to that earlier cell. */
    for (f = top; f != NULL; f = frames_next(f)) {
        if (frames_is_notebook(f, globals))
            cell_file = (frames_code(f)->co_flags & CO_OPTIMIZED) ? NULL
                                                                 : frames_code(f)->co_filename;
    }
    if (cell_file == NULL)
        return -1;
    /* Pass 2: the innermost frame compiled from that cell. */
    for (f = top; f != NULL; f = frames_next(f)) {
        if (frames_is_notebook(f, globals) && frames_code(f)->co_filename == cell_file)
            return frames_line(f);
    }
    return -1;
}
