"""cache=none / directsync: the file protocol opens with O_DIRECT (QEMU's
cache.direct) and bounces requests through aligned memory."""

from __future__ import annotations

import fcntl
import os

import pytest

import blockdrv
from blockdrv.block import open_node
from blockdrv.cli.io import main as io_main
from blockdrv.common import O_NOCACHE, O_RDWR


def _direct(bs) -> bool:
    node = bs
    while node.file is not None:
        node = node.file
    return bool(fcntl.fcntl(node.opaque.fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "d.vhdx")
    blockdrv.create_image(path, "vhdx", "16M").close()
    return path


def test_nocache_opens_o_direct_and_round_trips_unaligned_io(image):
    bs = open_node(image, "vhdx", O_RDWR | O_NOCACHE)
    try:
        assert _direct(bs)
        assert bs.file.request_alignment == 4096
        data = bytes(range(256)) * 13          # 3328 bytes, odd offset
        bs.pwrite(4097, data)
        bs.pwrite(2 << 20, b"\x5a" * (1 << 20))
        assert bs.pread(4097, len(data)) == data
        bs.reopen(read_only=True)
        assert _direct(bs)
        assert bs.pread(2 << 20, 1 << 20) == b"\x5a" * (1 << 20)
    finally:
        bs.close()
    with blockdrv.open_image(image) as img:      # and through the page cache
        assert img.read(4097, 3328) == bytes(range(256)) * 13


def test_default_open_is_buffered(image):
    with blockdrv.open_image(image) as img:
        assert not _direct(img.bs)


def test_raw_file_tail_reads_as_zeros_under_o_direct(tmp_path):
    path = str(tmp_path / "odd.raw")
    with open(path, "wb") as f:
        f.write(b"\x11" * 5000)              # not a multiple of the alignment
    bs = open_node(path, "raw", O_NOCACHE)
    try:
        assert bs.pread(4096, 1024) == b"\x11" * 904 + bytes(120)
    finally:
        bs.close()


def test_io_cache_none_uses_o_direct(image, capsys, monkeypatch):
    seen = []
    real_open = os.open

    def spy(path, flags, *args):
        if str(path) == image:
            seen.append(flags)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", spy)
    assert io_main(["-t", "none", "-c", "write -P 0x33 0 4k", image]) == 0
    assert seen and all(f & os.O_DIRECT for f in seen)
