"""VHDX resize (``bdrv_co_truncate``): grow in place, grow with BAT
relocation, shrink, fixed images; one log entry per resize; crash replay."""

from __future__ import annotations

import os

import numpy as np
import pytest

import blockdrv
from blockdrv.block import open_node
from blockdrv.drivers.vhdx import log as vlog
from blockdrv.drivers.vhdx.bat import total_entries
from blockdrv.drivers.vhdx.constants import (PAYLOAD_BLOCK_FULLY_PRESENT,
                                             PAYLOAD_BLOCK_ZERO)
from blockdrv.errors import InvalidArgumentError, UnsupportedError
from blockdrv.common import O_RDWR
from blockdrv.testing.crash import abandon

MiB = 1 << 20
GiB = 1 << 30


def make(tmp_path, size, name="a.vhdx", **opts):
    path = str(tmp_path / name)
    opts.setdefault("block_size", MiB)
    blockdrv.create_image(path, "vhdx", size, **opts).close()
    return path


def rw(path):
    return blockdrv.open_image(path, "vhdx", readonly=False)


def ro(path):
    return blockdrv.open_image(path, "vhdx")


class Spy:
    """Records the entries the log writer journals."""

    def __init__(self, monkeypatch):
        self.entries = []
        orig = vlog.LogWriter.co_write_sectors_and_flush
        spy = self

        async def wrapped(writer, file, updates, set_log_guid, *, zeros=(), new_guid=None):
            zeros = list(zeros)
            spy.entries.append(([off for off, _ in updates], zeros))
            return await orig(writer, file, updates, set_log_guid, zeros=zeros,
                              new_guid=new_guid)

        monkeypatch.setattr(vlog.LogWriter, "co_write_sectors_and_flush", wrapped)


def test_grow_in_place_one_entry(tmp_path, monkeypatch):
    path = make(tmp_path, 16 * MiB)
    with rw(path) as img:
        img.write(3 * MiB, b"\xab" * 4096)
        bat_before = img.bs.opaque.bat_offset
        spy = Spy(monkeypatch)
        img.resize(40 * MiB)
        assert img.size == 40 * MiB == img.bs.opaque.virtual_size
        assert img.bs.opaque.bat_offset == bat_before
        img.write(39 * MiB, b"\xcd" * 512)
    assert len(spy.entries) == 1                  # the resize (allocations: write_and_flush)
    with ro(path) as img:
        assert img.size == 40 * MiB
        assert img.read(3 * MiB, 4096) == b"\xab" * 4096
        assert img.read(16 * MiB, 23 * MiB) == bytes(23 * MiB)
        assert img.read(39 * MiB, 512) == b"\xcd" * 512
        assert img.check().corruptions == 0
        assert img.bs.opaque.bat.total_entries == total_entries(40 * MiB, MiB, 512)


def test_grow_zero_state_image_writes_bat_and_size_in_one_entry(tmp_path, monkeypatch):
    # a dynamic image whose unallocated blocks are ZERO (qemu's default)
    path = make(tmp_path, 16 * MiB, block_state_zero=True)
    with rw(path) as img:
        assert set(img.bs.opaque.bat.count_states()) == {PAYLOAD_BLOCK_ZERO}
        spy = Spy(monkeypatch)
        img.resize(64 * MiB)
        states = img.bs.opaque.bat.states()
    assert len(spy.entries) == 1
    offsets, zeros = spy.entries[0]
    assert len(offsets) == 2 and not zeros       # one BAT sector + the metadata sector
    assert set(states.tolist()) == {PAYLOAD_BLOCK_ZERO}


def test_grow_fixed_allocates_blocks_at_end(tmp_path):
    path = make(tmp_path, 6 * MiB, subformat="fixed", block_state_zero=False)
    with rw(path) as img:
        img.write(0, b"\x11" * MiB)
        flen = os.path.getsize(path)
        img.resize(10 * MiB)
        img.write(9 * MiB, b"\x22" * MiB)
    with ro(path) as img:
        bat = img.bs.opaque.bat
        assert (bat.states() == PAYLOAD_BLOCK_FULLY_PRESENT).all()
        offs = bat.offsets()
        assert list(offs[6:]) == [flen + i * MiB for i in range(4)]
        assert img.read(0, MiB) == b"\x11" * MiB
        assert img.read(6 * MiB, 3 * MiB) == bytes(3 * MiB)
        assert img.read(9 * MiB, MiB) == b"\x22" * MiB
        assert img.check().corruptions == 0
    assert os.path.getsize(path) == flen + 4 * MiB


def test_grow_relocates_bat(tmp_path, monkeypatch):
    path = make(tmp_path, 127 * GiB)
    with rw(path) as img:
        img.write(0, b"\x01" * 4096)
        img.write(127 * GiB - 4096, b"\x02" * 4096)
        old = img.bs.opaque.region_table.bat
        old_off, old_len = old.file_offset, old.length
        flen = os.path.getsize(path)
        spy = Spy(monkeypatch)
        img.resize(130 * GiB)
        new = img.bs.opaque.region_table.bat
        assert new.file_offset == flen and new.length == 2 * MiB
        img.write(130 * GiB - 512, b"\x03" * 512)
    offsets, zeros = spy.entries[0]
    # region table 1, region table 2, the metadata sector: nothing else
    assert offsets[:2] == [192 * 1024, 256 * 1024] and len(offsets) == 3 and not zeros
    with ro(path) as img:
        assert img.size == 130 * GiB
        assert img.bs.opaque.bat_offset == flen != old_off
        assert img.read(0, 4096) == b"\x01" * 4096
        assert img.read(127 * GiB - 4096, 4096) == b"\x02" * 4096
        assert img.read(130 * GiB - 512, 512) == b"\x03" * 512
        assert img.read(128 * GiB, MiB) == bytes(MiB)
        assert img.check().corruptions == 0
    assert old_len == MiB


def test_shrink_drops_entries_and_trims_file(tmp_path, monkeypatch):
    path = make(tmp_path, 24 * MiB)
    with rw(path) as img:
        for b in (1, 8, 20, 23):
            img.write(b * MiB, bytes([b]) * 4096)
        img.flush()
        full = os.path.getsize(path)
        spy = Spy(monkeypatch)
        img.resize(10 * MiB)
        assert img.size == 10 * MiB
    assert os.path.getsize(path) < full           # blocks 20, 23 were at the end
    offsets, zeros = spy.entries[0]
    # 24 entries share one BAT sector: it is journaled as data (entries 10..23
    # zeroed), with the metadata sector; no whole sector becomes zero
    assert len(offsets) == 2 and not zeros
    with ro(path) as img:
        assert img.read(MiB, 4096) == b"\x01" * 4096
        assert img.read(8 * MiB, 4096) == b"\x08" * 4096
        assert img.check().corruptions == img.check().leaks == 0
        raw = open(path, "rb").read()
        off = img.bs.opaque.bat_offset
        n = total_entries(24 * MiB, MiB, 512)
        table = np.frombuffer(raw[off:off + 8 * n], "<u8")
        assert not table[total_entries(10 * MiB, MiB, 512):].any()   # dropped: zeroed


def test_shrink_then_grow_reads_zeros(tmp_path):
    """The tail of a block cut mid-way must not come back on a later grow."""
    path = make(tmp_path, 8 * MiB)
    with rw(path) as img:
        img.write(2 * MiB, b"\x77" * MiB)
        img.resize(2 * MiB + 4096)
        img.resize(8 * MiB)
        assert img.read(2 * MiB, 4096) == b"\x77" * 4096
        assert img.read(2 * MiB + 4096, MiB - 4096) == bytes(MiB - 4096)
    with ro(path) as img:
        assert img.read(2 * MiB + 4096, MiB - 4096) == bytes(MiB - 4096)
        assert img.check().corruptions == 0


def test_grow_short_last_block_of_fixed_image(tmp_path):
    path = make(tmp_path, 10 * MiB + 512 * 1024, subformat="fixed", block_state_zero=False)
    with rw(path) as img:
        img.write(0, b"\x5a" * (10 * MiB + 512 * 1024))
        img.resize(20 * MiB)
    with ro(path) as img:
        assert img.read(10 * MiB, 512 * 1024) == b"\x5a" * (512 * 1024)
        assert img.read(10 * MiB + 512 * 1024, 512 * 1024) == bytes(512 * 1024)
        assert img.read(11 * MiB, 9 * MiB) == bytes(9 * MiB)
        assert img.check().corruptions == 0


def test_shrink_uses_zero_descriptors_for_whole_sectors(tmp_path, monkeypatch):
    path = make(tmp_path, 8 * GiB)              # 8192 + 1 entries: 17 BAT sectors
    with rw(path) as img:
        img.write(0, b"\x01" * 512)
        spy = Spy(monkeypatch)
        img.resize(GiB + MiB)                     # 1025 entries: ends mid-sector
        assert set(img.bs.opaque.bat.states()[1:].tolist()) == {PAYLOAD_BLOCK_ZERO}
    offsets, zeros = spy.entries[0]
    assert len(offsets) == 2 and len(zeros) == 1   # boundary sector, metadata; one run
    with ro(path) as img:
        assert img.size == GiB + MiB and img.read(0, 512) == b"\x01" * 512
        assert img.check().corruptions == 0


def test_reopen_sees_new_size_and_log_is_clean(tmp_path):
    path = make(tmp_path, 4 * MiB)
    with rw(path) as img:
        img.resize(12 * MiB)
    with ro(path) as img:
        assert img.size == 12 * MiB
        assert img.bs.opaque.header.log_guid == bytes(16)
        assert img.info().format_specific["log-pending"] is False


@pytest.mark.parametrize("size", [8 * MiB + 100, (64 << 40) + 512, -512])
def test_bad_sizes(tmp_path, size):
    path = make(tmp_path, 8 * MiB)
    with rw(path) as img, pytest.raises(InvalidArgumentError):
        img.resize(size)
    with ro(path) as img:
        assert img.size == 8 * MiB


def test_preallocation_refused(tmp_path):
    path = make(tmp_path, 8 * MiB)
    bs = open_node(path, "vhdx", O_RDWR)
    try:
        with pytest.raises(UnsupportedError):
            bs.truncate(16 * MiB, prealloc="full")
    finally:
        bs.close()


def test_4k_sectors(tmp_path):
    path = make(tmp_path, 8 * MiB, logical_sector_size=4096)
    with rw(path) as img:
        img.write(7 * MiB, b"\x09" * 4096)
        with pytest.raises(InvalidArgumentError):
            img.resize(16 * MiB + 512)
        img.resize(16 * MiB)
    with ro(path) as img:
        assert img.size == 16 * MiB
        assert img.read(7 * MiB, 4096) == b"\x09" * 4096


class _Cut(Exception):
    pass


@pytest.mark.parametrize("new", [40 * MiB, 4 * MiB])
def test_crash_after_log_guid_replays_new_size(tmp_path, monkeypatch, new):
    """Power lost after the entry is durable and the LogGuid set, before the
    sectors reach their place: the next open replays to the new size."""
    path = make(tmp_path, 16 * MiB)
    with rw(path) as img:
        img.write(MiB, b"\x42" * 4096)

    async def cut(writer, file, updates, set_log_guid, *, zeros=(), new_guid=None):
        size = file.getlength()
        entry = vlog.build_entry(writer.sequence, b"g" * 16, writer.tail, updates,
                                 zeros=list(zeros), flushed_file_offset=size,
                                 last_file_offset=size)
        await writer.co_write_entry(file, entry)
        await file.co_flush()
        await set_log_guid(b"g" * 16)
        raise _Cut()

    img = rw(path)
    monkeypatch.setattr(vlog.LogWriter, "co_write_sectors_and_flush", cut)
    with pytest.raises(_Cut):
        img.resize(new)
    monkeypatch.undo()
    abandon(img.bs)                     # as a crash would: locks released, nothing flushed
    with ro(path) as img:               # in-memory replay
        assert img.size == new and img.info().is_dirty
        assert img.read(MiB, 4096) == b"\x42" * 4096
    with rw(path) as img:
        assert img.size == new
        assert img.check().corruptions == 0
