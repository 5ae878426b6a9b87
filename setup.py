"""Build memguard: the C11 extension memguard._core (links libzmq) and the Python package.

NumPy's headers are needed at build time for the NEP 49 handler (csrc/hooks_numpy.c); the
extension targets NumPy's 1.22 C-API, so one build runs on NumPy 1.22 through 2.x. Build
without isolation (``pip install --no-build-isolation .``) so the NumPy in the environment
provides them.
"""
import glob
import platform

import numpy
from setuptools import Extension, setup

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
    define_macros=[("_GNU_SOURCE", "1")],
    libraries=["zmq"],
    extra_compile_args=CFLAGS + FAST,
    extra_link_args=FAST,
)

setup(
    name="memguard",
    version="0.1.0",
    description="A memory guard inside the Jupyter kernel: per-cell budgets and live alerts",
    package_dir={"": "jupyter_ext"},
    packages=["memguard"],
    ext_modules=[core],
    python_requires=">=3.11",
    install_requires=["ipykernel>=6", "pyzmq", "humanfriendly", "psutil", "tabulate", "matplotlib"],
)
