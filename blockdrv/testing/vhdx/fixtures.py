"""Fixtures only the VHDX tests need; a conftest imports them::

    from blockdrv.testing.vhdx.fixtures import vhdiinfo  # noqa: F401
"""

from __future__ import annotations

import pytest

from ..tools import require_tool


@pytest.fixture(scope="session")
def vhdiinfo() -> str:
    """Path of libvhdi's ``vhdiinfo``; skips when missing, fails under ``CI=true``."""
    return require_tool("vhdiinfo")


__all__ = ["vhdiinfo"]
