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


@pytest.mark.parametrize("ratio_sectors", [(1 << 20, 512), (32 << 20, 512), (1 << 20, 4096)])
def test_same_run_counts_as_a_loop_would(ratio_sectors):
    """Bat.same_run (memcmps, used by block status to skip absent
    stretches) against a plain loop over the entries, over runs that end on
    and around sector bitmap entries, at the table's end, and stop at a
    non-zero bitmap entry."""
    import mmap
    import random
    from blockdrv.drivers.vhdx.bat import Bat, bitmap_index
    bsize, lss = ratio_sectors
    size = 300_000 * bsize if bsize == MiB else 40_000 * bsize
    probe = Bat(bytearray(16 << 20), size, bsize, lss)
    n = probe.total_entries
    rnd = random.Random(7)
    for backing in ("bytearray", "mmap"):
        buf = bytearray(n * 8)
        bat = Bat(buf, size, bsize, lss)
        blocks = bat.data_blocks
        for b in range(blocks):
            bat.set(b, 2)                                   # ZERO background
        for b in rnd.sample(range(blocks), 40):
            bat.set(b, 6, (b + 16) * MiB)
        for b in (0, 1, blocks - 1):
            bat.set(b, 0)
        bat.set_raw_at(bitmap_index(3, bat.chunk_ratio), 6 | (8 * MiB))   # a bitmap block
        if backing == "mmap":
            m = mmap.mmap(-1, len(buf))
            m[:] = buf
            bat = Bat(m, size, bsize, lss)
        step = bat.chunk_ratio + 1

        def loop(block, end):
            first, count = bat.raw(block), 0
            for b in range(block, min(end, blocks)):
                i = b + b // bat.chunk_ratio
                if bat.raw(b) != first or (b > block and i % step == 0
                                           and bat.raw_at(i - 1) != 0):
                    break
                count += 1
            return count

        starts = [0, 2, 5, bat.chunk_ratio - 1, bat.chunk_ratio, 3 * bat.chunk_ratio + 1,
                  blocks - 3, blocks - 1] + rnd.sample(range(blocks), 30)
        for start in starts:
            for end in (blocks, start + 1, start + bat.chunk_ratio + 5, blocks + 10):
                assert bat.same_run(start, end) == loop(start, end), (start, end)


def test_background_scan_is_reused_until_the_table_changes():
    """An open scans the table once and `info` reuses it; any set() drops
    the answer, and a smaller limit is answered from a larger one."""
    from blockdrv.drivers.vhdx.bat import Bat
    bat = Bat(bytearray((8192 + 2) * 8), 8 << 30, MiB)
    for i in range(0, 8192, 97):
        bat.set(i, 6, (16 + i) * MiB)
    first = bat.background_scan()
    assert bat.background_scan() is first
    assert bat.background_scan(limit=10) is None
    assert bat.background_scan(limit=len(first[1])) is first
    bat.set(5, 6, 9000 * MiB)
    again = bat.background_scan()
    assert again is not first and len(again[1]) == len(first[1]) + 1
    bat.set_raw_at(bat.chunk_ratio, 6 | (9100 * MiB))     # the first sector bitmap entry
    assert len(bat.background_scan()[1]) == len(again[1]) + 1
    few = Bat(bytearray((8192 + 2) * 8), 8 << 30, MiB)
    for i in range(0, 8192, 2):
        few.set(i, 6, (16 + i) * MiB)
    assert few.background_scan(limit=100) is None
    assert few.background_scan(limit=50) is None
    assert len(few.background_scan(limit=8192)[1]) == 4096
