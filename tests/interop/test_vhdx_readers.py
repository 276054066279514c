"""VHDX across readers: qemu makes -> blockdrv reads; blockdrv makes -> qemu
(and vhdiinfo) reads and checks.

* Guest data is compared over the whole disk: blockdrv's reading of an image
  (``blockdrv.open_image(...).read``) against ``qemu-img convert -O raw`` of
  the same image, and qemu-io ``read -P`` of everything a blockdrv script
  wrote.
* ``info --output=json``: every key qemu-img prints has the same value in
  ``blockdrv info`` (``actual-size`` included; the two read the same file);
  blockdrv adds only ``format-specific``.
* ``map --output=json``: blockdrv reports the real allocation -- FULLY_PRESENT
  blocks as data with their file offset (split further where the host file
  has holes), absent/ZERO blocks as ``"data": false, "zero": true`` without
  an offset.  qemu 7.2's vhdx has no block-status callback, so ``qemu-img
  map`` reports the whole disk as one data extent without offsets; the test
  checks that qemu does exactly that and that blockdrv's map is true to the
  data (every data extent reads the guest bytes at its file offset, every
  zero extent reads zeros) and to the BAT.
* ``vhdiinfo`` (libvhdi 20210425) as a second reader: it prints disk type,
  media size and bytes per sector (it has no block-size line, so the block
  size is checked through blockdrv and qemu only).
"""

from __future__ import annotations

import json
import os

import pytest

import blockdrv
from blockdrv.testing.qemu import (qemu_img_check, qemu_img_create, qemu_img_info, qemu_img_map,
                                   random_script, replay_script, run_qemu_img, run_qemu_io)
from blockdrv.testing.scripts import guest_bytes, run_blockdrv, verify_reads
from blockdrv.testing.vhdx.scripts import edge_script, vhdiinfo_fields

pytestmark = pytest.mark.interop

MiB = 1 << 20
TiB = 1 << 40
SIZE = 10 * MiB + 512

OPTION_SETS = [
    dict(subformat="dynamic", block_size="1M", log_size="1M"),
    dict(subformat="dynamic", block_size="8M", log_size="8M", block_state_zero=False),
    dict(subformat="fixed", block_size="1M", log_size="1M"),
    dict(subformat="fixed", block_size="32M", log_size="1M", block_state_zero=False),
    dict(subformat="dynamic", block_size="256M", log_size="1M"),
]


def _oid(opts) -> str:
    return "-".join(f"{k}={v}" for k, v in opts.items())


def _o(opts) -> str:
    return ",".join(f"{k}={('on' if v else 'off') if isinstance(v, bool) else v}"
                    for k, v in opts.items())


def qemu_raw(path, out) -> bytes:
    rc, _, err = run_qemu_img("convert", "-f", "vhdx", "-O", "raw", path, out)
    assert rc == 0, err
    with open(out, "rb") as f:
        return f.read()


def write_script(seed: int, size: int) -> list[str]:
    """Writes only (pattern and zero writes), no reads or discards."""
    return random_script(seed, size, n=40, max_len=3 * MiB,
                         weights={"read": 0, "discard": 0, "flush": 0.3})


def blockdrv_create(path, size, opts) -> None:
    rc, out, err = run_blockdrv("create", "-q", "-f", "vhdx", "-o", _o(opts), path, size)
    assert rc == 0, err


# -- qemu makes -> blockdrv reads ---------------------------------------------------

@pytest.mark.parametrize("opts", OPTION_SETS, ids=_oid)
def test_qemu_written_image_reads_identically_in_blockdrv(interop_tmp, qemu_img, qemu_io,
                                                          opts):
    path = interop_tmp / "q.vhdx"
    qemu_img_create(path, "vhdx", SIZE, **opts)
    script = write_script(3, SIZE)
    res = replay_script(script + verify_reads(script, SIZE) + edge_script(SIZE, MiB, False),
                        path, "vhdx", "qemu")
    assert "verification failed" not in res.stdout
    assert guest_bytes(path) == qemu_raw(path, interop_tmp / "q.raw")
    rc, out, err = run_blockdrv("check", "-f", "vhdx", path)
    assert rc == 0, out + err


# -- blockdrv makes -> qemu reads and checks ------------------------------------------

@pytest.mark.parametrize("opts", OPTION_SETS, ids=_oid)
def test_blockdrv_written_image_reads_identically_in_qemu(interop_tmp, qemu_img, qemu_io,
                                                          opts):
    path = interop_tmp / "b.vhdx"
    blockdrv_create(path, SIZE, opts)
    script = write_script(4, SIZE)
    res = replay_script(script, path, "vhdx", "blockdrv")
    assert res.rc == 0, res.stdout + res.stderr
    assert qemu_raw(path, interop_tmp / "b.raw") == guest_bytes(path)
    # qemu-io verifies the final content of every range written
    rc, out, err = run_qemu_io(path, verify_reads(script, SIZE), "vhdx", readonly=True)
    assert rc == 0 and "verification failed" not in out, out + err
    rc, report = qemu_img_check(path, "vhdx")
    assert rc == 0 and report["check-errors"] == 0, report


def test_blockdrv_written_image_verified_by_qemu_io_patterns(interop_tmp, qemu_img, qemu_io):
    """Non-overlapping writes, each verified by qemu-io afterwards."""
    path = interop_tmp / "b.vhdx"
    blockdrv_create(path, SIZE, dict(block_size="1M"))
    writes = [(i * 700_001 % (SIZE - 70_000), 1 + i * 4099 % 65_000, i + 1) for i in range(14)]
    writes.sort()
    disjoint, end = [], 0
    for start, length, pat in writes:
        if start >= end:
            disjoint.append((start, length, pat))
            end = start + length
    res = replay_script([f"write -P {p} {s} {n}" for s, n, p in disjoint], path, "vhdx",
                        "blockdrv")
    assert res.rc == 0
    rc, out, err = run_qemu_io(path, [f"read -P {p} {s} {n}" for s, n, p in disjoint],
                               "vhdx", readonly=True)
    assert rc == 0 and "verification failed" not in out, out


# -- info and map -------------------------------------------------------------------------

def _info_pair(path):
    q = qemu_img_info(path, "vhdx")
    rc, out, err = run_blockdrv("info", "--output=json", "-f", "vhdx", path)
    assert rc == 0, err
    return q, json.loads(out)


@pytest.mark.parametrize("maker", ["qemu", "blockdrv"])
@pytest.mark.parametrize("opts", OPTION_SETS[:4], ids=_oid)
def test_info_json_matches_qemu(interop_tmp, qemu_img, qemu_io, maker, opts):
    path = interop_tmp / "i.vhdx"
    if maker == "qemu":
        qemu_img_create(path, "vhdx", SIZE, **opts)
    else:
        blockdrv_create(path, SIZE, opts)
    for step in range(2):
        q, b = _info_pair(path)
        assert "format-specific" not in q
        fs = b.pop("format-specific")
        assert b == q                     # same keys, same values, actual-size too
        assert fs["type"] == "vhdx"
        data = fs["data"]
        assert data["subformat"] == opts["subformat"]
        assert data["block-size"] == q["cluster-size"]
        assert data["log-size"] == int(opts["log_size"][:-1]) * MiB
        assert data["logical-sector-size"] == 512
        # then data written by the other tool
        replay_script(write_script(5 + step, SIZE), path, "vhdx",
                      "blockdrv" if maker == "qemu" else "qemu")


def test_info_human_output_starts_like_qemu(interop_tmp, qemu_img):
    path = interop_tmp / "h.vhdx"
    qemu_img_create(path, "vhdx", "33M", block_size="8M")
    rc, q, err = run_qemu_img("info", "-f", "vhdx", path)
    assert rc == 0, err
    rc, out, _ = run_blockdrv("info", "-f", "vhdx", path)
    assert rc == 0
    # human output: qemu's lines come first, blockdrv adds a format-specific block
    assert out.startswith(q.rstrip("\n")), (q, out)


def _map(path):
    rc, out, err = run_blockdrv("map", "--output=json", "-f", "vhdx", path)
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize("maker", ["qemu", "blockdrv"])
def test_map_shows_real_allocation(interop_tmp, qemu_img, qemu_io, maker):
    path = interop_tmp / "m.vhdx"
    qemu_img_create(path, "vhdx", SIZE, block_size="1M", log_size="1M")
    script = ["write -P 0x31 0 4096", "write -P 0x32 3M 1M", "write -z 6M 512",
              "write -P 0x33 10M 512"]
    res = replay_script(script, path, "vhdx", maker)
    assert res.rc == 0, res.stdout
    guest = guest_bytes(path)

    # qemu 7.2: no block status in its vhdx driver -> one data extent, no offsets
    assert qemu_img_map(path, "vhdx") == [
        {"start": 0, "length": SIZE, "depth": 0, "present": True, "zero": False,
         "data": True}]

    extents = _map(path)
    assert extents[0]["start"] == 0
    assert sum(e["length"] for e in extents) == SIZE
    with open(path, "rb") as f:
        for e in extents:
            s, n = e["start"], e["length"]
            if e["data"]:
                assert "offset" in e
                f.seek(e["offset"])
                assert f.read(n) == guest[s:s + n], e
            else:
                assert e["zero"] and "offset" not in e
                assert guest[s:s + n] == bytes(n), e
    # allocated (data) blocks are exactly the four blocks written (qemu
    # allocates a block for a zero write too): 0, 3, 6, 10
    blocks = sorted({e["start"] // MiB for e in extents if e["data"]} |
                    {(e["start"] + e["length"] - 1) // MiB for e in extents if e["data"]})
    assert blocks == [0, 3, 6, 10]


# -- vhdiinfo as a second reader -------------------------------------------------------------

VHDI_CASES = [
    (SIZE, dict(subformat="dynamic", block_size="1M")),
    (33 * MiB, dict(subformat="fixed", block_size="8M", block_state_zero=False)),
    (33 * MiB, dict(subformat="fixed", block_size="32M")),
    (5 * TiB + 4096, dict(subformat="dynamic", block_size="256M", log_size="8M")),
    (33 * MiB, dict(subformat="dynamic", logical_sector_size=4096)),
    (SIZE + 3584, dict(subformat="dynamic", logical_sector_size=4096, block_size="1M")),
    (33 * MiB, dict(subformat="dynamic", logical_sector_size=512, physical_sector_size=4096)),
]


@pytest.mark.parametrize("size, opts", VHDI_CASES, ids=[f"{s}-{_oid(o)}" for s, o in VHDI_CASES])
def test_vhdiinfo_accepts_blockdrv_images(interop_tmp, vhdiinfo, size, opts):
    path = interop_tmp / "v.vhdx"
    blockdrv_create(path, size, opts)
    lss = opts.get("logical_sector_size", 512)
    # written data must not upset it either
    res = replay_script(["write -P 0x44 0 8192", f"write -P 0x45 {size - lss} {lss}"],
                        path, "vhdx", "blockdrv")
    assert res.rc == 0, res.stdout + res.stderr
    f = vhdiinfo_fields(path, vhdiinfo)
    assert f["Format"].startswith("VHDX")
    assert f["Disk type"] == ("Fixed" if opts["subformat"] == "fixed" else "Dynamic")
    assert f["Media size"].endswith(f"({size} bytes)"), f
    assert f["Bytes per sector"] == f"{lss} bytes"
    with blockdrv.open_image(path) as img:
        assert img.size == size
        # libvhdi's "Identifier" of a VHDX is the header's DataWriteGuid
        assert f["Identifier"] == img.info().format_specific["data-write-guid"]
        assert img.info().cluster_size == (int(opts["block_size"][:-1]) * MiB
                                           if "block_size" in opts else
                                           (8 * MiB if size <= 1 << 30 else 64 * MiB))


def test_4096_sector_image_reads_correctly_in_blockdrv(interop_tmp, vhdiinfo):
    """qemu can neither create nor open it; blockdrv round-trips data through
    the 4 KiB request alignment (read-modify-write of partial sectors)."""
    path = interop_tmp / "4k.vhdx"
    size = 10 * MiB + 8192
    blockdrv_create(path, size, dict(logical_sector_size=4096, block_size="1M"))
    model = bytearray(size)
    with blockdrv.open_image(path, "vhdx", readonly=False) as img:
        assert img.block_status(0, 4096) is not None
        for off, data in [(1, b"\x01" * 3), (4095, b"\x02" * 2), (MiB - 100, b"\x03" * 300),
                          (size - 4096, b"\x04" * 4096), (size - 1, b"\x05"),
                          (3 * MiB + 12345, os.urandom(200_000))]:
            img.write(off, data)
            model[off:off + len(data)] = data
    assert guest_bytes(path) == bytes(model)
    assert vhdiinfo_fields(path, vhdiinfo)["Bytes per sector"] == "4096 bytes"
    rc, out, err = run_blockdrv("check", path)
    assert rc == 0, out + err
    rc, out, err = run_blockdrv("info", "--output=json", path)
    data = json.loads(out)["format-specific"]["data"]
    assert data["logical-sector-size"] == 4096


def test_qemu_refuses_4096_sector_image(interop_tmp, qemu_img):
    path = interop_tmp / "4k.vhdx"
    blockdrv_create(path, 8 * MiB, dict(logical_sector_size=4096))
    rc, out, err = run_qemu_io(path, ["read 0 4096"], "vhdx")
    assert rc != 0           # qemu 7.2: "Only 512-byte logical sectors supported"


# -- 40 TiB ---------------------------------------------------------------------------------

LAST = 40 * TiB - 512


@pytest.mark.parametrize("maker", ["qemu", "blockdrv"])
def test_40tib_dynamic_image(interop_tmp, qemu_img, qemu_io, maker):
    path = interop_tmp / "big.vhdx"
    if maker == "qemu":
        qemu_img_create(path, "vhdx", "40T")
    else:
        blockdrv_create(path, "40T", {"subformat": "dynamic"})
    with blockdrv.open_image(path) as img:
        assert img.size == 40 * TiB
        assert img.read(LAST - 4096, 4608) == bytes(4608)
        assert img.info().cluster_size == 64 * MiB
    # the other tool writes the last sector, then both read it back and check
    writer = "blockdrv" if maker == "qemu" else "qemu"
    res = replay_script(["read -P 0 43980465106944 4096", f"write -P 0x5a {LAST} 512"],
                        path, "vhdx", writer)
    assert res.rc == 0 and "verification failed" not in res.stdout, res.stdout
    with blockdrv.open_image(path) as img:
        assert img.read(LAST, 512) == b"\x5a" * 512
        assert img.read(LAST - 512, 512) == bytes(512)
    rc, out, err = run_qemu_io(path, [f"read -P 0x5a {LAST} 512", "read -P 0 0 1M"],
                               "vhdx", readonly=True)
    assert rc == 0 and "verification failed" not in out, out
    rc, report = qemu_img_check(path, "vhdx")
    assert rc == 0 and report["check-errors"] == 0
    rc, out, err = run_blockdrv("check", "-f", "vhdx", path)
    assert rc == 0, out + err
    q, b = _info_pair(path)
    b.pop("format-specific")
    assert b == q
    assert os.path.getsize(path) < 200 * MiB
