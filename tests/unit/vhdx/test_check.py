"""VHDX check and repair: what is counted, what is repaired, what is preserved."""

from __future__ import annotations

import os
import struct

import pytest

import blockdrv
from blockdrv.block import open_node
from blockdrv.common import FIX_ERRORS, FIX_LEAKS, O_CHECK, O_RDWR

from blockdrv.testing.compare import file_digest
from blockdrv.testing.vhdx.corrupt import KiB, MiB, Vhdx, make_dirty_log

FIX_ALL = FIX_LEAKS | FIX_ERRORS


@pytest.fixture(autouse=True, params=["python", "numpy"])
def check_path(request, monkeypatch):
    """Every case on both paths of check (drivers/vhdx/check/entries.py): the
    pure-Python one for few entries worth a look, and numpy's."""
    from blockdrv.drivers.vhdx.check import entries
    monkeypatch.setenv(entries.FORCE_ENV, request.param)
    return request.param


def run_check(path, fix=0):
    bs = open_node(os.fspath(path), "vhdx", O_CHECK | (O_RDWR if fix else 0))
    try:
        return bs.check(fix)
    finally:
        bs.close()


def counts(r):
    return (r.corruptions, r.leaks, r.corruptions_fixed, r.leaks_fixed, r.check_errors)


def read_all(path):
    with blockdrv.open_image(path, "vhdx") as img:
        return img.read(0, img.size)


@pytest.fixture
def image(tmp_path):
    """64 MiB, 1 MiB blocks; blocks 0, 3 and 5 hold data (at 8, 9, 10 MiB)."""
    path = tmp_path / "img.vhdx"
    img = blockdrv.create_image(path, "vhdx", "64M", block_size="1M")
    img.write(0, b"A" * MiB)
    img.write(3 * MiB, b"B" * 4096)
    img.write(5 * MiB + 512, b"C" * 512)
    img.close()
    return path


def mutate(path, fn):
    v = Vhdx.load(path)
    fn(v)
    v.save(path)
    return v


# --------------------------------------------------------------------------- clean

@pytest.mark.parametrize("opts", [
    dict(size="64M"),
    dict(size="0"),
    dict(size="64M", subformat="fixed"),
    dict(size="10M", subformat="fixed", block_state_zero="off", block_size="1M"),
    dict(size="10000000", subformat="fixed", block_state_zero="off"),
    dict(size="5000000", subformat="fixed"),
    dict(size="4G", block_size="1M", log_size="8M"),
    dict(size="64M", logical_sector_size="4096"),
])
def test_fresh_images_are_clean(opts, tmp_path):
    path = tmp_path / "fresh.vhdx"
    opts = dict(opts)
    size = opts.pop("size")
    img = blockdrv.create_image(path, "vhdx", size, **opts)
    if img.size:
        img.write(img.size - 512, b"z" * 512)
        img.write(0, b"a" * 512)
    img.close()
    before = file_digest(path)
    assert counts(run_check(path)) == (0, 0, 0, 0, 0)
    assert counts(run_check(path, FIX_ALL)) == (0, 0, 0, 0, 0)
    assert counts(run_check(path)) == (0, 0, 0, 0, 0)
    del before


def test_read_only_check_writes_nothing(image):
    mutate(image, lambda v: v.set_block(1, 6, v.metadata_offset))
    before = file_digest(image)
    r = run_check(image)
    assert r.corruptions == 1
    assert file_digest(image) == before


# --------------------------------------------------------------------------- corruptions

def test_entry_beyond_eof(image):
    mutate(image, lambda v: v.set_block(7, 6, 100 * MiB))
    r = run_check(image)
    assert counts(r) == (1, 0, 0, 0, 0)
    assert any("BAT entry 7 start offset 104857600 points after end of file" in m
               for m in r.messages)
    r = run_check(image, FIX_ERRORS)
    assert counts(r) == (0, 0, 1, 0, 0)
    assert counts(run_check(image)) == (0, 0, 0, 0, 0)
    data = read_all(image)
    assert data[7 * MiB:8 * MiB] == bytes(MiB)
    assert data[:MiB] == b"A" * MiB and data[3 * MiB:3 * MiB + 4096] == b"B" * 4096


def test_truncated_block_keeps_its_surviving_bytes(image):
    v = Vhdx.load(image)
    state, off = v.block(5)
    assert off == 10 * MiB and len(v.data) == 11 * MiB
    v.truncate(10 * MiB + 4096)          # block 5 lost all but its first 4 KiB
    v.save(image)
    assert counts(run_check(image)) == (1, 0, 0, 0, 0)
    assert counts(run_check(image, FIX_ALL)) == (0, 0, 1, 0, 0)
    assert counts(run_check(image)) == (0, 0, 0, 0, 0)
    data = read_all(image)
    assert data[5 * MiB + 512:5 * MiB + 1024] == b"C" * 512      # inside the first 4 KiB
    assert data[5 * MiB + 4096:6 * MiB] == bytes(MiB - 4096)


@pytest.mark.parametrize("where", ["header", "log", "bat", "metadata"])
def test_entry_inside_metadata(where, image):
    def at(v):
        return {"header": 0, "log": v.log_offset, "bat": v.bat_offset,
                "metadata": v.metadata_offset}[where]
    mutate(image, lambda v: v.set_block(2, 6, at(v)))
    with pytest.raises(blockdrv.BlockDriverError):
        blockdrv.open_image(image, "vhdx")          # refused without O_CHECK
    assert counts(run_check(image)) == (1, 0, 0, 0, 0)
    assert counts(run_check(image, FIX_ERRORS)) == (0, 0, 1, 0, 0)
    assert counts(run_check(image)) == (0, 0, 0, 0, 0)
    data = read_all(image)
    assert data[2 * MiB:3 * MiB] == bytes(MiB)
    assert data[:MiB] == b"A" * MiB


def test_duplicate_offsets_keep_both_readable(image):
    mutate(image, lambda v: v.set_block(9, 6, v.block(0)[1]))
    before = read_all(image)
    assert before[9 * MiB:10 * MiB] == b"A" * MiB
    r = run_check(image)
    assert counts(r) == (1, 0, 0, 0, 0)
    assert any("BAT entry 9 overlaps" in m for m in r.messages)
    r = run_check(image, FIX_ALL)
    assert counts(r) == (0, 0, 1, 0, 0)
    assert counts(run_check(image)) == (0, 0, 0, 0, 0)
    assert read_all(image) == before                 # nothing readable was lost
    v = Vhdx.load(image)
    assert v.block(9)[1] != v.block(0)[1]
    # the copy is independent now
    with blockdrv.open_image(image, "vhdx", readonly=False) as img:
        img.write(9 * MiB, b"x" * 512)
        assert img.read(0, 512) == b"A" * 512


def test_partially_present_is_reported_not_repaired(image):
    mutate(image, lambda v: v.set_block(3, 7, v.block(3)[1]))
    assert counts(run_check(image)) == (1, 0, 0, 0, 0)
    r = run_check(image, FIX_ALL)
    assert counts(r) == (1, 0, 0, 0, 0)
    assert any("PARTIALLY_PRESENT" in m for m in r.messages)


def test_invalid_state_and_reserved_bits(image):
    def fn(v):
        v.set_block(4, 4, 0)
        v.set_bat(v.bat_index(3), v.bat(v.bat_index(3)) | 0x100)
    mutate(image, fn)
    assert counts(run_check(image)) == (2, 0, 0, 0, 0)
    assert counts(run_check(image, FIX_ERRORS)) == (0, 0, 2, 0, 0)
    data = read_all(image)
    assert data[3 * MiB:3 * MiB + 4096] == b"B" * 4096
    assert data[4 * MiB:5 * MiB] == bytes(MiB)


def test_stray_sector_bitmap_entry(tmp_path):
    path = tmp_path / "big.vhdx"
    blockdrv.create_image(path, "vhdx", "5G", block_size="1M").close()
    v = Vhdx.load(path)
    ratio = v.chunk_ratio
    assert v.data_blocks > ratio
    v.set_bat(ratio, 6 | (8 * MiB))          # bitmap entry of chunk 0 "present"
    v.save(path)
    assert counts(run_check(path)) == (1, 0, 0, 0, 0)
    assert counts(run_check(path, FIX_ERRORS)) == (0, 0, 1, 0, 0)
    assert Vhdx.load(path).bat(ratio) == 0


def test_bad_region_table_copy_is_rewritten(image):
    v = mutate(image, lambda v: v.data.__setitem__(256 * KiB + 300, 0x55))
    del v
    assert counts(run_check(image)) == (1, 0, 0, 0, 0)
    assert counts(run_check(image, FIX_ERRORS)) == (0, 0, 1, 0, 0)
    v = Vhdx.load(image)
    assert v.data[192 * KiB:256 * KiB] == v.data[256 * KiB:320 * KiB]


def test_several_problems_count_like_qemu_per_entry(image):
    def fn(v):
        v.set_block(10, 6, 100 * MiB)                  # past EOF: 1
        v.set_block(11, 6, (1 << 64) - MiB)            # overflow + past EOF: 2 (qemu)
        v.set_block(12, 6, v.metadata_offset)          # region: 1
    mutate(image, fn)
    assert run_check(image).corruptions == 4
    r = run_check(image, FIX_ALL)
    assert (r.corruptions, r.corruptions_fixed) == (0, 4)


# --------------------------------------------------------------------------- log

def test_pending_log_read_only_and_read_write(tmp_path):
    path = tmp_path / "dirty.vhdx"
    facts = make_dirty_log(path, block_size="1M")
    before = file_digest(path)
    r = run_check(path)
    # a pending log is what a crash leaves, not a corruption
    assert counts(r) == (0, 0, 0, 0, 0)
    assert any("pending log" in m for m in r.messages), r.messages
    assert file_digest(path) == before
    r = run_check(path, FIX_ERRORS)
    assert counts(r) == (0, 0, 1, 0, 0)
    assert counts(run_check(path)) == (0, 0, 0, 0, 0)
    with blockdrv.open_image(path, "vhdx") as img:
        assert img.read(0, 4096) == bytes([facts["pattern"]]) * 4096


def test_repair_goes_through_the_log(image):
    mutate(image, lambda v: v.set_block(2, 6, 100 * MiB))
    v = Vhdx.load(image)
    log_before = bytes(v.data[v.log_offset:v.log_offset + v.log_length])
    run_check(image, FIX_ERRORS)
    v = Vhdx.load(image)
    first = v.log_offset
    assert v.data[first:first + 4] == b"loge"
    assert bytes(v.data[first:first + v.log_length]) != log_before, \
        "the BAT repair was not journaled"
    bat_sector = struct.unpack_from("<Q", v.data, first + 64 + 16)[0]   # descriptor FileOffset
    assert bat_sector == v.bat_offset
    assert all(v.header(i)["log_guid"] == bytes(16) for i in (0, 1))


# --------------------------------------------------------------------------- leaks

def free_space(r) -> int | None:
    """Bytes of free space a check reported, None if it reported none."""
    for m in r.messages:
        if "bytes of free space (" in m:
            return int(m.split()[2])
    return None


def test_trailing_space_is_free_space_not_a_leak(image):
    size = os.path.getsize(image)
    mutate(image, lambda v: v.truncate(size + 3 * MiB))
    r = run_check(image)
    assert counts(r) == (0, 0, 0, 0, 0) and free_space(r) == 3 * MiB
    r = run_check(image, FIX_ERRORS)               # -r errors leaves it alone
    assert counts(r) == (0, 0, 0, 0, 0)
    assert os.path.getsize(image) == size + 3 * MiB
    r = run_check(image, FIX_LEAKS)                # -r leaks reclaims it, counts nothing
    assert counts(r) == (0, 0, 0, 0, 0)
    assert any(f"Reclaimed {3 * MiB} bytes" in m for m in r.messages), r.messages
    assert os.path.getsize(image) == size
    r = run_check(image)
    assert counts(r) == (0, 0, 0, 0, 0) and free_space(r) is None


def test_orphaned_block_after_crash(tmp_path):
    """A crash between the data write and the BAT journal leaves the new block
    referenced by nothing: free space (spec 2.1), reclaimed by truncation."""
    path = tmp_path / "orphan.vhdx"
    blockdrv.create_image(path, "vhdx", "64M", block_size="2M").close()
    size = os.path.getsize(path)
    v = Vhdx.load(path)
    v.truncate(size + 2 * MiB)
    v.data[size:] = b"D" * (2 * MiB)
    v.save(path)
    r = run_check(path)
    assert counts(r) == (0, 0, 0, 0, 0) and free_space(r) == 2 * MiB
    assert counts(run_check(path, FIX_ALL)) == (0, 0, 0, 0, 0)
    assert os.path.getsize(path) == size


def test_interior_free_space_is_reported_not_moved(image):
    v = Vhdx.load(image)
    end = len(v.data)
    v.truncate(end + 2 * MiB)                       # orphan at 11..13 MiB
    v.save(image)
    with blockdrv.open_image(image, "vhdx", readonly=False) as img:
        img.write(20 * MiB, b"E" * 512)             # allocated after the orphan
    before = read_all(image)
    size = os.path.getsize(image)
    r = run_check(image)
    assert counts(r) == (0, 0, 0, 0, 0) and free_space(r) == 2 * MiB
    assert any("between used blocks" in m for m in r.messages), r.messages
    r = run_check(image, FIX_ALL)
    assert counts(r) == (0, 0, 0, 0, 0) and free_space(r) == 2 * MiB
    assert read_all(image) == before and os.path.getsize(image) == size


def test_unaligned_trailing_bytes_are_counted_exactly(image):
    """Disk2VHD leaves 512 zero bytes after the last block: 512 bytes of free
    space, not a 1 MiB leak."""
    size = os.path.getsize(image)
    with open(image, "ab") as f:
        f.write(bytes(512))
    r = run_check(image)
    assert counts(r) == (0, 0, 0, 0, 0) and free_space(r) == 512
    run_check(image, FIX_LEAKS)
    assert os.path.getsize(image) == size


def test_fixed_image_preallocation_is_not_free_space(tmp_path):
    path = tmp_path / "fixed.vhdx"
    blockdrv.create_image(path, "vhdx", "32M", subformat="fixed").close()
    r = run_check(path)
    assert counts(r) == (0, 0, 0, 0, 0) and free_space(r) is None
    size = os.path.getsize(path)
    v = Vhdx.load(path)
    v.truncate(size + MiB)
    v.save(path)
    r = run_check(path)
    assert counts(r) == (0, 0, 0, 0, 0) and free_space(r) == MiB


def test_check_on_large_sparse_image_is_fast(tmp_path):
    import time
    path = tmp_path / "large.vhdx"
    img = blockdrv.create_image(path, "vhdx", "16T", block_size="1M")
    img.write(15 << 40, b"x" * 512)
    img.close()
    t0 = time.monotonic()
    assert counts(run_check(path)) == (0, 0, 0, 0, 0)
    assert time.monotonic() - t0 < 10


def test_struct_helpers_agree_with_driver(image):
    v = Vhdx.load(image)
    assert v.block(0) == (6, 8 * MiB)
    assert struct.unpack_from("<Q", v.data, v.bat_offset)[0] == 8 * MiB | 6


# --------------------------------------------------------------------------- regions

@pytest.mark.parametrize("region", ["bat", "log"])
def test_overlapping_regions_count_as_corruptions_read_only(region, image):
    """A read-only check opens an image whose regions overlap and counts the
    overlap (ordinary opens refuse it); a repairing check refuses, writing
    nothing, since journaling into overlapping metadata could destroy more."""
    def move(v):
        if region == "bat":
            v.set_region(_bat_guid(), file_offset=v.metadata_offset)
        else:   # the log grows over the BAT that follows it
            v.set_header(log_length=v.header(v.current)["log_length"] + MiB)
    mutate(image, move)
    before = file_digest(image)
    with pytest.raises(blockdrv.CorruptImageError, match="overlap"):
        blockdrv.open_image(image, "vhdx")
    r = run_check(image)
    assert r.corruptions >= 1
    assert any("overlap" in m for m in r.messages)
    with pytest.raises(blockdrv.CorruptImageError, match="overlap"):
        run_check(image, FIX_ALL)
    assert file_digest(image) == before


def _bat_guid():
    from blockdrv.drivers.vhdx.constants import BAT_GUID
    return BAT_GUID



@pytest.mark.parametrize("seed", range(6))
def test_both_paths_find_and_repair_the_same(seed, tmp_path, monkeypatch):
    """Random damage to a table (states, offsets into the metadata, past or
    across the end, duplicates, reserved bits, bitmap entries): the
    pure-Python path and numpy's count, describe, measure free space and
    repair alike, and each is the one taken when forced."""
    import hashlib
    import random
    from blockdrv.drivers.vhdx.check import entries
    from blockdrv.drivers.vhdx.check.analysis import _analyse
    from blockdrv.drivers.vhdx.check.leaks import _free_space
    rnd = random.Random(seed)
    path = tmp_path / "r.vhdx"
    fixed = seed == 5                   # a fixed image is all there: keep it small
    img = blockdrv.create_image(path, "vhdx", "64M" if fixed else "6G", block_size="1M",
                                **({"subformat": "fixed"} if fixed else {}))
    for b in rnd.sample(range(40), 12 * (not fixed)):
        img.write(b * MiB, bytes([b + 1]) * 4096)
    img.close()
    v = Vhdx.load(path)
    flen = len(v.data)
    offsets = [0, v.metadata_offset, v.bat_offset, v.log_offset, flen - MiB // 2, flen,
               flen + 7 * MiB, (1 << 44) - MiB, (1 << 64) - MiB]
    for _ in range(rnd.randrange(20, 300)):
        i = rnd.randrange(v.data_blocks + v.data_blocks // v.chunk_ratio)
        off = rnd.choice(offsets + [rnd.randrange(flen // MiB + 4) * MiB] * 3)
        v.set_bat(i, (off & ((1 << 64) - MiB)) | rnd.choice([0, 1, 2, 3, 4, 5, 6, 6, 7])
                  | rnd.choice([0, 0, 0, 0x100, 0x8]))
    v.save(path)
    results = {}
    for forced in ("python", "numpy"):
        monkeypatch.setenv(entries.FORCE_ENV, forced)
        bs = open_node(os.fspath(path), "vhdx", O_CHECK)
        try:
            f = _analyse(bs.opaque)
            assert entries.is_few(f.found) == (forced == "python")
            free = _free_space(bs.opaque)
            results[forced] = (f.corruptions, [int(c) for c in f.count], f.messages,
                               [int(i) for i in f.idx], free)
        finally:
            bs.close()
        copy = tmp_path / f"{forced}.vhdx"
        copy.write_bytes(path.read_bytes())
        r = run_check(copy, FIX_ALL)
        # headers and log differ (fresh GUIDs); what follows them may not
        fixed = Vhdx.load(copy)
        after_log = fixed.log_offset + fixed.log_length
        results[forced + " repair"] = (counts(r), r.messages, len(fixed.data),
                                       hashlib.sha256(fixed.data[after_log:]).hexdigest())
    assert results["python"] == results["numpy"]
    assert results["python repair"] == results["numpy repair"]
    assert results["python"][0] > 0
