/* Cell-line attribution: which line of the running notebook cell is executing, read from
 * the interpreter's frames without allocating (csrc/frames.c, the only file that uses
 * CPython's frame layouts: 3.10, 3.11, 3.12 and 3.13). Entered from hooks and from Python. */
#ifndef MEMGUARD_MG_FRAMES_H
#define MEMGUARD_MG_FRAMES_H

#include <Python.h>

#include "memguard.h"

/* Set the globals dict whose frames are the notebook's (IPython's shell.user_global_ns);
 * NULL clears it. Keeps a strong reference to the new dict and drops the old one. GIL
 * held: hooks read the pointer only while holding the GIL, so swapping it under the GIL
 * cannot race with them. */
void mg_frames_set_user_globals(PyObject *globals);

/* Set the filename the running cell's code is compiled under (as IPython's compiler names
 * it), or NULL when unknown. Keeps a strong reference. GIL held (pre_run_cell). */
void mg_frames_set_cell_file(PyObject *filename);

/* 1-based line, in the running cell's source, of the innermost frame that belongs to the
 * running cell, or -1 when unknown (this thread does not hold the GIL, no notebook frame
 * is on the stack).
 *
 * The innermost frame whose globals are the notebook's and whose filename is the running
 * cell's (mg_frames_set_cell_file) is the answer, in any thread, so a function defined in
 * the cell reports its own line, and library frames (numpy, scipy) and functions from
 * earlier cells are skipped outward to the cell's own code. When the filename is not known
 * (or not found in this thread), the outermost notebook frame is taken as the cell if it is
 * module-level code, and its filename is used the same way; a thread that runs only a
 * function of an earlier cell gets -1 rather than a line of another cell.
 *
 * Hook-safe by exception (docs/design.md, "Hook safety"): it calls PyGILState_Check, which
 * reads thread-specific data without allocating, and walks frames only when the calling
 * thread holds the GIL; PyCode_Addr2Line reads the line table without allocating. Cost:
 * one pass over the thread's frames, so callers use it only on rare paths. */
MG_HOOKSAFE int mg_frames_cell_line(void);

#endif /* MEMGUARD_MG_FRAMES_H */
