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

import os
import random
import struct
import subprocess

import pytest

from blockdrv.driver import BlockDriverError, O_RDWR, open_node
from blockdrv.testing.qemu import QEMU_IMG, qemu_img_create, sparse_copy

MiB = 1 << 20
SECTOR = 512
BLOCK = 2 * MiB
SIZE = 16 * MiB
MODES = (("keep", "drop"), ("lose", "drop"), ("random", "fail"))


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


class Model:
    def __init__(self):
        self.versions: dict[int, list[bytes]] = {}
        self.floor: dict[int, int] = {}
        self.acked: dict[int, int] = {}

    def issue(self, off, data):
        for i in range(0, len(data), SECTOR):
            s = (off + i) // SECTOR
            self.versions.setdefault(s, [bytes(SECTOR)]).append(data[i:i + SECTOR])
            self.floor.setdefault(s, 0)

    def ack(self, off, n):
        for s in range(off // SECTOR, (off + n) // SECTOR):
            self.acked[s] = len(self.versions[s]) - 1

    def flushed(self):
        self.floor.update(self.acked)
        self.acked.clear()


def _state(bs):
    # blockdrv.testing has no accessor for the blkdebug node's counters; the
    # node below the format is the filter and its opaque carries them
    return bs.file.opaque


def run_plan(path, ops, model, config):
    try:
        bs = open_node(path, "vpc", O_RDWR,
                       options={"file": {"driver": "blkdebug", "config": config}})
    except BlockDriverError as exc:
        assert "lost power" in str(exc), exc
        return None
    st = _state(bs)
    fail_after = any(r.get("after_crash") == "fail" for r in config.get("rules", ()))
    try:
        for op in ops:
            if st.crashed and fail_after:
                break
            try:
                if op[0] == "w":
                    if not st.crashed:
                        model.issue(op[1], op[2])
                    bs.pwrite(op[1], op[2])
                    if not st.crashed:
                        model.ack(op[1], len(op[2]))
                else:
                    bs.flush()
                    if not st.crashed:
                        model.flushed()
            except BlockDriverError:
                if not st.crashed:
                    raise
    finally:
        try:
            bs.close()
        except BlockDriverError:
            if not st.crashed:
                raise
    return st


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


def verify(path, model, written_blocks, scratch):
    problems, bat = structure_problems(path)
    for i, e in enumerate(bat):
        if e != 0xFFFFFFFF and i not in written_blocks:
            problems.append(f"BAT entry for block {i}, never written")
    try:
        bs = open_node(path, "vpc", 0)
    except BlockDriverError as exc:
        return problems + [f"does not open: {exc}"]
    try:
        ours = bytes(bs.pread(0, bs.total_size))
    finally:
        bs.close()
    raw = os.path.join(scratch, "qemu.raw")
    p = subprocess.run([QEMU_IMG, "convert", "-f", "vpc", "-O", "raw", path, raw],
                       capture_output=True, text=True)
    if p.returncode:
        return problems + [f"qemu-img cannot read it: {p.stderr.strip()}"]
    if open(raw, "rb").read() != ours:
        problems.append("qemu and blockdrv read different data")
    for s, vers in model.versions.items():
        got = ours[s * SECTOR:(s + 1) * SECTOR]
        if got not in vers[model.floor[s]:]:
            what = "lost a flushed write" if got in vers else "holds garbage"
            problems.append(f"sector {s} {what}")
            break
    for s in range(0, len(ours) // SECTOR, 97):
        if s not in model.versions and any(ours[s * SECTOR:(s + 1) * SECTOR]):
            problems.append(f"untouched sector {s} is not zero")
            break
    return problems


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
    scratch = str(tmp_path)
    base = os.path.join(scratch, "base.vhd")
    work = os.path.join(scratch, "work.vhd")
    qemu_img_create(base, "vpc", SIZE)
    ops = make_plan(seed)
    written = {off // BLOCK for op in ops if op[0] == "w" for off in
               (op[1], op[1] + len(op[2]) - 1)}
    sparse_copy(base, work)
    st = run_plan(work, ops, Model(), {"record": True, "rules": []})
    total = st.events
    tried = survived = 0
    failures = []
    for n in range(1, total + 2):
        for mode in ([MODES[n % 3]] if rotate else MODES):
            sparse_copy(base, work)
            model = Model()
            rule = {"event": ["write", "flush"], "nth": n, "action": "crash",
                    "unflushed": mode[0], "after_crash": mode[1], "seed": n}
            st = run_plan(work, ops, model, {"rules": [rule]})
            if st is not None and not st.crashed and n <= total:
                failures.append(f"cut {n}: the crash never fired")
                continue
            problems = verify(work, model, written, scratch)
            if not problems:
                problems = still_writable(work, scratch)
            tried += 1
            if problems:
                failures.append(f"cut {n} {mode}: {problems[:3]}")
            else:
                survived += 1
    figures("vpc", f"crash matrix seed {seed}{'' if rotate else ' (full)'}", events=total, tried=tried, survived=survived)
    print(f"\n[vpc crash matrix] seed {seed}: {total} events, {tried} cuts, {survived} survived")
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
