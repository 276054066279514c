"""The vpc plugin's tests: they need the plugin *installed* (its entry point
is how blockdrv finds it) and qemu-img/qemu-io 7.2.  Under ``CI=true`` a
missing plugin or oracle fails every test instead of skipping it."""

from __future__ import annotations

from collections import defaultdict
from importlib.metadata import entry_points

import pytest

import blockdrv.testing.plugin as _plugin
from blockdrv.testing.compare import register_normalizer
from blockdrv.testing.tools import in_ci, require_tool

# name -> counters, printed at the end ("interop: create" -> compared/identical)
FIGURES: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))


def _plugin_problem() -> str | None:
    eps = [ep for ep in entry_points(group="blockdrv.drivers") if ep.name == "vpc"]
    if not eps:
        return ("the blockdrv-vpc plugin is not installed (no 'vpc' entry point in "
                "group blockdrv.drivers): pip install -e plugins/blockdrv-vpc")
    try:
        eps[0].load()
    except Exception as exc:   # noqa: BLE001 -- reported, not hidden
        return f"the blockdrv-vpc entry point does not load: {exc!r}"
    return None


def pytest_configure(config):
    if not config.pluginmanager.is_registered(_plugin):
        config.pluginmanager.register(_plugin, "blockdrv-testing")
    if _plugin_problem() is None:
        from blockdrv_vpc.normalize import normalize
        # Today's harness masks a prefix: the head copy of the footer.  The
        # tail copy is masked by the tests' own comparisons (compare_vpc).
        register_normalizer("vpc", normalize, prefix=4096)


@pytest.fixture(autouse=True)
def _require_plugin_and_oracles():
    problem = _plugin_problem()
    if problem:
        if in_ci():
            pytest.fail(f"CI=true: {problem}")
        pytest.skip(problem)
    require_tool("qemu-img")
    require_tool("qemu-io")


@pytest.fixture
def figures():
    def record(name: str, **counts: int) -> None:
        for key, value in counts.items():
            FIGURES[name][key] += value
    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FIGURES:
        return
    terminalreporter.section("vpc figures")
    totals: dict[str, int] = defaultdict(int)
    for name in sorted(FIGURES):
        counts = FIGURES[name]
        terminalreporter.write_line(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if name.startswith("interop"):
            for k, v in counts.items():
                totals[k] += v
    if totals:
        terminalreporter.write_line(
            "interop total: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
