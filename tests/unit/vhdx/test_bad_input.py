"""Invalid VHDX images are refused: one-line error, bounded time and memory, no write.

Every case takes a valid image (``blockdrv.create_image``), applies one
mutation with :mod:`blockdrv.testing.vhdx.corrupt` (re-sealing checksums where the point is to
reach a deeper check) and opens it read-only and read-write.  Opening must
raise a ``BlockDriverError`` subclass with a one-line message, within a
time bound, with a bounded Python allocation peak (no buffer sized by an
unchecked field), and must leave the file's bytes and mtime untouched --
including read-write opens, which validate everything before their first
header update or log replay.

The tail of the file holds regression tests for findings of the fuzz
campaign (tests/fuzz/test_vhdx_fuzz.py).
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid

import pytest

import blockdrv
from blockdrv.errors import BlockDriverError, CorruptImageError, UnsupportedError

from blockdrv.testing.compare import file_digest
from blockdrv.testing.vhdx.corrupt import (BAT_GUID, FILE_PARAMETERS, LOGICAL_SECTOR_SIZE,
                                           METADATA_GUID, MiB, PAGE83, PHYSICAL_SECTOR_SIZE,
                                           VIRTUAL_DISK_SIZE, Vhdx, make_dirty_log)

KiB = 1024
TiB = 1 << 40
TIME_LIMIT = 5.0            # seconds per open
MEMORY_LIMIT = 16 * MiB     # Python allocation peak per open
OLD_MTIME_NS = 1_000_000_000 * 1_000_000_000   # 2001-09-09


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Vhdx:
    """64 MiB dynamic image, 1 MiB blocks, blocks 0 and 3 written."""
    path = tmp_path_factory.mktemp("base") / "base.vhdx"
    img = blockdrv.create_image(path, "vhdx", "64M", block_size="1M")
    img.write(0, b"A" * 4096)
    img.write(3 * MiB, b"B" * 4096)
    img.close()
    return Vhdx.load(path)


def assert_refused(path, *, exc=BlockDriverError, match: str | None = None) -> list[str]:
    """Open read-only and read-write: each raises ``exc``; nothing is written."""
    path = os.fspath(path)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    before = file_digest(path, mtime=True)
    messages = []
    for readonly in (True, False):
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(exc) as info:
                blockdrv.open_image(path, "vhdx", readonly=readonly).close()
        finally:
            elapsed = time.monotonic() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        err = info.value
        assert isinstance(err, BlockDriverError)
        text = str(err)
        assert text and "\n" not in text, text
        assert err.filename == path
        if match:
            assert match.lower() in text.lower(), text
        assert elapsed < TIME_LIMIT, elapsed
        assert peak < MEMORY_LIMIT, f"allocation peak {peak} bytes"
        assert file_digest(path, mtime=True) == before, "the failed open wrote to the image"
        messages.append(text)
    # probing picks the same driver -- also an error (without the signature the
    # file probes as raw, as with qemu)
    with open(path, "rb") as fh:
        if fh.read(8) == b"vhdxfile":
            with pytest.raises(BlockDriverError):
                blockdrv.open_image(path).close()
    assert file_digest(path, mtime=True) == before
    return messages


# --------------------------------------------------------------------------- mutations

def _new_guid() -> bytes:
    return uuid.uuid4().bytes_le


def m_file_signature(v):
    v.data[0:8] = b"vhdxfilE"


def m_headers_bad_crc(v):
    for i in (0, 1):
        v.set_header(i, reseal=False, sequence_number=v.header(i)["sequence_number"] + 7)


def m_headers_bad_signature(v):
    v.set_header(signature=b"HEAD")


def m_headers_bad_version(v):
    v.set_header(version=2)


def m_headers_equal_sequence_differ(v):
    v.set_header(0, sequence_number=5, data_write_guid=_new_guid())
    v.set_header(1, sequence_number=5, data_write_guid=_new_guid())


def m_log_version(v):
    v.set_header(log_version=1, log_guid=_new_guid())


def m_region_tables_bad_crc(v):
    v.set_regions(count=2, reseal=False, signature=b"regi")
    for base in (192 * KiB, 256 * KiB):
        v.data[base + 100] ^= 0xFF


def m_region_tables_bad_signature(v):
    v.set_regions(signature=b"REGI")


def m_region_count_2048(v):
    v.set_regions(count=2048)


def m_region_count_huge(v):
    v.set_regions(count=0xFFFFFFFF)


def m_region_missing_bat(v):
    v.set_regions([e for e in v.regions() if e[0] != BAT_GUID])


def m_region_duplicate(v):
    v.set_regions(v.regions() + [v.regions()[0]])


def m_metadata_bad_signature(v):
    v.set_metadata(signature=b"METADATA")


def m_metadata_count_2048(v):
    v.set_metadata(count=2048)


def m_metadata_count_huge(v):
    v.set_metadata(count=0xFFFF)


def m_item_length_over_1mib(v):
    v.set_metadata_entry(FILE_PARAMETERS, length=MiB + 8)


def m_item_length_huge(v):
    v.set_metadata_entry(FILE_PARAMETERS, length=0xFFFFFFFF)


def m_item_offset_outside_region(v):
    v.set_metadata_entry(VIRTUAL_DISK_SIZE, offset=MiB - 4)


def m_item_offset_in_table(v):
    v.set_metadata_entry(VIRTUAL_DISK_SIZE, offset=32)


def m_missing_required_item(v):
    v.set_metadata([e for e in v.metadata_entries() if e[0] != PAGE83])


def m_duplicate_item(v):
    entries = v.metadata_entries()
    v.set_metadata(entries + [entries[1]])


def m_unknown_required_item(v):
    entries = v.metadata_entries()
    v.set_metadata(entries + [[_new_guid(), 64 * KiB + 512, 8, 4, 0]])


def m_unknown_required_region(v):
    v.set_regions(v.regions() + [[_new_guid(), 5 * MiB, MiB, 1]])


def m_bat_region_huge(v):
    v.set_region(BAT_GUID, length=0xFFF00000)


def m_bat_region_too_small(v):
    # 64 entries need 512 bytes; an aligned region can only be 0 then
    v.set_region(BAT_GUID, length=0)


def m_bat_region_beyond_eof(v):
    v.set_region(BAT_GUID, file_offset=1 << 40)


def m_bat_region_unaligned(v):
    v.set_region(BAT_GUID, file_offset=v.bat_offset + 4096)


def m_bat_over_metadata(v):
    v.set_region(BAT_GUID, file_offset=v.metadata_offset)


def m_metadata_over_log(v):
    v.set_region(METADATA_GUID, file_offset=v.log_offset)


def m_metadata_over_bat(v):
    v.set_region(METADATA_GUID, file_offset=v.bat_offset)


def m_region_in_header(v):
    v.set_region(METADATA_GUID, file_offset=0)


def m_metadata_region_beyond_eof(v):
    v.set_region(METADATA_GUID, file_offset=len(v.data))


def m_log_beyond_eof(v):
    v.set_header(log_length=1 << 30)


def m_log_length_huge(v):
    v.set_header(log_length=0xFFF00000, log_guid=_new_guid())


def m_log_offset_huge(v):
    v.set_header(log_offset=(1 << 63) - MiB)


def m_log_in_header(v):
    v.set_header(log_offset=0)


def m_log_unaligned(v):
    v.set_header(log_length=MiB + 4096)


def m_log_guid_without_log(v):
    v.set_header(log_guid=_new_guid())


def m_log_guid_without_log_length(v):
    v.set_header(log_guid=_new_guid(), log_length=0)


def m_block_size_not_pow2(v):
    v.set_item(FILE_PARAMETERS, "I", 3 * MiB)


def m_block_size_small(v):
    v.set_item(FILE_PARAMETERS, "I", 512 * KiB)


def m_block_size_large(v):
    v.set_item(FILE_PARAMETERS, "I", 512 * MiB)


def m_block_size_zero(v):
    v.set_item(FILE_PARAMETERS, "I", 0)


def m_logical_sector_1024(v):
    v.set_item(LOGICAL_SECTOR_SIZE, "I", 1024)


def m_logical_sector_zero(v):
    v.set_item(LOGICAL_SECTOR_SIZE, "I", 0)


def m_physical_sector_bad(v):
    v.set_item(PHYSICAL_SECTOR_SIZE, "I", 520)


def m_virtual_size_unaligned(v):
    v.set_item(VIRTUAL_DISK_SIZE, "Q", 64 * MiB + 100)


def m_virtual_size_over_64t(v):
    v.set_item(VIRTUAL_DISK_SIZE, "Q", 64 * TiB + MiB)


def m_virtual_size_huge(v):
    v.set_item(VIRTUAL_DISK_SIZE, "Q", (1 << 64) - 512)


def m_virtual_size_needs_bigger_bat(v):
    v.set_item(VIRTUAL_DISK_SIZE, "Q", 1 * TiB)    # 1M entries > the 1 MiB BAT


def m_has_parent_without_locator(v):
    v.set_item(FILE_PARAMETERS, "I", 2, at=4)


def _bat(state, offset_fn):
    def mutate(v):
        v.set_block(1, state, offset_fn(v))
    return mutate


def _bitmap_present(v):
    # 64 MiB in 1 MiB blocks has no bitmap entry; corrupt the last payload one
    v.set_block(v.data_blocks - 1, 6, (1 << 44) - MiB)


CASES = {
    "file-signature": m_file_signature,
    "headers-bad-checksum": m_headers_bad_crc,
    "headers-bad-signature": m_headers_bad_signature,
    "headers-bad-version": m_headers_bad_version,
    "headers-equal-sequence-differ": m_headers_equal_sequence_differ,
    "log-version-1": m_log_version,
    "region-tables-bad-checksum": m_region_tables_bad_crc,
    "region-tables-bad-signature": m_region_tables_bad_signature,
    "region-entry-count-2048": m_region_count_2048,
    "region-entry-count-4G": m_region_count_huge,
    "region-missing-bat": m_region_missing_bat,
    "region-duplicate": m_region_duplicate,
    "metadata-bad-signature": m_metadata_bad_signature,
    "metadata-entry-count-2048": m_metadata_count_2048,
    "metadata-entry-count-65535": m_metadata_count_huge,
    "item-length-over-1MiB": m_item_length_over_1mib,
    "item-length-4G": m_item_length_huge,
    "item-offset-outside-region": m_item_offset_outside_region,
    "item-offset-inside-table": m_item_offset_in_table,
    "missing-required-item": m_missing_required_item,
    "duplicate-item": m_duplicate_item,
    "unknown-required-item": m_unknown_required_item,
    "unknown-required-region": m_unknown_required_region,
    "bat-region-length-4G": m_bat_region_huge,
    "bat-region-too-small": m_bat_region_too_small,
    "bat-region-beyond-eof": m_bat_region_beyond_eof,
    "bat-region-unaligned": m_bat_region_unaligned,
    "bat-over-metadata": m_bat_over_metadata,
    "metadata-over-log": m_metadata_over_log,
    "metadata-over-bat": m_metadata_over_bat,
    "region-in-header-section": m_region_in_header,
    "metadata-region-beyond-eof": m_metadata_region_beyond_eof,
    "log-beyond-eof": m_log_beyond_eof,
    "log-length-4G-with-guid": m_log_length_huge,
    "log-offset-2^63": m_log_offset_huge,
    "log-in-header-section": m_log_in_header,
    "log-length-unaligned": m_log_unaligned,
    "log-guid-without-valid-log": m_log_guid_without_log,
    "log-guid-with-empty-log": m_log_guid_without_log_length,
    "block-size-3MiB": m_block_size_not_pow2,
    "block-size-512KiB": m_block_size_small,
    "block-size-512MiB": m_block_size_large,
    "block-size-0": m_block_size_zero,
    "logical-sector-1024": m_logical_sector_1024,
    "logical-sector-0": m_logical_sector_zero,
    "physical-sector-520": m_physical_sector_bad,
    "virtual-size-not-sector-multiple": m_virtual_size_unaligned,
    "virtual-size-over-64TiB": m_virtual_size_over_64t,
    "virtual-size-2^64": m_virtual_size_huge,
    "virtual-size-bat-too-small": m_virtual_size_needs_bigger_bat,
    "has-parent-without-locator": m_has_parent_without_locator,
    "bat-entry-in-header": _bat(6, lambda v: 0),
    "bat-entry-in-log": _bat(6, lambda v: v.log_offset),
    "bat-entry-in-bat": _bat(6, lambda v: v.bat_offset),
    "bat-entry-in-metadata": _bat(6, lambda v: v.metadata_offset),
    "bat-entry-beyond-eof": _bat(6, lambda v: len(v.data) + 64 * MiB),
    "bat-entry-offset-2^64": _bat(6, lambda v: (1 << 64) - MiB),
    "bat-last-entry-2^64": _bitmap_present,
}


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_image_is_refused(name, base, tmp_path):
    v = base.copy()
    CASES[name](v)
    path = v.save(tmp_path / f"{name}.vhdx")
    assert_refused(path)


EXPECTED_CLASS = {
    "unknown-required-item": UnsupportedError,
    "unknown-required-region": UnsupportedError,
    "bat-over-metadata": CorruptImageError,
    "block-size-3MiB": CorruptImageError,
    "logical-sector-1024": CorruptImageError,
    "virtual-size-over-64TiB": CorruptImageError,
    "virtual-size-not-sector-multiple": CorruptImageError,
    "log-guid-without-valid-log": CorruptImageError,
}


@pytest.mark.parametrize("name", list(EXPECTED_CLASS))
def test_error_class_and_errno(name, base, tmp_path):
    v = base.copy()
    CASES[name](v)
    path = v.save(tmp_path / f"{name}.vhdx")
    cls = EXPECTED_CLASS[name]
    assert_refused(path, exc=cls)
    with pytest.raises(cls) as info:
        blockdrv.open_image(path, "vhdx")
    assert info.value.errno == (errno.ENOTSUP if cls is UnsupportedError else errno.EINVAL)


def test_messages_name_the_problem(base, tmp_path):
    checks = {"block-size-3MiB": "block size", "logical-sector-1024": "sector size",
              "virtual-size-over-64TiB": "64 TiB", "log-guid-without-valid-log": "log",
              "unknown-required-region": "required region",
              "unknown-required-item": "required metadata", "bat-over-metadata": "overlap",
              "bat-entry-beyond-eof": "end of the file",
              "bat-entry-in-metadata": "metadata",
              "region-entry-count-2048": "too many"}
    for name, words in checks.items():
        v = base.copy()
        CASES[name](v)
        path = v.save(tmp_path / f"{name}.vhdx")
        assert_refused(path, match=words)


def _truncation_lengths(n: int) -> list[int]:
    points = [0, 1, 7, 8, 519, 520, 4096, 64 * KiB - 1, 64 * KiB, 64 * KiB + 80,
              68 * KiB - 1, 128 * KiB, 132 * KiB - 1, 192 * KiB, 192 * KiB + 16,
              256 * KiB - 1, 256 * KiB, 320 * KiB - 1, 320 * KiB, MiB - 1, MiB,
              MiB + 4096, 2 * MiB - 1, 2 * MiB, 2 * MiB + 8, 3 * MiB - 1, 3 * MiB,
              3 * MiB + 64 * KiB - 1, 3 * MiB + 64 * KiB + 8, 4 * MiB - 1, 4 * MiB,
              8 * MiB, 8 * MiB + 1, 9 * MiB - 1, 10 * MiB, 12 * MiB - 512, n - 1]
    return sorted({p for p in points if p < n})


def test_truncated_files_are_refused(base, tmp_path):
    lengths = _truncation_lengths(len(base.data))
    assert len(lengths) > 30
    for n in lengths:
        v = base.copy()
        v.truncate(n)
        path = v.save(tmp_path / f"trunc-{n}.vhdx")
        assert_refused(path)


def test_truncated_dirty_log_is_refused(tmp_path):
    """Log entry intact, but the file was cut below its flushed file offset."""
    path = tmp_path / "dirty.vhdx"
    facts = make_dirty_log(path, block_size="1M")
    v = Vhdx.load(path)
    v.truncate(facts["block_offset"])
    v.save(path)
    assert_refused(path, match="truncated")


def test_huge_lengths_allocate_nothing_big(base, tmp_path):
    """Crafted lengths (BAT region, log, items, counts) never size a buffer."""
    for name in ("bat-region-length-4G", "log-length-4G-with-guid", "item-length-4G",
                 "metadata-entry-count-65535", "region-entry-count-4G", "virtual-size-2^64"):
        v = base.copy()
        CASES[name](v)
        path = v.save(tmp_path / f"{name}.vhdx")
        assert_refused(path)         # asserts peak < MEMORY_LIMIT


def test_sparse_file_with_huge_bat_region(base, tmp_path):
    """A BAT region that does fit a (sparse) file: only the needed entries are read."""
    v = base.copy()
    v.set_region(BAT_GUID, file_offset=8 * MiB + 64 * MiB, length=0xFFF00000)
    path = v.save(tmp_path / "sparse.vhdx")
    with open(path, "r+b") as fh:
        fh.truncate(8 * MiB + 64 * MiB + 0xFFF00000)
    tracemalloc.start()
    try:
        with blockdrv.open_image(path, "vhdx") as img:
            assert img.read(0, 4096) == bytes(4096)      # the new BAT area is all zero
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT


def test_one_bad_header_is_tolerated(base, tmp_path):
    """Not a refusal: one valid header is enough (spec 2.2.2)."""
    v = base.copy()
    v.data[64 * KiB + 200] ^= 1        # header 1 checksum now wrong
    path = v.save(tmp_path / "one-header.vhdx")
    with blockdrv.open_image(path, "vhdx") as img:
        assert img.read(0, 4) == b"AAAA"


def test_one_bad_region_table_copy_is_tolerated(base, tmp_path):
    v = base.copy()
    v.data[192 * KiB + 100] ^= 1
    path = v.save(tmp_path / "one-region.vhdx")
    with blockdrv.open_image(path, "vhdx") as img:
        assert img.read(3 * MiB, 4) == b"BBBB"


@pytest.mark.parametrize("state", [7, 4])
def test_bad_block_state_read_raises(state, base, tmp_path):
    """PARTIALLY_PRESENT (or an undefined state) in a dynamic image: a clear error on
    read of that block, never data; other blocks still read."""
    v = base.copy()
    v.set_block(3, state, v.block(3)[1])
    path = v.save(tmp_path / f"state{state}.vhdx")
    before = file_digest(path, mtime=True)
    with blockdrv.open_image(path, "vhdx") as img:
        assert img.read(0, 4) == b"AAAA"
        for off, n in ((3 * MiB, 4096), (3 * MiB - 512, 1024), (0, 8 * MiB)):
            with pytest.raises(CorruptImageError) as info:
                img.read(off, n)
            assert info.value.errno == errno.EIO
            assert "\n" not in str(info.value)
            if state == 7:
                assert "PARTIALLY_PRESENT" in str(info.value)
    assert file_digest(path, mtime=True) == before, "a read-only open wrote"
    with blockdrv.open_image(path, "vhdx", readonly=False) as img:
        with pytest.raises(CorruptImageError):
            img.read(3 * MiB, 512)
        with pytest.raises(CorruptImageError):
            img.write(3 * MiB, b"x" * 512)
    # the rw open may update the headers, but the refused write touched neither
    # the block's BAT entry nor its payload
    after = Vhdx.load(path)
    assert after.block(3) == v.block(3)
    offset = v.block(3)[1]
    assert after.data[offset:offset + 4096] == v.data[offset:offset + 4096]


def test_rw_open_of_invalid_dirty_image_writes_nothing(tmp_path):
    """A pending log must not be replayed (nor headers updated) when the image
    fails validation after it -- here the metadata is invalid."""
    path = tmp_path / "dirty-bad.vhdx"
    make_dirty_log(path, block_size="1M")
    v = Vhdx.load(path)
    v.set_item(LOGICAL_SECTOR_SIZE, "I", 1024)
    v.save(path)
    assert_refused(path, match="sector size")


def test_rw_open_of_dirty_image_whose_replay_points_beyond_eof(tmp_path):
    """The log itself is fine but the BAT it replays points past the end of file."""
    path = tmp_path / "dirty-eof.vhdx"
    facts = make_dirty_log(path, block_size="1M")
    v = Vhdx.load(path)
    lo = facts["log_entry"]
    # the one data sector carries the BAT sector; its bytes 8.. hold entry 1
    data_sector = lo + 4096
    struct.pack_into("<Q", v.data, data_sector + 8, (100 << 30) | 6)
    v.reseal_log_entry(lo)
    v.save(path)
    assert_refused(path, match="end of the file")


# --------------------------------------------------------------------------- CLI

CLI_CASES = ["headers-bad-checksum", "region-entry-count-2048", "block-size-3MiB",
             "unknown-required-region", "bat-entry-in-metadata", "log-guid-without-valid-log"]


@pytest.mark.parametrize("command", ["info", "check"])
@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_one_line_error(name, command, base, tmp_path):
    v = base.copy()
    CASES[name](v)
    path = v.save(tmp_path / f"{name}.vhdx")
    before = file_digest(path, mtime=True)
    res = subprocess.run([sys.executable, "-m", "blockdrv", command, "-f", "vhdx", path],
                         capture_output=True, text=True, timeout=60)
    if name == "bat-entry-in-metadata" and command == "check":
        # check opens with O_CHECK and reports it as a corruption instead
        assert res.returncode == 2, res
        assert "Traceback" not in res.stderr
        return
    if name == "log-guid-without-valid-log" and command == "check":
        # a corruption check reports (and `-r all` clears), writing nothing
        assert res.returncode == 2, res
        assert "no valid log entry" in res.stderr and "-r all" in res.stderr, res
        assert "Traceback" not in res.stderr
        assert file_digest(path, mtime=True) == before
        return
    assert res.returncode == 1, res
    lines = [line for line in res.stderr.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("blockdrv: "), res.stderr
    assert path in lines[0]
    assert "Traceback" not in res.stderr
    assert file_digest(path, mtime=True) == before
