"""Concurrent coroutine readers and writers on one VHDX node (issue 4, item 5).

The node sits on a ``blkdebug`` filter with ``suspend`` on, so every guest
read and write awaits ``asyncio.sleep(0)`` before and after reaching the file
and requests really interleave (metadata I/O, done synchronously under the
driver's lock, never suspends).  After each run: every 4 KiB sector holds
exactly one writer's pattern (or zeros if nobody wrote it) -- the result of
some serial order --, every non-overlapping write landed, ``check`` is clean,
no two BAT entries share a block and the file grew by exactly one block per
allocated block.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil

import numpy as np
import pytest

import blockdrv
from blockdrv.block import open_node
from blockdrv.iov import IOVector
from blockdrv.common import O_RDWR

MiB = 1 << 20
SEC = 4096
SIZE = 32 * MiB
SECTION = "concurrency"


def _pattern(writer: int, nsec: int) -> bytes:
    """Writer ``writer``'s content: every 4 KiB sector starts with its id and
    is filled with a writer-specific byte, so a torn sector is visible."""
    one = writer.to_bytes(4, "little") + bytes([(writer * 37 + 1) % 255 + 1]) * (SEC - 4)
    return one * nsec


def _owner(sector: bytes) -> int | None:
    """Which writer's pattern ``sector`` is (0 for zeros); None for garbage."""
    if sector == bytes(SEC):
        return 0
    writer = int.from_bytes(sector[:4], "little")
    return writer if sector == _pattern(writer, 1) else None


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "c.vhdx")
    blockdrv.create_image(path, "vhdx", SIZE, block_size=MiB, log_size=MiB).close()
    return path


def _open(path):
    return open_node(path, "vhdx", O_RDWR,
                     options={"file": {"driver": "blkdebug",
                                       "config": {"suspend": True, "rules": []}}})


def _verify(path, expected_blocks, must_hold, may_hold):
    """must_hold: sector -> writer; may_hold: sector -> set of writers."""
    with open_node(path, "vhdx", 0) as bs:
        res = bs.check()
        assert res.corruptions == 0, res.messages
        img = bs.opaque
        states = img.bat.states()
        present = np.flatnonzero(states == 6)
        offsets = img.bat.offsets()[present]
        assert len(set(offsets.tolist())) == len(offsets), "a block was allocated twice"
        assert set(present.tolist()) == expected_blocks
        data_start = min(offsets.tolist()) if len(offsets) else 0
        assert bs.file.getlength() == data_start + len(present) * MiB, \
            "file length does not match the allocated blocks"
        garbage = []
        for sector in sorted(set(must_hold) | set(may_hold)):
            got = _owner(bytes(bs.pread(sector * SEC, SEC)))
            if sector in must_hold and got != must_hold[sector]:
                garbage.append((sector, got, must_hold[sector]))
            elif sector in may_hold and got not in may_hold[sector]:
                garbage.append((sector, got, may_hold[sector]))
        assert not garbage, f"sectors not from any serial order: {garbage[:5]}"


def test_disjoint_writers_and_allocation_races(image, figures):
    """Writers to different sectors of the same unallocated blocks: every
    block allocated once, every write landed."""
    rng = random.Random(1)
    blocks = rng.sample(range(SIZE // MiB), 12)
    jobs = []
    writer = 1
    for b in blocks:
        for slot in rng.sample(range(MiB // SEC // 4), 6):      # 6 writers per block
            jobs.append((writer, b * MiB + slot * 4 * SEC, 1 + rng.randrange(4)))
            writer += 1

    async def main():
        bs = _open(image)
        try:
            await asyncio.gather(*(bs.co_pwrite(off, _pattern(w, n)) for w, off, n in jobs))
            await bs.co_flush()
        finally:
            bs.close()

    asyncio.run(main())
    must = {off // SEC + i: w for w, off, n in jobs for i in range(n)}
    _verify(image, set(_payload_blocks(blocks)), must, {})
    figures(SECTION, "disjoint writers, shared unallocated blocks",
            cases=1, writers=len(jobs))


def _payload_blocks(blocks):
    # BAT payload indices skip one sector-bitmap entry per chunk; with 1 MiB
    # blocks and 512-byte sectors a chunk holds 2048 blocks: indices == blocks.
    return blocks


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_overlapping_writers_and_readers(image, seed, figures):
    """Writers hitting the same sectors (allocated and not) while readers
    read them: each sector ends up as one writer's, each read sees a whole
    pattern, and the final state is explained by a serial order."""
    rng = random.Random(seed)
    hot = rng.sample(range(SIZE // MiB), 4)
    # a few blocks allocated before the race: overwrites in place
    pre = hot[:2]
    with blockdrv.open_image(image, "vhdx", readonly=False) as img:
        for b in pre:
            img.write(b * MiB, _pattern(999, 8))
    jobs = []
    for w in range(1, 41):
        b = rng.choice(hot)
        start = rng.randrange(0, 8)
        jobs.append((w, b * MiB + start * SEC, rng.randint(1, 8 - start)))
    torn = []

    async def reader(off, n):
        for _ in range(3):
            buf = bytearray(n * SEC)
            await bs.co_preadv(off, n * SEC, IOVector.from_buffer(buf))
            for i in range(n):
                if _owner(bytes(buf[i * SEC:(i + 1) * SEC])) is None:
                    torn.append(off // SEC + i)
            await asyncio.sleep(0)

    async def writer(w, off, n):
        await bs.co_pwrite(off, _pattern(w, n))
        if w % 7 == 0:
            await bs.co_flush()

    async def main():
        global bs
        tasks = [writer(*j) for j in jobs]
        tasks += [reader(b * MiB, 8) for b in hot for _ in range(3)]
        rng.shuffle(tasks)
        await asyncio.gather(*tasks)
        await bs.co_flush()

    global bs
    bs = _open(image)
    try:
        asyncio.run(main())
    finally:
        bs.close()
    assert not torn, f"readers saw torn sectors {torn[:5]}"
    may: dict[int, set] = {}
    for b in hot:
        for i in range(8):
            may[b * MiB // SEC + i] = {999} if b in pre and i < 8 else {0}
    for w, off, n in jobs:
        for i in range(n):
            may[off // SEC + i].add(w)
    # every sector some writer touched holds one of those writers (a later
    # writer always wins over the pre-race content)
    for w, off, n in jobs:
        for i in range(n):
            may[off // SEC + i].discard(0)
            may[off // SEC + i].discard(999)
    _verify(image, set(hot) & (set(pre) | {off // MiB for _, off, _ in jobs}), {}, may)
    figures(SECTION, "overlapping writers + readers", cases=1, writers=len(jobs),
            readers=12)


def test_flush_waits_for_inflight_allocation(image, tmp_path, figures):
    """Regression: a write into a block whose allocation was still in flight
    went straight to the new block (the in-memory BAT said FULLY_PRESENT
    before the BAT update was journaled), so the writer's flush returned while
    the BAT entry naming its data was not yet on disk: a power loss right then
    lost an acknowledged, flushed write.  The same early publication let a
    failed allocation revert the entry under a completed write."""
    bs = open_node(image, "vhdx", O_RDWR)
    child = bs.file
    gate = asyncio.Event()
    gated = asyncio.Event()
    first = {}
    real = child.co_pwritev

    async def slow_first_payload_write(offset, nbytes, qiov, flags=0):
        if offset >= 8 * MiB and not first:
            first["off"] = offset
            gated.set()
            await gate.wait()             # the allocating write's data is slow
        return await real(offset, nbytes, qiov, flags)

    child.co_pwritev = slow_first_payload_write
    snapshot = str(tmp_path / "crash.vhdx")

    async def main():
        a = asyncio.ensure_future(bs.co_pwrite(5 * MiB, _pattern(1, 1)))
        await gated.wait()

        async def b_write_and_flush():
            await bs.co_pwrite(5 * MiB + 16 * SEC, _pattern(2, 1))
            await bs.co_flush()

        b = asyncio.ensure_future(b_write_and_flush())
        for _ in range(50):
            await asyncio.sleep(0)
        if b.done():
            shutil.copyfile(image, snapshot)   # power loss right after B's flush
        gate.set()
        await asyncio.gather(a, b)
        if not os.path.exists(snapshot):
            shutil.copyfile(image, snapshot)

    try:
        asyncio.run(main())
    finally:
        bs.close()
    with blockdrv.open_image(snapshot, "vhdx") as img:
        assert img.read(5 * MiB + 16 * SEC, SEC) == _pattern(2, 1), \
            "a flushed write was lost: its block's BAT entry was not durable"
    figures(SECTION, "flush vs in-flight allocation", cases=1)
