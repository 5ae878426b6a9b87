"""The sparse_to_dense detector: predicts a ``scipy.sparse`` densification before NumPy
allocates the dense array.

Every scipy.sparse class that defines ``toarray`` gets a wrapper that calls a callback
with the matrix first. ``todense()`` and the ``.A`` property (SciPy < 1.14) both call
``toarray``, so one wrapper per class covers all three (scipy/sparse/_base.py). Nested
calls (``dia.toarray`` -> ``tocoo().toarray()``) report only the outermost conversion, and a
conversion into a caller's ``out=`` array allocates nothing, so it is not reported.
"""

import functools
import importlib.abc
import math
import sys
import threading

_tls = threading.local()
# class -> its own original toarray; written by install/uninstall (main thread, GIL).
_originals = {}
# Array attributes that hold a sparse matrix's storage, by format (scipy.sparse docs).
_STORAGE = ("data", "indices", "indptr", "row", "col", "coords", "offsets")


def _sparse_classes():
    import scipy.sparse as sp

    base = getattr(sp._base, "_spbase", None) or sp.spmatrix
    seen, todo = [], [base]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen


def installed():
    """True if the wrappers are in place."""
    return bool(_originals)


def install(on_densify):
    """Wrap ``toarray`` of every scipy.sparse class (idempotent for classes already wrapped).

    ``on_densify(matrix)`` runs before the conversion, in the calling thread, with the GIL.
    A ``MemoryError`` it raises propagates (refusing the conversion); any other exception
    is reported through ``sys.excepthook`` and the conversion goes ahead.
    Raises ImportError if SciPy is not importable.
    """
    for cls in _sparse_classes():
        orig = cls.__dict__.get("toarray")
        if orig is None or cls in _originals:
            continue
        _originals[cls] = orig
        cls.toarray = _wrap(orig, on_densify)


def uninstall():
    """Put back every original ``toarray`` and stop watching for the import of SciPy."""
    for cls, orig in list(_originals.items()):
        cls.toarray = orig
        del _originals[cls]
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _ImportWatcher)]


def install_when_imported(on_densify):
    """``install(on_densify)`` now if scipy.sparse is imported, else right after it is, even
    in the middle of a cell (a post-import hook on ``sys.meta_path``, PEP 451)."""
    if "scipy.sparse" in sys.modules:
        install(on_densify)
    elif not any(isinstance(f, _ImportWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportWatcher(on_densify))


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``scipy.sparse`` is being imported, it wraps the real
    loader so the wrappers are installed as soon as the module has executed."""

    def __init__(self, on_densify):
        self._on_densify = on_densify

    def find_spec(self, name, path=None, target=None):
        if name != "scipy.sparse":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _InstallingLoader(spec.loader, self)
                return spec
        return None


class _InstallingLoader(importlib.abc.Loader):
    def __init__(self, loader, watcher):
        self._loader = loader
        self._watcher = watcher

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self._watcher]
        try:
            install(self._watcher._on_densify)
        except Exception:  # a failed wrap must never fail the user's import
            sys.excepthook(*sys.exc_info())


def _wrap(orig, on_densify):
    @functools.wraps(orig)
    def toarray(self, *args, **kwargs):
        out = kwargs.get("out", args[1] if len(args) > 1 else None)
        if getattr(_tls, "inside", False) or out is not None:
            return orig(self, *args, **kwargs)
        _tls.inside = True
        try:
            try:
                on_densify(self)
            except MemoryError:
                raise
            except Exception:
                sys.excepthook(*sys.exc_info())
            return orig(self, *args, **kwargs)
        finally:
            _tls.inside = False

    toarray.__memguard_wrapped__ = True
    return toarray


def predict(matrix):
    """Sizes of densifying ``matrix``, computed from its shape and storage without copying.

    Returns a dict: ``format`` (e.g. "csr"), ``shape`` (list of ints), ``dtype`` (str),
    ``nnz`` (int), ``density`` (nnz / number of elements, 0-1), ``sparse_bytes`` (bytes of
    its storage arrays; for dok/lil, nnz x (itemsize + 16) as an estimate of the index
    overhead) and ``dense_bytes`` (elements x itemsize, what ``toarray`` will allocate).
    """
    shape = [int(n) for n in matrix.shape]
    itemsize = matrix.dtype.itemsize
    elements = math.prod(shape)
    nnz = int(matrix.nnz)
    sparse_bytes = 0
    for name in _STORAGE:
        part = getattr(matrix, name, None)
        if isinstance(part, tuple):  # coo_array.coords
            sparse_bytes += sum(getattr(p, "nbytes", 0) for p in part)
        else:
            sparse_bytes += getattr(part, "nbytes", 0) if hasattr(part, "dtype") else 0
    if sparse_bytes == 0:
        sparse_bytes = nnz * (itemsize + 16)
    return {
        "format": str(matrix.format),
        "shape": shape,
        "dtype": str(matrix.dtype),
        "nnz": nnz,
        "density": nnz / elements if elements else 0.0,
        "sparse_bytes": int(sparse_bytes),
        "dense_bytes": int(elements * itemsize),
    }
