"""The vpc plugin's tests: they need the plugin *installed* (its entry point
is how blockdrv finds it) and qemu-img/qemu-io 7.2.  Under ``CI=true`` a
missing plugin or oracle fails every test instead of skipping it."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

import blockdrv.testing.plugin as _plugin
from blockdrv.testing.tools import in_ci, require_tool

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


@pytest.fixture(autouse=True)
def _require_plugin_and_oracles():
    problem = _plugin_problem()
    if problem:
        if in_ci():
            pytest.fail(f"CI=true: {problem}")
        pytest.skip(problem)
    require_tool("qemu-img")
    require_tool("qemu-io")
