"""memguard's command line: ``python -m memguard COMMAND``.

``install [--profile NAME]``
    Makes every new or restarted IPython kernel of profile NAME (default ``default``) load
    memguard at start, without ``%load_ext memguard``. It adds a marked block to the
    profile's ``ipython_kernel_config.py``::

        # >>> memguard >>>
        # Added by `python -m memguard install`: IPython kernels of this profile load memguard.
        # `python -m memguard uninstall` removes exactly these lines.
        get_config().InteractiveShellApp.extensions.append("memguard")
        # <<< memguard <<<

    When install creates the file, or has to end its last line first, the first line says
    so (``(file created by memguard install)``, ``(newline added before this block)``), for
    uninstall. The block appends to the extensions list, so extensions configured elsewhere
    (earlier in the file, or in ``ipython_config.py``) keep loading. The file is the one
    IPython kernels read and the terminal ``ipython`` does not: ipykernel's ``IPKernelApp``
    is named ``ipython-kernel``, so IPython's ``BaseIPythonApplication`` loads
    ``ipython_config.py`` and then ``ipython_kernel_config.py`` from the profile directory.
    The profile directory is ``profile_NAME`` under IPython's own directory
    (``$IPYTHONDIR``, else ``~/.ipython``); it is created when missing. A kernel uses a
    profile other than ``default`` only when its kernelspec passes ``--profile=NAME``.

    Installing again changes nothing (one block); a block from another memguard version is
    rewritten in place.

``uninstall [--profile NAME]``
    Removes exactly that block and nothing else: a file that had other content is left as
    it was before ``install`` (byte for byte, also when ``install`` had to add a newline at
    its end first). A file that ``install`` created is deleted when nothing but the block is
    in it; any other file is kept, even if empty. Uninstalling when memguard is not
    installed changes nothing.

Both print one line saying what was done and the file's path.

``report [FILE]``
    Prints the post-crash report of a black box in the terminal: FILE, or when omitted the
    newest black box in ``$MEMGUARD_DIR`` (default: the ``memguard`` folder of the Jupyter
    runtime directory) whose kernel is dead. A file that is not a usable black box
    (truncated, corrupt, from a newer memguard, half-written) is reported in one line on
    stderr with exit status 1; so is the absence of any black box of a dead kernel.

Exit status: 0 on success (also when there was nothing to do), 1 when the profile
directory or the config file cannot be read or written (one line on stderr), 2 for bad
arguments (argparse's usage message).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import warnings

PROG = "python -m memguard"
# ipykernel's IPKernelApp.name is "ipython-kernel"; IPython's config_file_name default is
# name.replace("-", "_") + "_config.py" (IPython/core/application.py).
KERNEL_CONFIG = "ipython_kernel_config.py"
BEGIN = "# >>> memguard >>>"
END = "# <<< memguard <<<"
# Notes on the BEGIN line that tell uninstall how to restore the file exactly.
NOTE_CREATED = "(file created by memguard install)"
NOTE_NEWLINE = "(newline added before this block)"
BODY = (
    "# Added by `python -m memguard install`: IPython kernels of this profile load memguard.\n"
    "# `python -m memguard uninstall` removes exactly these lines.\n"
    'get_config().InteractiveShellApp.extensions.append("memguard")\n'
)
# A block: from a line starting with BEGIN to the next line starting with END, inclusive
# (its newline too, when there is one).
BLOCK_RE = re.compile(r"^" + re.escape(BEGIN) + r"(?P<note>[^\n]*)\n.*?^" + re.escape(END)
                      + r"[^\n]*(?:\n|\Z)", re.DOTALL | re.MULTILINE)


class CliError(Exception):
    """A failure reported as one line on stderr with exit status 1."""


def block(note: str = "") -> str:
    """The config block, with ``note`` (NOTE_CREATED, NOTE_NEWLINE or "") on its first line."""
    return BEGIN + (" " + note if note else "") + "\n" + BODY + END + "\n"


def _profile_name(value: str) -> str:
    """argparse type for --profile: a plain directory-name suffix."""
    if not value or "/" in value or os.sep in value or value in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"invalid profile name {value!r}: use a plain name such as 'default' or 'work'")
    return value


def profile_dir(name: str, create: bool) -> str | None:
    """The directory of IPython profile ``name`` (under ``$IPYTHONDIR`` or ``~/.ipython``),
    found with IPython's own API. With ``create`` it is created when missing; without it,
    None is returned for a missing profile."""
    from IPython.core.profiledir import ProfileDir, ProfileDirError

    ipython_dir = _ipython_dir()
    try:
        return ProfileDir.find_profile_dir_by_name(ipython_dir, name).location
    except ProfileDirError:
        if not create:
            return None
    try:
        return ProfileDir.create_profile_dir_by_name(ipython_dir, name).location
    except (OSError, ProfileDirError) as exc:
        raise CliError(f"cannot create IPython profile {name!r} in {ipython_dir}: "
                       f"{_reason(exc)}") from exc


def _ipython_dir() -> str:
    """IPython's directory from IPython.paths.get_ipython_dir ($IPYTHONDIR, else
    ~/.ipython), created when missing. get_ipython_dir falls back to a new temporary
    directory (with a warning) when that place is not writable: useless here, since kernels
    would not read it, so that is an error."""
    from IPython.paths import get_ipython_dir

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ipython_dir = get_ipython_dir()
        except OSError as exc:
            where = os.environ.get("IPYTHONDIR") or "~/.ipython"
            raise CliError(f"cannot create IPython's directory {where}: {_reason(exc)}; "
                           f"set IPYTHONDIR to a writable folder") from exc
    for w in caught:
        text = str(w.message)
        if "not a writable location" in text:
            try:
                os.rmdir(ipython_dir)  # the empty temporary directory it just made
            except OSError:
                pass
            raise CliError(f"IPython's directory is not writable ({text.split(',')[0]}); "
                           f"set IPYTHONDIR to a writable folder")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ipython_dir


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _read(path: str) -> str | None:
    """The file's text exactly as stored (no newline translation), or None if missing."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {_reason(exc)}") from exc


def _write(path: str, text: str) -> None:
    """Replace ``path``'s content with ``text``: atomically when the folder allows it (a
    temporary file in the same folder, renamed over it, keeping the old file's permission
    bits), else by rewriting the file in place."""
    folder = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".memguard-", suffix=".tmp")
    except OSError:
        try:
            with open(path, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
            return
        except OSError as exc:
            raise CliError(f"cannot write {path}: {_reason(exc)}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        if os.path.exists(path):
            mode = os.stat(path).st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CliError(f"cannot write {path}: {_reason(exc)}") from exc


def config_path(profile: str, create: bool) -> str | None:
    """Where the block goes for ``profile`` (symlinks resolved, so a linked dotfile is edited
    in place), or None when the profile does not exist and ``create`` is false."""
    folder = profile_dir(profile, create)
    if folder is None:
        return None
    return os.path.realpath(os.path.join(folder, KERNEL_CONFIG))


def install(profile: str = "default") -> str:
    """Add the block to ``profile``'s kernel config (idempotent); returns the line to print."""
    path = config_path(profile, create=True)
    text = _read(path)
    where = f"{path} (profile {profile!r})"
    if text is None:
        _write(path, block(NOTE_CREATED))
        return (f"memguard: installed in {where}, a new file; new and restarted kernels "
                f"will load memguard")
    found = list(BLOCK_RE.finditer(text))
    if found:
        first = found[0]
        wanted = block(first.group("note").strip())
        # One block: the first is brought up to date, any later copy is dropped.
        new = text[:first.start()] + wanted + BLOCK_RE.sub("", text[first.end():])
        if new == text:
            return f"memguard: already installed in {where}; nothing changed"
        _write(path, new)
        return f"memguard: updated its block in {where}"
    if text == "" or text.endswith("\n"):
        new = text + block()
    else:
        new = text + "\n" + block(NOTE_NEWLINE)
    _write(path, new)
    return f"memguard: installed in {where}; new and restarted kernels will load memguard"


def uninstall(profile: str = "default") -> str:
    """Remove the block from ``profile``'s kernel config (idempotent); returns the line to
    print."""
    path = config_path(profile, create=False)
    if path is None:
        return (f"memguard: not installed (IPython profile {profile!r} does not exist); "
                f"nothing changed")
    where = f"{path} (profile {profile!r})"
    text = _read(path)
    found = list(BLOCK_RE.finditer(text)) if text is not None else []
    if not found:
        return f"memguard: not installed in {where}; nothing changed"
    parts, pos, created = [], 0, False
    for m in found:
        before = text[pos:m.start()]
        note = m.group("note").strip()
        if note == NOTE_NEWLINE and before.endswith("\n"):
            before = before[:-1]
        created = created or note == NOTE_CREATED
        parts.append(before)
        pos = m.end()
    parts.append(text[pos:])
    new = "".join(parts)
    if new == "" and created:
        try:
            os.unlink(path)
        except OSError as exc:
            raise CliError(f"cannot remove {path}: {_reason(exc)}") from exc
        return (f"memguard: uninstalled from {where}, removed the file (memguard had created "
                f"it); new kernels will not load memguard")
    _write(path, new)
    return f"memguard: uninstalled from {where}; new kernels will not load memguard"


# --- the launcher kernelspec (`install --kernelspec [NAME]`) ------------------------------

KERNELSPEC_NAME = "python3-memguard"
KERNELSPEC_DISPLAY = "Python 3 (memguard)"


def kernelspec(python: str | None = None) -> dict:
    """The kernel.json of the launcher kernelspec: memguard's launcher (launcher.py) owns
    IOPub and starts ipykernel, which loads memguard (``--ext=memguard``)."""
    return {
        "argv": [python or sys.executable, "-m", "memguard.launcher", "-f",
                 "{connection_file}", "--ext=memguard"],
        "display_name": KERNELSPEC_DISPLAY,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": True, "memguard": {"launcher": True}},
    }


def kernelspec_dir(name: str, user: bool, prefix: str | None) -> str:
    """Where kernelspec ``name`` goes, as ``ipykernel install`` and jupyter_client's
    KernelSpecManager decide it: ``--user``: the user's Jupyter data dir; ``--prefix`` (or
    ``--sys-prefix``): PREFIX/share/jupyter; else the system-wide Jupyter path."""
    from jupyter_core.paths import SYSTEM_JUPYTER_PATH, jupyter_data_dir

    if user:
        base = jupyter_data_dir()
    elif prefix:
        base = os.path.join(os.path.abspath(prefix), "share", "jupyter")
    else:
        base = SYSTEM_JUPYTER_PATH[0]
    return os.path.join(base, "kernels", name)


def install_kernelspec(name: str, user: bool = False, prefix: str | None = None) -> str:
    """Write the launcher kernelspec ``name`` (replacing one of that name); returns the line
    to print."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kernel.json"), "w", encoding="utf-8") as fh:
            json.dump(kernelspec(), fh, indent=1)
        try:
            import ipykernel.kernelspec as ik  # the Python logos, when ipykernel has them

            for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
                src = os.path.join(ik.RESOURCES, logo)
                if os.path.exists(src):
                    shutil.copy(src, tmp)
        except (ImportError, AttributeError, OSError):
            pass
        try:
            where = KernelSpecManager().install_kernel_spec(
                tmp, name, user=user, prefix=None if user else prefix)
        except OSError as exc:
            raise CliError(f"cannot write kernelspec {name!r} in "
                           f"{kernelspec_dir(name, user, prefix)}: {_reason(exc)}") from exc
    return (f"memguard: installed kernelspec {name!r} ({KERNELSPEC_DISPLAY}) in {where}: its "
            f"kernels run behind memguard's launcher")


def uninstall_kernelspec(name: str, user: bool = False, prefix: str | None = None) -> str:
    """Remove the kernelspec ``name`` from the place install_kernelspec chose; returns the
    line to print."""
    where = kernelspec_dir(name, user, prefix)
    if not os.path.exists(os.path.join(where, "kernel.json")):
        return f"memguard: no kernelspec {name!r} in {where}; nothing changed"
    try:
        shutil.rmtree(where)
    except OSError as exc:
        raise CliError(f"cannot remove {where}: {_reason(exc)}") from exc
    return f"memguard: removed kernelspec {name!r} from {where}"


def _spec_prefix(args: argparse.Namespace) -> str | None:
    return sys.prefix if args.sys_prefix else args.prefix


def _cmd_install(args: argparse.Namespace) -> int:
    if args.kernelspec:
        print(install_kernelspec(args.kernelspec, args.user, _spec_prefix(args)))
        return 0
    print(install(args.profile))
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    if args.kernelspec:
        print(uninstall_kernelspec(args.kernelspec, args.user, _spec_prefix(args)))
        return 0
    print(uninstall(args.profile))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from . import blackbox, limits, render, report

    path = args.file or blackbox.newest_dead()
    if path is None:
        raise CliError(f"no black box of a dead kernel in {blackbox.default_dir()}")
    try:
        box = blackbox.read(path)
    except blackbox.BlackBoxError as exc:
        raise CliError(str(exc)) from None
    alert = report.crash_alert(box, limits.effective_limit())
    print(f"{path} (kernel {box.connection}, died {render.crash_age(alert)})")
    print(render.crash_text(alert))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The argument parser and its subcommand group. Each subcommand sets ``func``, called
    with the parsed arguments and returning the exit status; add a subcommand with
    ``subparsers.add_parser(...)`` and ``set_defaults(func=...)``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="memguard: a memory guard inside the Jupyter kernel.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, func, text in (
            ("install", _cmd_install,
             "make new and restarted IPython kernels of a profile load memguard "
             f"(adds a marked block to the profile's {KERNEL_CONFIG})"),
            ("uninstall", _cmd_uninstall,
             f"remove exactly that block from the profile's {KERNEL_CONFIG}")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--profile", default="default", type=_profile_name, metavar="NAME",
                       help="IPython profile (default: %(default)s); kernels use a profile "
                            "other than 'default' only when started with --profile=NAME")
        p.add_argument("--kernelspec", nargs="?", const=KERNELSPEC_NAME, default=None,
                       metavar="NAME",
                       help=f"the kernelspec NAME (default {KERNELSPEC_NAME}, shown as "
                            f"'{KERNELSPEC_DISPLAY}') whose kernels run behind memguard's "
                            f"launcher, instead of the profile block")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--user", action="store_true",
                           help="with --kernelspec: the user's Jupyter data directory")
        where.add_argument("--sys-prefix", action="store_true",
                           help="with --kernelspec: this Python's prefix (venv, conda env)")
        where.add_argument("--prefix", metavar="PATH",
                           help="with --kernelspec: PATH/share/jupyter/kernels")
        p.set_defaults(func=func)
    text = ("print the post-crash report of a black box (default: the newest one whose "
            "kernel is dead)")
    p = sub.add_parser("report", help=text, description=text)
    p.add_argument("file", nargs="?", metavar="FILE", help="a .mgbox file")
    p.set_defaults(func=_cmd_report)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (argparse exits with 2 on bad arguments)."""
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"memguard: error: {exc}", file=sys.stderr)
        return 1
