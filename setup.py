"""Build memguard's C11 extension, memguard._core; the package's metadata is in
pyproject.toml.

NumPy's headers are needed at build time for the NEP 49 handler (csrc/hooks_numpy.c), and
pyproject.toml's build requirements bring NumPy 2 into the isolated build environment. The
extension targets NumPy's 1.22 C-API (NPY_TARGET_VERSION in csrc/hooks_numpy.c), so one build runs on NumPy 1.22
through 2.x. It links no libzmq: csrc/zmqlib.c resolves libzmq's calls at run time from the
copy pyzmq has loaded.
"""
import ast
import glob
import platform
from pathlib import Path

import numpy
from setuptools import Extension, setup


def read_version():
    """memguard.__version__, read without importing the package (it is not built yet)."""
    tree = ast.parse(Path("jupyter_ext/memguard/__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__version__":
            return node.value.value
    raise RuntimeError("__version__ not found in jupyter_ext/memguard/__init__.py")


CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
# The allocator hooks run on every allocation (bench/overhead.py measures them): only
# PyInit__core is exported, so calls between the C files need no PLT and globals no GOT;
# link-time optimisation inlines the counting helpers of csrc/acct.c and csrc/hooks.c into
# the hooks; and TLS descriptors (x86-64) make the per-thread reentrancy flag a load instead
# of a __tls_get_addr call, falling back to dynamic TLS if glibc's static TLS is used up.
# Measured with `make bench-callgrind` (the README's overhead table).
FAST = ["-fvisibility=hidden", "-flto"]
if platform.machine() in ("x86_64", "AMD64"):
    FAST.append("-mtls-dialect=gnu2")

core = Extension(
    "memguard._core",
    sources=sorted(glob.glob("csrc/*.c")),
    include_dirs=["include", numpy.get_include()],
    depends=sorted(glob.glob("include/*.h")),
    define_macros=[
        ("_GNU_SOURCE", "1"),
        ("MG_VERSION", '"%s"' % read_version()),
    ],
    libraries=["dl"],
    extra_compile_args=CFLAGS + FAST,
    extra_link_args=FAST,
)

setup(ext_modules=[core])
