"""Start-up: drivers imported on demand, light probes, no numpy for ordinary
images (blockdrv/_lazy.py, plugins.DriverRegistry, vhdx bat background)."""

import os
import subprocess
import sys

import pytest

from blockdrv import _lazy, plugins

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


@pytest.mark.parametrize("buf", [bytes(512), b"vhdxfile" + bytes(504),
                                 b"vhdxfilX" + bytes(504), b"QFI\xfb" + bytes(508),
                                 b"QFI\xfb\0\0\0\x02" + bytes(504),
                                 b"QFI\xfb\0\0\0\x03" + bytes(504)])
def test_light_probes_score_as_the_hooks(buf):
    reg = plugins.get_registry()
    for name, value in _lazy.BUILTIN_PROBES.items():
        light = plugins.load_entry_point(value)(buf=buf, filename="x")
        drv = reg.formats.get(name)
        if drv is None:
            assert name in reg.protocols and light == 0
        else:
            assert light == drv.bdrv_probe(buf=buf, filename="x")


def test_registry_imports_only_what_is_looked_up():
    code = ("import sys, blockdrv.plugins as p; r = p.get_registry();"
            "assert 'blockdrv.drivers.vhdx' not in sys.modules;"
            "r.format('raw'); r.protocol('file');"
            "d, s = r.probe(b'vhdxfile' + bytes(504), 'x');"
            "assert d.format_name == 'vhdx' and s == 100;"
            "bad = [m for m in ('blockdrv.protocols.nbd', 'blockdrv.protocols.fsspec',"
            " 'blockdrv.protocols.blkdebug', 'blockdrv.protocols.memory') if m in sys.modules];"
            "assert not bad, bad;"
            "assert sorted(r.protocols) == sorted(['file', 'memory', 'blkdebug', 'nbd', 'fsspec'])")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.interop
@pytest.mark.parametrize("cmd", [["info"], ["check"], ["map", "--output=json"]])
def test_short_commands_do_not_import_numpy(tmp_path, cmd, qemu_img, qemu_io):
    img = str(tmp_path / "a.vhdx")
    subprocess.run([qemu_img, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "4G"],
                   check=True)
    # block 0 allocated (the table's first entry is no guide to its background)
    args = [qemu_io, "-f", "vhdx"]
    for i in range(50):
        args += ["-c", f"write -P {i + 1} {i * 37}M 1M"]
    subprocess.run(args + [img], check=True, stdout=subprocess.DEVNULL)
    code = ("import sys, runpy; sys.argv = ['blockdrv'] + sys.argv[1:];"
            "import blockdrv.cli as c\n"
            "try:\n    rc = c.main()\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert 'numpy' not in sys.modules, 'numpy imported'\n"
            "sys.exit(rc or 0)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code, *cmd, img], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_background_scan_with_first_block_allocated():
    from blockdrv.drivers.vhdx.bat import Bat
    size = 8 << 30
    n = 8192 + 8192 // 4096
    buf = bytearray(n * 8)
    bat = Bat(buf, size, MiB)
    for i in range(0, 8192, 97):
        bat.set(i, 6, (16 + i) * MiB)
    bg, diff = bat.background_scan()
    assert bg == 0 and len(diff) == len(range(0, 8192, 97))
    assert bat.count_states() == {0: 8192 - len(diff), 6: len(diff)}


def test_background_scan_dense_small_table():
    from blockdrv.drivers.vhdx.bat import Bat
    buf = bytearray(64 * 8)
    bat = Bat(buf, 16 * 32 * MiB, 32 * MiB)
    for i in range(16):
        bat.set(i, 6, (8 + 32 * i) * MiB)
    bg, diff = bat.background_scan()
    assert len(diff) == 16 and bat.count_states() == {6: 16}
