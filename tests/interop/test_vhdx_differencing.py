"""Differencing VHDX against libvhdi (pyvhdi, vhdiinfo): qemu 7.2 cannot open
differencing images at all, so libvhdi is the second reader.

* pyvhdi, given the parent (``set_parent``, which checks parent_linkage against
  the parent's DataWriteGuid), reads our child images byte for byte as
  blockdrv does: 512- and 4096-byte sectors, partial and whole-block writes,
  chains of three, parents made by qemu-img;
* vhdiinfo reports a differential disk whose parent identifier is the parent's
  DataWriteGuid;
* the parent stays byte-identical through writes to the child, and qemu-img
  still checks it clean.

libvhdi bug (20210425 and 20260901): for a block that is not FULLY_PRESENT in
a chunk whose sector bitmap entry is SB_BLOCK_NOT_PRESENT (valid per spec
2.5.1.2, and what a fresh child has everywhere), libvhdi reads the "bitmap"
at file offset 0 -- the file type identifier -- and returns bytes of the
child's header as guest data.  The images compared below therefore have a
sector bitmap block in every chunk (one partial write per chunk; every chunk
is 4 GiB or more); blockdrv's reading of bitmap-less chunks (all from the
parent) is covered by tests/unit/vhdx/test_differencing.py.
"""

from __future__ import annotations

import random

import pytest

import blockdrv
from blockdrv.testing.compare import file_digest
from blockdrv.testing.qemu import qemu_img_check, qemu_img_create, run_qemu_io
from blockdrv.testing.scripts import run_blockdrv
from blockdrv.testing.vhdx.scripts import vhdiinfo_fields
from blockdrv.testing.vhdx.fixtures import libvhdi_read

pytestmark = pytest.mark.interop

MiB = 1 << 20


def ours(path) -> bytes:
    with blockdrv.open_image(path) as img:
        return img.read(0, img.size)


def scribble(path, seed: int, lss: int, count: int = 30) -> None:
    """Partial (sector-sized) and whole-block writes; the first write is
    partial so the chunk gets its sector bitmap block."""
    rng = random.Random(seed)
    with blockdrv.open_image(path, readonly=False) as img:
        size = img.size
        img.write(lss, rng.randbytes(3 * lss))
        for _ in range(count):
            n = rng.choice([lss, 5 * lss, 64 * 1024, MiB, 2 * MiB])
            off = rng.randrange(0, (size - n) // lss) * lss
            img.write(off, rng.randbytes(n))


@pytest.mark.parametrize("lss", [512, 4096])
def test_pyvhdi_reads_children_like_blockdrv(tmp_path, pyvhdi, lss):
    base = tmp_path / "base.vhdx"
    blockdrv.create_image(base, "vhdx", "20M", block_size="1M",
                          logical_sector_size=lss).close()
    scribble(base, 1, lss)
    chain = [base]
    for level in (1, 2):
        child = tmp_path / f"child{level}.vhdx"
        blockdrv.create_image(child, "vhdx", backing_file=chain[-1].name).close()
        before = [file_digest(p) for p in chain]
        scribble(child, 10 + level, lss)
        assert [file_digest(p) for p in chain] == before        # parents untouched
        chain.append(child)
        assert libvhdi_read(pyvhdi, chain) == ours(child)


def test_parent_made_by_qemu(tmp_path, pyvhdi, qemu_img, qemu_io):
    base = tmp_path / "base.vhdx"
    qemu_img_create(base, "vhdx", "24M", block_size="2M")
    rc, out, err = run_qemu_io(base, ["write -P 0x5a 1M 5M"], "vhdx")
    assert rc == 0, out + err
    before = file_digest(base)
    child = tmp_path / "child.vhdx"
    rc, out, err = run_blockdrv("create", "-q", "-f", "vhdx", "-b", "base.vhdx",
                                "-F", "vhdx", child)
    assert rc == 0, err
    scribble(child, 3, 512)
    assert file_digest(base) == before
    assert libvhdi_read(pyvhdi, [base, child]) == ours(child)
    # qemu still finds the parent clean
    assert qemu_img_check(base, "vhdx")[0] == 0


def test_pyvhdi_and_vhdiinfo_see_the_linkage(tmp_path, pyvhdi, vhdiinfo):
    base = tmp_path / "base.vhdx"
    blockdrv.create_image(base, "vhdx", "8M").close()
    child = tmp_path / "child.vhdx"
    blockdrv.create_image(child, "vhdx", backing_file="base.vhdx").close()
    p, c = pyvhdi.file(), pyvhdi.file()
    p.open(str(base))
    c.open(str(child))
    assert c.get_parent_identifier() == p.get_identifier()
    with blockdrv.open_image(child) as img:
        loc = img.info().format_specific["parent-locator"]
    # libvhdi names the parent from absolute_win32_path, which a POSIX path
    # outside WSL's drive mounts does not get (nothing misleading to show)
    assert "absolute_win32_path" not in loc and c.get_parent_filename() is None
    c.set_parent(p)                                   # libvhdi checks the linkage
    fields = vhdiinfo_fields(child, vhdiinfo)
    assert fields["Disk type"] == "Differential", fields
    assert fields["Parent identifier"] == p.get_identifier(), fields
    # after a write to the parent, libvhdi refuses the link as blockdrv does
    with blockdrv.open_image(base, readonly=False) as img:
        img.write(0, b"changed")
    p2, c2 = pyvhdi.file(), pyvhdi.file()
    p2.open(str(base))
    c2.open(str(child))
    with pytest.raises(Exception):
        c2.set_parent(p2)
    with pytest.raises(blockdrv.CorruptImageError):
        blockdrv.open_image(child)
