"""Fixtures only the VHDX tests need; a conftest imports them::

    from blockdrv.testing.vhdx.fixtures import pyvhdi, vhdiinfo  # noqa: F401

and libvhdi as a second reader: :func:`libvhdi_read`.
"""

from __future__ import annotations

import pytest

from ..tools import in_ci, require_tool


@pytest.fixture(scope="session")
def vhdiinfo() -> str:
    """Path of libvhdi's ``vhdiinfo``; skips when missing, fails under ``CI=true``."""
    return require_tool("vhdiinfo")


@pytest.fixture(scope="session")
def pyvhdi():
    """libvhdi's Python binding (the ``test`` extra's libvhdi-python), the
    second reader of differencing chains; skips when missing, fails under
    ``CI=true``."""
    try:
        import pyvhdi as mod
    except ImportError:
        message = "pyvhdi is not installed (pip install libvhdi-python)"
        if in_ci():
            pytest.fail(f"CI=true but the oracle is missing: {message}")
        pytest.skip(message)
    return mod


def libvhdi_read(pyvhdi, chain) -> bytes:
    """The guest bytes of the top of ``chain`` (paths, base first) as pyvhdi
    reads them."""
    files = []
    for path in chain:
        f = pyvhdi.file()
        f.open(str(path))
        if files:
            f.set_parent(files[-1])
        files.append(f)
    top = files[-1]
    try:
        return top.read_buffer_at_offset(top.get_media_size(), 0)
    finally:
        for f in reversed(files):
            f.close()


__all__ = ["libvhdi_read", "pyvhdi", "vhdiinfo"]
