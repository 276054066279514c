"""Discards and unmapping zero writes as VHDX block states (blockdrv.drivers.
vhdx.discard): only with an explicit discard=unmap; UNMAPPED (dynamic) or
ZERO (zero writes, differencing); partial blocks zeroed; freed space reused
before the file grows; fixed images untouched; qemu-io's default changes
nothing."""

from __future__ import annotations

import io
import os
import random

import pytest

import blockdrv
from blockdrv.cli.io.session import run as io_run
from blockdrv.drivers.vhdx.constants import (PAYLOAD_BLOCK_FULLY_PRESENT,
                                             PAYLOAD_BLOCK_NOT_PRESENT,
                                             PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                                             PAYLOAD_BLOCK_UNMAPPED, PAYLOAD_BLOCK_ZERO)

MiB = 1 << 20


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def states(img) -> list[int]:
    bat = img.bs.opaque.bat
    return [bat.raw(b) & 7 for b in range(bat.data_blocks)]


def bio(path, *commands, extra=()):
    argv = ["-f", "vhdx", *extra]
    for c in commands:
        argv += ["-c", c]
    out, err = io.StringIO(), io.StringIO()
    rc = io_run(argv + [str(path)], out, err)
    assert rc == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture
def dyn(tmp_path):
    path = str(tmp_path / "d.vhdx")
    blockdrv.create_image(path, "vhdx", 16 * MiB, block_size=MiB, log_size=MiB).close()
    with blockdrv.open_image(path, readonly=False) as img:
        img.write(0, data(1, 6 * MiB))
    return path


def test_whole_blocks_become_unmapped_partial_ones_zeroed(dyn):
    with blockdrv.open_image(dyn, readonly=False, discard="unmap") as img:
        img.discard(MiB, 2 * MiB)                    # blocks 1, 2
        img.discard(3 * MiB + 4096, 8192)            # inside block 3
        img.write_zeroes(4 * MiB, MiB, unmap=True)   # block 4
        st = states(img)
        assert st[1] == st[2] == PAYLOAD_BLOCK_UNMAPPED
        assert st[3] == PAYLOAD_BLOCK_FULLY_PRESENT
        assert st[4] == PAYLOAD_BLOCK_ZERO
        assert st[0] == st[5] == PAYLOAD_BLOCK_FULLY_PRESENT
        assert img.bs.opaque.bat.raw(1) >> 20 == 0   # FileOffsetMB zero: nothing to leak
    want = bytearray(data(1, 6 * MiB))
    want[MiB:3 * MiB] = bytes(2 * MiB)
    want[3 * MiB + 4096:3 * MiB + 12288] = bytes(8192)
    want[4 * MiB:5 * MiB] = bytes(MiB)
    with blockdrv.open_image(dyn) as img:
        assert img.read(0, 6 * MiB) == bytes(want)
        assert img.check().corruptions == 0


def test_freed_blocks_are_reused_before_the_file_grows(dyn):
    length = os.path.getsize(dyn)
    with blockdrv.open_image(dyn, readonly=False, discard="unmap") as img:
        img.discard(0, 3 * MiB)
        img.write(10 * MiB + 512, b"\x11" * 512)     # one freed block, zero-filled
        img.write(12 * MiB, data(2, MiB))
    assert os.path.getsize(dyn) == length
    with blockdrv.open_image(dyn, readonly=False, discard="unmap") as img:
        # a new session finds the third freed block in the file
        img.write(14 * MiB, data(3, 4096))
        assert img.read(10 * MiB, MiB) == bytes(512) + b"\x11" * 512 + bytes(MiB - 1024)
    assert os.path.getsize(dyn) == length
    with blockdrv.open_image(dyn) as img:
        assert img.read(12 * MiB, MiB) == data(2, MiB)
        assert img.read(14 * MiB, 4096) == data(3, 4096)
        assert img.read(0, 3 * MiB) == bytes(3 * MiB)
        assert img.check().corruptions == 0


def test_reuse_waits_while_other_requests_are_in_flight(dyn):
    with blockdrv.open_image(dyn, readonly=False, discard="unmap") as img:
        vimg = img.bs.opaque
        img.discard(0, MiB)
        vimg.inflight += 1                       # a request that may still use the old block
        length = os.path.getsize(dyn)
        img.write(9 * MiB, b"x" * 512)
        assert os.path.getsize(dyn) > length     # grew instead of reusing
        vimg.inflight -= 1


def _snapshot(path):
    with blockdrv.open_image(path) as img:
        v = img.bs.opaque
        return (os.path.getsize(path), v.bat.to_bytes(),
                img.info().format_specific["data-write-guid"], img.read(0, img.size))


def test_without_explicit_option_nothing_changes(dyn, tmp_path):
    """qemu's vhdx has no discard: qemu-io's default (-d absent, O_UNMAP set)
    and open_image's default leave BAT, data, DataWriteGuid and length as
    they were (a read-write open still renews the FileWriteGuid, as qemu's)."""
    before = _snapshot(dyn)
    bio(dyn, "discard 0 4M", "discard 5M 512")
    with blockdrv.open_image(dyn, readonly=False) as img:
        img.discard(0, 2 * MiB)
    assert _snapshot(dyn) == before
    # write -z -u without the option: zeros written, blocks stay present
    bio(dyn, "write -z -u 0 1M")
    with blockdrv.open_image(dyn) as img:
        assert states(img)[0] == PAYLOAD_BLOCK_FULLY_PRESENT
        assert img.read(0, MiB) == bytes(MiB)


def test_io_explicit_unmap_acts(dyn):
    bio(dyn, "discard 0 2M", "write -z -u 2M 1M", "write -z 3M 1M", extra=["-d", "unmap"])
    with blockdrv.open_image(dyn) as img:
        st = states(img)
        assert st[:4] == [PAYLOAD_BLOCK_UNMAPPED, PAYLOAD_BLOCK_UNMAPPED, PAYLOAD_BLOCK_ZERO,
                          PAYLOAD_BLOCK_FULLY_PRESENT]      # write -z without -u writes zeros
        assert img.read(0, 4 * MiB) == bytes(4 * MiB)


def test_fixed_images_keep_every_block(tmp_path):
    path = str(tmp_path / "f.vhdx")
    blockdrv.create_image(path, "vhdx", 8 * MiB, subformat="fixed", block_size=MiB).close()
    with blockdrv.open_image(path, readonly=False) as img:
        img.write(0, data(4, 2 * MiB))
    before = _snapshot(path)
    with blockdrv.open_image(path, readonly=False, discard="unmap") as img:
        img.discard(0, 2 * MiB)
    assert _snapshot(path) == before
    with blockdrv.open_image(path, readonly=False, discard="unmap") as img:
        img.write_zeroes(0, MiB, unmap=True)
        assert states(img)[0] == PAYLOAD_BLOCK_FULLY_PRESENT
        assert img.read(0, MiB) == bytes(MiB)


def test_differencing_child_hides_its_parent(tmp_path):
    parent = str(tmp_path / "p.vhdx")
    child = str(tmp_path / "c.vhdx")
    blockdrv.create_image(parent, "vhdx", 8 * MiB, block_size=MiB).close()
    with blockdrv.open_image(parent, readonly=False) as img:
        img.write(0, b"\x77" * (8 * MiB))
    blockdrv.create_image(child, "vhdx", backing_file="p.vhdx", backing_fmt="vhdx").close()
    with blockdrv.open_image(child, readonly=False) as img:
        img.write(MiB, data(5, MiB))                  # FULLY_PRESENT
        img.write(2 * MiB, data(6, 4096))             # PARTIALLY_PRESENT
    with blockdrv.open_image(child, readonly=False, discard="unmap") as img:
        img.discard(0, 3 * MiB)                       # NOT_PRESENT, FULLY, PARTIALLY
        img.discard(4 * MiB + 8192, 4096)             # part of a NOT_PRESENT block
        st = states(img)
        assert st[:3] == [PAYLOAD_BLOCK_ZERO] * 3
        assert st[4] == PAYLOAD_BLOCK_PARTIALLY_PRESENT
        assert st[5] == PAYLOAD_BLOCK_NOT_PRESENT
    with blockdrv.open_image(child) as img:
        assert img.read(0, 3 * MiB) == bytes(3 * MiB)
        got = img.read(4 * MiB, MiB)
        assert got[8192:12288] == bytes(4096)
        assert got[:8192] == got[12288:] [:8192] == b"\x77" * 8192
        assert img.read(5 * MiB, MiB) == b"\x77" * MiB
        assert img.check().corruptions == 0


def test_discard_across_sessions_marks_data_write(dyn):
    with blockdrv.open_image(dyn) as img:
        guid = img.info().format_specific["data-write-guid"]
    with blockdrv.open_image(dyn, readonly=False, discard="unmap") as img:
        img.discard(0, MiB)
    with blockdrv.open_image(dyn) as img:
        assert img.info().format_specific["data-write-guid"] != guid
