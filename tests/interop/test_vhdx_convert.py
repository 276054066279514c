"""``blockdrv convert`` to and from VHDX against ``qemu-img convert`` 7.2.

* raw -> vhdx: the same raw source (data, holes, explicitly written zeros,
  zero runs inside data) converted by both tools gives files identical after
  ``normalize_vhdx`` (``compare_files(..., "vhdx")``), with the payload
  allocated in the same places.  The one allocation difference is the metadata area written by
  create: qemu writes the whole BAT and metadata regions (zeros included),
  blockdrv leaves the all-zero parts as holes; bytes are the same, so the
  maps are compared from ``structure_end`` on.
* qemu-img skips zero ranges only when the new target ``has_zero_init``
  (qemu's vhdx: a dynamic image, or a fixed one whose first BAT entry is
  FULLY_PRESENT on a zero-initialised file); the fixed/zero-off and ``-n``
  cases check the driver answers alike.
* vhdx -> raw: byte-for-byte equal to qemu's output and exactly as sparse
  (same SEEK_DATA/SEEK_HOLE map).
* vhdx -> vhdx: identical normalized files.
"""

from __future__ import annotations

import json
import os

import pytest

from blockdrv.testing.compare import allocation_map, compare_files, data_extents
from blockdrv.testing.qemu import qemu_img_create, qemu_img_map, replay_script, run_qemu_img
from blockdrv.testing.scripts import run_blockdrv

pytestmark = pytest.mark.interop

MiB = 1 << 20


def make_raw(path, size: int) -> None:
    """Data, holes, written zeros, zero runs inside data, the last sector."""
    pieces = [(0, bytes([1]) * 4096), (MiB, bytes([2]) * 3 * MiB), (9 * MiB, bytes([3]) * 5000),
              (20 * MiB + 100, b"\xff" * MiB), (9 * MiB + 8192, b"\x05"),
              (12 * MiB, bytes(2 * MiB)),                       # allocated zeros
              (15 * MiB, b"\x01" + bytes(70000) + b"\x02"),   # zero run inside data
              (5 * MiB, bytes(range(256)) * 4096),             # 1 MiB, no zero sector
              (size - 512, bytes([4]) * 512)]
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            if off + len(data) <= size:
                f.seek(off)
                f.write(data)


def qemu_convert(*args) -> None:
    rc, out, err = run_qemu_img("convert", *map(os.fspath, args))
    assert rc == 0, err


def blockdrv_convert(*args) -> None:
    rc, out, err = run_blockdrv("convert", *args)
    assert rc == 0, out + err


def assert_same_vhdx_payload(a, b) -> None:
    """Same size, same bytes after normalization, payload allocated alike."""
    diff = compare_files(a, b, "vhdx", extents="payload")
    assert diff is None, str(diff)


TARGETS = [
    "subformat=dynamic",
    "subformat=dynamic,block_size=1M",
    "subformat=dynamic,block_size=32M,log_size=8M",
    "subformat=dynamic,block_state_zero=off,block_size=8M",
    "subformat=fixed",
    "subformat=fixed,block_size=1M",
    "subformat=fixed,block_state_zero=off,block_size=1M",
    "subformat=fixed,block_state_zero=off,block_size=32M",
]


@pytest.mark.parametrize("size", [33 * MiB, 10 * MiB + 512])
@pytest.mark.parametrize("opts", TARGETS)
def test_raw_to_vhdx_identical(interop_tmp, qemu_img, opts, size):
    src = interop_tmp / "src.raw"
    make_raw(src, size)
    q, b = interop_tmp / "q.vhdx", interop_tmp / "b.vhdx"
    qemu_convert("-f", "raw", "-O", "vhdx", "-o", opts, src, q)
    blockdrv_convert("-f", "raw", "-O", "vhdx", "-o", opts, src, b)
    assert_same_vhdx_payload(q, b)


@pytest.mark.parametrize("tail", [b"", b"\x07"])
def test_raw_source_not_a_sector_multiple(interop_tmp, qemu_img, tail):
    """Regression: a raw file of 15 MiB + 70002 bytes.  qemu rounds its length
    up to a sector; the rounded tail past EOF reads as zeros.  blockdrv's raw
    driver asked the file node for the status past its EOF and convert
    failed with "driver raw returned an invalid block status length"."""
    src = interop_tmp / "odd.raw"
    make_raw(src, 15 * MiB)
    with open(src, "ab") as f:
        f.write(b"\x01" + bytes(70000) + (tail or b"\0"))
    q, b = interop_tmp / "q.vhdx", interop_tmp / "b.vhdx"
    qemu_convert("-f", "raw", "-O", "vhdx", src, q)
    blockdrv_convert("-f", "raw", "-O", "vhdx", src, b)
    assert_same_vhdx_payload(q, b)
    qr, br = interop_tmp / "q.raw", interop_tmp / "b.raw"
    qemu_convert("-f", "raw", "-O", "raw", src, qr)
    blockdrv_convert("-f", "raw", "-O", "raw", src, br)
    with open(qr, "rb") as f1, open(br, "rb") as f2:
        assert f1.read() == f2.read()
    assert data_extents(qr) == data_extents(br)
    rc, out, err = run_blockdrv("map", "--output=json", "-f", "raw", src)
    assert rc == 0 and json.loads(out) == qemu_img_map(src, "raw")


@pytest.mark.parametrize("sparse", ["0", "64k", "4k"])
def test_raw_to_vhdx_sparse_sizes(interop_tmp, qemu_img, sparse):
    src = interop_tmp / "src.raw"
    make_raw(src, 33 * MiB)
    q, b = interop_tmp / "q.vhdx", interop_tmp / "b.vhdx"
    qemu_convert("-S", sparse, "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", src, q)
    blockdrv_convert("-S", sparse, "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", src, b)
    assert_same_vhdx_payload(q, b)


@pytest.mark.parametrize("target", ["subformat=dynamic,block_size=1M",
                                    "subformat=fixed,block_state_zero=off,block_size=1M"])
def test_convert_into_existing_vhdx_writes_zero_ranges(interop_tmp, qemu_img, qemu_io, target):
    """``-n``: the target is not new, so zero_init does not apply and the
    source's holes must overwrite the target's old data."""
    src = interop_tmp / "src.raw"
    make_raw(src, 33 * MiB)
    paths = []
    for tool in ("qemu", "blockdrv"):
        dst = interop_tmp / f"{tool}.vhdx"
        qemu_img_create(dst, "vhdx", 33 * MiB,
                        **dict(kv.split("=") for kv in target.split(",")))
        res = replay_script(["write -P 0x77 0 33M"], dst, "vhdx", "qemu")
        assert res.rc == 0
        (qemu_convert if tool == "qemu" else blockdrv_convert)(
            "-n", "-f", "raw", "-O", "vhdx", src, dst)
        paths.append(dst)
    assert_same_vhdx_payload(*paths)
    q_raw = interop_tmp / "check.raw"
    qemu_convert("-O", "raw", paths[1], q_raw)
    with open(q_raw, "rb") as f1, open(src, "rb") as f2:
        assert f1.read() == f2.read()


def _vhdx_source(interop_tmp, opts: str, maker: str):
    src = interop_tmp / "src.raw"
    make_raw(src, 33 * MiB)
    img = interop_tmp / "src.vhdx"
    qemu_convert("-f", "raw", "-O", "vhdx", "-o", opts, src, img)
    # then some writes by either tool: zero writes, new blocks, overwrites
    res = replay_script(["write -z 20M 1M", "write -P 9 30M 4k", "write -z 6M 4k",
                         "write -P 8 32M 512"],
                        img, "vhdx", maker)
    assert res.rc == 0, res.stdout + res.stderr
    return img


SOURCES = ["subformat=dynamic", "subformat=dynamic,block_size=1M",
           "subformat=fixed,block_size=1M",
           "subformat=fixed,block_state_zero=off,block_size=8M"]


@pytest.mark.parametrize("maker", ["qemu", "blockdrv"])
@pytest.mark.parametrize("opts", SOURCES)
def test_vhdx_to_raw_identical_and_as_sparse(interop_tmp, qemu_img, qemu_io, opts, maker):
    img = _vhdx_source(interop_tmp, opts, maker)
    q, b = interop_tmp / "q.raw", interop_tmp / "b.raw"
    qemu_convert("-f", "vhdx", "-O", "raw", img, q)
    blockdrv_convert("-f", "vhdx", "-O", "raw", img, b)
    with open(q, "rb") as fq, open(b, "rb") as fb:
        assert fq.read() == fb.read()
    assert data_extents(q) == data_extents(b)
    # as sparse as qemu's copy: the same allocation map (written and
    # preallocated ranges), not st_blocks, which also counts the filesystem's
    # own extent-tree blocks and so varies with fragmentation under load
    assert allocation_map(q) == allocation_map(b)


@pytest.mark.parametrize("maker", ["qemu", "blockdrv"])
@pytest.mark.parametrize("target", ["subformat=dynamic,block_size=1M",
                                    "subformat=fixed,block_size=8M",
                                    "subformat=fixed,block_state_zero=off,block_size=1M"])
def test_vhdx_to_vhdx_identical(interop_tmp, qemu_img, qemu_io, target, maker):
    img = _vhdx_source(interop_tmp, "subformat=dynamic,block_size=8M", maker)
    q, b = interop_tmp / "q.vhdx", interop_tmp / "b.vhdx"
    qemu_convert("-f", "vhdx", "-O", "vhdx", "-o", target, img, q)
    blockdrv_convert("-f", "vhdx", "-O", "vhdx", "-o", target, img, b)
    assert_same_vhdx_payload(q, b)
