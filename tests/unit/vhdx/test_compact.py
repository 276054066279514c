"""``blockdrv compact`` (blockdrv.drivers.vhdx.compact): zero blocks become
ZERO, blocks move from the end into holes, the file is truncated; guest data
and DataWriteGuid never change; the result is no larger than a fresh
convert plus 1 MiB; refusals are one line."""

from __future__ import annotations

import os
import random

import pytest

import blockdrv
from blockdrv.api import compact
from blockdrv.drivers.vhdx.compact import plan_moves
from blockdrv.drivers.vhdx.constants import (PAYLOAD_BLOCK_FULLY_PRESENT,
                                             PAYLOAD_BLOCK_NOT_PRESENT,
                                             PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                                             PAYLOAD_BLOCK_ZERO, SB_BLOCK_PRESENT)
from blockdrv.drivers.vhdx.space import Span
from blockdrv.errors import BlockDriverError
from blockdrv.testing.compare import file_digest
from blockdrv.testing.scripts import guest_bytes, run_blockdrv
from blockdrv.testing.vhdx.corrupt import make_dirty_log

MiB = 1 << 20


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def states(path):
    with blockdrv.open_image(path) as img:
        bat = img.bs.opaque.bat
        return [bat.raw(b) & 7 for b in range(bat.data_blocks)]


def dwg(path):
    with blockdrv.open_image(path) as img:
        return img.info().format_specific["data-write-guid"]


def fragmented(path, seed=1, size=48 * MiB):
    """Blocks of data, of zeros written as data, and discarded ones, in a
    shuffled order so that the file has holes below its last blocks."""
    rng = random.Random(seed)
    blockdrv.create_image(path, "vhdx", size, block_size=MiB, log_size=MiB).close()
    blocks = list(range(size // MiB))
    rng.shuffle(blocks)
    with blockdrv.open_image(path, readonly=False, discard="unmap") as img:
        for i, b in enumerate(blocks[:36]):
            img.write(b * MiB, bytes(MiB) if i % 3 == 0 else data(seed * 100 + b, MiB))
        img.write(blocks[40] * MiB + 4096, data(7, 8192))          # a partly written block
    with blockdrv.open_image(path, readonly=False) as img:      # qemu-io style: no discard
        img.write_zeroes(blocks[1] * MiB, MiB)                   # zeros into a present block
    with blockdrv.open_image(path, readonly=False, discard="unmap") as img:
        for b in blocks[2:30:4]:
            img.discard(b * MiB, MiB)                            # holes in the file
    return blocks


def test_compact_dynamic(tmp_path):
    path = str(tmp_path / "a.vhdx")
    fragmented(path)
    before, guid, length = guest_bytes(path), dwg(path), os.path.getsize(path)
    dry = compact(path, dry_run=True)
    assert dry.dry_run and os.path.getsize(path) == length
    r = compact(path)
    assert guest_bytes(path) == before
    assert dwg(path) == guid                         # guest data did not change
    assert r.length_after == os.path.getsize(path) == dry.length_after < length
    assert r.zeroed_blocks == dry.zeroed_blocks >= 10
    assert blockdrv.check(path).corruptions == 0
    conv = str(tmp_path / "c.vhdx")
    blockdrv.convert(path, conv, fmt="vhdx", options={"block_size": MiB, "log_size": MiB})
    assert os.path.getsize(path) <= os.path.getsize(conv) + MiB
    # a second run finds nothing left to do
    again = compact(path)
    assert again.freed == 0 and again.moved_blocks == again.zeroed_blocks == 0


def test_zero_blocks_become_zero_not_absent(tmp_path):
    path = str(tmp_path / "z.vhdx")
    blockdrv.create_image(path, "vhdx", 8 * MiB, block_size=MiB).close()
    with blockdrv.open_image(path, readonly=False) as img:
        img.write(0, bytes(2 * MiB))
        img.write(2 * MiB, data(1, MiB))
    compact(path)
    st = states(path)
    assert st[:3] == [PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_FULLY_PRESENT]


def test_compact_differencing_child(tmp_path):
    parent, child = str(tmp_path / "p.vhdx"), str(tmp_path / "c.vhdx")
    blockdrv.create_image(parent, "vhdx", 16 * MiB, block_size=MiB).close()
    with blockdrv.open_image(parent, readonly=False) as img:
        img.write(0, b"\x55" * (16 * MiB))
    parent_digest = file_digest(parent)
    blockdrv.create_image(child, "vhdx", backing_file="p.vhdx", backing_fmt="vhdx").close()
    with blockdrv.open_image(child, readonly=False) as img:
        img.write(0, bytes(MiB))                      # FULLY_PRESENT zeros over parent data
        img.write(MiB, data(2, MiB))                  # FULLY_PRESENT data
        img.write(2 * MiB + 4096, bytes(4096))        # PARTIALLY_PRESENT (zeros)
        img.write(5 * MiB, data(3, MiB))
    with blockdrv.open_image(child, readonly=False, discard="unmap") as img:
        img.discard(MiB, MiB)                         # a hole in the middle of the file
    before = guest_bytes(child)
    r = compact(child)
    assert guest_bytes(child) == before
    st = states(child)
    assert st[0] == PAYLOAD_BLOCK_ZERO               # zeros whatever the parent holds
    assert st[2] == PAYLOAD_BLOCK_PARTIALLY_PRESENT  # left as it is
    assert st[3] == PAYLOAD_BLOCK_NOT_PRESENT        # never hides or shows anything new
    assert r.moved_blocks >= 1
    assert file_digest(parent) == parent_digest
    assert blockdrv.check(child).corruptions == 0


def test_unused_sector_bitmap_block_is_freed(tmp_path):
    parent, child = str(tmp_path / "p.vhdx"), str(tmp_path / "c.vhdx")
    blockdrv.create_image(parent, "vhdx", 8 * MiB, block_size=MiB).close()
    blockdrv.create_image(child, "vhdx", backing_file="p.vhdx", backing_fmt="vhdx").close()
    with blockdrv.open_image(child, readonly=False) as img:
        img.write(4096, data(4, 4096))                # PARTIALLY_PRESENT + bitmap block
        img.write(3 * MiB, data(5, MiB))
    with blockdrv.open_image(child, readonly=False, discard="unmap") as img:
        img.discard(0, MiB)                           # now ZERO: the bitmap is unused
    before, length = guest_bytes(child), os.path.getsize(child)
    r = compact(child)
    assert r.freed_bitmaps == 1
    with blockdrv.open_image(child) as img:
        v = img.bs.opaque
        assert v.bitmaps.entry(0) & 7 != SB_BLOCK_PRESENT
    assert guest_bytes(child) == before
    assert os.path.getsize(child) < length
    # a later partial write allocates a fresh bitmap block
    with blockdrv.open_image(child, readonly=False) as img:
        img.write(5 * MiB + 512, b"\x01" * 512)
    with blockdrv.open_image(child) as img:
        assert img.read(5 * MiB, 1536) == bytes(512) + b"\x01" * 512 + bytes(512)
    assert blockdrv.check(child).corruptions == 0


def test_plan_moves_highest_first_into_lowest_holes():
    MB = MiB
    spans = [Span(0, 4 * MB, -1), Span(8 * MB, 9 * MB, 1), Span(11 * MB, 12 * MB, 2),
             Span(14 * MB, 15 * MB, 3), Span(15 * MB, 16 * MB, 4)]
    moves, end = plan_moves(spans, 16 * MB)
    assert [(s.index, d // MB) for s, d in moves] == [(4, 9), (3, 10)]
    assert end == 12 * MB


def test_refusals_are_one_line(tmp_path):
    fixed = str(tmp_path / "f.vhdx")
    blockdrv.create_image(fixed, "vhdx", 8 * MiB, subformat="fixed").close()
    rc, out, err = run_blockdrv("compact", fixed)
    assert rc == 1 and err.count("\n") == 1 and "fixed" in err
    raw = str(tmp_path / "r.raw")
    blockdrv.create_image(raw, "raw", 8 * MiB).close()
    rc, out, err = run_blockdrv("compact", raw)
    assert rc == 1 and err.count("\n") == 1 and "does not support compaction" in err
    dyn = str(tmp_path / "d.vhdx")
    blockdrv.create_image(dyn, "vhdx", 8 * MiB).close()
    with blockdrv.open_image(dyn, readonly=False):
        rc, out, err = run_blockdrv("compact", dyn)     # in use: the lock refuses
    assert rc == 1 and err.count("\n") == 1 and "lock" in err
    rc, out, err = run_blockdrv("compact", str(tmp_path / "missing.vhdx"))
    assert rc == 1 and err.count("\n") == 1


def test_pending_log_is_replayed_first(tmp_path):
    path = tmp_path / "dirty.vhdx"
    facts = make_dirty_log(path, block_size="1M")
    with pytest.raises(BlockDriverError, match="pending log"):
        compact(path, dry_run=True)
    r = compact(path)
    assert not r.dry_run
    with blockdrv.open_image(path) as img:
        assert img.info().format_specific["log-pending"] is False
        assert img.read(0, 4096) == bytes([facts["pattern"]]) * 4096


def test_cli_dry_run_and_quiet(tmp_path):
    path = str(tmp_path / "a.vhdx")
    fragmented(path, seed=3)
    digest = file_digest(path)
    rc, out, err = run_blockdrv("compact", "--dry-run", path)
    assert rc == 0, err
    assert out.startswith("Compaction would free ") and file_digest(path) == digest
    rc, out, err = run_blockdrv("compact", "-q", "-f", "vhdx", path)
    assert rc == 0 and out == "" and err == ""
