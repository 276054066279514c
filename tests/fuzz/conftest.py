"""Hypothesis profiles for the fuzz campaign.

``ci`` (default): derandomized, a fast seeded subset.  ``long``: thousands of
random cases; select it with ``HYPOTHESIS_PROFILE=long`` or run the
``slow``-marked tests (``pytest -m slow tests/fuzz``), which use it.
"""

import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit", "vhdx"))

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture],
               print_blob=True)
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
