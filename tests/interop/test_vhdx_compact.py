"""Discards as VHDX block states and ``blockdrv compact``, with qemu-img and
qemu-io 7.2 as readers (qemu cannot open differencing VHDX files).

* a random qemu-io script (writes, ``write -z [-u]``, discards, verified
  reads) run by ``blockdrv io -d unmap`` on a dynamic VHDX reads, for
  qemu-img compare, exactly as the same script run by qemu-io on a raw file
  (whose discards punch holes); qemu-img check finds nothing;
* a fixed VHDX keeps every block: as the script with its discards dropped;
* ``blockdrv compact`` of those images: qemu-img check clean, compare
  identical to before, no larger than qemu-img convert's copy plus 1 MiB;
  qemu-io can then write into the compacted image and check stays clean.
"""

from __future__ import annotations

import os
import shutil

import pytest

from blockdrv.testing.qemu import (qemu_img_check, qemu_img_info, random_script,
                                   run_blockdrv_io, run_qemu_img, run_qemu_io)
from blockdrv.testing.scripts import run_blockdrv
from blockdrv.testing.vhdx.fixtures import libvhdi_read

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB


def ok_io(rc, out, err):
    assert rc == 0 and "fail" not in (out + err).lower(), out + err


def qemu_compare(a, b, fmt_a="vhdx", fmt_b="vhdx"):
    rc, out, err = run_qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b)
    assert rc == 0, out + err


def qemu_clean(path):
    rc, out, err = run_qemu_img("check", "-f", "vhdx", path)
    assert rc == 0 and "No errors" in out, out + err


def create(path, **opts):
    o = ",".join(f"{k}={v}" for k, v in {"block_size": "1M", **opts}.items())
    rc, out, err = run_blockdrv("create", "-q", "-f", "vhdx", "-o", o, path, str(SIZE))
    assert rc == 0, err


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_discarded_dynamic_image_reads_as_qemus_raw(tmp_path, seed):
    script = random_script(seed, SIZE, n=60, aligned=1.0, out_of_range=0.0,
                           discard_zeroes=True, weights={"discard": 2.5, "zero": 2})
    vhdx, raw = str(tmp_path / "a.vhdx"), str(tmp_path / "a.raw")
    create(vhdx)
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    ok_io(*run_blockdrv_io(vhdx, script, fmt="vhdx", extra=["-d", "unmap"]))
    ok_io(*run_qemu_io(raw, script, fmt="raw"))
    qemu_clean(vhdx)
    qemu_compare(vhdx, raw, fmt_b="raw")
    assert qemu_img_info(vhdx, "vhdx")["virtual-size"] == SIZE

    # compact: same guest data, clean, no larger than qemu's convert + 1 MiB
    before = str(tmp_path / "before.vhdx")
    shutil.copyfile(vhdx, before)
    rc, out, err = run_blockdrv("compact", vhdx)
    assert rc == 0 and out.startswith("Image compacted"), err
    qemu_clean(vhdx)
    qemu_compare(vhdx, before)
    qemu_compare(vhdx, raw, fmt_b="raw")
    conv = str(tmp_path / "conv.vhdx")
    rc, out, err = run_qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M",
                                raw, conv)
    assert rc == 0, err
    assert os.path.getsize(vhdx) <= os.path.getsize(conv) + MiB
    # qemu allocates into the compacted image
    ok_io(*run_qemu_io(vhdx, ["write -P 0x3c 60M 3M", "read -P 0x3c 60M 3M"], fmt="vhdx"))
    qemu_clean(vhdx)


def test_discarded_fixed_image_keeps_its_blocks(tmp_path):
    script = random_script(7, SIZE, n=40, aligned=1.0, out_of_range=0.0,
                           weights={"discard": 2.5, "zero": 2})
    fixed, ref = str(tmp_path / "f.vhdx"), str(tmp_path / "ref.vhdx")
    create(fixed, subformat="fixed")
    shutil.copyfile(fixed, ref)
    ok_io(*run_blockdrv_io(fixed, script, fmt="vhdx", extra=["-d", "unmap"]))
    ok_io(*run_blockdrv_io(ref, script, fmt="vhdx", extra=["-d", "ignore"]))
    qemu_clean(fixed)
    qemu_compare(fixed, ref)
    assert os.path.getsize(fixed) == os.path.getsize(ref)
    rc, _, err = run_blockdrv("compact", fixed)
    assert rc == 1 and "fixed" in err and err.count("\n") == 1


def test_compact_image_written_by_qemu(tmp_path):
    """An image qemu-io wrote (zeros written as data, as qemu's vhdx does)."""
    path = str(tmp_path / "q.vhdx")
    rc, out, err = run_qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", path, str(SIZE))
    assert rc == 0, err
    ok_io(*run_qemu_io(path, ["write -P 0x11 0 10M", "write -z 2M 6M", "write -P 0x22 40M 4M",
                              "write -z -u 41M 2M", "write -P 0x33 63M 1M"], fmt="vhdx"))
    before = str(tmp_path / "before.vhdx")
    shutil.copyfile(path, before)
    length = os.path.getsize(path)
    rc, out, err = run_blockdrv("compact", "--dry-run", path)
    assert rc == 0 and out.startswith("Compaction would free"), err
    rc, out, err = run_blockdrv("compact", path)
    assert rc == 0, err
    assert os.path.getsize(path) == length - 8 * MiB       # 6 + 2 MiB of zero blocks
    qemu_clean(path)
    qemu_compare(path, before)
    assert qemu_img_check(path, "vhdx")[0] == 0


def test_pyvhdi_reads_discarded_and_compacted_images(tmp_path, pyvhdi):
    """libvhdi (pyvhdi) reads UNMAPPED and ZERO blocks and moved blocks as we do."""
    path, raw = str(tmp_path / "a.vhdx"), str(tmp_path / "a.raw")
    create(path)
    ok_io(*run_blockdrv_io(path, ["write -P 0x61 0 12M", "write -z 4M 2M",
                                  "write -P 0x62 30M 2M"], fmt="vhdx"))
    ok_io(*run_blockdrv_io(path, ["discard 1M 1M", "discard 8M 1536k", "write -z -u 10M 1M"],
                           fmt="vhdx", extra=["-d", "unmap"]))

    def same():
        rc, _, err = run_blockdrv("convert", "-O", "raw", path, raw)
        assert rc == 0, err
        assert libvhdi_read(pyvhdi, [path]) == open(raw, "rb").read()
    same()
    rc, _, err = run_blockdrv("compact", "-q", path)
    assert rc == 0, err
    same()
