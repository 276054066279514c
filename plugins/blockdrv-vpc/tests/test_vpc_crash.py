"""Crash matrix: a seeded plan of guest writes and flushes on a dynamic VHD
runs through the ``blkdebug`` filter, which cuts the power at the Nth write
or flush (every N), keeping, losing or randomly keeping the unflushed
writes.  The image left behind must

* open with blockdrv and with qemu (qemu-img info, qemu-io reads),
* read the same through both tools (qemu-img convert vs blockdrv reads),
* hold every write acknowledged before the last completed flush, and for
  every touched sector a version at least that new (never garbage),
* end with a valid footer, and have BAT entries only for written blocks,
  inside the file and not overlapping,
* take further allocating writes (checked with qemu-img compare).

qemu-img has no ``check`` for vpc (it exits 63); the structural checks above
stand in for it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import subprocess

import pytest

from blockdrv.driver import O_RDWR, open_node
from blockdrv.testing import crash
from blockdrv.testing.qemu import QEMU_IMG, qemu_img_create

from vpc_helpers import virtual_size

MiB = 1 << 20
SECTOR = 512
BLOCK = 2 * MiB
SIZE = 16 * MiB
MODES = crash.MODES               # keep / lose / random subset of the unflushed writes


def _pattern(rng, tag, nbytes):
    out = bytearray(rng.randbytes(nbytes))
    for pos in range(0, nbytes, SECTOR):
        out[pos:pos + 4] = tag.to_bytes(4, "little")
    return bytes(out)


def make_plan(seed):
    """Allocating writes, overwrites, writes spanning two blocks, flushes."""
    rng = random.Random(seed)
    ops, tag = [], 1
    blocks = list(range(SIZE // BLOCK))
    for i in range(14):
        block = rng.choice(blocks)
        nsec = rng.randint(1, 96)
        if rng.random() < 0.25 and block + 1 < len(blocks):
            off = (block + 1) * BLOCK - rng.randint(1, nsec) * SECTOR
        else:
            off = block * BLOCK + rng.randrange(0, BLOCK - nsec * SECTOR + 1, SECTOR)
        ops.append(("w", off, _pattern(rng, tag, nsec * SECTOR)))
        tag += 1
        if rng.random() < 0.35:
            ops.append(("f",))
    ops.append(("f",))
    return ops


def structure_problems(path):
    """What a VHD checker would flag (qemu has none for vpc)."""
    data = open(path, "rb").read()
    problems = []
    tail = data[-512:]
    if tail[:8] != b"conectix":
        problems.append("no footer in the last 512 bytes")
    else:
        ck = struct.unpack(">I", tail[64:68])[0]
        if ~(sum(tail) - sum(tail[64:68])) & 0xFFFFFFFF != ck:
            problems.append("tail footer checksum")
    if data[:512] != tail:
        problems.append("head and tail footers differ")
    entries, = struct.unpack(">I", data[512 + 28:512 + 32])
    bat = struct.unpack(f">{entries}I", data[1536:1536 + 4 * entries])
    spans = sorted(e * SECTOR for e in bat if e != 0xFFFFFFFF)
    for a, b in zip(spans, spans[1:]):
        if b < a + 512 + BLOCK:
            problems.append(f"blocks at {a:#x} and {b:#x} overlap")
    if spans and spans[-1] + 512 + BLOCK > len(data) - 512:
        problems.append("a block reaches past the tail footer")
    return problems, bat


def vpc_checks(scratch):
    """The harness's ``extra_checks``: on the crashed image (the read-only
    open, before anything rewrote it) the VHD structure, BAT entries only for
    blocks the plan wrote, and qemu reading what blockdrv reads.  The harness
    itself checks every acknowledged-flushed write and never garbage."""
    def check(bs, model, what, flags):
        if what != "read-only open":
            return []
        path = bs.filename
        problems, bat = structure_problems(path)
        written = {s * SECTOR // BLOCK for s in model.versions}
        for i, e in enumerate(bat):
            if e != 0xFFFFFFFF and i not in written:
                problems.append(f"BAT entry for block {i}, never written")
        raw = os.path.join(scratch, "qemu.raw")
        p = subprocess.run([QEMU_IMG, "convert", "-f", "vpc", "-O", "raw", path, raw],
                           capture_output=True, text=True)
        if p.returncode:
            return problems + [f"qemu-img cannot read it: {p.stderr.strip()}"]
        if open(raw, "rb").read() != bytes(bs.pread(0, bs.total_size)):
            problems.append("qemu and blockdrv read different data")
        return problems
    return check


def still_writable(path, scratch):
    """An allocating write after the crash, by us; qemu then agrees."""
    bs = open_node(path, "vpc", O_RDWR)
    try:
        for off in (SIZE - BLOCK + 4096, 4096 * 3):
            bs.pwrite(off, b"\xa5" * 8192)
        bs.flush()
    finally:
        bs.close()
    raw = os.path.join(scratch, "after.raw")
    bs = open_node(path, "vpc", 0)
    try:
        with open(raw, "wb") as f:
            f.write(bs.pread(0, bs.total_size))
    finally:
        bs.close()
    p = subprocess.run([QEMU_IMG, "compare", "-f", "vpc", "-F", "raw", path, raw],
                       capture_output=True, text=True)
    return [] if p.returncode == 0 else [f"after a new write: {p.stdout}{p.stderr}"]


def test_crash_matrix_fast(tmp_path, figures):
    """Every cut point of two plans, the three crash modes rotating over N."""
    for seed in (1, 2):
        run_matrix(seed, tmp_path, figures, rotate=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_crash_matrix_full(seed, tmp_path, figures):
    """Every cut point in every crash mode."""
    run_matrix(seed, tmp_path, figures, rotate=False)


def run_matrix(seed, tmp_path, figures, rotate):
    """Every cut point of plan ``seed`` through the harness's engine
    (:mod:`blockdrv.testing.crash`), vpc's own checks added, and after each
    one an allocating write that qemu must read back alike."""
    scratch = str(tmp_path)
    base = os.path.join(scratch, "base.vhd")
    work = os.path.join(scratch, "work.vhd")
    plan = crash.Plan(f"vpc seed {seed}", SIZE, {}, make_plan(seed), fmt="vpc",
                      block_size=BLOCK)
    crash.make_base(base, plan, lambda path, size: qemu_img_create(path, "vpc", size))
    # qemu's CHS geometry rounds the disk up: the model knows the real size
    plan = dataclasses.replace(plan, size=virtual_size(base))
    base_blocks = crash.base_content(base, plan)
    total, _ = crash.count_events(base, work, plan, base_blocks)
    checks = vpc_checks(scratch)
    tried = survived = 0
    failures = []
    for n in range(1, total + 2):
        for mode in ([MODES[n % 3]] if rotate else MODES):
            problems = crash.run_cut(base, work, plan, base_blocks, n, mode,
                                     extra_checks=checks)
            if not problems:
                problems = still_writable(work, scratch)
            tried += 1
            if problems:
                failures.append(f"cut {n} {mode}: {problems[:3]}")
            else:
                survived += 1
    figures("vpc", f"crash matrix seed {seed}{'' if rotate else ' (full)'}",
            events=total, tried=tried, survived=survived)
    assert not failures, failures[:10]


def test_matrix_catches_a_driver_that_skips_the_flush(tmp_path, monkeypatch, figures):
    """The checker itself: without the flush before the BAT entry, a lost
    cache leaves a BAT entry over a block whose data never landed."""
    import blockdrv_vpc.image as image

    async def no_flush(self):
        return None
    real = image.VPCImage._allocate

    async def allocate_without_flush(self, *a):
        f = self.file
        orig = type(f).co_flush
        monkeypatch.setattr(type(f), "co_flush", no_flush)
        try:
            await real(self, *a)
        finally:
            monkeypatch.setattr(type(f), "co_flush", orig)
    monkeypatch.setattr(image.VPCImage, "_allocate", allocate_without_flush)
    with pytest.raises(AssertionError):
        run_matrix(1, tmp_path, lambda *a, **k: None, rotate=True)
