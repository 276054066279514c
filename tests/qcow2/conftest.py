import pytest

from blockdrv.plugins import get_registry


@pytest.fixture(autouse=True, scope="session")
def _qcow2_registered():
    # the driver comes in through its entry point: an install is needed
    assert "qcow2" in get_registry().formats, "pip install -e . to register the qcow2 driver"
