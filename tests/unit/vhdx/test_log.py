"""Unit tests of the VHDX journal: structures, replay (spec 2.3.3), writer."""

from __future__ import annotations

import random
import struct
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdrv.drivers.vhdx import log as L
from blockdrv.errors import CorruptImageError, InvalidArgumentError

MiB = 1 << 20
LOG_OFF, LOG_LEN = MiB, MiB
GUID = bytes(range(1, 17))
OTHER = bytes(range(17, 33))


class MemFile:
    """The node interface over a bytearray; strict like a node: no I/O past EOF."""

    def __init__(self, size_or_data=4 * MiB) -> None:
        self.buf = (bytearray(size_or_data) if isinstance(size_or_data, int)
                    else bytearray(size_or_data))
        self.ops: list[tuple] = []

    def pread(self, offset, nbytes):
        assert 0 <= offset and offset + nbytes <= len(self.buf), "read past EOF"
        self.ops.append(("read", offset, nbytes))
        return bytes(self.buf[offset:offset + nbytes])

    def pwrite(self, offset, data):
        assert 0 <= offset and offset + len(data) <= len(self.buf), "write past EOF"
        self.ops.append(("write", offset, len(data)))
        self.buf[offset:offset + len(data)] = data

    def flush(self):
        self.ops.append(("flush",))

    def getlength(self):
        return len(self.buf)

    def truncate(self, length):
        self.ops.append(("truncate", length))
        if length < len(self.buf):
            del self.buf[length:]
        else:
            self.buf += bytes(length - len(self.buf))

    def writes(self):
        return [op for op in self.ops if op[0] in ("write", "truncate")]


def hdr(guid=GUID, off=LOG_OFF, length=LOG_LEN):
    return SimpleNamespace(log_guid=guid, log_offset=off, log_length=length, log_version=0)


def put(f: MemFile, pos: int, entry: bytes, log_len: int = LOG_LEN) -> None:
    """Place an entry in the ring at ``pos``, wrapping like a writer does."""
    for i in range(0, len(entry), L.SECTOR):
        p = (pos + i) % log_len
        f.buf[LOG_OFF + p:LOG_OFF + p + L.SECTOR] = entry[i:i + L.SECTOR]


def sector(fill: int) -> bytes:
    return bytes([fill]) * L.SECTOR


def mk(seq, tail, updates=(), zeros=(), guid=GUID, flushed=4 * MiB, last=4 * MiB):
    return L.build_entry(seq, guid, tail, updates, zeros=zeros,
                         flushed_file_offset=flushed, last_file_offset=last)


# --- structures -----------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
# 4 KiB of arbitrary bytes, cheap for hypothesis to generate (it dislikes big binaries).
sector_bytes = st.integers(0, 2**64).map(lambda s: random.Random(s).randbytes(4096))


@given(st.builds(L.LogEntryHeader, u32, u32, u64, u32, st.binary(min_size=16, max_size=16),
                 u64, u64, u32, u32, st.binary(min_size=4, max_size=4)))
def test_entry_header_roundtrip(h):
    assert len(h.pack()) == 64 and L.LogEntryHeader.parse(h.pack()) == h


@given(st.builds(L.ZeroDescriptor, u64, u64, u64, u32, st.binary(min_size=4, max_size=4)))
def test_zero_descriptor_roundtrip(d):
    assert len(d.pack()) == 32 and L.ZeroDescriptor.parse(d.pack()) == d


@given(st.builds(L.DataDescriptor, u64, st.binary(min_size=8, max_size=8),
                 st.binary(min_size=4, max_size=4), u64, st.binary(min_size=4, max_size=4)))
def test_data_descriptor_roundtrip(d):
    assert len(d.pack()) == 32 and L.DataDescriptor.parse(d.pack()) == d


@given(sector_bytes)
def test_data_sector_bytes_roundtrip(raw):
    assert L.DataSector.parse(raw).pack() == raw
    for cls in (L.LogEntryHeader, L.ZeroDescriptor, L.DataDescriptor):
        assert cls.parse(raw).pack() == raw[:64 if cls is L.LogEntryHeader else 32]


@given(sector_bytes, st.integers(1, 2**64 - 1))
def test_split_join_sector(update, seq):
    desc, data = L.split_sector(update, 8192, seq)
    assert desc.leading_bytes == update[:8] and desc.trailing_bytes == update[-4:]
    assert data.sequence_number == seq and data.sequence_high == seq >> 32
    assert L.join_sector(desc, L.DataSector.parse(data.pack())) == update


def test_descriptor_sectors():
    assert [L.descriptor_sectors(n) for n in (0, 1, 126, 127, 254, 255)] == [1, 1, 1, 2, 2, 3]


def test_build_entry_layout():
    e = mk(7, 0, [(3 * MiB, sector(0xAB))], zeros=[(2 * MiB, 8192)])
    h = L.LogEntryHeader.parse(e)
    assert (h.signature, h.entry_length, h.descriptor_count, h.sequence_number) == (
        b"loge", 8192, 2, 7)
    assert e[64:68] == b"zero" and e[96:100] == b"desc" and e[4096:4100] == b"data"
    assert not any(e[128:4096])         # unused descriptor slots are zero
    assert L.log_entry_mask(e) == [(4, 8), (32, 48), (128, 4096)]


def test_many_descriptors_span_sectors():
    ups = [(i * 4096, sector(i % 251)) for i in range(200)]
    e = mk(1, 0, ups, last=MiB)
    assert len(e) == (2 + 200) * 4096
    f = MemFile()
    put(f, 0, e)
    entry = L.read_entry(L._Ring(f, LOG_OFF, LOG_LEN), 0, GUID)
    assert [d[0].file_offset for d in entry.descriptors] == [o for o, _ in ups]


def test_corrupting_any_entry_byte_invalidates_it():
    e = mk(3, 0, [(3 * MiB, sector(0x5A))])
    f = MemFile()
    rnd = random.Random(1)
    for i in [0, 4, 8, 12, 16, 24, 40, 56, 64, 100, 4095, 4096, 4100, 6000, 8191] + \
            rnd.sample(range(len(e)), 20):
        bad = bytearray(e)
        bad[i] ^= 0x40
        put(f, 0, bytes(bad))
        assert L.read_entry(L._Ring(f, LOG_OFF, LOG_LEN), 0, GUID) is None, i


# --- replay ---------------------------------------------------------------------

def test_empty_log_is_a_no_op():
    f = MemFile()
    assert L.replay_log(f, hdr(guid=L.ZERO_GUID)) is None
    assert L.replay_log_in_memory(f, hdr(guid=L.ZERO_GUID)) is None
    assert f.writes() == []


def test_guid_without_valid_log_is_corrupt():
    f = MemFile()
    put(f, 0, mk(1, 0, [(3 * MiB, sector(1))], guid=OTHER))
    with pytest.raises(CorruptImageError, match="no valid entries"):
        L.replay_log(f, hdr())
    assert f.writes() == []


def test_replay_single_entry_restores_leading_and_trailing_bytes():
    f = MemFile()
    update = bytes(random.Random(2).randbytes(4096))
    put(f, 0, mk(1, 0, [(3 * MiB, update)]))
    seq = L.replay_log(f, hdr())
    assert seq.sequence_number == 1 and len(seq.entries) == 1
    assert f.buf[3 * MiB:3 * MiB + 4096] == update
    assert f.ops[-1] == ("flush",)


def test_replay_entry_wrapping_the_ring_end():
    f = MemFile()
    ups = [(2 * MiB, sector(1)), (2 * MiB + 4096, sector(2))]
    pos = LOG_LEN - 4096                # header in the last sector, data wraps to 0
    put(f, pos, mk(9, pos, ups))
    seq = L.replay_log(f, hdr())
    assert [e.position for e in seq.entries] == [pos]
    assert f.buf[2 * MiB:2 * MiB + 8192] == sector(1) + sector(2)


def test_sequence_applies_in_order_from_tail_to_head():
    f = MemFile()
    a, b, c = 0x10000, 0x12000, 0x14000
    put(f, a, mk(5, a, [(3 * MiB, sector(1))]))
    put(f, b, mk(6, a, [(3 * MiB, sector(2)), (3 * MiB + 4096, sector(2))]))
    put(f, b + 12288, mk(7, a, [(3 * MiB, sector(3))]))
    seq = L.replay_log(f, hdr())
    assert [e.sequence_number for e in seq.entries] == [5, 6, 7]
    assert f.buf[3 * MiB:3 * MiB + 8192] == sector(3) + sector(2)


def test_head_tail_trims_already_applied_entries():
    f = MemFile()
    put(f, 0, mk(1, 0, [(3 * MiB, sector(1))]))
    put(f, 8192, mk(2, 8192, [(3 * MiB + 4096, sector(2))]))
    seq = L.replay_log(f, hdr())
    assert [e.sequence_number for e in seq.entries] == [2]
    assert f.buf[3 * MiB:3 * MiB + 4096] == bytes(4096)   # entry 1 not replayed


def test_highest_sequence_wins_over_stale_ones():
    f = MemFile()
    put(f, 0x40000, mk(10, 0x40000, [(3 * MiB, sector(0xA))]))
    put(f, 0x1000, mk(2, 0x1000, [(3 * MiB, sector(0x2))]))
    put(f, 0x80000, mk(99, 0x80000, [(3 * MiB, sector(0x9))], guid=OTHER))  # stale guid
    seq = L.replay_log(f, hdr())
    assert seq.sequence_number == 10
    assert f.buf[3 * MiB:3 * MiB + 4096] == sector(0xA)


def test_torn_head_falls_back_to_previous_entry():
    f = MemFile()
    put(f, 0, mk(4, 0, [(3 * MiB, sector(1))]))
    torn = bytearray(mk(5, 0, [(3 * MiB, sector(2))]))
    torn[8192 - 2] ^= 1                 # data sector half written: checksum fails
    put(f, 8192, bytes(torn))
    seq = L.replay_log(f, hdr())
    assert seq.sequence_number == 4
    assert f.buf[3 * MiB:3 * MiB + 4096] == sector(1)


def test_data_sector_sequence_mismatch_invalidates_even_with_good_checksum():
    e = bytearray(mk(5, 0, [(3 * MiB, sector(2))]))
    struct.pack_into("<I", e, 4096 + 4092, 6)   # SequenceLow of the data sector
    L._crc.seal(e)
    f = MemFile()
    put(f, 0, bytes(e))
    assert L.find_active_sequence(f, LOG_OFF, LOG_LEN, GUID) is None


def test_gap_in_sequence_numbers_breaks_the_sequence():
    f = MemFile()
    put(f, 0, mk(4, 0, [(3 * MiB, sector(1))]))
    put(f, 8192, mk(6, 0, [(3 * MiB, sector(2))]))  # tail 0 unreachable: not valid
    seq = L.replay_log(f, hdr())
    assert seq.sequence_number == 4


def test_tail_outside_sequence_is_invalid():
    f = MemFile()
    put(f, 0x20000, mk(4, 0x10000, [(3 * MiB, sector(1))]))
    assert L.find_active_sequence(f, LOG_OFF, LOG_LEN, GUID) is None


def test_truncated_file_is_refused():
    f = MemFile()
    put(f, 0, mk(1, 0, [(3 * MiB, sector(1))], flushed=8 * MiB, last=8 * MiB))
    with pytest.raises(CorruptImageError, match="truncated"):
        L.replay_log(f, hdr())
    with pytest.raises(CorruptImageError):
        L.replay_log_in_memory(f, hdr())
    assert f.writes() == []


def test_replay_extends_file_for_descriptors_and_last_file_offset():
    f = MemFile()
    put(f, 0, mk(1, 0, [(5 * MiB, sector(7))], flushed=4 * MiB, last=6 * MiB + 1))
    L.replay_log(f, hdr())
    assert len(f.buf) == 7 * MiB        # LastFileOffset rounded up to 1 MiB
    assert f.buf[5 * MiB:5 * MiB + 4096] == sector(7)


def test_last_file_offset_growth_is_bounded_by_what_is_referenced():
    """LastFileOffset near 2^48 (a damaged entry): the driver passes the end of
    everything the image references; the file grows only that far."""
    f = MemFile()
    put(f, 0, mk(1, 0, [(5 * MiB, sector(7))], flushed=4 * MiB, last=(1 << 48) - 4096))
    ov = L.replay_log_in_memory(f, hdr(), referenced_end=6 * MiB)
    assert (ov.length, ov.capped) == (6 * MiB, True)
    ov.bound(8 * MiB)                   # a larger bound (the BAT read later)
    assert (ov.length, ov.capped) == (8 * MiB, True)
    L.replay_log(f, hdr(), referenced_end=0)
    assert len(f.buf) == 5 * MiB + 4096     # the descriptor's end, no further
    g = MemFile()
    put(g, 0, mk(1, 0, [(5 * MiB, sector(7))], flushed=4 * MiB, last=6 * MiB + 1))
    ov = L.replay_log_in_memory(g, hdr(), referenced_end=16 * MiB)
    assert (ov.length, ov.capped) == (7 * MiB, False)


def test_zero_descriptors_and_their_order_with_data():
    f = MemFile(bytes([0xEE]) * 4 * MiB)
    put(f, 0, bytes(LOG_LEN))
    put(f, 0, mk(1, 0, [(3 * MiB, sector(1))]))
    # next entry zeroes 3 MiB..3 MiB+16K then rewrites its second sector
    e2 = L.build_entry(2, GUID, 0, [(3 * MiB + 4096, sector(2))], zeros=[(3 * MiB, 16384)],
                       flushed_file_offset=4 * MiB, last_file_offset=4 * MiB)
    put(f, 8192, e2)
    # and a zero range beyond EOF extends the file
    put(f, 16384, mk(3, 0, zeros=[(4 * MiB + 8192, 8192)]))
    ov = L.replay_log_in_memory(f, hdr())
    L.replay_log(f, hdr())
    want = bytes(4096) + sector(2) + bytes(8192)
    assert f.buf[3 * MiB:3 * MiB + 16384] == want
    assert f.buf[3 * MiB + 16384:3 * MiB + 20480] == sector(0xEE)
    assert len(f.buf) == 4 * MiB + 16384 and not any(f.buf[4 * MiB:])
    assert ov.length == len(f.buf)


def test_in_memory_replay_matches_disk_replay_and_writes_nothing():
    rnd = random.Random(5)
    f = MemFile(rnd.randbytes(4 * MiB))
    put(f, 0, bytes(LOG_LEN))
    pos, tail = 0x30000, 0x30000
    for seq in range(20, 26):
        ups = [(rnd.randrange(2 * MiB, 4 * MiB + 64 * 1024, 4096), rnd.randbytes(4096))
               for _ in range(rnd.randrange(0, 4))]
        zs = [(rnd.randrange(2 * MiB, 4 * MiB, 4096), 4096 * rnd.randrange(1, 5))
              for _ in range(rnd.randrange(0, 2))]
        e = mk(seq, tail, ups, zs, flushed=4 * MiB, last=4 * MiB)
        put(f, pos, e)
        pos += len(e)
    before = bytes(f.buf)
    ov = L.replay_log_in_memory(f, hdr())
    assert bytes(f.buf) == before and f.writes() == []
    disk = MemFile(before)
    L.replay_log(disk, hdr())
    assert ov.length == len(disk.buf)
    for _ in range(200):
        off = rnd.randrange(0, ov.length)
        n = rnd.randrange(1, 3 * 4096)
        assert ov.pread(f, off, n) == bytes(disk.buf[off:off + n]).ljust(n, b"\0")
    assert ov.pread(f, 0, ov.length) == bytes(disk.buf)


@pytest.mark.parametrize("count", [0, 2**32 - 1])
def test_crafted_ring_is_bounded(count):
    """Every sector claims a ring-sized entry with the right GUID: bounded work."""
    f = MemFile()
    for pos in range(0, LOG_LEN, 4096):
        h = L.LogEntryHeader(LOG_LEN, pos, 1 + pos // 4096, count, GUID, 0, 0, 0xBAD)
        f.buf[LOG_OFF + pos:LOG_OFF + pos + 64] = h.pack()
    t = time.monotonic()
    assert L.find_active_sequence(f, LOG_OFF, LOG_LEN, GUID) is None
    assert time.monotonic() - t < 10


def test_unchecked_fields_never_drive_allocation():
    f = MemFile()
    # entry_length beyond the log, absurd descriptor count: rejected from 64 bytes
    h = L.LogEntryHeader(2**32 - 4096, 0, 1, 2**32 - 1, GUID, 0, 0)
    f.buf[LOG_OFF:LOG_OFF + 64] = h.pack()
    reads = []
    orig = f.pread
    f.pread = lambda o, n: reads.append(n) or orig(o, n)
    assert L.find_active_sequence(f, LOG_OFF, LOG_LEN, GUID) is None
    assert max(reads) <= LOG_LEN


def test_chain_of_one_sector_entries_with_outside_tails_terminates():
    f = MemFile()
    for i in range(256):
        put(f, i * 4096, mk(100 + i, (i * 4096 + 8192) % LOG_LEN))
    t = time.monotonic()
    L.find_active_sequence(f, LOG_OFF, LOG_LEN, GUID)
    assert time.monotonic() - t < 10


def test_log_beyond_eof_is_corrupt():
    f = MemFile(MiB + 4096)
    with pytest.raises(CorruptImageError):
        L.replay_log(f, hdr())


# --- writer ---------------------------------------------------------------------

def test_merge_sectors_like_qemu():
    f = MemFile(bytes(range(256)) * (16 * 1024))
    got = L.merge_sectors(f, 8192 + 8, b"\x01" * 8)
    assert [o for o, _ in got] == [8192]
    want = bytearray(f.buf[8192:12288])
    want[8:16] = b"\x01" * 8
    assert got[0][1] == want
    got = L.merge_sectors(f, 4096 - 4, b"\x02" * 4104)   # head partial, full, tail 4
    assert [o for o, _ in got] == [0, 4096, 8192]
    assert got[0][1][-4:] == b"\x02" * 4 and got[0][1][:-4] == f.buf[:4092]
    assert got[2][1][:4] == b"\x02" * 4 and got[2][1][4:] == f.buf[8196:12288]


def test_write_and_flush_order_and_fields():
    f = MemFile(4 * MiB)
    calls = []
    w = L.LogWriter(LOG_OFF, LOG_LEN)

    def set_guid(g):
        calls.append(g)
        f.ops.append(("guid", g))

    e = w.write_and_flush(f, 2 * MiB + 8, b"\x06\x00\x80" + bytes(5), set_guid, new_guid=GUID)
    assert calls == [GUID, L.ZERO_GUID]
    kinds = [op[0] for op in f.ops]
    # Entry written and flushed before the header names it (crash safety),
    # then the BAT sector, then the LogGuid is cleared.
    assert kinds == ["flush", "read", "write", "write", "flush", "guid", "write", "flush",
                     "guid"]
    assert [op[1] for op in f.ops if op[0] == "write"] == [LOG_OFF, LOG_OFF + 4096, 2 * MiB]
    h = e.header
    assert (h.sequence_number, h.tail, h.entry_length, h.descriptor_count) == (1, 0, 8192, 1)
    assert h.flushed_file_offset == h.last_file_offset == 4 * MiB
    assert f.buf[2 * MiB + 8:2 * MiB + 11] == b"\x06\x00\x80"
    # the entry on disk replays to the same bytes
    entry = L.read_entry(L._Ring(f, LOG_OFF, LOG_LEN), 0, GUID)
    assert entry.descriptors[0][1] == bytes(f.buf[2 * MiB:2 * MiB + 4096])
    e2 = w.write_and_flush(f, 2 * MiB, bytes(8), lambda g: None)
    assert (e2.position, e2.header.tail, e2.sequence_number) == (8192, 8192, 2)


def test_writer_wraps_sector_by_sector():
    f = MemFile(4 * MiB)
    w = L.LogWriter(LOG_OFF, LOG_LEN, sequence=41, position=LOG_LEN - 4096)
    entry = mk(41, LOG_LEN - 4096, [(3 * MiB, sector(3))])
    assert w.write_entry(f, entry) == LOG_LEN - 4096
    assert f.buf[LOG_OFF + LOG_LEN - 4096:LOG_OFF + LOG_LEN] == entry[:4096]
    assert f.buf[LOG_OFF:LOG_OFF + 4096] == entry[4096:]
    assert (w.position, w.tail, w.sequence) == (4096, 4096, 42)
    assert L.replay_log(f, hdr()).sequence_number == 41


def test_writer_refuses_entry_filling_the_ring():
    w = L.LogWriter(LOG_OFF, LOG_LEN)
    big = mk(1, 0, [(i * 4096, sector(0)) for i in range(255)])   # 257 sectors
    with pytest.raises(InvalidArgumentError):
        w.write_entry(MemFile(), big)
    ok = mk(1, 0, [(i * 4096, sector(0)) for i in range(253)])    # 255 sectors: fits
    w.write_entry(MemFile(), ok)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(2 * MiB // 8, 3 * MiB // 8 - 1), st.binary(min_size=8,
                                                                                  max_size=8)),
                min_size=1, max_size=8),
       st.integers(0, 255))
def test_crash_after_log_flush_replays_to_the_intended_state(updates, start):
    """Write entries (as a crashed writer would, never applying them) into a ring at
    any start position; replaying gives exactly the state a clean run produces."""
    crashed, clean = MemFile(), MemFile()
    w = L.LogWriter(LOG_OFF, LOG_LEN, sequence=1000, position=start * 4096)
    tail = w.position
    for idx, data in updates:
        ups = L.merge_sectors(clean, idx * 8, data)
        clean.pwrite(idx * 8, data)
        e = L.build_entry(w.sequence, GUID, tail, ups, flushed_file_offset=4 * MiB,
                          last_file_offset=4 * MiB)
        w.write_entry(crashed, e)       # never applied: the crash hit before
    seq = L.replay_log(crashed, hdr())
    assert len(seq.entries) == len(updates)
    assert crashed.buf[2 * MiB:3 * MiB] == clean.buf[2 * MiB:3 * MiB]
