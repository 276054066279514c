"""qcow2 on-disk structures: parse/pack round trips and refusals (no qemu)."""

from __future__ import annotations

import re
import struct

import pytest

from blockdrv.errors import InvalidArgumentError, UnsupportedError
from blockdrv.drivers.qcow2 import l2 as L
from blockdrv.drivers.qcow2 import refcount as rc
from blockdrv.drivers.qcow2.constants import (COMPAT_LAZY_REFCOUNTS, EXT_FEATURE_TABLE,
                                              INCOMPAT_EXTL2)
from blockdrv.drivers.qcow2.header import Header
from blockdrv.drivers.qcow2.snapshot import Snapshot, parse_table


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("cbits", [9, 12, 16, 21])
def test_header_round_trip(version, cbits):
    h = Header(version=version, cluster_bits=cbits, size=5 << 30, l1_size=3,
               l1_table_offset=3 << cbits, refcount_table_offset=1 << cbits,
               refcount_table_clusters=1, backing_file="base.raw", backing_format="raw")
    if version == 3:
        h.compatible_features = COMPAT_LAZY_REFCOUNTS
        h.incompatible_features = INCOMPAT_EXTL2 if cbits >= 14 else 0
    buf = h.pack()
    assert len(buf) == 1 << cbits
    back = Header.parse(buf)
    for name in ("version", "cluster_bits", "size", "l1_size", "l1_table_offset",
                 "refcount_table_offset", "backing_file", "backing_format",
                 "compatible_features", "incompatible_features"):
        assert getattr(back, name) == getattr(h, name), name
    assert back.pack() == buf
    # qemu leaves the feature table out of clusters of 4 KiB and less
    has_table = any(e.type == EXT_FEATURE_TABLE for e in back.extensions)
    assert has_table == (version == 3 and cbits > 12)


@pytest.mark.parametrize("patch,message", [
    ((0, b"QFI\xfa"), "Image is not in qcow2 format"),
    ((4, struct.pack(">I", 4)), "Unsupported qcow2 version 4"),
    ((20, struct.pack(">I", 22)), "Unsupported cluster size: 2^22"),
    ((20, struct.pack(">I", 8)), "Unsupported cluster size: 2^8"),
    ((96, struct.pack(">I", 7)), "Reference count entry width too large; may not exceed "
                                 "64 bits"),
    ((100, struct.pack(">I", 100)), "qcow2 header too short"),
    ((8, struct.pack(">Q", 1 << 20)), "Invalid backing file offset"),
])
def test_header_refusals(patch, message):
    buf = bytearray(Header(refcount_table_offset=65536).pack())
    off, data = patch
    buf[off:off + len(data)] = data
    with pytest.raises((InvalidArgumentError, UnsupportedError), match=f"^{re.escape(message)}$"):
        Header.parse(bytes(buf))


def test_unknown_incompatible_features_are_named():
    buf = bytearray(Header().pack())
    struct.pack_into(">Q", buf, 72, (1 << 4) | (1 << 9) | (1 << 40))
    # bit 4 is known (extended L2); 9 and 40 are not, and the table has no names
    with pytest.raises(UnsupportedError,
                       match=r"^Unsupported qcow2 feature\(s\): Unknown incompatible "
                             r"feature: 10000000200$"):
        Header.parse(bytes(buf))


def test_unknown_feature_named_by_the_table():
    h = Header()
    buf = bytearray(h.pack())
    # rename table entry 0 (dirty bit) to bit 9 with a name of its own
    table = buf.index(b"dirty bit") - 2
    buf[table:table + 48] = struct.pack(">BB46s", 0, 9, b"future feature")
    struct.pack_into(">Q", buf, 72, 1 << 9)
    with pytest.raises(UnsupportedError, match=r"^Unsupported qcow2 feature\(s\): "
                                               r"future feature$"):
        Header.parse(bytes(buf))


def test_l2_entry_kinds():
    assert L.cluster_type(0, False) == L.UNALLOCATED
    assert L.cluster_type(1, False) == L.ZERO_PLAIN
    assert L.cluster_type(0x10000 | 1 | L.OFLAG_COPIED, False) == L.ZERO_ALLOC
    assert L.cluster_type(0x10000 | L.OFLAG_COPIED, False) == L.NORMAL
    assert L.cluster_type(L.OFLAG_COMPRESSED | 5, False) == L.COMPRESSED
    # extended L2: the zero flag is ignored, the bitmap decides
    entry = 0x30000 | L.OFLAG_COPIED
    bitmap = L.alloc_range_bitmap(0, 4) | L.zero_range_bitmap(4, 2)
    kinds = [L.subcluster_type(entry, bitmap, i) for i in range(8)]
    assert kinds == [L.NORMAL] * 4 + [L.ZERO_ALLOC] * 2 + [L.UNALLOCATED_ALLOC] * 2
    assert L.subcluster_type(entry, 1 | 1 << 32, 0) == L.INVALID
    assert L.subcluster_type(0, L.zero_range_bitmap(3, 1), 3) == L.ZERO_PLAIN
    assert L.subcluster_type(0, 1, 0) == L.INVALID
    assert L.subcluster_type(L.OFLAG_COMPRESSED | 5, 1, 0) == L.INVALID


@pytest.mark.parametrize("cbits", [9, 16, 21])
@pytest.mark.parametrize("offset,size", [(0x12345600, 512), (0x12345601, 1000),
                                         (0x7fff_ffff_fe00, 4096)])
def test_compressed_descriptor_round_trip(cbits, offset, size):
    if size > 1 << cbits:
        return
    d = L.parse_compressed(L.pack_compressed(offset, size, cbits), cbits)
    assert d.offset == offset
    assert d.size >= size and (d.offset + d.size) % 512 == 0


@pytest.mark.parametrize("order", range(7))
def test_refcounts_every_width(order):
    cs = 512
    n = rc.entries_per_block(cs, order)
    block = bytearray(cs)
    top = (1 << (1 << order)) - 1
    values = [(i * 7919) & top for i in range(n)]
    for i, v in enumerate(values):
        rc.put(block, i, order, v)
    assert [rc.get(block, i, order) for i in range(n)] == values
    with pytest.raises(ValueError):
        rc.put(block, 0, order, top + 1)


def test_refcount_sub_byte_layout_is_lsb_first():
    block = bytearray(2)
    rc.put(block, 0, 0, 1)
    rc.put(block, 9, 0, 1)
    assert block == bytearray([0x01, 0x02])
    block = bytearray(1)
    rc.put(block, 1, 1, 3)
    assert block == bytearray([0x0c])


def test_refcount_table_round_trip():
    table = [0x20000, 0, 0x1230000]
    assert rc.parse_table(rc.pack_table(table), 3) == table


def test_refcount_metadata_fixed_point():
    blocks, table = rc.metadata_clusters(3, 65536, 4, False)
    assert (blocks, table) == (1, 1)
    blocks, table = rc.metadata_clusters(10**6, 512, 6, False)
    per_block = 512 * 8 // 64
    assert blocks * per_block >= 10**6 + blocks + table
    assert table * 64 >= blocks


def test_snapshot_table_round_trip():
    snaps = [Snapshot(id="1", name="before upgrade", l1_table_offset=0x50000, l1_size=2,
                      date_sec=1700000000, date_nsec=5, vm_clock_nsec=3_500_000_000,
                      vm_state_size=1 << 33, disk_size=1 << 30, icount=-1),
             Snapshot(id="2", name="", l1_table_offset=0x60000, l1_size=2, disk_size=7,
                      icount=99)]
    raw = b"".join(s.pack() for s in snaps)
    back, length = parse_table(raw, 2)
    assert length == len(raw)
    assert [(s.id, s.name, s.vm_state_size, s.disk_size, s.icount) for s in back] == [
        ("1", "before upgrade", 1 << 33, 1 << 30, -1), ("2", "", 0, 7, 99)]
    first, second = (s.info().to_qapi() for s in back)
    assert first["vm-clock-sec"] == 3 and "icount" not in first
    assert second["icount"] == 99


def test_snapshot_table_refusals():
    with pytest.raises(InvalidArgumentError, match="Snapshot table exceeds the file"):
        parse_table(Snapshot(id="1", name="x").pack()[:30], 1)
    raw = bytearray(Snapshot(id="1", name="x").pack())
    struct.pack_into(">I", raw, 36, 2000)
    with pytest.raises(InvalidArgumentError, match="Too much extra metadata"):
        parse_table(bytes(raw), 1)
