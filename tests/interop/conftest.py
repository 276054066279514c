"""The interop tests' fixtures: the generic ones come from
:mod:`blockdrv.testing.plugin` (see tests/conftest.py); ``vhdiinfo`` and ``pyvhdi`` are the
VHDX tests' own and register only here."""

from blockdrv.testing.vhdx.fixtures import pyvhdi, vhdiinfo  # noqa: F401
