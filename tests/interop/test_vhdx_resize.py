"""``blockdrv resize`` of VHDX images, with qemu-img, qemu-io and vhdiinfo as readers.

qemu-img 7.2 cannot resize VHDX ("Image format driver does not support
resize"), so the oracle here is qemu's *reading* of what we resized: info,
check, read patterns (old data intact, zeros beyond) and its replay of a
resize cut by a crash after the log entry was made durable -- a log entry
that targets the region tables in the header section, which qemu replays.
"""

from __future__ import annotations

import os
import re

import pytest

import blockdrv
from blockdrv.drivers.vhdx import log as vlog
from blockdrv.testing.qemu import (qemu_img_check, qemu_img_create, qemu_img_info,
                                   run_qemu_img, run_qemu_io)
from blockdrv.testing.scripts import run_blockdrv
from blockdrv.testing.vhdx.scripts import vhdiinfo_fields
from blockdrv.testing.crash import abandon

pytestmark = pytest.mark.interop

MiB = 1 << 20
GiB = 1 << 30


def qemu_reads(path, commands):
    rc, out, err = run_qemu_io(path, commands, fmt="vhdx", readonly=True)
    assert rc == 0 and "fail" not in (out + err).lower(), out + err


def media_size(path) -> int:
    media = vhdiinfo_fields(path)["Media size"]
    m = re.search(r"\((\d+) bytes\)", media)
    assert m, media
    return int(m.group(1))


def resize(path, *args):
    rc, out, err = run_blockdrv("resize", *args)
    assert rc == 0, err
    assert out.strip() == "Image resized."


def assert_readers_agree(path, size):
    assert qemu_img_info(path, "vhdx")["virtual-size"] == size
    rc, data = qemu_img_check(path, "vhdx")
    assert rc == 0, data
    assert media_size(path) == size
    rc, out, err = run_blockdrv("check", os.fspath(path))
    assert rc in (0, 3), out + err          # relocation may leave the old BAT as a leak


CASES = [
    # (create options, size, resize args, new size)
    (dict(subformat="dynamic", block_size="1M"), 16 * MiB, ["+24M"], 40 * MiB),
    (dict(subformat="dynamic", block_size="8M", block_state_zero=False), 10 * MiB + 512,
     ["100M"], 100 * MiB),
    (dict(subformat="fixed", block_size="1M", block_state_zero=False), 10 * MiB + 512 * 1024,
     ["20M"], 20 * MiB),
    (dict(subformat="fixed", block_size="1M"), 8 * MiB, ["12M"], 12 * MiB),
    (dict(subformat="dynamic", block_size="1M"), 24 * MiB, ["--shrink", "-14M"], 10 * MiB),
]


@pytest.mark.parametrize("opts, size, args, new", CASES,
                         ids=["grow", "grow-short-tail", "fixed-grow-short-tail",
                              "fixed-zero-grow", "shrink"])
def test_qemu_made_image_resized_reads_in_qemu(interop_tmp, vhdiinfo, opts, size, args, new):
    path = interop_tmp / "r.vhdx"
    qemu_img_create(path, "vhdx", size, **opts)
    rc, out, err = run_qemu_io(path, ["write -P 0x61 0 64k", f"write -P 0x62 {5 * MiB} 1M"],
                               fmt="vhdx")
    assert rc == 0, err
    resize(path, *args[:-1], os.fspath(path), args[-1])
    assert_readers_agree(path, new)
    reads = ["read -P 0x61 0 64k", f"read -P 0x62 {5 * MiB} 1M"]
    if new > size:
        reads.append(f"read -P 0 {size} {new - size}")
    qemu_reads(path, reads)
    # qemu can go on writing in the new space
    rc, out, err = run_qemu_io(path, [f"write -P 0x63 {new - 4096} 4096"], fmt="vhdx")
    assert rc == 0, err
    qemu_reads(path, [f"read -P 0x63 {new - 4096} 4096", "read -P 0x61 0 64k"])
    assert qemu_img_check(path, "vhdx")[0] == 0


def test_grow_with_bat_relocation(interop_tmp, vhdiinfo):
    """127 GiB in 1 MiB blocks fills the 1 MiB BAT region; 130 GiB moves the
    BAT to a new region at the end of the file (region tables journaled)."""
    path = interop_tmp / "big.vhdx"
    qemu_img_create(path, "vhdx", 127 * GiB, block_size="1M")
    rc, _, err = run_qemu_io(path, ["write -P 0x71 0 4k", f"write -P 0x72 {127 * GiB - 4096} 4k"],
                             fmt="vhdx")
    assert rc == 0, err
    flen = os.path.getsize(path)
    resize(path, os.fspath(path), "130G")
    with blockdrv.open_image(path, "vhdx") as img:
        assert img.bs.opaque.region_table.bat.file_offset == flen
    assert_readers_agree(path, 130 * GiB)
    qemu_reads(path, ["read -P 0x71 0 4k", f"read -P 0x72 {127 * GiB - 4096} 4k",
                      f"read -P 0 {128 * GiB} 1M"])
    rc, _, err = run_qemu_io(path, [f"write -P 0x73 {130 * GiB - 4096} 4k"], fmt="vhdx")
    assert rc == 0, err
    qemu_reads(path, [f"read -P 0x73 {130 * GiB - 4096} 4k"])


class _Cut(Exception):
    pass


@pytest.mark.parametrize("new", [130 * GiB, 10 * GiB], ids=["relocate", "shrink"])
def test_qemu_replays_a_cut_resize(interop_tmp, qemu_img, monkeypatch, new):
    """Power lost once the log entry is durable and the LogGuid set: qemu's
    ``check -r all`` replays it -- region tables at 192/256 KiB and zero
    descriptors included -- and shows the new size with the data intact."""
    path = interop_tmp / "cut.vhdx"
    qemu_img_create(path, "vhdx", 127 * GiB, block_size="1M")
    rc, _, err = run_qemu_io(path, ["write -P 0x55 0 4k", f"write -P 0x56 {9 * GiB} 4k"],
                             fmt="vhdx")
    assert rc == 0, err

    async def cut(writer, file, updates, set_log_guid, *, zeros=(), new_guid=None):
        size = file.getlength()
        guid = os.urandom(16)
        await writer.co_write_entry(file, vlog.build_entry(
            writer.sequence, guid, writer.tail, updates, zeros=list(zeros),
            flushed_file_offset=size, last_file_offset=size))
        await file.co_flush()
        await set_log_guid(guid)
        raise _Cut()

    img = blockdrv.open_image(path, "vhdx", readonly=False)
    monkeypatch.setattr(vlog.LogWriter, "co_write_sectors_and_flush", cut)
    with pytest.raises(_Cut):
        img.resize(new)
    monkeypatch.undo()
    abandon(img.bs)                     # as a crash would: locks released, nothing flushed
    rc, _, err = run_qemu_img("info", "-f", "vhdx", os.fspath(path))
    assert rc != 0 and "log that needs to be replayed" in err
    rc, data = qemu_img_check(path, "vhdx", repair="all")
    assert rc == 0 and data["corruptions-fixed"] == 1, data
    assert qemu_img_info(path, "vhdx")["virtual-size"] == new
    qemu_reads(path, ["read -P 0x55 0 4k", f"read -P 0x56 {9 * GiB} 4k"])
    with blockdrv.open_image(path, "vhdx") as ours:
        assert ours.size == new and ours.check().corruptions == 0


def test_qemu_img_cannot_resize_vhdx_blockdrv_can(interop_tmp, qemu_img):
    path = interop_tmp / "q.vhdx"
    qemu_img_create(path, "vhdx", 8 * MiB)
    rc, out, err = run_qemu_img("resize", "-f", "vhdx", os.fspath(path), "16M")
    assert rc != 0 and "does not support resize" in err
    resize(path, os.fspath(path), "16M")
    assert qemu_img_info(path, "vhdx")["virtual-size"] == 16 * MiB


def test_shrink_needs_the_flag(interop_tmp, qemu_img):
    path = interop_tmp / "s.vhdx"
    qemu_img_create(path, "vhdx", 8 * MiB)
    rc, out, err = run_blockdrv("resize", os.fspath(path), "4M")
    assert rc != 0 and "--shrink" in err
    assert qemu_img_info(path, "vhdx")["virtual-size"] == 8 * MiB
