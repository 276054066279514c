"""Measure ``blockdrv compact`` on a 10 GiB dynamic VHDX (issue 14): every
block written, then 30% of the blocks overwritten with zeros (as data, the
way qemu's vhdx writes ``write -z``) and 20% discarded with discard=unmap
(UNMAPPED, host holes punched), in a shuffled order.  Prints the file size
(apparent and allocated) before and after compaction, the wall time of
``compact --dry-run`` and ``compact``, and the sizes of fresh converts by
blockdrv and qemu-img; checks guest equality with qemu-img compare.

Not collected by pytest; run as::

    PYTHONPATH=. python3 tests/interop/measure_vhdx_compact.py [DIR] [SIZE_GIB]
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time

import blockdrv
from blockdrv.api import compact

GiB, MiB = 1 << 30, 1 << 20


def sizes(path):
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def fmt(pair):
    return f"{pair[0] / MiB:9.1f} MiB apparent, {pair[1] / MiB:9.1f} MiB allocated"


def main(workdir: str, size: int) -> None:
    path = os.path.join(workdir, "disk.vhdx")
    blockdrv.create_image(path, "vhdx", size).close()
    rng = random.Random(14)
    with blockdrv.open_image(path, readonly=False) as img:
        bsize = img.bs.opaque.block_size
        nblocks = size // bsize
        buf = bytearray(rng.randbytes(bsize))
        t = time.perf_counter()
        for b in range(nblocks):
            buf[:8] = b.to_bytes(8, "little")
            img.write(b * bsize, bytes(buf))
        img.flush()
        print(f"filled {nblocks} blocks of {bsize // MiB} MiB in {time.perf_counter() - t:.1f} s")
    order = list(range(nblocks))
    rng.shuffle(order)
    zero = order[:nblocks * 3 // 10]
    gone = order[len(zero):len(zero) + nblocks * 2 // 10]
    zeros = bytes(bsize)
    with blockdrv.open_image(path, readonly=False) as img:
        for b in zero:
            img.write(b * bsize, zeros)
    with blockdrv.open_image(path, readonly=False, discard="unmap") as img:
        for b in gone:
            img.discard(b * bsize, bsize)
    before = sizes(path)
    print(f"{len(zero)} blocks zeroed, {len(gone)} discarded")
    print(f"before compact:  {fmt(before)}")
    t = time.perf_counter()
    dry = compact(path, dry_run=True)
    t_dry = time.perf_counter() - t
    print(f"dry run:         would free {dry.freed / MiB:.1f} MiB "
          f"({dry.zeroed_blocks} zero blocks, {dry.moved_blocks} moves) in {t_dry:.2f} s")
    t = time.perf_counter()
    r = compact(path)
    t_compact = time.perf_counter() - t
    after = sizes(path)
    print(f"after compact:   {fmt(after)}  ({t_compact:.2f} s wall; "
          f"{r.zeroed_blocks} zero blocks, {r.moved_blocks} blocks moved)")
    conv = os.path.join(workdir, "conv.vhdx")
    t = time.perf_counter()
    blockdrv.convert(path, conv, fmt="vhdx", options={"block_size": bsize})
    print(f"blockdrv convert:{fmt(sizes(conv))}  ({time.perf_counter() - t:.1f} s)")
    qconv = os.path.join(workdir, "qconv.vhdx")
    t = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "vhdx", "-o",
                    f"block_size={bsize}", path, qconv], check=True)
    print(f"qemu-img convert:{fmt(sizes(qconv))}  ({time.perf_counter() - t:.1f} s)")
    assert after[0] <= sizes(conv)[0] + MiB, "compacted image larger than convert + 1 MiB"
    cmp = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", path, qconv],
                         capture_output=True, text=True)
    chk = subprocess.run(["qemu-img", "check", "-f", "vhdx", path], capture_output=True,
                         text=True)
    print(f"qemu-img compare: {cmp.stdout.strip()}  qemu-img check: {chk.stdout.strip()}")
    os.unlink(conv)
    os.unlink(qconv)
    os.unlink(path)


if __name__ == "__main__":
    d = sys.argv[1] if len(sys.argv) > 1 else None
    gib = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        main(tmp, gib * GiB)
