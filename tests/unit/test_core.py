"""The generic layer: bounds, zero length, read-only, RMW, IOVector, sync
driving, reopen, probing -- and the protocol conformance suite."""

from __future__ import annotations

import asyncio

import pytest

from blockdrv import block
from blockdrv.coroutine import run_sync
from blockdrv.errors import BlockDriverError, InvalidArgumentError, ReadOnlyError
from blockdrv.hookspecs import hookimpl
from blockdrv.iov import IOVector
from blockdrv.common import O_RDWR
from blockdrv.node import BlockDriverState
from blockdrv.plugins import DriverRegistry, get_registry
from blockdrv.protocols import memory
from blockdrv.testing.conformance import ProtocolConformance


# -- protocol conformance ---------------------------------------------------------------


class TestFileConformance(ProtocolConformance):
    protocol = "file"
    discard_zeroes = True

    def new_filename(self, tmp_path, name):
        return str(tmp_path / name)


class TestMemoryConformance(ProtocolConformance):
    protocol = "memory"

    def new_filename(self, tmp_path, name):
        return f"memory:{tmp_path.name}-{name}"


# -- a sector-aligned toy driver -------------------------------------------------------


class Sector512:
    """Format driver over a bytearray, requiring 512-byte aligned requests."""

    format_name = "sector512"
    protocol_name = None

    def __init__(self):
        self.requests = []

    @hookimpl
    def bdrv_open(self, bs, options, flags):
        bs.opaque = bytearray(options.get("size", 4096))
        bs.total_size = len(bs.opaque)
        bs.request_alignment = 512

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov):
        assert offset % 512 == 0 and nbytes % 512 == 0 and qiov.size == nbytes
        self.requests.append(("r", offset, nbytes))
        qiov.scatter(0, bs.opaque[offset:offset + nbytes])

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov, flags):
        assert offset % 512 == 0 and nbytes % 512 == 0 and qiov.size == nbytes
        self.requests.append(("w", offset, nbytes))
        bs.opaque[offset:offset + nbytes] = qiov.to_bytes()


@pytest.fixture
def sector_node():
    reg = DriverRegistry()
    drv = Sector512()
    bound = reg.register(drv)
    bs = BlockDriverState(bound, "toy", O_RDWR, {"size": 4096})
    bound.bdrv_open(bs, bs.options, bs.open_flags)
    return bs, drv


def test_rmw_unaligned_write(sector_node):
    bs, drv = sector_node
    bs.pwrite(0, b"\x11" * 4096)
    drv.requests.clear()
    bs.pwrite(510, b"abcd")
    assert bytes(bs.pread(508, 8)) == b"\x11\x11abcd\x11\x11"
    ops = [r[0] for r in drv.requests]
    assert ops[:3] == ["r", "r", "w"]                 # head, tail, then one write
    assert drv.requests[2] == ("w", 0, 1024)


def test_unaligned_read_uses_bounce_buffers(sector_node):
    bs, drv = sector_node
    bs.pwrite(0, bytes(range(256)) * 16)
    drv.requests.clear()
    assert bytes(bs.pread(3, 5)) == bytes([3, 4, 5, 6, 7])
    assert drv.requests == [("r", 0, 512)]


def test_bounds_and_zero_length(sector_node):
    bs, _ = sector_node
    assert bytes(bs.pread(4096, 0)) == b""
    with pytest.raises(InvalidArgumentError):
        bs.pread(4096, 1)
    with pytest.raises(BlockDriverError):
        bs.pwrite(4095, b"xx")
    with pytest.raises(BlockDriverError):
        bs.pread(-512, 512)
    with pytest.raises(BlockDriverError):
        bs.pread(8192, 0)


def test_read_only_enforced(sector_node):
    bs, drv = sector_node
    bs.open_flags &= ~O_RDWR
    with pytest.raises(ReadOnlyError):
        bs.pwrite(0, b"x")
    with pytest.raises(ReadOnlyError):
        bs.pwrite_zeroes(0, 512)
    with pytest.raises(ReadOnlyError):
        bs.pdiscard(0, 512)
    assert not [r for r in drv.requests if r[0] == "w"]


def test_write_zeroes_fallback_writes_zeros(sector_node):
    bs, _ = sector_node
    bs.pwrite(0, b"\xff" * 4096)
    bs.pwrite_zeroes(100, 1000)                      # driver has no write-zeroes hook
    data = bytes(bs.pread(0, 4096))
    assert data[:100] == b"\xff" * 100 and data[100:1100] == bytes(1000)
    assert data[1100:] == b"\xff" * (4096 - 1100)


# -- IOVector ----------------------------------------------------------------------------


def test_iovector_slicing_shares_memory():
    a, b = bytearray(b"0123456789"), bytearray(b"abcdefghij")
    vec = IOVector([a, b])
    part = vec.slice(5, 10)
    assert part.size == 10 and part.to_bytes() == b"56789abcde"
    part.memset(0, 10, ord("-"))                      # writes through to a and b
    assert a == bytearray(b"01234-----") and b == bytearray(b"-----fghij")
    assert all(v.obj is a or v.obj is b for v in part.iov)
    assert vec.slice(0, vec.size) is vec
    with pytest.raises(ValueError):
        vec.slice(15, 6)


def test_iovector_gather_is_zero_copy_within_one_element():
    buf = bytearray(b"hello world")
    vec = IOVector.from_buffer(buf)
    view = vec.gather(6, 5)
    assert isinstance(view, memoryview) and bytes(view) == b"world"
    buf[6:11] = b"WORLD"
    assert bytes(view) == b"WORLD"
    assert IOVector([b"ab", b"cd"]).gather(1, 2) == b"bc"
    assert IOVector([bytes(4), b"\0\0"]).is_zero()
    assert not IOVector([bytes(4), b"\0\1"]).is_zero()


# -- coroutines ---------------------------------------------------------------------------


def test_run_sync_drives_non_suspending_coroutines():
    async def add(x, y):
        return x + y

    assert run_sync(add(2, 3)) == 5


def test_run_sync_refuses_a_suspending_coroutine():
    async def sleeper():
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError):
        run_sync(sleeper())


def test_co_api_under_an_event_loop():
    name = "memory:core-asyncio"
    bs = block.open_protocol(name, O_RDWR, {"create": True})
    bs.growable = True

    async def go():
        await bs.co_pwrite(0, b"async")
        return bytes(await bs.co_pread(0, 5))

    try:
        assert asyncio.run(go()) == b"async"
    finally:
        bs.close()
        memory.discard(name)


# -- reopen transaction -----------------------------------------------------------------------


class _Reopenable:
    format_name = "reopenable"
    protocol_name = None

    def __init__(self, refuse=False):
        self.refuse = refuse
        self.log = []

    @hookimpl
    def bdrv_open(self, bs, options, flags):
        bs.total_size = 512

    @hookimpl
    def bdrv_reopen_prepare(self, bs, flags):
        self.log.append("prepare")
        if self.refuse:
            raise ReadOnlyError("refused")

    @hookimpl
    def bdrv_reopen_commit(self, bs, flags):
        self.log.append("commit")

    @hookimpl
    def bdrv_reopen_abort(self, bs, flags):
        self.log.append("abort")


def _reopen_node(tmp_path, refuse):
    path = tmp_path / "reopen.img"
    path.write_bytes(bytes(512))
    reg = DriverRegistry()
    drv = _Reopenable(refuse)
    bound = reg.register(drv)
    file_bs = block.open_protocol(str(path), 0)
    bs = BlockDriverState(bound, str(path), 0)
    bs.file = file_bs
    bound.bdrv_open(bs, {}, 0)
    return bs, drv


def test_reopen_commits_on_both_nodes(tmp_path):
    bs, drv = _reopen_node(tmp_path, refuse=False)
    bs.reopen(read_only=False)
    assert not bs.read_only and not bs.file.read_only
    assert drv.log == ["prepare", "commit"]
    bs.file.pwrite(0, b"ok")              # the file child really is writable now
    bs.close()


def test_reopen_aborts_when_prepare_refuses(tmp_path):
    bs, drv = _reopen_node(tmp_path, refuse=True)
    with pytest.raises(ReadOnlyError):
        bs.reopen(read_only=False)
    assert bs.read_only and bs.file.read_only
    assert drv.log == ["prepare"]          # nothing was prepared by this driver
    with pytest.raises(ReadOnlyError):
        bs.file.pwrite(0, b"no")
    bs.close()


# -- probing -----------------------------------------------------------------------------


class _Prober:
    protocol_name = None

    def __init__(self, name, magic, score):
        self.format_name = name
        self.magic, self.score = magic, score

    @hookimpl
    def bdrv_probe(self, buf, filename):
        return self.score if buf.startswith(self.magic) else 0


def test_probe_highest_score_wins_and_raw_is_fallback():
    reg = DriverRegistry()
    reg.register(get_registry().formats["raw"].plugin)
    reg.register(_Prober("weak", b"MAGIC", 50))
    reg.register(_Prober("strong", b"MAGIC", 100))
    drv, score = reg.probe(b"MAGIC....", None)
    assert (drv.name, score) == ("strong", 100)
    drv, score = reg.probe(b"nothing", None)
    assert (drv.name, score) == ("raw", 1)


def test_probe_survives_a_raising_driver():
    class Broken:
        format_name, protocol_name = "broken", None

        @hookimpl
        def bdrv_probe(self, buf, filename):
            raise RuntimeError("boom")

    reg = DriverRegistry()
    reg.register(Broken())
    reg.register(get_registry().formats["raw"].plugin)
    assert reg.probe(b"x", None)[0].name == "raw"


def test_open_node_probes_raw(tmp_path):
    path = tmp_path / "plain.img"
    path.write_bytes(b"\x01" * 1024)
    bs = block.open_node(str(path))
    try:
        assert bs.format_name == "raw" and bs.probed_raw
    finally:
        bs.close()


def test_raw_size_is_rounded_to_sectors(tmp_path):
    # qemu treats a 1001-byte raw file as a 1024-byte disk
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x01" * 1001)
    bs = block.open_node(str(path), "raw", O_RDWR)
    try:
        assert bs.total_size == 1024
        assert bytes(bs.pread(1000, 24)) == b"\x01" + bytes(23)
        bs.pwrite(1020, b"end!")
    finally:
        bs.close()
    assert path.stat().st_size == 1024


def test_close_releases_the_driver_even_when_its_flush_fails(tmp_path):
    """A flush error at close is raised, and the file descriptor is still closed."""
    import os
    from blockdrv.block import open_node
    from blockdrv.errors import BlockIOError
    from blockdrv.common import O_RDWR
    path = tmp_path / "x.img"
    path.write_bytes(bytes(4096))
    bs = open_node(os.fspath(path), "raw", O_RDWR)
    bs.pwrite(0, b"x")
    fd = bs.file.opaque.fd

    async def failing_flush(node):
        raise BlockIOError("injected flush failure")
    orig = bs.file.drv.bdrv_co_flush
    bs.file.drv.bdrv_co_flush = failing_flush
    try:
        with pytest.raises(BlockIOError):
            bs.close()
    finally:
        bs.file.drv.bdrv_co_flush = orig
    with pytest.raises(OSError):
        os.fstat(fd)
