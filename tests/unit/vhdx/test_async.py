"""Format drivers over a protocol that really suspends (Core issue, part 4).

Every node here sits on :mod:`blockdrv.testing.suspending`: under an event
loop each request to the file awaits ``asyncio.sleep(0)``, and a synchronous
request made from inside a coroutine (``run_sync`` under the running loop --
metadata I/O that does not await) raises.  Many tasks read, write (allocating
and in place, aligned and not) and flush concurrently; the result is checked
against a shadow model, then again after a reopen (under a loop too, so
cached metadata such as sector bitmaps is read through the suspending file).

Each task owns every ``NTASKS``-th 4 KiB chunk of the first half of the disk
(so tasks allocate the same blocks concurrently but never write the same
bytes) and one contiguous stretch of the second half (multi-block writes).
"""

from __future__ import annotations

import asyncio
import random

import pytest

import blockdrv
from blockdrv.block import open_node
from blockdrv.common import BLOCK_DATA, BLOCK_ZERO, O_RDWR
from blockdrv.testing import suspending

MiB = 1 << 20
CHUNK = 4096
NTASKS = 12
SIZE = 16 * MiB
OPS = 40


@pytest.fixture(autouse=True)
def _registered():
    suspending.register()


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _vhdx(path, **opts):
    blockdrv.create_image(path, "vhdx", SIZE, block_size=MiB, **opts).close()


def _raw(path):
    blockdrv.create_image(path, "raw", SIZE).close()


def _chain(tmp_path):
    """A 512-byte-sector parent with data in some blocks, and its child."""
    parent = str(tmp_path / "parent.vhdx")
    child = str(tmp_path / "child.vhdx")
    _vhdx(parent)
    base = bytearray(SIZE)
    with open_node(parent, "vhdx", O_RDWR) as bs:
        for block in (0, 2, 5, 9, 12):
            data = _pattern(block, MiB)
            bs.pwrite(block * MiB, data)
            base[block * MiB:(block + 1) * MiB] = data
    blockdrv.create_image(child, "vhdx", None, backing_file=parent,
                          backing_fmt="vhdx").close()
    return child, parent, base


CASES = ["vhdx-dynamic", "vhdx-fixed", "vhdx-4k", "vhdx-chain", "raw"]


def _make(tmp_path, case):
    """(path, format, open options, initial guest content, lss)."""
    path = str(tmp_path / f"{case}.img")
    opts = {"file": {"driver": "suspend"}}
    base = bytearray(SIZE)
    lss = 512
    if case == "vhdx-dynamic":
        _vhdx(path)
    elif case == "vhdx-fixed":
        _vhdx(path, subformat="fixed")
    elif case == "vhdx-4k":
        _vhdx(path, logical_sector_size=4096)
        lss = 4096
    elif case == "raw":
        _raw(path)
    else:
        path, parent, base = _chain(tmp_path)
        opts["backing"] = suspending.PREFIX + parent
    fmt = "raw" if case == "raw" else "vhdx"
    return path, fmt, opts, base, lss


async def _task(bs, tid: int, shadow: bytearray, lss: int, rng: random.Random) -> None:
    half = SIZE // 2
    mine = [c for c in range(half // CHUNK) if c % NTASKS == tid]
    stretch = half // NTASKS
    lo = half + tid * stretch
    for _ in range(OPS):
        op = rng.random()
        if op < 0.45:
            # inside one owned chunk: sector-aligned or not (read-modify-write)
            c = rng.choice(mine)
            if rng.random() < 0.5:
                start = rng.randrange(0, CHUNK // lss) * lss
                end = rng.randrange(start // lss + 1, CHUNK // lss + 1) * lss
            else:
                start = rng.randrange(0, CHUNK - 1)
                end = rng.randrange(start + 1, CHUNK + 1)
            off, n = c * CHUNK + start, end - start
        elif op < 0.65:
            # several blocks of the owned stretch, sector aligned
            n = rng.randrange(1, stretch // lss) * lss
            off = lo + rng.randrange(0, (stretch - n) // lss + 1) * lss
        elif op < 0.9:
            c = rng.choice(mine)
            got = await bs.co_pread(c * CHUNK, CHUNK)
            assert bytes(got) == shadow[c * CHUNK:(c + 1) * CHUNK], f"task {tid} chunk {c}"
            got = await bs.co_pread(lo, stretch)
            assert bytes(got) == shadow[lo:lo + stretch], f"task {tid} stretch"
            continue
        else:
            await bs.co_flush()
            continue
        data = rng.randbytes(n)
        await bs.co_pwrite(off, data)
        shadow[off:off + n] = data


async def _workload(bs, shadow: bytearray, lss: int, seed: int) -> None:
    tasks = [_task(bs, t, shadow, lss, random.Random(seed * 100 + t)) for t in range(NTASKS)]
    await asyncio.gather(*tasks)
    await bs.co_flush()
    assert bytes(await bs.co_pread(0, SIZE)) == shadow
    # block status through the suspending file, chain included
    pos = 0
    while pos < SIZE:
        st = await bs.co_block_status(pos, SIZE - pos)
        assert st.pnum > 0
        if st.flags & BLOCK_ZERO and not st.flags & BLOCK_DATA:
            assert shadow[pos:pos + st.pnum] == bytes(st.pnum) or bs.backing is not None
        pos += st.pnum


async def _verify(bs, shadow: bytearray) -> None:
    for off in range(0, SIZE, 3 * MiB + 512):
        n = min(2 * MiB, SIZE - off)
        assert bytes(await bs.co_pread(off, n)) == shadow[off:off + n]
    assert bytes(await bs.co_pread(0, SIZE)) == shadow


def _sleeps(bs) -> int:
    total = suspending.state(bs).sleeps
    if bs.backing is not None:
        total += suspending.state(bs.backing).sleeps
    return total


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [1, 2])
def test_concurrent_io_over_suspending_protocol(tmp_path, case, seed):
    path, fmt, opts, base, lss = _make(tmp_path, case)
    shadow = bytearray(base)
    bs = open_node(path, fmt, O_RDWR, options=opts)          # no loop: nothing suspends
    try:
        assert suspending.state(bs).sleeps == 0
        asyncio.run(_workload(bs, shadow, lss, seed))
        assert suspending.state(bs).sleeps > NTASKS * OPS // 2, "requests did not suspend"
        if bs.backing is not None:
            assert suspending.state(bs.backing).sleeps > 0, "the parent did not suspend"
    finally:
        bs.close()
    # reopen (read-only, then read-write) and read everything again under a loop:
    # caches are cold, so metadata (bitmaps) comes through the suspending file
    for flags in (0, O_RDWR):
        bs = open_node(path, fmt, flags, options=opts)
        try:
            before = _sleeps(bs)
            asyncio.run(_verify(bs, shadow))
            assert _sleeps(bs) > before
            if fmt == "vhdx":
                res = bs.check()
                assert res.corruptions == 0 and res.check_errors == 0, res.messages
        finally:
            bs.close()


def test_resize_over_suspending_protocol(tmp_path):
    path = str(tmp_path / "r.vhdx")
    _vhdx(path)
    data = _pattern(7, 3 * MiB)
    bs = open_node(path, "vhdx", O_RDWR, options={"file": {"driver": "suspend"}})

    async def run():
        await bs.co_pwrite(MiB // 2, data)
        await bs.co_truncate(SIZE * 2)
        await bs.co_pwrite(SIZE + 4096, data)
        await bs.co_truncate(SIZE + 8 * MiB)
        await bs.co_flush()

    try:
        asyncio.run(run())
        assert suspending.state(bs).sleeps > 0
    finally:
        bs.close()
    with open_node(path, "vhdx", 0) as bs:
        assert bs.total_size == SIZE + 8 * MiB
        assert bytes(bs.pread(MiB // 2, len(data))) == data
        assert bytes(bs.pread(SIZE + 4096, len(data))) == data
        assert bs.check().corruptions == 0


def test_nested_sync_io_fails_loudly(tmp_path):
    """The filter itself: a synchronous request from inside a coroutine raises."""
    path = str(tmp_path / "n.raw")
    _raw(path)
    bs = open_node(path, "raw", O_RDWR, options={"file": {"driver": "suspend"}})

    async def nested():
        bs.pwrite(0, b"x" * 512)          # run_sync under the running loop

    try:
        with pytest.raises(suspending.NestedSyncIOError):
            asyncio.run(nested())
        bs.pwrite(0, b"y" * 512)          # without a loop: passes through
        assert suspending.state(bs).passthrough > 0
    finally:
        bs.close()


def test_pending_log_read_through_suspending_protocol(tmp_path, monkeypatch):
    """A read-only open of an image with a pending log reads through the
    in-memory replay -- over the suspending file too."""
    from blockdrv.drivers.vhdx import log as vlog
    from blockdrv.testing.crash import abandon

    class Cut(Exception):
        pass

    async def cut(writer, file, offset, data, set_log_guid, new_guid=None):
        await file.co_flush()
        updates = await vlog.co_merge_sectors(file, offset, data)
        size = file.getlength()
        guid = b"p" * 16
        await writer.co_write_entry(file, vlog.build_entry(
            writer.sequence, guid, writer.tail, updates, flushed_file_offset=size,
            last_file_offset=size))
        await file.co_flush()
        await set_log_guid(guid)
        raise Cut()                       # power lost before the BAT sector is written

    path = str(tmp_path / "p.vhdx")
    _vhdx(path)
    data = _pattern(3, 64 * 1024)
    bs = open_node(path, "vhdx", O_RDWR, options={"file": {"driver": "suspend"}})
    monkeypatch.setattr(vlog.LogWriter, "co_write_and_flush", cut)
    with pytest.raises(Cut):
        asyncio.run(bs.co_pwrite(5 * MiB, data))
    monkeypatch.undo()
    abandon(bs)
    bs = open_node(path, "vhdx", 0, options={"file": {"driver": "suspend"}})
    try:
        assert bs.opaque.overlay is not None          # replayed in memory only

        async def read():
            return bytes(await bs.co_pread(5 * MiB - 4096, len(data) + 8192))

        got = asyncio.run(read())
        assert got == bytes(4096) + data + bytes(4096)
        assert suspending.state(bs).sleeps > 0
    finally:
        bs.close()
