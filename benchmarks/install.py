"""Run the benchmarks against blockdrv as a user installs it.

A developer's checkout is usually installed in editable mode, and setuptools
does that for this project's layout with an import hook that every Python
process loads from a ``.pth`` file: ~15 ms of imports (pathlib, importlib.util,
...) before blockdrv's first line, more than most of what a short command
does.  A ``pip install blockdrv`` has no such hook, so timing the editable
install would charge blockdrv for the developer's set-up.

:func:`reexec_installed` therefore builds (once) a virtual environment in
``/var/tmp/blockdrv-bench-venv`` with the project's dependencies and the
``bench`` extra, installs a copy of this checkout into it as an ordinary
(non-editable) package -- the copy keeps pip's build files out of the
checkout -- and re-runs the benchmark under that environment's interpreter.
There ``sys.executable`` and the ``blockdrv`` console script next to it are
the user's, and ``python -c pass`` measures the same interpreter.  Pass
``--in-place`` to time whatever ``blockdrv`` the current interpreter has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

VENV = "/var/tmp/blockdrv-bench-venv"
_MARK = "BLOCKDRV_BENCH_INSTALLED"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_checkout(dest: str) -> None:
    """The files a build needs, without .git, caches or earlier build output."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
        ".hypothesis", "tests", "plugins", "benchmarks"))


def install() -> str:
    """The environment's interpreter, with this checkout installed in it."""
    py = os.path.join(VENV, "bin", "python")
    if not os.access(py, os.X_OK):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    with tempfile.TemporaryDirectory(prefix="blockdrv-bench-src-") as tmp:
        src = os.path.join(tmp, "blockdrv")
        _copy_checkout(src)
        print(f"installing this checkout into {VENV} (not editable) ...", file=sys.stderr)
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"{src}[bench]"], check=True, stdout=subprocess.DEVNULL)
        # the copy is reinstalled every run: the checkout may have changed
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-deps", "--force-reinstall", src], check=True,
                       stdout=subprocess.DEVNULL)
    # byte-compiled now, so no timed command compiles a module (CI images
    # often set PYTHONDONTWRITEBYTECODE)
    subprocess.run([py, "-m", "compileall", "-q", os.path.join(VENV, "lib")],
                   check=False, stdout=subprocess.DEVNULL)
    return py


def reexec_installed(module: str, argv: list[str]) -> None:
    """Re-run ``python -m module argv`` under the installed environment,
    unless this process already is that run or ``--in-place`` was asked."""
    if os.environ.get(_MARK) or "--in-place" in argv:
        return
    py = install()
    env = dict(os.environ, **{_MARK: "1"})
    env.pop("PYTHONPATH", None)                 # the installed copy, not a checkout
    os.chdir(ROOT)                              # `-m benchmarks.x` finds the harness here
    os.execve(py, [py, "-m", module, *argv], env)
