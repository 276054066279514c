"""The interop tests' fixtures: the generic ones come from
:mod:`blockdrv.testing.plugin` (see tests/conftest.py); ``vhdiinfo`` is the
VHDX tests' own and registers only here."""

from blockdrv.testing.vhdx.fixtures import vhdiinfo  # noqa: F401
