"""pytest plugin of the interop harness (entry point ``pytest11: blockdrv``).

Fixtures:

``qemu_img``, ``qemu_io`` (session)
    paths of the oracle tools (``$QEMU_IMG`` / ``$QEMU_IO`` when set, as the
    runners of :mod:`blockdrv.testing.qemu` use them; else found on PATH); the
    test skips when one is missing, and fails under ``CI=true`` (:func:`blockdrv.testing.tools.require_tool`).
    Format-specific tools register where they are needed (``vhdiinfo``:
    :mod:`blockdrv.testing.vhdx.fixtures`, imported by the VHDX tests' conftest).
``interop_tmp``
    a fresh directory for images (pytest's ``tmp_path``).
``figures``
    ``figures(section, name, tried=.., survived=..)`` adds to the figures
    printed in the terminal summary (:mod:`blockdrv.testing.figures`).
``scratch``
    a fresh directory on ``/dev/shm`` when there is one (crash matrices copy
    images thousands of times), else under ``tmp_path``.
``replay_both``
    ``replay_both(script, fmt="raw", size="64M", image=None, create_options={})``
    copies one template image (``image``, or one made by ``qemu-img create``)
    twice, runs the qemu-io script with ``qemu-io`` on one copy and with
    ``blockdrv io`` on the other, and returns a :class:`Replay` with both
    :class:`~blockdrv.testing.qemu.ScriptResult` and both paths;
    ``replay.assert_same()`` checks outputs, exit codes and files (after the
    format's normalizer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import pytest

from .compare import Difference, compare_files
from .figures import record, summary_lines
from .qemu import QEMU_IMG, QEMU_IO, ScriptResult, qemu_img_create, replay_script, sparse_copy
from .tools import require_tool


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "interop: compares against qemu-img / qemu-io")


@pytest.fixture(scope="session")
def qemu_img() -> str:
    return require_tool(QEMU_IMG)


@pytest.fixture(scope="session")
def qemu_io() -> str:
    return require_tool(QEMU_IO)


@pytest.fixture
def figures():
    """``figures(section, name, tried=.., survived=..)`` adds to the summary."""
    return record


@pytest.fixture
def scratch(tmp_path):
    """A fresh directory, on /dev/shm when available."""
    import shutil
    import tempfile
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    if base is None:
        yield str(tmp_path)
        return
    path = tempfile.mkdtemp(prefix="blockdrv-rel-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = summary_lines()
    if not lines:
        return
    terminalreporter.section("reliability figures")
    for line in lines:
        terminalreporter.write_line(line)


@pytest.fixture
def interop_tmp(tmp_path):
    """Directory for the images of one test."""
    d = tmp_path / "images"
    d.mkdir()
    return d


@dataclass
class Replay:
    """One script run on two copies of one image."""

    script: list[str]
    fmt: str
    qemu: ScriptResult
    blockdrv: ScriptResult
    qemu_path: str
    blockdrv_path: str

    def output_difference(self) -> str | None:
        q, b = self.qemu.normalized, self.blockdrv.normalized
        for name, x, y in zip(("exit code", "stdout", "stderr"), q, b):
            if x != y:
                return _describe(name, x, y)
        return None

    def file_difference(self) -> Difference | None:
        return compare_files(self.qemu_path, self.blockdrv_path, self.fmt)

    def assert_same_output(self) -> None:
        diff = self.output_difference()
        assert diff is None, diff

    def assert_same_files(self) -> None:
        diff = self.file_difference()
        assert diff is None, f"files differ after the script: {diff}"

    def assert_same(self) -> None:
        self.assert_same_output()
        self.assert_same_files()


def _describe(name: str, x, y) -> str:
    if isinstance(x, str):
        import difflib
        diff = "\n".join(difflib.unified_diff(x.splitlines(), y.splitlines(),
                                              "qemu-io", "blockdrv io", lineterm="", n=2))
        return f"{name} differs:\n{diff[:6000]}"
    return f"{name} differs: qemu-io {x!r}, blockdrv io {y!r}"


@pytest.fixture
def replay_both(qemu_img, qemu_io, interop_tmp):
    """``replay_both(script, fmt="raw", size="64M", image=None, **options)``."""
    counter = [0]

    def run(script: Sequence[str], fmt: str = "raw", size: int | str = "64M",
            image: str | os.PathLike | None = None, readonly: bool = False,
            subprocess_: bool = False, batch: int = 0, **create_options) -> Replay:
        counter[0] += 1
        n = counter[0]
        if image is None:
            image = interop_tmp / f"template{n}.{fmt}"
            qemu_img_create(image, fmt, size, **create_options)
        qpath = interop_tmp / f"qemu{n}.{fmt}"
        bpath = interop_tmp / f"blockdrv{n}.{fmt}"
        sparse_copy(image, qpath)
        sparse_copy(image, bpath)
        q = replay_script(script, qpath, fmt, "qemu", readonly, batch=batch)
        b = replay_script(script, bpath, fmt, "blockdrv", readonly,
                          subprocess_=subprocess_, batch=batch)
        return Replay(list(script), fmt, q, b, str(qpath), str(bpath))

    return run
