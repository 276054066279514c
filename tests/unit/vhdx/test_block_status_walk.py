"""Block status over a dense VHDX image: a walk to the end is linear."""

from __future__ import annotations

import os

from blockdrv import block
from blockdrv.common import BLOCK_DATA, BLOCK_ZERO, O_RDWR
from blockdrv.mapping import block_status

MiB = 1 << 20
BLOCKS = 64


def test_walk_over_a_dense_image_reads_each_entry_a_bounded_number_of_times(tmp_path):
    """Every block allocated, contiguous in the file, with a host hole in
    each: every answer is cut at a hole, so an answer that walked every
    allocated block to the end of the image made the walk quadratic."""
    path = str(tmp_path / "d.vhdx")
    block.create(path, "vhdx", {"size": BLOCKS * MiB, "block_size": MiB})
    bs = block.open_node(path, "vhdx", O_RDWR)
    try:
        data = os.urandom(MiB // 2)
        for b in range(BLOCKS):
            bs.pwrite(b * MiB, data)         # the second half of each block: a host hole
        bat = bs.opaque.bat
        calls = 0
        real = bat.raw

        def counting(block_no):
            nonlocal calls
            calls += 1
            return real(block_no)
        bat.raw = counting
        pos, answers = 0, []
        while pos < BLOCKS * MiB:
            st = block_status(bs, pos, BLOCKS * MiB - pos)
            answers.append((pos, st.pnum, bool(st.flags & BLOCK_ZERO),
                            bool(st.flags & BLOCK_DATA)))
            pos += st.pnum
    finally:
        bs.close()
    # data, then zeros, per block: the file's holes show through
    assert answers[:2] == [(0, MiB // 2, False, True), (MiB // 2, MiB // 2, True, True)]
    assert len(answers) == 2 * BLOCKS
    assert calls <= 12 * len(answers)    # a quadratic walk reads ~BLOCKS / 2 per answer
