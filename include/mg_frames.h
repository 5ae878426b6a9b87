/* Cell-line attribution: which line of the running notebook cell is executing, read from
 * the interpreter's frames without allocating (csrc/frames.c, the only file that uses
 * CPython's internal frame layout). Entered from hooks and from Python. */
#ifndef MEMGUARD_MG_FRAMES_H
#define MEMGUARD_MG_FRAMES_H

#include <Python.h>

#include "memguard.h"

/* Set the globals dict whose frames are the notebook's (IPython's shell.user_global_ns);
 * NULL clears it. Keeps a strong reference to the new dict and drops the old one. GIL
 * held: hooks read the pointer only while holding the GIL, so swapping it under the GIL
 * cannot race with them. */
void mg_frames_set_user_globals(PyObject *globals);

/* 1-based line, in the running cell's source, of the innermost frame that belongs to the
 * running cell, or -1 when unknown (this thread does not hold the GIL, no notebook frame
 * is on the stack, the interpreter version has no implementation here).
 *
 * "The running cell" is the outermost frame whose globals are the notebook's: IPython
 * executes a cell's code object with those globals, and every code object compiled from the
 * cell (its functions, comprehensions) shares that frame's co_filename object. A frame of
 * the same filename deeper in the stack is preferred, so a function defined in the cell
 * reports its own line; library frames (numpy, scipy) and functions from earlier cells are
 * skipped outward to the cell's own code.
 *
 * Hook-safe by exception (../shared/STYLE.md section 3): it calls PyGILState_Check, which
 * reads thread-specific data without allocating, and walks frames only when the calling
 * thread holds the GIL; PyCode_Addr2Line reads the line table without allocating. Cost:
 * one pass over the thread's frames, so callers use it only on rare paths. */
MG_HOOKSAFE int mg_frames_cell_line(void);

#endif /* MEMGUARD_MG_FRAMES_H */
