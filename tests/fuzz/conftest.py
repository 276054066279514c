"""Hypothesis profiles for the fuzz campaign, and its figures.

``ci`` (default): derandomized, a fast seeded subset.  ``long``: thousands of
random cases; select it with ``HYPOTHESIS_PROFILE=long`` or run the
``slow``-marked tests (``pytest -m slow tests/fuzz``), which use it.

What the campaign did (examples run, images opened read-only / read-write,
refused, repaired) is counted through the ``fuzz_stats`` fixture and printed
in pytest's terminal summary.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture],
               print_blob=True)
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

STATS = dict.fromkeys(("examples", "opened_ro", "opened_rw", "refused", "repaired"), 0)


@pytest.fixture(scope="session")
def fuzz_stats() -> dict[str, int]:
    """The campaign's counters (``stats["refused"] += 1``), summed over the session."""
    return STATS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not STATS["examples"]:
        return
    terminalreporter.section("vhdx fuzz figures")
    terminalreporter.write_line(", ".join(f"{k} {v}" for k, v in STATS.items()))
