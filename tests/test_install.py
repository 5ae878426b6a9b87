"""``python -m memguard install|uninstall`` with real kernels.

Each test points ``IPYTHONDIR`` at its own tmp_path, both for the command (a subprocess of
this interpreter, the venv's or Debian's) and for the kernels it starts, so the user's
~/.ipython is never touched.
"""

import json
import os
import subprocess
import sys

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from conftest import Kernel

BEGIN = "# >>> memguard >>>"
END = "# <<< memguard <<<"


def memguard_cli(ipydir, *args):
    """Run ``python -m memguard ARGS`` with IPYTHONDIR=ipydir; returns the CompletedProcess."""
    env = {**os.environ, "IPYTHONDIR": str(ipydir)}
    return subprocess.run([sys.executable, "-m", "memguard", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def ok(proc, *words):
    """The command succeeded and printed one line containing ``words``."""
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def kernel_config(ipydir, profile="default"):
    return ipydir / f"profile_{profile}" / "ipython_kernel_config.py"


def start_kernel(ipydir, tmp_path, profile=None):
    """A kernel with IPYTHONDIR=ipydir; with ``profile``, started with --profile=NAME through
    a temporary kernelspec (the python3 kernelspec passes no profile)."""
    env = {"IPYTHONDIR": str(ipydir)}
    if profile is None:
        return Kernel(env=env)
    specs = tmp_path / "kernelspecs"
    (specs / "prof").mkdir(parents=True, exist_ok=True)
    (specs / "prof" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 f"--profile={profile}"],
        "display_name": "memguard profile test", "language": "python"}))
    k = Kernel.__new__(Kernel)
    k.km = KernelManager(kernel_name="prof",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]))
    k.km.start_kernel(env={**os.environ, **env})
    k.kc = k.km.client()
    k.kc.start_channels()
    k.kc.wait_for_ready(timeout=60)
    return k


def loaded_extensions(k):
    """Names of the extensions loaded in kernel ``k``, without IPython's own prefix
    (IPython 9 records "autoreload" as "IPython.extensions.autoreload")."""
    ex = k.execute("print(sorted(get_ipython().extension_manager.loaded))")
    return {name.removeprefix("IPython.extensions.") for name in eval(ex.stdout.strip())}


@pytest.fixture
def ipydir(tmp_path):
    d = tmp_path / "ipython"
    d.mkdir()
    return d


def test_install_makes_a_new_kernel_load_memguard(ipydir, tmp_path):
    line = ok(memguard_cli(ipydir, "install"), "installed", str(kernel_config(ipydir)))
    assert "profile 'default'" in line
    text = kernel_config(ipydir).read_text()
    assert text.startswith(BEGIN) and text.endswith(END + "\n")
    assert 'get_config().InteractiveShellApp.extensions.append("memguard")\n' in text
    k = start_kernel(ipydir, tmp_path)
    try:
        assert "memguard" in loaded_extensions(k)  # no %load_ext typed
        ex = k.execute("%memguard status")
        (msg,) = [m for _, m in ex.messages if m["msg_type"] == "display_data"]
        assert "limit" in msg["content"]["data"]["text/plain"]
        # Loaded at start, it still routes alerts under the running cell.
        k.execute("%memguard budget 100MB")
        ex = k.execute("import numpy as np\na = np.ones(25_000_000)  # 200 MB\n")
        alerts = ex.alerts_of("budget")
        assert alerts and alerts[0][2]["cell"] == ex.execution_count
        assert alerts[0][2]["line"] == 2
    finally:
        k.shutdown()


def test_install_twice_one_block_uninstall_twice(ipydir, tmp_path):
    path = kernel_config(ipydir)
    ok(memguard_cli(ipydir, "install"), "installed")
    first = path.read_bytes()
    ok(memguard_cli(ipydir, "install"), "already installed", str(path))
    assert path.read_bytes() == first
    assert first.decode().count(BEGIN) == 1 and first.decode().count(END) == 1

    ok(memguard_cli(ipydir, "uninstall"), "uninstalled", str(path))
    assert not path.exists()  # memguard created it and only its block was in it
    ok(memguard_cli(ipydir, "uninstall"), "not installed", str(path))
    k = start_kernel(ipydir, tmp_path)
    try:
        assert "memguard" not in loaded_extensions(k)
        ex = k.execute("%memguard status", ok=False)
        assert ex.error and ex.error["ename"] == "UsageError"  # the magic is not there
    finally:
        k.shutdown()


def test_user_config_is_kept_and_restored_byte_for_byte(ipydir, tmp_path):
    prof = ipydir / "profile_default"
    prof.mkdir()
    # An extension configured in ipython_config.py (read first by kernels) and a setting in
    # ipython_kernel_config.py, whose last line has no newline: install must add one and
    # uninstall take it away again.
    (prof / "ipython_config.py").write_text('c.InteractiveShellApp.extensions = ["autoreload"]\n')
    original = b'# my settings\nc.InteractiveShellApp.exec_lines = ["MARK = 42"]'
    path = kernel_config(ipydir)
    path.write_bytes(original)
    os.chmod(path, 0o640)

    ok(memguard_cli(ipydir, "install"), "installed")
    ok(memguard_cli(ipydir, "install"), "already installed")
    text = path.read_bytes()
    assert text.startswith(original + b"\n" + BEGIN.encode())
    assert text.count(BEGIN.encode()) == 1
    k = start_kernel(ipydir, tmp_path)
    try:
        assert {"memguard", "autoreload"} <= loaded_extensions(k)
        assert k.execute("print(MARK)").stdout.strip() == "42"
    finally:
        k.shutdown()

    ok(memguard_cli(ipydir, "uninstall"), "uninstalled")
    assert path.read_bytes() == original
    assert os.stat(path).st_mode & 0o777 == 0o640
    ok(memguard_cli(ipydir, "uninstall"), "not installed")
    assert path.read_bytes() == original
    k = start_kernel(ipydir, tmp_path)
    try:
        exts = loaded_extensions(k)
        assert "autoreload" in exts and "memguard" not in exts
        assert k.execute("print(MARK)").stdout.strip() == "42"
    finally:
        k.shutdown()


def test_block_between_user_lines_is_removed_exactly(ipydir):
    """A block the user moved between own lines: uninstall removes those lines only."""
    ok(memguard_cli(ipydir, "install"), "installed")
    path = kernel_config(ipydir)
    block = path.read_text()
    path.write_text("a = 1\n" + block.replace(" (file created by memguard install)", "")
                    + "b = 2\n")
    ok(memguard_cli(ipydir, "install"), "already installed")
    # A block from another version (other body) and a pasted copy: brought back to one.
    plain = block.replace(" (file created by memguard install)", "")
    old = plain.replace('.append("memguard")', '.append("memguard")  # old')
    path.write_text("a = 1\n" + old + "b = 2\n" + plain)
    ok(memguard_cli(ipydir, "install"), "updated")
    assert path.read_text() == "a = 1\n" + plain + "b = 2\n"
    ok(memguard_cli(ipydir, "uninstall"), "uninstalled")
    assert path.read_text() == "a = 1\nb = 2\n"


def test_profile_option_edits_only_that_profile(ipydir, tmp_path):
    line = ok(memguard_cli(ipydir, "install", "--profile", "other"), "installed",
              str(kernel_config(ipydir, "other")))
    assert "profile 'other'" in line
    assert kernel_config(ipydir, "other").exists()
    assert not kernel_config(ipydir, "default").exists()
    k = start_kernel(ipydir, tmp_path, profile="other")
    try:
        assert "memguard" in loaded_extensions(k)
    finally:
        k.shutdown()
    k = start_kernel(ipydir, tmp_path)  # the default profile: untouched
    try:
        assert "memguard" not in loaded_extensions(k)
    finally:
        k.shutdown()
    ok(memguard_cli(ipydir, "uninstall"), "not installed")  # default profile
    assert kernel_config(ipydir, "other").exists()
    ok(memguard_cli(ipydir, "uninstall", "--profile", "other"), "uninstalled")
    assert not kernel_config(ipydir, "other").exists()
    ok(memguard_cli(ipydir, "uninstall", "--profile", "missing"), "does not exist")
    assert not (ipydir / "profile_missing").exists()


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["install", "--profile", "a/b"],
                                  ["install", "--bogus"], ["uninstall", "extra"]])
def test_bad_arguments_exit_2_with_usage(ipydir, args):
    proc = memguard_cli(ipydir, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "usage:" in proc.stderr and "error:" in proc.stderr
    assert not kernel_config(ipydir).exists()


def test_unwritable_config_is_one_line_on_stderr_and_exit_1(ipydir, tmp_path):
    prof = ipydir / "profile_default"
    prof.mkdir()
    # A symlink into a folder that does not exist: not writable, even as root.
    kernel_config(ipydir).symlink_to(tmp_path / "nowhere" / "ipython_kernel_config.py")
    proc = memguard_cli(ipydir, "install")
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("memguard: error: cannot write ") and "nowhere" in line


def test_unusable_ipython_dir_is_an_error_not_a_temporary_dir(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = memguard_cli(afile / "ipython", "install")
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("memguard: error: ") and "IPYTHONDIR" in line
