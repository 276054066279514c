"""The reliability suite's fixtures (``scratch``: a directory on tmpfs when
there is one; ``figures``: the tried/survived figures printed in pytest's
terminal summary) come from :mod:`blockdrv.testing.plugin`; see
tests/conftest.py for source trees whose metadata predates the plugin."""
