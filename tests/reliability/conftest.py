"""Shared bits of the reliability suite: a scratch directory on tmpfs when
there is one, and the figures printed in pytest's terminal summary."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict

import pytest

# name -> {"tried": n, "survived": n, ...}; filled by the tests, printed at the end.
FIGURES: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))


def record(section: str, name: str, **counts: int) -> None:
    slot = FIGURES[f"{section}: {name}"]
    for key, value in counts.items():
        slot[key] += value


@pytest.fixture
def figures():
    """``figures(section, name, tried=.., survived=..)`` adds to the summary."""
    return record


@pytest.fixture
def scratch(tmp_path):
    """A fresh directory, on /dev/shm when available (crash matrices copy
    images thousands of times; fdatasync there costs nothing)."""
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
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name in sorted(FIGURES):
        counts = FIGURES[name]
        terminalreporter.write_line(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        section = name.split(":", 1)[0]
        for key, value in counts.items():
            totals[section][key] += value
    for section, counts in sorted(totals.items()):
        terminalreporter.write_line(
            f"TOTAL {section}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
