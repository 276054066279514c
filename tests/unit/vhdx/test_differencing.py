"""Differencing VHDX images (HasParent): create, open, read, write, check, map.

Reads resolve per state (FULLY_PRESENT here, NOT_PRESENT from the parent,
PARTIALLY_PRESENT per sector through the chunk's sector bitmap); partial
writes allocate PARTIALLY_PRESENT blocks with bitmap bits, journaled with the
BAT entries as one log entry; whole-block writes allocate FULLY_PRESENT.
"""

from __future__ import annotations

import os
import random
import shutil
import struct

import pytest

import blockdrv
from blockdrv.block import open_node
from blockdrv.cli import main as cli_main
from blockdrv.drivers.vhdx.bat import bitmap_index
from blockdrv.drivers.vhdx.constants import guid_str
from blockdrv.errors import BlockDriverError
from blockdrv.mapping import map_entries
from blockdrv.common import O_RDWR
from blockdrv.protocols import blkdebug
from blockdrv.testing.compare import file_digest

MiB = 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_base(path, size="8M", lss=512, block_size="1M", writes=()):
    img = blockdrv.create_image(path, "vhdx", size, block_size=block_size,
                                logical_sector_size=lss)
    with img:
        for off, data in writes:
            img.write(off, data)
    return path


def read_all(path, **opts) -> bytes:
    with blockdrv.open_image(path, **opts) as img:
        return img.read(0, img.size)


@pytest.fixture
def chain(tmp_path):
    """base (8 MiB, 1 MiB blocks, pattern in 0..3 MiB) and an empty child."""
    base = make_base(tmp_path / "base.vhdx", writes=[(0, pattern(1, 3 * MiB))])
    child = tmp_path / "child.vhdx"
    blockdrv.create_image(child, "vhdx", backing_file="base.vhdx", backing_fmt="vhdx").close()
    return base, child


def vhdx_of(path):
    bs = open_node(os.fspath(path), "vhdx", 0)
    return bs


# ------------------------------------------------------------------ create

def test_create_child_inherits_and_links(chain):
    base, child = chain
    with vhdx_of(base) as pb, vhdx_of(child) as cb:
        parent_guid = pb.opaque.header.data_write_guid
        img = cb.opaque
        assert img.differencing and img.params.has_parent
        assert cb.total_size == pb.total_size == 8 * MiB
        assert img.block_size == MiB and img.logical_sector_size == 512
        loc = img.params.parent_locator.entries
        assert loc["parent_linkage"] == "{" + guid_str(parent_guid) + "}"
        assert loc["relative_path"] == "base.vhdx"
        # no Win32 name for a POSIX path outside WSL's /mnt/<drive> (parent.win32_absolute)
        assert "absolute_win32_path" not in loc
        # whole chunks: ceil(8 / 4096) * 4097 entries, all NOT_PRESENT
        assert img.bat.total_entries == 4097
        assert img.bat.count_states() == {0: 8}
        assert cb.backing is not None and cb.backing.read_only
    assert read_all(child) == read_all(base)


def test_create_rules(tmp_path):
    base = make_base(tmp_path / "b4k.vhdx", lss=4096, block_size="2M")
    with pytest.raises(blockdrv.InvalidArgumentError, match="sector size"):
        blockdrv.create_image(tmp_path / "c.vhdx", "vhdx", backing_file="b4k.vhdx",
                              logical_sector_size=512)
    assert not (tmp_path / "c.vhdx").exists()
    with pytest.raises(blockdrv.InvalidArgumentError, match="fixed"):
        blockdrv.create_image(tmp_path / "c.vhdx", "vhdx", backing_file="b4k.vhdx",
                              subformat="fixed")
    with pytest.raises(blockdrv.InvalidArgumentError, match="vhdx"):
        blockdrv.create_image(tmp_path / "c.vhdx", "vhdx", backing_file="b4k.vhdx",
                              backing_fmt="raw")
    with pytest.raises(blockdrv.InvalidArgumentError, match="backing file"):
        blockdrv.create_image(tmp_path / "c.vhdx", "vhdx", backing_file="nope.vhdx")
    assert not (tmp_path / "c.vhdx").exists()
    # block size may differ from the parent's (the spec sets no rule); size may grow
    with blockdrv.create_image(tmp_path / "c.vhdx", "vhdx", "16M", backing_file="b4k.vhdx",
                               block_size="8M") as img:
        assert img.size == 16 * MiB and img.info().cluster_size == 8 * MiB
        assert img.bs.opaque.logical_sector_size == 4096
        assert img.read(8 * MiB, 4096) == bytes(4096)       # beyond the parent: zeros


# ------------------------------------------------------------ read / write

def test_partial_write_sets_bitmap_bits_only(chain):
    base, child = chain
    before = file_digest(base)
    with blockdrv.open_image(child, readonly=False) as img:
        img.write(512, b"\x22" * 1024)
    assert file_digest(base) == before
    expect = bytearray(read_all(base))
    expect[512:1536] = b"\x22" * 1024
    assert read_all(child) == expect
    with vhdx_of(child) as cb:
        img = cb.opaque
        state, off = img.bat.get(0)
        assert state == 7 and off
        sb = img.bat.raw_at(bitmap_index(0, img.bat.chunk_ratio))
        assert sb & 7 == 6
        bits = img.bitmaps.bits(0)
        assert bits[0] == 0b110 and not any(bits[1:])
        assert cb.check().corruptions == 0
        # only the written sectors were stored: the rest of the block is the file's zeros
        raw = cb.file.pread(off, 2048)
        assert raw[:512] == bytes(512) and raw[512:1536] == b"\x22" * 1024


def test_whole_block_write_is_fully_present(chain):
    base, child = chain
    with blockdrv.open_image(child, readonly=False) as img:
        img.write(2 * MiB, b"\x33" * MiB)
        img.write(5 * MiB + 4096, b"\x44" * 4096)
        img.write(5 * MiB, b"\x55" * MiB)          # PARTIALLY_PRESENT, now all bits set
    with vhdx_of(child) as cb:
        assert cb.opaque.bat.get(2)[0] == 6
        assert cb.opaque.bat.get(5)[0] == 7
        assert cb.opaque.bitmaps.all_set(5, 0, MiB // 512)
    data = read_all(child)
    assert data[2 * MiB:3 * MiB] == b"\x33" * MiB
    assert data[5 * MiB:6 * MiB] == b"\x55" * MiB


@pytest.mark.parametrize("lss,block_size", [(512, "1M"), (4096, "1M"), (4096, "32M")])
def test_random_writes_three_level_chain(tmp_path, lss, block_size):
    size = 24 * MiB
    rng = random.Random(lss)
    model = bytearray(size)
    base = tmp_path / "base.vhdx"
    make_base(base, size=size, lss=lss, block_size=block_size)
    chain, snapshots = [base], []
    for level in range(3):
        path = chain[-1]
        with blockdrv.open_image(path, readonly=False) as img:
            for _ in range(25):
                n = rng.choice([lss, 2 * lss, 7 * lss, MiB, 2 * MiB + 3 * lss])
                off = rng.randrange(0, (size - n) // lss) * lss
                data = rng.randbytes(n)
                img.write(off, data)
                model[off:off + n] = data
            assert img.read(0, size) == model
        snapshots.append(bytes(model))
        if level < 2:
            nxt = tmp_path / f"level{level + 1}.vhdx"
            blockdrv.create_image(nxt, "vhdx", backing_file=path.name).close()
            chain.append(nxt)
    top = chain[-1]
    with vhdx_of(top) as bs:
        assert bs.backing.backing is not None and bs.backing.backing.backing is None
        assert bs.check().corruptions == 0
    # reopened, every level reads what it held when its child was made
    for path, expect in zip(chain, snapshots):
        assert read_all(path) == expect


def test_parent_unchanged_and_unaligned_writes(chain):
    base, child = chain
    before = file_digest(base)
    expect = bytearray(read_all(base))
    with blockdrv.open_image(child, readonly=False) as img:
        for off, n in [(100, 10), (MiB - 5, 10), (3 * MiB + 511, 2), (7 * MiB + 1, 4000)]:
            data = pattern(off, n)
            img.write(off, data)
            expect[off:off + n] = data
        assert img.read(0, img.size) == expect
    assert file_digest(base) == before
    assert read_all(child) == expect


# ------------------------------------------------------------ chain checks

def test_linkage_mismatch_is_refused(chain):
    base, child = chain
    with blockdrv.open_image(base, readonly=False) as img:
        img.write(0, b"x")                # new DataWriteGuid
    with pytest.raises(blockdrv.CorruptImageError, match="DataWriteGuid"):
        blockdrv.open_image(child)
    before = file_digest(child)
    with pytest.raises(blockdrv.CorruptImageError):
        blockdrv.open_image(child, readonly=False)
    assert file_digest(child) == before           # nothing written to a child that failed to open


def test_missing_parent_and_override(chain, tmp_path, capsys):
    base, child = chain
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(base, moved / "renamed.vhdx")
    with pytest.raises(blockdrv.InvalidArgumentError, match="parent not found"):
        blockdrv.open_image(child)
    with blockdrv.open_image(child, backing=str(moved / "renamed.vhdx")) as img:
        assert img.read(0, 3 * MiB) == pattern(1, 3 * MiB)
    # info names the parent without opening it, as qemu-img info does
    assert cli_main(["info", str(child)]) == 0
    out = capsys.readouterr().out
    assert f"backing file: base.vhdx (actual path: {tmp_path}/base.vhdx)" in out
    assert "backing file format: vhdx" in out


def test_moved_child_is_repaired_by_rebase_u(chain, tmp_path):
    # A parent outside WSL's /mnt/<drive> gets no absolute_win32_path (it has
    # no Win32 name), so relative_path alone links the child: moving the
    # child breaks it, and `rebase -u` (Set-VHD -ParentPath) repairs it --
    # the linkage still matches, so no --ignore-id-mismatch is needed.
    from blockdrv.engines.rebase import rebase
    base, child = chain
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.move(child, sub / "child.vhdx")      # relative_path no longer resolves
    with pytest.raises(BlockDriverError, match="parent not found"):
        read_all(sub / "child.vhdx")
    rebase(str(sub / "child.vhdx"), "../base.vhdx", unsafe=True)
    assert read_all(sub / "child.vhdx")[:3 * MiB] == pattern(1, 3 * MiB)


def test_absolute_path_fallback_of_old_images(chain, tmp_path):
    # images written before kept the POSIX path as "\\?\\tmp\..." in
    # absolute_win32_path: still followed when relative_path fails
    from blockdrv.coroutine import run_sync
    from blockdrv.drivers.vhdx import parent as vparent
    base, child = chain
    with blockdrv.open_image(child, readonly=False) as img:
        vimg = img.bs.opaque
        old = vimg.params.parent_locator
        loc = vparent.ParentLocator(old.locator_type, dict(
            old.entries, absolute_win32_path="\\\\?\\" + str(base).replace("/", "\\")))

        async def write():
            async with vimg.lock:
                await vparent.co_write_locator(vimg, loc)
        run_sync(write())
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.move(child, sub / "child.vhdx")
    assert read_all(sub / "child.vhdx")[:3 * MiB] == pattern(1, 3 * MiB)


def test_backing_chain_cycle_is_refused(tmp_path):
    make_base(tmp_path / "base.vhdx")
    blockdrv.create_image(tmp_path / "a.vhdx", "vhdx", backing_file="base.vhdx").close()
    blockdrv.create_image(tmp_path / "b.vhdx", "vhdx", backing_file="a.vhdx").close()
    os.replace(tmp_path / "b.vhdx", tmp_path / "base.vhdx")      # a -> base(=b) -> a
    with pytest.raises(BlockDriverError, match="loops back"):
        blockdrv.open_image(tmp_path / "a.vhdx")


# ------------------------------------------------------------ check / map

def test_check_and_map(chain):
    base, child = chain
    with blockdrv.open_image(child, readonly=False) as img:
        img.write(512, b"\x22" * 1024)
        img.write(4 * MiB, b"\x33" * MiB)
    with vhdx_of(child) as bs:
        res = bs.check()
        assert res.corruptions == 0 and res.leaks == 0, res.messages
        entries = list(map_entries(bs))
    summary = [(e.start, e.length, e.depth, e.data) for e in entries]
    assert summary[:3] == [(0, 512, 1, True), (512, 1024, 0, True),
                           (1536, 3 * MiB - 1536, 1, True)]
    assert (4 * MiB, MiB, 0, True) in summary
    assert all(e.filename.endswith("base.vhdx") for e in entries if e.depth == 1 and e.data)


def test_check_finds_partially_present_without_bitmap(chain):
    base, child = chain
    with blockdrv.open_image(child, readonly=False) as img:
        img.write(512, b"\x22" * 512)
    with vhdx_of(child) as bs:
        img = bs.opaque
        at = img.bat_offset + bitmap_index(0, img.bat.chunk_ratio) * 8
    with open(child, "r+b") as f:             # drop the bitmap entry behind the log's back
        f.seek(at)
        f.write(struct.pack("<Q", 0))
    bs = open_node(str(child), "vhdx", 0x1000)     # O_CHECK
    with bs:
        res = bs.check()
    assert res.corruptions >= 1
    assert any("no sector bitmap block" in m for m in res.messages)
    # without its bitmap the block reads from the parent
    assert read_all(child)[:3 * MiB] == pattern(1, 3 * MiB)


def test_cli_create_and_info_json(tmp_path, capsys):
    make_base(tmp_path / "base.vhdx")
    child = tmp_path / "c.vhdx"
    assert cli_main(["create", "-q", "-f", "vhdx", "-b", "base.vhdx", "-F", "vhdx",
                     str(child)]) == 0
    assert cli_main(["info", "--output=json", str(child)]) == 0
    import json
    info = json.loads(capsys.readouterr().out)
    assert info["backing-filename"] == "base.vhdx"
    assert info["full-backing-filename"] == str(tmp_path / "base.vhdx")
    assert info["backing-filename-format"] == "vhdx"
    assert info["virtual-size"] == 8 * MiB
    assert "parent_linkage" in info["format-specific"]["data"]["parent-locator"]
    assert cli_main(["create", "-q", "-f", "vhdx", "-b", "base.vhdx", "-F", "raw",
                     str(tmp_path / "d.vhdx")]) == 1
    assert not (tmp_path / "d.vhdx").exists()
    assert cli_main(["create", "-q", "-f", "raw", "-b", "base.vhdx",
                     str(tmp_path / "e.raw"), "1M"]) == 1


# ------------------------------------------------------------ crash safety

def _crash_config(n: int) -> dict:
    return {"rules": [{"event": ["write", "flush"], "nth": n, "action": "crash",
                       "unflushed": "lose", "after_crash": "drop", "seed": n}]}


def test_partial_allocation_is_crash_safe(chain, tmp_path):
    """Cut one partial allocation (data, bitmap block, bitmap bits, BAT entries
    through the log) at every write/flush: the child then opens, checks clean
    (leaks allowed) and reads either the parent's sectors or the new ones."""
    base, child = chain
    pristine = tmp_path / "pristine.vhdx"
    shutil.copy(child, pristine)
    old = read_all(child)
    new = bytearray(old)
    new[MiB + 1024:MiB + 3072] = b"\x77" * 2048
    n = 1
    outcomes = set()
    while True:
        shutil.copy(pristine, child)
        try:
            bs = open_node(str(child), "vhdx", O_RDWR,
                           options={"file": {"driver": "blkdebug", "config": _crash_config(n)}})
        except BlockDriverError:
            n += 1
            continue
        st = blkdebug.state(bs)
        try:
            bs.pwrite(MiB + 1024, b"\x77" * 2048)
            bs.flush()
        except BlockDriverError:
            assert st.crashed
        finally:
            try:
                bs.close()
            except BlockDriverError:
                pass
        crashed = st.crashed
        with vhdx_of(child) as ro:                     # read-only: log replayed in memory
            got = ro.pread(0, ro.total_size)
        assert got in (old, new), f"cut {n}: neither old nor new data"
        with blockdrv.open_image(child, readonly=False) as img:       # replays
            assert img.read(0, img.size) == got
            res = img.check()
            assert res.corruptions == 0, (n, res.messages)
        outcomes.add(got == new)
        if not crashed:
            break
        n += 1
    assert outcomes == {False, True} and n > 5
