"""Backing chains belong to the core: a toy copy-on-write format, written
against the public driver API only, gets parents of any format, loop and depth
checks, O_NO_BACKING, the user's ``backing=`` and a veto for free."""

from __future__ import annotations

import struct

import pytest

import blockdrv
from blockdrv.driver import (BLOCK_DATA, BLOCK_OFFSET_VALID, O_NO_BACKING, BlockStatus,
                             CorruptImageError, CreateOption, InvalidArgumentError,
                             IOVector, create_file, hookimpl, open_node)
from blockdrv.block import create
from blockdrv.mapping import map_entries
from blockdrv.plugins import get_registry

MAGIC = b"TOYCOW\0\0"
SECTOR = 512
DATA = 2 * SECTOR         # header sector, then an allocation bitmap sector


class ToyCow:
    """Header: magic, size, parent size (0: any), backing name; then one bit
    per guest sector; then guest sectors at ``DATA + offset``."""

    format_name = "toycow"
    protocol_name = None
    create_opts = [CreateOption("size", "size", "Virtual disk size"),
                   CreateOption("backing_file", "string", "Parent"),
                   CreateOption("backing_fmt", "string", "Parent format")]

    @hookimpl
    def bdrv_probe(self, buf, filename):
        return 100 if bytes(buf[:8]) == MAGIC else 0

    @hookimpl
    def bdrv_create(self, filename, options):
        name = (options.get("backing_file") or "").encode()
        fmt = (options.get("backing_fmt") or "").encode()
        head = MAGIC + struct.pack("<QQ", options["size"], 0) + name.ljust(256, b"\0")
        head += fmt.ljust(32, b"\0")
        bs = create_file(filename)
        try:
            bs.pwrite(0, head.ljust(DATA, b"\0"))
        finally:
            bs.close()

    @hookimpl
    def bdrv_open(self, bs, options, flags):
        head = bytes(bs.file.pread(0, DATA))
        size, parent_size = struct.unpack_from("<QQ", head, 8)
        name = head[24:280].rstrip(b"\0").decode()
        fmt = head[280:312].rstrip(b"\0").decode()
        bs.total_size = size
        bs.request_alignment = SECTOR
        bs.opaque = {"bitmap": bytearray(head[SECTOR:DATA]), "parent_size": parent_size}
        bs.backing_file = name or None          # the core opens it
        bs.backing_format = fmt or None

    @hookimpl
    def bdrv_check_backing(self, bs, backing):
        want = bs.opaque["parent_size"]
        if want and backing.total_size != want:
            raise CorruptImageError(f"parent is {backing.total_size} bytes, not {want}")

    def _allocated(self, bs, sector):
        return bs.opaque["bitmap"][sector // 8] >> (sector % 8) & 1

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov):
        for pos in range(0, nbytes, SECTOR):
            part = qiov.slice(pos, SECTOR)
            if self._allocated(bs, (offset + pos) // SECTOR):
                await bs.file.co_preadv(DATA + offset + pos, SECTOR, part)
            else:
                await bs.co_read_backing(offset + pos, SECTOR, part)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov, flags):
        await bs.file.co_pwritev(DATA + offset, nbytes, qiov, flags)
        bitmap = bs.opaque["bitmap"]
        for sector in range(offset // SECTOR, (offset + nbytes) // SECTOR):
            bitmap[sector // 8] |= 1 << (sector % 8)
        await bs.file.co_pwritev(SECTOR, SECTOR, IOVector.from_buffer(bitmap), flags)

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes):
        first = self._allocated(bs, offset // SECTOR)
        n = SECTOR
        while n < nbytes and self._allocated(bs, (offset + n) // SECTOR) == first:
            n += SECTOR
        if first:
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, n, DATA + offset, bs.file)
        return BlockStatus(0, n)                # unallocated: the chain answers


@pytest.fixture(scope="module", autouse=True)
def toycow():
    get_registry().register(ToyCow())


def _raw(path, size, fill):
    with open(path, "wb") as f:
        f.write(fill * size)
    return str(path)


def test_child_over_raw_reads_through_and_past_the_parent_end(tmp_path):
    parent = _raw(tmp_path / "p.raw", 8192, b"\x11")
    child = str(tmp_path / "c.cow")
    blockdrv.create_image(child, "toycow", 16384, backing_file="p.raw",
                          backing_fmt="raw").close()
    with blockdrv.open_image(child, readonly=False) as img:
        assert img.bs.backing is not None and img.bs.backing.format_name == "raw"
        assert img.bs.full_backing_file == parent          # relative to the child
        img.write(512, b"\x22" * 512)
        assert img.read(0, 1536) == b"\x11" * 512 + b"\x22" * 512 + b"\x11" * 512
        assert img.read(8192, 8192) == bytes(8192)         # past the parent's end
        depths = [(e.start, e.length, e.depth) for e in map_entries(img.bs)]
    assert depths[:3] == [(0, 512, 1), (512, 512, 0), (1024, 7168, 1)]


def test_parent_of_another_format_and_probing(tmp_path):
    parent = str(tmp_path / "p.vhdx")
    with blockdrv.create_image(parent, "vhdx", "1M") as img:
        img.write(0, b"\x33" * 4096)
    child = str(tmp_path / "c.cow")
    blockdrv.create_image(child, "toycow", "1M", backing_file=parent).close()  # probed
    with blockdrv.open_image(child) as img:
        assert img.bs.backing.format_name == "vhdx"
        assert img.read(0, 4096) == b"\x33" * 4096


def test_loops_and_depth_are_refused(tmp_path):
    a, b = str(tmp_path / "a.cow"), str(tmp_path / "b.cow")
    create(a, "toycow", {"size": 4096, "backing_file": "b.cow", "backing_fmt": "toycow"})
    create(b, "toycow", {"size": 4096, "backing_file": "a.cow", "backing_fmt": "toycow"})
    with pytest.raises(InvalidArgumentError, match="loops back"):
        blockdrv.open_image(a)
    names = [str(tmp_path / f"d{i}.cow") for i in range(70)]
    _raw(tmp_path / "base.raw", 4096, b"\x44")
    prev = "base.raw"
    for name in names:
        create(name, "toycow", {"size": 4096, "backing_file": prev})
        prev = name
    with blockdrv.open_image(names[60]) as img:            # 62 images: fine
        assert img.read(0, 512) == b"\x44" * 512
    with pytest.raises(InvalidArgumentError, match="deeper than 64") as err:
        blockdrv.open_image(names[-1])
    assert str(err.value).count("Could not open backing file") == 1   # one line, not 64


def test_no_backing_names_without_opening(tmp_path):
    child = str(tmp_path / "c.cow")
    create(child, "toycow", {"size": 4096, "backing_file": "missing.raw"})
    with pytest.raises(InvalidArgumentError, match="parent not found"):
        blockdrv.open_image(child)
    bs = open_node(child, None, O_NO_BACKING)
    try:
        assert bs.backing is None and bs.backing_file == "missing.raw"
    finally:
        bs.close()


def test_user_names_the_parent_and_the_driver_may_veto(tmp_path):
    _raw(tmp_path / "good.raw", 4096, b"\x55")
    _raw(tmp_path / "other.raw", 4096, b"\x66")
    child = str(tmp_path / "c.cow")
    blockdrv.create_image(child, "toycow", 4096, backing_file="good.raw").close()
    with blockdrv.open_image(child, backing=str(tmp_path / "other.raw"),
                             backing_fmt="raw") as img:
        assert img.read(0, 512) == b"\x66" * 512
    with open(child, "r+b") as f:                           # record the parent's size
        f.seek(16)
        f.write(struct.pack("<Q", 1234))
    with pytest.raises(CorruptImageError, match="parent is 4096 bytes, not 1234"):
        blockdrv.open_image(child)
    # the refused parent was closed again: a writer can take it
    with blockdrv.open_image(str(tmp_path / "good.raw"), "raw", readonly=False):
        pass
