"""The generic block-status rules every consumer shares (node, map, io, API)."""

from __future__ import annotations

import pytest

import blockdrv
from blockdrv.block import open_protocol
from blockdrv.common import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_RECURSE,
                             BLOCK_ZERO, O_RDWR, BlockStatus)
from blockdrv.hookspecs import hookimpl
from blockdrv.mapping import map_entries
from blockdrv.node import BlockDriverState
from blockdrv.plugins import DriverRegistry


class WholeBlocks:
    """A format whose one 64 KiB block lives at the same offset of its file
    and is reported as data, with or without BLOCK_RECURSE."""

    format_name = "wholeblocks"
    protocol_name = None

    def __init__(self, recurse: bool) -> None:
        self.recurse = recurse

    @hookimpl
    def bdrv_open(self, bs, options, flags):
        bs.total_size = 65536

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes):
        flags = BLOCK_DATA | BLOCK_OFFSET_VALID | (BLOCK_RECURSE if self.recurse else 0)
        return BlockStatus(flags, nbytes, offset, bs.file)


@pytest.fixture
def host(tmp_path):
    path = str(tmp_path / "host")
    with open(path, "wb") as f:
        f.write(b"\x11" * 4096)         # data, then a 60 KiB hole
        f.truncate(65536)
    return path


@pytest.mark.parametrize("recurse", [False, True])
def test_recurse_decides_whether_host_holes_read_as_zero(host, recurse):
    reg = DriverRegistry()
    bound = reg.register(WholeBlocks(recurse))
    bs = BlockDriverState(bound, host, 0, {})
    bs.file = open_protocol(host, 0)
    bound.bdrv_open(bs, {}, 0)
    try:
        entries = [(e.start, e.length, e.data, e.zero) for e in map_entries(bs)]
        if recurse:     # QEMU's BDRV_BLOCK_RECURSE: the host's hole shows as zeros
            assert entries == [(0, 4096, True, False), (4096, 61440, True, True)]
        else:           # whole block reported as data, as qemu's vpc does
            assert entries == [(0, 65536, True, False)]
        st = bs.block_status(4096, 4096)
        assert st.flags & BLOCK_ALLOCATED
        assert bool(st.flags & BLOCK_ZERO) is recurse
        assert not st.flags & BLOCK_RECURSE     # consumed by the generic layer
    finally:
        bs.file.close()


def test_image_block_status_reads_through_the_chain(tmp_path):
    parent = str(tmp_path / "p.vhdx")
    child = str(tmp_path / "c.vhdx")
    with blockdrv.create_image(parent, "vhdx", "16M") as img:
        img.write(0, b"\x22" * 65536)
    blockdrv.create_image(child, "vhdx", backing_file=parent, backing_fmt="vhdx").close()
    with blockdrv.open_image(child) as img:
        own = img.bs.block_status(0, 65536)
        assert not own.flags & BLOCK_ALLOCATED          # the child has nothing
        st = img.block_status(0, 65536)
        assert st.flags & BLOCK_DATA and st.flags & BLOCK_ALLOCATED
        assert st.file is not None and st.file.filename == parent
        far = img.block_status(8 << 20, 4096)
        assert far.flags & BLOCK_ZERO and not far.flags & BLOCK_DATA


@pytest.mark.interop
def test_io_alloc_and_map_as_qemu_io(tmp_path, qemu_io):
    """``io alloc``/``map`` read the node's generic answer, as qemu-io's do."""
    import shutil
    import subprocess
    import sys
    from blockdrv.cli.io import normalize_qemu_io_output
    path = str(tmp_path / "a.vhdx")
    blockdrv.create_image(path, "vhdx", "64M", block_size="1M").close()
    subprocess.run([qemu_io, "-c", "write 3M 4k", "-c", "write -z 8M 1M", path],
                   check=True, capture_output=True)
    shutil.copy(path, path + ".b")
    script = ["-c", "alloc 0 4M", "-c", "alloc 3M 64k", "-c", "map"]
    outs = []
    for tool, img in (([qemu_io], path), ([sys.executable, "-m", "blockdrv", "io"],
                                          path + ".b")):
        r = subprocess.run([*tool, "-r", *script, img], capture_output=True, text=True)
        outs.append((r.returncode, normalize_qemu_io_output(r.stdout), r.stderr))
    assert outs[0] == outs[1]
    assert "allocated at offset 3 MiB" in outs[0][1]
