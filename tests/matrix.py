"""The version matrix: memguard's kernel tests on every CPython 3.10-3.13 found here, each in
a fresh venv with that version's pinned stack, memguard installed from a wheel built from
the sdist the way a user installs it (``pip install``, isolated build, no apt, no
``--no-build-isolation``).

Usage: ``python tests/matrix.py [--versions 3.10,3.13] [--require-all] [--list-tests]
[PYTEST_ARGS...]``
(``make test-matrix``). For each version X.Y:

1. find an interpreter: ``pythonX.Y`` on PATH, else the newest ``$(pyenv root)/versions/X.Y.*``;
2. as an unprivileged user when run as root (``memguard-ci``, created once; so the install
   needs no root, as in a data scientist's own environment), create ``build/matrix/X.Y/venv``,
   install ``requirements/matrix-pyX.Y.txt`` (``make lock-matrix`` writes these), build a
   wheel from ``build/matrix/dist/memguard-*.tar.gz`` with ``pip wheel`` and install it;
3. install a ``python3`` kernelspec into the venv and run the kernel tests there.

Step 2 runs for all versions at once; step 3 one version at a time. A version that passed
leaves nothing under ``build/matrix``; a failed one keeps its venv there.

Prints one line per version (ran / passed / failed / not found) and exits non-zero if any
version failed, or if ``--require-all`` (the default under ``CI=true``) and one was not found.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("3.10", "3.11", "3.12", "3.13")
USER = "memguard-ci"
# The kernel tests: real kernels started by jupyter_client, real NumPy/SciPy. Between them
# they check, on each version, a budget alert naming the exact cell and line, sparse_to_dense
# and accumulation alerts with their lines, raise mode's MemoryError, and the crash report
# after SIGKILL and restart.
KERNEL_TESTS = ("test_packaging.py", "test_kernel.py", "test_detectors.py",
                "test_raise_limit.py", "test_crash_report.py")


def find_python(version: str) -> str | None:
    """Path of a CPython X.Y interpreter, or None. pyenv's shims are skipped: they choose
    an interpreter by the caller's pyenv settings, not by the name."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        exe = os.path.join(d, f"python{version}")
        if "/shims" not in d and os.access(exe, os.X_OK):
            return os.path.realpath(exe)
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        root = os.path.expanduser("~/.pyenv")
    found = []
    for d in glob.glob(os.path.join(root, "versions", f"{version}.*")):
        exe = os.path.join(d, "bin", f"python{version}")
        patch = os.path.basename(d)[len(version) + 1:]
        if os.access(exe, os.X_OK) and patch.isdigit():
            found.append((int(patch), exe))
    return max(found)[1] if found else None


def ensure_user(paths: list[str]) -> list[str]:
    """When root: the unprivileged user the venvs are built and tests run as, created once,
    with traverse access to the directories holding the interpreters (pyenv lives under
    /root, 0700) granted to that user alone by an ACL. Returns the command prefix."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER],
                       check=True)
    for path in paths:
        # Every ancestor of the interpreter must be traversable by the user.
        p = Path(path).resolve().parent
        while p != p.parent:
            st = p.stat()
            if not st.st_mode & 0o001:
                subprocess.run(["setfacl", "-m", f"u:{USER}:x", str(p)], check=True)
            p = p.parent
    return ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups",
            "--reset-env"]


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", default=",".join(VERSIONS))
    ap.add_argument("--require-all", action="store_true",
                    default=os.environ.get("CI", "").lower() == "true")
    ap.add_argument("--list-tests", action="store_true",
                    help="print the test files the matrix runs, one per line, and exit")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args(argv)
    if args.list_tests:
        print("\n".join(KERNEL_TESTS))
        return 0
    versions = [v for v in args.versions.split(",") if v]
    unknown = [v for v in versions if v not in VERSIONS]
    if unknown:
        ap.error(f"unsupported version(s) {unknown}; memguard supports {', '.join(VERSIONS)}")

    work = ROOT / "build" / "matrix"
    dist = work / "dist"
    sdists = sorted(dist.glob("memguard-*.tar.gz"))
    if len(sdists) != 1:
        print(f"matrix: expected one sdist in {dist} (make test-matrix builds it)", file=sys.stderr)
        return 2
    pythons = {v: find_python(v) for v in versions}
    prefix = ensure_user([p for p in pythons.values() if p])
    if prefix:
        shutil.chown(work, USER, USER)
        for p in work.iterdir():
            if p.name != "dist":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    results = {}
    jobs = {}  # version -> (setup command, test command)
    for version, python in pythons.items():
        if python is None:
            results[version] = "not found"
            continue
        vdir = work / version
        vdir.mkdir(parents=True, exist_ok=True)
        if prefix:
            shutil.chown(vdir, USER, USER)
        venv = vdir / "venv"
        home = vdir / "home"
        env = [f"HOME={home}", "PATH=/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK=1",
               "PYTHONDONTWRITEBYTECODE=1", f"CI={os.environ.get('CI', '')}"]
        # pip's settings (index, find-links, certificates) and the machine's OpenBLAS
        # settings reach the user's shell as they are.
        env += [f"{k}={v}" for k, v in os.environ.items()
                if k.startswith("PIP_") or k.startswith("OPENBLAS_")]
        pin = ROOT / "requirements" / f"matrix-py{version}.txt"
        setup = " && ".join([
            f"mkdir -p {home}",
            f"{python} -m venv --clear {venv}",
            f"{venv}/bin/pip install -q -r {pin}",
            f"{venv}/bin/pip wheel -q --no-deps -w {vdir}/wheel {sdists[0]}",
            f"{venv}/bin/pip install -q -c {pin} {vdir}/wheel/memguard-*.whl",
            f"{venv}/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null",
        ])
        test = " && ".join([
            f"cd {ROOT}/tests",
            f"{venv}/bin/python -m pytest -q -p no:cacheprovider "
            + " ".join(KERNEL_TESTS + tuple(args.pytest_args)),
        ])
        jobs[version] = tuple((prefix + ["env", *env, "sh", "-c", script]) if prefix else
                              ["env", *env, "sh", "-c", script] for script in (setup, test))

    # The venvs are made and the wheels built side by side (mostly pip unpacking and one C
    # compile each); the kernel tests then run one version at a time, since some of them
    # time alerts and must not compete for the CPU.
    print(f"matrix: setting up {', '.join(jobs)} side by side", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        setups = {v: pool.submit(subprocess.run, cmd[0], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
                  for v, cmd in jobs.items()}
    for version, (setup_cmd, test_cmd) in jobs.items():
        print(f"\n=== CPython {version}: {pythons[version]}", flush=True)
        print("+", " ".join(map(str, setup_cmd)), flush=True)
        done = setups[version].result()
        sys.stdout.write(done.stdout)
        if done.returncode != 0:
            results[version] = f"FAILED (set-up, exit {done.returncode})"
            continue
        rc = run(test_cmd).returncode
        results[version] = "passed" if rc == 0 else f"FAILED (exit {rc})"
        if rc == 0:
            # Nothing of a passed version stays in the tree (its venv holds thousands of
            # third-party files); a failed one keeps its venv for a look.
            shutil.rmtree(work / version, ignore_errors=True)

    print("\nversion matrix (kernel tests, memguard installed from its wheel):")
    for version, outcome in results.items():
        print(f"  CPython {version}: {outcome}")
    failed = [v for v, o in results.items() if o.startswith("FAILED")]
    missing = [v for v, o in results.items() if o == "not found"]
    if failed or (missing and args.require_all):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
