"""VHDX on-disk structures: parse/pack round trips and validation errors."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdrv.drivers.vhdx import bat as B
from blockdrv.drivers.vhdx import checksum
from blockdrv.drivers.vhdx import validate as V
from blockdrv.drivers.vhdx.constants import (BAT_GUID, FILE_PARAMETERS_GUID, HEADER_SIZE,
                                             METADATA_GUID, MiB, PAYLOAD_BLOCK_FULLY_PRESENT,
                                             PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_ZERO,
                                             REGION_TABLE_SIZE, SB_BLOCK_PRESENT, TiB,
                                             guid_from_bytes, guid_to_bytes, new_guid)
from blockdrv.drivers.vhdx.header import FileIdentifier, Header, select_current_header
from blockdrv.drivers.vhdx.metadata import (DiskParameters, MetadataEntry, MetadataTable,
                                            ParentLocator, build_metadata, read_metadata)
from blockdrv.drivers.vhdx.region import RegionEntry, RegionTable
from blockdrv.errors import CorruptImageError, UnsupportedError

guids = st.binary(min_size=16, max_size=16)
u64 = st.integers(0, 2**64 - 1)


def test_guid_helpers():
    raw = BAT_GUID
    assert str(guid_from_bytes(raw)).upper() == "2DC27766-F623-4200-9D64-115E9BFD4A08"
    assert guid_to_bytes(guid_from_bytes(raw)) == raw
    assert guid_from_bytes(new_guid()).version == 4


def test_checksum_seal_verify():
    buf = bytearray(b"x" * 100)
    crc = checksum.seal(buf)
    assert checksum.verify(buf) and checksum.stored(buf) == crc
    buf[50] ^= 1
    assert not checksum.verify(buf)


# --- file identifier / headers ---------------------------------------------

def test_file_identifier_round_trip():
    raw = FileIdentifier("QEMU v7.2.22").pack()
    assert raw[:8] == b"vhdxfile" and len(raw) == 520
    assert FileIdentifier.parse(raw).creator == "QEMU v7.2.22"
    with pytest.raises(CorruptImageError, match="signature"):
        FileIdentifier.parse(b"vhdxfilX" + bytes(512))


@settings(max_examples=50)
@given(seq=u64, fw=guids, dw=guids, lg=guids, ll=st.integers(0, 2**32 - 1), lo=u64)
def test_header_round_trip(seq, fw, dw, lg, ll, lo):
    h = Header(seq, fw, dw, lg, 0, 1, ll, lo)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE
    assert Header.parse(raw) == h


def _hdr(seq, **kw):
    kw.setdefault("log_offset", MiB)
    kw.setdefault("log_length", MiB)
    return Header(sequence_number=seq, **kw).pack()


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.__setitem__(slice(0, 4), b"heaD"), "signature"),
    (lambda b: b.__setitem__(4000, 1), "checksum"),
])
def test_header_invalid(mutate, message):
    raw = bytearray(_hdr(1))
    mutate(raw)
    with pytest.raises(CorruptImageError, match=message):
        Header.parse(raw)


def test_header_bad_version():
    raw = bytearray(_hdr(1))
    struct.pack_into("<H", raw, 66, 2)
    checksum.seal(raw)
    with pytest.raises(CorruptImageError, match="version"):
        Header.parse(raw)


def test_select_current_header():
    assert select_current_header(_hdr(5), _hdr(6))[0] == 1
    assert select_current_header(_hdr(7), _hdr(6))[0] == 0
    assert select_current_header(_hdr(5), bytes(4096))[0] == 0      # one valid header is enough
    assert select_current_header(bytes(4096), _hdr(5))[0] == 1
    assert select_current_header(_hdr(5), _hdr(5))[0] == 0          # identical: accepted
    with pytest.raises(CorruptImageError, match="equal sequence"):
        select_current_header(_hdr(5), _hdr(5, log_length=2 * MiB))
    with pytest.raises(CorruptImageError, match="No valid VHDX header"):
        select_current_header(bytes(4096), bytes(4096))


@pytest.mark.parametrize("kw, exc", [
    (dict(log_offset=MiB + 4096), CorruptImageError),
    (dict(log_length=MiB + 1), CorruptImageError),
    (dict(log_offset=0), CorruptImageError),                               # inside header section
    (dict(log_guid=b"\1" * 16, log_length=0, log_offset=0), CorruptImageError),
    (dict(log_guid=b"\1" * 16, log_version=1), UnsupportedError),
])
def test_header_log_fields(kw, exc):
    with pytest.raises(exc):
        select_current_header(_hdr(1, **kw), bytes(4096))


def test_header_log_version_ignored_without_log():
    select_current_header(_hdr(1, log_version=3), bytes(4096))


# --- region table ----------------------------------------------------------

def _rt(*entries):
    return RegionTable(list(entries))


GOOD_RT = (RegionEntry(BAT_GUID, 2 * MiB, MiB), RegionEntry(METADATA_GUID, 3 * MiB, MiB))


@settings(max_examples=30)
@given(st.lists(st.tuples(guids, u64, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                max_size=20))
def test_region_table_round_trip(entries):
    rt = _rt(*(RegionEntry(*e) for e in entries))
    raw = rt.pack()
    assert len(raw) == REGION_TABLE_SIZE
    assert RegionTable.parse(raw).entries == rt.entries


def test_region_table_valid():
    rt = RegionTable.parse(_rt(*GOOD_RT).pack())
    rt.validate(MiB, MiB, file_size=8 * MiB)
    assert rt.bat.file_offset == 2 * MiB and rt.metadata.file_offset == 3 * MiB


def test_region_table_parse_errors():
    raw = bytearray(_rt(*GOOD_RT).pack())
    raw[100] = 1
    with pytest.raises(CorruptImageError, match="checksum"):
        RegionTable.parse(raw)
    raw = bytearray(REGION_TABLE_SIZE)
    raw[:4] = b"regi"
    struct.pack_into("<I", raw, 8, 2048)
    checksum.seal(raw)
    with pytest.raises(CorruptImageError, match="too many"):
        RegionTable.parse(raw)
    with pytest.raises(CorruptImageError, match="signature"):
        RegionTable.parse(bytes(REGION_TABLE_SIZE))


UNKNOWN = bytes(range(16))


@pytest.mark.parametrize("entries, exc, message", [
    ((GOOD_RT[0],), CorruptImageError, "no metadata"),
    ((GOOD_RT[1],), CorruptImageError, "no BAT"),
    (GOOD_RT + (GOOD_RT[0],), CorruptImageError, "twice"),
    ((RegionEntry(BAT_GUID, 2 * MiB + 4096, MiB), GOOD_RT[1]), CorruptImageError, "aligned"),
    ((RegionEntry(BAT_GUID, 2 * MiB, MiB + 512), GOOD_RT[1]), CorruptImageError, "aligned"),
    ((RegionEntry(BAT_GUID, 2 * MiB, 2 * MiB), GOOD_RT[1]), CorruptImageError, "overlap"),
    ((RegionEntry(BAT_GUID, 0, MiB), GOOD_RT[1]), CorruptImageError, "overlap"),
    ((RegionEntry(BAT_GUID, MiB, MiB), GOOD_RT[1]), CorruptImageError,
     "BAT and log regions overlap"),
    (GOOD_RT + (RegionEntry(UNKNOWN, 9 * MiB, MiB, 1),), UnsupportedError, "required"),
    ((RegionEntry(BAT_GUID, 2 * MiB, MiB), RegionEntry(METADATA_GUID, 30 * MiB, MiB)),
     CorruptImageError, "beyond"),
])
def test_region_table_invalid(entries, exc, message):
    with pytest.raises(exc, match=message):
        _rt(*entries).validate(MiB, MiB, file_size=8 * MiB)


def test_region_table_unknown_optional_ok():
    _rt(*GOOD_RT, RegionEntry(UNKNOWN, 9 * MiB, MiB, 0)).validate(MiB, MiB)


# --- metadata --------------------------------------------------------------

def _params(**kw):
    base = dict(block_size=8 * MiB, virtual_size=10 * MiB + 512, page83=new_guid())
    base.update(kw)
    return DiskParameters(**base)


def _region(params=None, table=None, items=None, length=MiB):
    t, i = build_metadata(params or _params())
    region = bytearray(length)
    region[:len(table or t)] = table or t
    region[65536:65536 + len(items or i)] = items or i
    return region


def _read(region):
    return lambda off, n: bytes(region[off:off + n])


def test_metadata_round_trip():
    p = _params(logical_sector_size=4096, physical_sector_size=4096, leave_blocks_allocated=True,
                virtual_size=10 * MiB + 4096)
    table, parsed = read_metadata(_read(_region(p)), MiB)
    assert parsed == p
    assert MetadataTable.parse(table.pack()) == table
    assert [e.offset for e in table.entries] == [65536, 65544, 65552, 65568, 65572]
    assert [e.flags for e in table.entries] == [4, 6, 6, 6, 6]


@settings(max_examples=30)
@given(st.lists(st.tuples(guids, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=30))
def test_metadata_table_round_trip(entries):
    t = MetadataTable([MetadataEntry(*e) for e in entries])
    assert MetadataTable.parse(t.pack()) == t


def test_parent_locator_round_trip():
    loc = ParentLocator(new_guid(), {"parent_linkage": "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}",
                                      "relative_path": r"..\parent.vhdx"})
    assert ParentLocator.parse(loc.pack()) == loc


def _with_table(mutate):
    table, items = build_metadata(_params())
    t = MetadataTable.parse(table)
    mutate(t)
    return _region(table=t.pack(), items=items)


@pytest.mark.parametrize("mutate, exc, message", [
    (lambda t: t.entries.pop(2), CorruptImageError, "no page 83"),
    (lambda t: t.entries.append(t.entries[0]), CorruptImageError, "twice"),
    (lambda t: setattr(t.entries[0], "offset", 100), CorruptImageError, "outside"),
    (lambda t: setattr(t.entries[0], "offset", MiB - 4), CorruptImageError, "outside"),
    (lambda t: setattr(t.entries[0], "length", 4), CorruptImageError, "too short"),
    (lambda t: setattr(t.entries[1], "offset", 65540), CorruptImageError, "overlap"),
    (lambda t: t.entries.append(MetadataEntry(UNKNOWN, 70000, 8, 4)), UnsupportedError, "required"),
    (lambda t: t.entries.append(MetadataEntry(UNKNOWN, 0, 8, 0)), CorruptImageError, "outside"),
])
def test_metadata_invalid_table(mutate, exc, message):
    with pytest.raises(exc, match=message):
        read_metadata(_read(_with_table(mutate)), MiB)


def test_metadata_unknown_optional_ok():
    region = _with_table(lambda t: t.entries.append(MetadataEntry(UNKNOWN, 70000, 8, 0)))
    read_metadata(_read(region), MiB)


def test_metadata_too_many_entries():
    raw = bytearray(MetadataTable().pack())
    struct.pack_into("<H", raw, 10, 2048)
    with pytest.raises(CorruptImageError, match="too many"):
        MetadataTable.parse(raw)


@pytest.mark.parametrize("kw, exc, message", [
    (dict(block_size=3 * MiB), CorruptImageError, "block size"),
    (dict(block_size=512 * 1024), CorruptImageError, "block size"),
    (dict(block_size=512 * MiB), CorruptImageError, "block size"),
    (dict(logical_sector_size=1024), CorruptImageError, "logical"),
    (dict(physical_sector_size=2048), CorruptImageError, "physical"),
    (dict(logical_sector_size=4096), CorruptImageError, "multiple"),
    (dict(virtual_size=64 * TiB + 512), CorruptImageError, "64 TiB"),
    (dict(has_parent=True), CorruptImageError, "parent locator"),
    (dict(has_parent=True, parent_locator=ParentLocator(new_guid(), {"a": "b"})),
     UnsupportedError, "differencing"),
])
def test_disk_parameters_invalid(kw, exc, message):
    with pytest.raises(exc, match=message):
        read_metadata(_read(_region(_params(**kw))), MiB)


def test_metadata_region_too_small():
    with pytest.raises(CorruptImageError):
        read_metadata(_read(_region()), 4096)


# --- BAT -------------------------------------------------------------------

@pytest.mark.parametrize("size, bs, lss, expect", [
    (0, 8 * MiB, 512, 0),
    (MiB, 8 * MiB, 512, 1),
    (10 * MiB + 512, 8 * MiB, 512, 2),
    (512 * 8 * MiB, 8 * MiB, 512, 512),          # exactly one chunk: no trailing bitmap entry
    (513 * 8 * MiB, 8 * MiB, 512, 514),
    (64 * TiB, MiB, 512, 2**26 + (2**26 - 1) // 4096),
    (64 * TiB, 64 * MiB, 512, 2**20 + (2**20 - 1) // 64),
])
def test_total_entries(size, bs, lss, expect):
    assert B.total_entries(size, bs, lss) == expect


def test_chunk_ratio_and_indices():
    assert B.chunk_ratio(MiB, 512) == 4096
    assert B.chunk_ratio(256 * MiB, 512) == 16
    assert B.chunk_ratio(MiB, 4096) == 32768
    assert B.payload_index(15, 16) == 15 and B.payload_index(16, 16) == 17
    assert B.bitmap_index(0, 16) == 16 and B.bitmap_index(1, 16) == 33
    assert B.total_entries(MiB, MiB, 512, differencing=True) == 4097


@given(st.integers(0, 7), st.integers(0, 2**44 - 1))
def test_entry_round_trip(state, mb):
    assert B.decode_entry(B.encode_entry(state, mb * MiB)) == (state, mb * MiB)


def test_encode_entry_rejects_misaligned():
    with pytest.raises(ValueError):
        B.encode_entry(6, MiB + 1)


def new_bat(size: int, bs: int) -> B.Bat:
    """An all-zero (NOT_PRESENT) writable BAT sized like qemu's region."""
    return B.Bat(bytearray(B.region_length(B.total_entries(size, bs, 512))), size, bs)


def problems(f) -> np.ndarray:
    """Entries the validator flags, as a mask parallel to ``f.idx``."""
    return (f.past_eof | f.cut_short | f.in_metadata | f.overlapping | f.partial
            | f.bad_state | f.reserved | f.stray_bitmap)


def test_bat_views_skip_bitmap_entries():
    bs = 256 * MiB                                   # chunk ratio 16
    t = new_bat(40 * bs, bs)
    assert t.total_entries == 40 + 2
    values = np.arange(40, dtype=np.uint64) * np.uint64(MiB) | np.uint64(6)
    for block, value in enumerate(values.tolist()):
        t.set(block, value & 7, value & ~7)
    assert np.array_equal(t.payload_entries(), values)
    assert t.entries[16] == 0 and t.entries[33] == 0   # bitmap entries untouched
    assert t.get(16) == (6, 16 * MiB)
    assert t.set(17, 2) == 18
    assert t.to_bytes()[18 * 8:19 * 8] == struct.pack("<Q", 2)
    assert t.count_states() == {6: 39, 2: 1}


def test_bat_region_too_small():
    with pytest.raises(CorruptImageError):
        B.Bat(bytearray(8), 10 * MiB, MiB)


def test_validator_finds_problems():
    bs = MiB
    size = 8 * MiB
    t = new_bat(size, bs)
    t.set(0, PAYLOAD_BLOCK_FULLY_PRESENT, 10 * MiB)
    t.set(1, PAYLOAD_BLOCK_FULLY_PRESENT, 10 * MiB)          # duplicate
    t.set(2, PAYLOAD_BLOCK_FULLY_PRESENT, 2 * MiB)           # inside the BAT region
    t.set(3, PAYLOAD_BLOCK_FULLY_PRESENT, 0)                 # header section
    t.set(4, PAYLOAD_BLOCK_FULLY_PRESENT, 100 * MiB)         # beyond EOF
    t.set(5, PAYLOAD_BLOCK_PARTIALLY_PRESENT, 12 * MiB)      # not valid outside differencing
    t.set(6, 4)                                              # undefined state
    t.entries[7] = np.uint64(PAYLOAD_BLOCK_ZERO | 0x100)     # reserved bits
    spans = [(MiB, 2 * MiB), (2 * MiB, 3 * MiB), (3 * MiB, 4 * MiB)]
    f = V.scan(t, 20 * MiB, spans)
    assert list(f.block[f.overlapping]) == [1]
    assert list(f.block[f.in_metadata]) == [2, 3]           # a region, the header
    assert list(f.start[f.in_metadata]) == [2 * MiB, 0]
    assert list(f.block[f.past_eof]) == [4]
    assert list(f.block[f.partial]) == [5]
    assert list(f.block[f.bad_state]) == [6]
    assert list(f.block[f.reserved]) == [7]
    assert int(problems(f).sum()) == 7
    # open refuses the first entry the same rules find
    layout = SimpleNamespace(bat=t, structure_spans=lambda: [(0, MiB)] + spans)
    with pytest.raises(CorruptImageError, match="block 2 points into VHDX metadata"):
        V.refuse_at_open(layout, 20 * MiB)


def test_validator_partial_last_block_and_bitmaps():
    bs = 256 * MiB
    size = 17 * bs - 512 * 1024                               # short last block
    t = new_bat(size, bs)
    for b in range(17):
        t.set(b, PAYLOAD_BLOCK_FULLY_PRESENT, 8 * MiB + b * bs)
    file_end = 8 * MiB + size
    assert not problems(V.scan(B.Bat(t.buf, size, bs), file_end, [])).any()
    t.entries[16] = np.uint64(SB_BLOCK_PRESENT | (4000 * MiB))
    f = V.scan(t, file_end, [])
    assert list(f.idx[f.stray_bitmap]) == [16]
    f = V.scan(t, file_end - 1, [])
    assert list(f.block[f.past_eof | f.cut_short]) == [16]
