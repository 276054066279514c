import pytest

from blockdrv.testing.tools import require_tool


@pytest.fixture(scope="session")
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    return require_tool("qemu-io")


@pytest.fixture(scope="session")
def vhdiinfo() -> str:
    return require_tool("vhdiinfo")
