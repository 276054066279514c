"""Concurrency: the VHDX-only regression (issue 4, item 5).

Concurrent coroutine readers and writers through a suspending ``blkdebug``
filter (disjoint writers sharing unallocated blocks, overlapping writers
with readers) run for every format and variant in the format conformance
suite (``test_concurrent_*`` in tests/conformance/test_format_conformance.py,
with VHDX's BAT checks: no block allocated twice, the file grew by one block
per allocated block).  Here stays the regression test of a race inside the
VHDX allocation path.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

import blockdrv
from blockdrv.block import open_node
from blockdrv.common import O_RDWR

MiB = 1 << 20
SEC = 4096
SIZE = 32 * MiB
SECTION = "concurrency"


def _pattern(writer: int, nsec: int) -> bytes:
    one = writer.to_bytes(4, "little") + bytes([(writer * 37 + 1) % 255 + 1]) * (SEC - 4)
    return one * nsec


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "c.vhdx")
    blockdrv.create_image(path, "vhdx", SIZE, block_size=MiB, log_size=MiB).close()
    return path


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
