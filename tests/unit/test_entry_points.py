"""A driver shipped as a separate package is found through its entry point."""

import subprocess
import sys
import textwrap

import pytest

TOY_DRIVER = '''
"""A toy format: the first 8 bytes are b"TOYIMAGE", guest data follows."""
from blockdrv.driver import DriverInfo, hookimpl    # the public driver API, nothing else

MAGIC = b"TOYIMAGE"


class ToyFormat:
    format_name = "toy"
    protocol_name = None

    @hookimpl
    def bdrv_probe(self, buf, filename):
        return 100 if bytes(buf[:8]) == MAGIC else 0

    @hookimpl
    def bdrv_open(self, bs, options, flags):
        bs.total_size = bs.file.total_size - len(MAGIC)

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov):
        await bs.file.co_preadv(offset + len(MAGIC), nbytes, qiov)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov, flags):
        await bs.file.co_pwritev(offset + len(MAGIC), nbytes, qiov, flags)

    @hookimpl
    def bdrv_get_info(self, bs):
        return DriverInfo(cluster_size=512)


driver = ToyFormat()
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "blockdrv-toy"
version = "0.0.1"

[project.entry-points."blockdrv.drivers"]
toy = "blockdrv_toy:driver"
'''

CHECK = textwrap.dedent('''
    import sys
    import blockdrv
    from blockdrv.plugins import get_registry
    assert "toy" in get_registry().formats, sorted(get_registry().formats)
    path = sys.argv[1]
    with open(path, "wb") as f:
        f.write(b"TOYIMAGE" + bytes(4096))
    with blockdrv.open_image(path, readonly=False) as img:   # probed, not named
        assert img.format == "toy", img.format
        img.write(100, b"hello")
    with open(path, "rb") as f:
        data = f.read()
    assert data[108:113] == b"hello", data[100:120]
    print("toy ok", get_registry().formats["toy"].has("bdrv_co_pdiscard"))
''')



def test_third_party_driver_found_by_entry_point(tmp_path):
    src = tmp_path / "src"
    (src / "blockdrv_toy").mkdir(parents=True)
    (src / "blockdrv_toy" / "__init__.py").write_text(TOY_DRIVER)
    (src / "pyproject.toml").write_text(PYPROJECT)
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(target), str(src)],
        capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    env_path = str(target)
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path / "img.toy")],
        capture_output=True, text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    # Capabilities follow from the callbacks present: the toy has no discard.
    assert run.stdout.strip() == "toy ok False"


def test_builtin_drivers_are_entry_points():
    from importlib.metadata import entry_points
    names = {ep.name for ep in entry_points(group="blockdrv.drivers")}
    assert {"file", "memory", "raw", "vhdx"} <= names


def test_toy_driver_uses_only_the_public_driver_api():
    imports = [line.split()[1] for line in TOY_DRIVER.splitlines()
               if line.startswith(("from blockdrv", "import blockdrv"))]
    assert imports == ["blockdrv.driver"]


def test_public_driver_api_names_resolve():
    import blockdrv.driver as api
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing
    # the contract types are defined outside node.py (no hookspecs -> node cycle)
    assert api.BlockStatus.__module__ == "blockdrv.common"
    assert api.DriverInfo.__module__ == "blockdrv.common"
