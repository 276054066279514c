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
# qcow2: "findings fixed" counts the hand-made regression cases of the driver
# fixes the campaign led to (tests/fuzz/test_qcow2_fuzz.py FINDINGS)
QCOW2_STATS = dict.fromkeys(("examples", "opened", "refused", "findings fixed"), 0)


@pytest.fixture(scope="session")
def fuzz_stats() -> dict[str, int]:
    """The campaign's counters (``stats["refused"] += 1``), summed over the session."""
    return STATS


@pytest.fixture(scope="session")
def qcow2_fuzz_stats() -> dict[str, int]:
    return QCOW2_STATS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for name, stats in (("vhdx", STATS), ("qcow2", QCOW2_STATS)):
        if stats["examples"]:
            terminalreporter.section(f"{name} fuzz figures")
            terminalreporter.write_line(", ".join(f"{k} {v}" for k, v in stats.items()))
