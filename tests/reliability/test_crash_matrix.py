"""Crash-consistency matrix for the VHDX driver (issue 4, item 2).

Each workload is a seeded plan of guest writes and flushes on a VHDX image.
For every cut point N (the Nth write or flush reaching the protocol layer,
counting the open's own header updates) the plan runs against a fresh copy of
the base image through a ``blkdebug`` filter that crashes at event N: event N
and everything after it never reach the file, and the writes since the last
completed flush are kept, lost, or kept as a seeded random subset (a volatile
write cache losing power).  The post-crash image must then

* open read-only (log replayed in memory) and read-write (log replayed),
* ``check`` without corruptions (a pending log is none),
* hold every write acknowledged before the last completed flush,
* show, for every 512-byte sector the plan touched, a version it held at or
  after that flush (never garbage, never a write issued after the crash), and
  for every untouched sector of a touched block its base content,
* have no BAT entry present for a block the plan never wrote.

A sample of post-crash images also goes through ``qemu-img check -r all``
(qemu replays our log) and ``qemu-img check`` after our replay.

The fast subset runs every cut point of the small workloads once (the three
crash modes rotate over N) and a window around each log wrap of the wrap
workload; ``-m slow`` runs every cut point in every mode.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass, field

import numpy as np
import pytest

import blockdrv
from blockdrv.block import open_node, open_protocol
from blockdrv.drivers.vhdx.create import create_vhdx
from blockdrv.errors import BlockDriverError
from blockdrv.common import O_RDWR
from blockdrv.plugins import get_registry
from blockdrv.protocols import blkdebug
from blockdrv.testing.qemu import QEMU_IMG, sparse_copy
from blockdrv.testing.tools import require_tool

MiB = 1 << 20
SECTOR = 512
SECTION = "crash matrix"
# (unflushed writes at the crash, behaviour of requests after it)
MODES = (("keep", "drop"), ("lose", "drop"), ("random", "fail"))


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

@dataclass
class Plan:
    name: str
    size: int
    create: dict
    ops: list                         # ("w", offset, bytes) | ("f",) | ("t", new size)
    setup: list = field(default_factory=list)   # ops applied to the base, flushed
    full_blocks: bool = True          # verify whole touched blocks (else written +- 1 sector)
    block_size: int = MiB
    lss: int = SECTOR


def _pattern(rng: random.Random, tag: int, nbytes: int) -> bytes:
    """Unique, never-zero content: each sector names its write."""
    head = tag.to_bytes(4, "little")
    body = rng.randbytes(nbytes)
    out = bytearray(body)
    for pos in range(0, nbytes, SECTOR):
        out[pos:pos + 4] = head
    return bytes(out)


def _writes(rng, tag0, count, blocks, block_size, lss, *, max_sectors=64, flush_every=(2, 4),
            span_next=0.2):
    ops, tag = [], tag0
    since = 0
    every = rng.randint(*flush_every)
    for _ in range(count):
        block = rng.choice(blocks)
        nsec = rng.randint(1, max_sectors)
        nbytes = nsec * lss
        if rng.random() < span_next and block + 1 < max(blocks) + 1:
            offset = (block + 1) * block_size - rng.randint(1, nsec) * lss   # crosses a block end
        else:
            offset = block * block_size + rng.randrange(0, block_size - nbytes + 1, lss)
        ops.append(("w", offset, _pattern(rng, tag, nbytes)))
        tag += 1
        since += 1
        if since >= every:
            ops.append(("f",))
            since, every = 0, rng.randint(*flush_every)
    ops.append(("f",))
    return ops


def plan_alloc(seed: int = 1, lss: int = SECTOR) -> Plan:
    rng = random.Random(seed)
    size = 24 * MiB
    ops = _writes(rng, 1, 10, list(range(24)), MiB, lss)
    name = "allocating writes" + (" (4K sectors)" if lss == 4096 else "")
    return Plan(name, size, {"block_size": MiB, "log_size": MiB,
                             "logical_sector_size": lss}, ops, lss=lss)


def plan_overwrite(seed: int = 2) -> Plan:
    rng = random.Random(seed)
    size = 16 * MiB
    allocated = [1, 3, 4, 9, 12]
    setup = [("w", b * MiB, _pattern(rng, 1000 + b, 256 * 1024)) for b in allocated]
    # mostly overwrites of allocated blocks (overlapping each other), some allocations
    ops = _writes(rng, 1, 8, allocated, MiB, SECTOR, max_sectors=512, span_next=0.0)
    ops += _writes(rng, 100, 3, [6, 7, 14], MiB, SECTOR)
    ops += _writes(rng, 200, 4, allocated + [6, 7, 14], MiB, SECTOR, flush_every=(1, 3))
    return Plan("overwrites", size, {"block_size": MiB, "log_size": MiB}, ops, setup)


def plan_fixed(seed: int = 3, zero_state: bool = False) -> Plan:
    rng = random.Random(seed)
    size = 8 * MiB
    ops = _writes(rng, 1, 10, list(range(8)), MiB, SECTOR, max_sectors=256)
    name = "fixed (ZERO-state BAT)" if zero_state else "fixed"
    return Plan(name, size, {"subformat": "fixed", "block_size": MiB, "log_size": MiB,
                             "block_state_zero": zero_state}, ops)


def plan_wrap(seed: int = 4, allocations: int = 400) -> Plan:
    """One 4 KiB allocating write per block: each journals one 8 KiB log
    entry, so 400 allocations wrap the 1 MiB ring three times."""
    rng = random.Random(seed)
    blocks = list(range(allocations))
    rng.shuffle(blocks)
    ops, tag = [], 1
    for i, block in enumerate(blocks):
        offset = block * MiB + rng.randrange(0, MiB - 4096 + 1, SECTOR)
        ops.append(("w", offset, _pattern(rng, tag, 4096)))
        tag += 1
        if i % 5 == 4:
            # an overwrite of a block allocated earlier in the run
            old = blocks[rng.randrange(0, i + 1)]
            ops.append(("w", old * MiB + rng.randrange(0, MiB - 1024 + 1, SECTOR),
                        _pattern(rng, tag, 1024)))
            tag += 1
        if i % 7 == 6:
            ops.append(("f",))
    ops.append(("f",))
    return Plan("log wrap x3", allocations * MiB, {"block_size": MiB, "log_size": MiB},
                ops, full_blocks=False)


def plan_resize_grow(seed: int = 6) -> Plan:
    """Grow within the BAT region's slack: one log entry with the new BAT
    sectors and the VirtualDiskSize sector; then writes into the new space."""
    rng = random.Random(seed)
    setup = [("w", b * MiB, _pattern(rng, 1000 + b, 128 * 1024)) for b in (2, 15)]
    ops = _writes(rng, 1, 3, [2, 5, 15], MiB, SECTOR, flush_every=(2, 3))
    ops.append(("t", 40 * MiB))
    ops += _writes(rng, 100, 4, [15, 16, 30, 39], MiB, SECTOR, flush_every=(1, 3))
    return Plan("resize: grow in place", 16 * MiB, {"block_size": MiB, "log_size": MiB},
                ops, setup)


def plan_resize_relocate(seed: int = 7) -> Plan:
    """Grow past the 1 MiB BAT region (127 GiB in 1 MiB blocks needs 130080
    entries; 130 GiB needs more than 131072): the new BAT is written at the
    end of the file, then both region tables and the size are journaled."""
    rng = random.Random(seed)
    size, new = 127 << 30, 130 << 30
    last = size // MiB - 1
    setup = [("w", last * MiB, _pattern(rng, 1000, 64 * 1024))]
    ops = _writes(rng, 1, 2, [0, last], MiB, SECTOR, span_next=0.0)
    ops.append(("t", new))
    ops += _writes(rng, 100, 3, [last, last + 1, new // MiB - 1], MiB, SECTOR,
                   span_next=0.0, flush_every=(1, 2))
    return Plan("resize: grow with BAT relocation", size,
                {"block_size": MiB, "log_size": MiB}, ops, setup)


def plan_resize_shrink(seed: int = 8) -> Plan:
    """Shrink: the dropped entries are zeroed through the log (zero
    descriptors), then the freed blocks at the end of the file are cut off."""
    rng = random.Random(seed)
    setup = [("w", b * MiB, _pattern(rng, 1000 + b, 128 * 1024)) for b in (1, 6, 20, 23)]
    ops = _writes(rng, 1, 3, [1, 6, 20], MiB, SECTOR, span_next=0.0, flush_every=(2, 3))
    ops.append(("t", 10 * MiB))
    ops += _writes(rng, 100, 3, [1, 8, 9], MiB, SECTOR, span_next=0.0, flush_every=(1, 3))
    return Plan("resize: shrink", 24 * MiB, {"block_size": MiB, "log_size": MiB},
                ops, setup)


def plan_resize_fixed(seed: int = 9) -> Plan:
    """A fixed image grows with FULLY_PRESENT blocks at the end of the file."""
    rng = random.Random(seed)
    ops = _writes(rng, 1, 2, [0, 5], MiB, SECTOR, span_next=0.0)
    ops.append(("t", 12 * MiB))
    ops += _writes(rng, 100, 3, [5, 6, 11], MiB, SECTOR, span_next=0.0, flush_every=(1, 2))
    return Plan("resize: fixed grow", 6 * MiB,
                {"subformat": "fixed", "block_size": MiB, "log_size": MiB,
                 "block_state_zero": False}, ops)


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------

def make_base(path: str, plan: Plan) -> None:
    blockdrv.create_image(path, "vhdx", plan.size, **plan.create).close()
    if plan.setup:
        with blockdrv.open_image(path, "vhdx", readonly=False) as img:
            for _, off, data in plan.setup:
                img.write(off, data)
            img.flush()


def open_blkdebug(path: str, config: dict, flags: int = O_RDWR):
    return open_node(path, "vhdx", flags,
                     options={"file": {"driver": "blkdebug", "config": config}})


# --------------------------------------------------------------------------
# The model: what each sector may hold after the crash
# --------------------------------------------------------------------------

class Model:
    def __init__(self, plan: Plan, base: dict[int, np.ndarray]) -> None:
        self.plan = plan
        self.base = base                       # block -> uint8[block_size] as in the base image
        self.versions: dict[int, list[bytes]] = {}
        self.floor: dict[int, int] = {}        # durable version index per sector
        self.acked: dict[int, int] = {}        # acknowledged since the last flush
        self.sizes = [plan.size]               # virtual sizes, in issue order
        self.size_floor = 0                    # index of the durable one

    def resize_issued(self, size: int) -> None:
        self.sizes.append(size)

    def resize_acked(self) -> None:
        # a resize is durable when it returns (one flushed log entry)
        self.size_floor = len(self.sizes) - 1

    def _sector_base(self, sector: int) -> bytes:
        off = sector * SECTOR
        block, inb = divmod(off, self.plan.block_size)
        return self.base[block][inb:inb + SECTOR].tobytes()

    def issue(self, offset: int, data: bytes) -> None:
        for i in range(0, len(data), SECTOR):
            sector = (offset + i) // SECTOR
            vers = self.versions.get(sector)
            if vers is None:
                vers = self.versions[sector] = [self._sector_base(sector)]
                self.floor[sector] = 0
            vers.append(data[i:i + SECTOR])

    def ack(self, offset: int, nbytes: int) -> None:
        for i in range(0, nbytes, SECTOR):
            sector = (offset + i) // SECTOR
            self.acked[sector] = len(self.versions[sector]) - 1

    def flushed(self) -> None:
        self.floor.update(self.acked)
        self.acked.clear()

    def touched_blocks(self) -> set[int]:
        return {s * SECTOR // self.plan.block_size for s in self.versions}


def base_content(path: str, plan: Plan) -> dict[int, np.ndarray]:
    blocks = set()
    for op in plan.ops:
        if op[0] == "w":
            first = op[1] // plan.block_size
            last = (op[1] + len(op[2]) - 1) // plan.block_size
            blocks.update(range(first, last + 1))
    out = {}
    with blockdrv.open_image(path, "vhdx") as img:
        for b in blocks:
            start = b * plan.block_size
            n = max(0, min(plan.block_size, plan.size - start))
            buf = bytearray(plan.block_size)        # past the base size: zeros
            buf[:n] = img.read(start, n) if n else b""
            out[b] = np.frombuffer(bytes(buf), dtype=np.uint8)
    return out


def verify_content(bs, model: Model, what: str) -> list[str]:
    plan = model.plan
    problems: list[str] = []
    size = bs.total_size
    by_block: dict[int, list[int]] = {}
    for sector in model.versions:
        if sector * SECTOR >= size:
            # dropped by a shrink, or written after a grow that did not
            # survive -- verify_image checked that the size may be this one
            # (a flushed write past an old size implies its grow returned)
            continue
        by_block.setdefault(sector * SECTOR // plan.block_size, []).append(sector)
    for block, sectors in sorted(by_block.items()):
        start = block * plan.block_size
        if plan.full_blocks:
            n = min(plan.block_size, size - start)
            got = np.frombuffer(bs.pread(start, n), dtype=np.uint8)
            base = model.base[block][:n]
            rows = got.reshape(-1, SECTOR) != base.reshape(-1, SECTOR)
            bad = set(np.flatnonzero(rows.any(axis=1)).tolist())
            written = {s - start // SECTOR for s in sectors}
            for rel in sorted(bad - written)[:3]:
                problems.append(f"{what}: block {block} sector {rel} (never written) "
                                "holds garbage")
            for sector in sectors:
                rel = sector - start // SECTOR
                data = got[rel * SECTOR:(rel + 1) * SECTOR].tobytes()
                if data not in model.versions[sector][model.floor[sector]:]:
                    problems.append(_describe(model, sector, data, what))
        else:
            for sector in sectors:
                data = bytes(bs.pread(sector * SECTOR, SECTOR))
                if data not in model.versions[sector][model.floor[sector]:]:
                    problems.append(_describe(model, sector, data, what))
            # guard sectors next to each written run read as their base content
            for sector in sectors:
                for nb in (sector - 1, sector + 1):
                    if nb in model.versions or nb // (plan.block_size // SECTOR) != block:
                        continue
                    data = bytes(bs.pread(nb * SECTOR, SECTOR))
                    if data != model._sector_base(nb):
                        problems.append(f"{what}: sector {nb} (never written) holds garbage")
        if len(problems) > 5:
            break
    return problems


def _describe(model: Model, sector: int, data: bytes, what: str) -> str:
    vers = model.versions[sector]
    if data in vers:
        return (f"{what}: sector {sector} lost a flushed write: holds version "
                f"{vers.index(data)}, durable version is {model.floor[sector]} of {len(vers) - 1}")
    return f"{what}: sector {sector} holds garbage (tag {data[:4].hex()})"


def verify_image(path: str, model: Model) -> list[str]:
    """Every post-crash property on the image at ``path`` (modifies it: replays)."""
    plan = model.plan
    problems: list[str] = []
    allowed_present = model.touched_blocks() | {
        off // plan.block_size for _, off, _d in plan.setup}
    for flags, what in ((0, "read-only open"), (O_RDWR, "read-write open"),
                        (0, "reopen after replay")):
        try:
            bs = open_node(path, "vhdx", flags)
        except BlockDriverError as exc:
            problems.append(f"{what}: cannot open: {exc}")
            return problems
        try:
            img = bs.opaque
            if bs.total_size not in model.sizes[model.size_floor:]:
                problems.append(f"{what}: size {bs.total_size}, expected one of "
                                f"{model.sizes[model.size_floor:]}")
            res = bs.check()
            pending = 1 if img.overlay is not None else 0
            if flags and img.overlay is not None:
                problems.append(f"{what}: log still pending after a read-write open")
            if what == "reopen after replay" and pending:
                problems.append(f"{what}: log pending after replay")
            if res.corruptions:                 # a pending log is not one
                problems.append(f"{what}: check reports {res.corruptions} corruptions: "
                                f"{res.messages[:3]}")
            if not plan.create.get("subformat") == "fixed":
                states = img.bat.states()
                present = set(np.flatnonzero(states == 6).tolist())
                stray = present - allowed_present
                if stray:
                    problems.append(f"{what}: BAT entries present for unwritten blocks "
                                    f"{sorted(stray)[:5]}")
            if what != "reopen after replay":
                problems += verify_content(bs, model, what)
        finally:
            bs.close()
    return problems


# --------------------------------------------------------------------------
# Running a plan with a crash at event N
# --------------------------------------------------------------------------

def crash_rule(n: int, mode) -> dict:
    unflushed, after = mode
    return {"rules": [{"event": ["write", "flush"], "nth": n, "action": "crash",
                       "unflushed": unflushed, "after_crash": after, "seed": n}]}


def run_plan(path: str, plan: Plan, model: Model, config: dict):
    """Run ``plan`` on ``path`` through blkdebug; returns the filter state
    (None when the crash hit the open itself and the open failed)."""
    try:
        bs = open_blkdebug(path, config)
    except BlockDriverError as exc:
        assert "lost power" in str(exc), f"open failed before the crash: {exc}"
        return None
    st = blkdebug.state(bs)
    fail_after = any(r.after_crash == "fail" for r in st.config.rules)
    try:
        for op in plan.ops:
            if st.crashed and fail_after:
                break
            try:
                if op[0] == "w":
                    if not st.crashed:
                        model.issue(op[1], op[2])
                    bs.pwrite(op[1], op[2])
                    if not st.crashed:
                        model.ack(op[1], len(op[2]))
                elif op[0] == "t":
                    if not st.crashed:
                        model.resize_issued(op[1])
                    bs.truncate(op[1])
                    if not st.crashed:
                        model.resize_acked()
                else:
                    bs.flush()
                    if not st.crashed:
                        model.flushed()
            except BlockDriverError:
                if not st.crashed:
                    raise
    finally:
        try:
            bs.close()                  # flushes: fails on a dead device in "fail" mode
        except BlockDriverError:
            if not st.crashed:
                raise
    return st


def count_events(base: str, work: str, plan: Plan, base_blocks) -> tuple[int, list]:
    sparse_copy(base, work)
    st = run_plan(work, plan, Model(plan, base_blocks), {"record": True, "rules": []})
    assert st is not None and not st.crashed
    return st.events, st.trace


def run_cut(base: str, work: str, plan: Plan, base_blocks, n: int, mode,
            keep_crashed: str | None = None) -> list[str]:
    """Run ``plan`` on a copy of ``base`` with a crash at event ``n``, then
    verify (and so replay) the image left in ``work``; ``keep_crashed``: also
    copy the crashed image there before our replay touches it."""
    sparse_copy(base, work)
    model = Model(plan, base_blocks)
    st = run_plan(work, plan, model, crash_rule(n, mode))
    if st is not None and not st.crashed and n <= st.events:
        return [f"cut {n}: the crash never fired ({st.events} events)"]
    if keep_crashed:
        sparse_copy(work, keep_crashed)
    problems = verify_image(work, model)
    return [f"cut {n} {mode}: {p}" for p in problems]


def qemu_check(qemu_img: str, path: str, *args: str) -> tuple[int, str]:
    proc = subprocess.run([qemu_img, "check", "-f", "vhdx", *args, path],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def run_matrix(scratch: str, plan: Plan, cuts, modes_for, figures, label=None,
               qemu_img: str | None = None, qemu_every: int = 0) -> None:
    base = os.path.join(scratch, "base.vhdx")
    work = os.path.join(scratch, "work.vhdx")
    crashed = os.path.join(scratch, "crashed.vhdx")
    make_base(base, plan)
    base_blocks = base_content(base, plan)
    total, trace = count_events(base, work, plan, base_blocks)
    cut_list = cuts(total, trace) if callable(cuts) else cuts
    tried = survived = qemu_checked = 0
    failures: list[str] = []
    for i, n in enumerate(cut_list):
        for mode in modes_for(n):
            with_qemu = bool(qemu_img and qemu_every and i % qemu_every == 0)
            problems = run_cut(base, work, plan, base_blocks, n, mode,
                               keep_crashed=crashed if with_qemu else None)
            if with_qemu and not problems:
                # qemu replays the log we left (check -r all opens read-write)...
                rc, out = qemu_check(qemu_img, crashed, "-r", "all")
                if rc != 0:
                    problems.append(f"cut {n} {mode}: qemu-img check -r all: rc {rc}: {out}")
                # ...and checks the image our replay produced (verify_image's
                # read-write open replayed it in ``work``).
                rc, out = qemu_check(qemu_img, work)
                if rc != 0:
                    problems.append(f"cut {n} {mode}: qemu-img check after replay: "
                                    f"rc {rc}: {out}")
                qemu_checked += 1
            tried += 1
            if problems:
                failures += problems
            else:
                survived += 1
    name = label or plan.name
    figures(SECTION, name, tried=tried, survived=survived, events=total,
            **({"qemu_checked": qemu_checked} if qemu_img else {}))
    print(f"\n[crash matrix] {name}: {total} write/flush events, "
          f"{tried} cut points tried, {survived} survived"
          + (f", {qemu_checked} qemu-img checked" if qemu_img else ""))
    assert not failures, f"{len(failures)} problems, first: " + "\n".join(failures[:10])


def every_cut(total, trace):
    return range(1, total + 2)          # total + 1: no crash at all


def rotate_modes(n):
    return [MODES[n % len(MODES)]]


def all_modes(n):
    return MODES


def wrap_windows(log_offset: int, window: int, stride: int):
    """Cut points around every write to the first log sector after the first
    (the ring wrapping), plus every ``stride``-th event."""
    def cuts(total, trace):
        events, wraps, seen_start = 0, [], 0
        for item in trace:
            if item[0] == "truncate":
                continue
            events += 1
            if item[0] == "write" and item[1] == log_offset:
                seen_start += 1
                if seen_start > 1:
                    wraps.append(events)
        assert len(wraps) >= 3, f"the log wrapped only {len(wraps)} times"
        chosen = set(range(1, total + 2, stride))
        for w in wraps:
            chosen.update(range(max(1, w - window), min(total + 1, w + window) + 1))
        return sorted(chosen)
    return cuts


SMALL_PLANS = [plan_alloc, plan_overwrite, plan_fixed,
               lambda: plan_fixed(zero_state=True), lambda: plan_alloc(5, lss=4096)]
SMALL_IDS = ["alloc", "overwrite", "fixed", "fixed-zero-state", "alloc-4k"]


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

@pytest.mark.parametrize("make", SMALL_PLANS, ids=SMALL_IDS)
def test_crash_matrix_fast(make, scratch, figures):
    run_matrix(scratch, make(), every_cut, rotate_modes, figures)


def test_crash_matrix_log_wrap_fast(scratch, figures):
    run_matrix(scratch, plan_wrap(), wrap_windows(MiB, window=3, stride=400),
               rotate_modes, figures)


@pytest.mark.slow
@pytest.mark.parametrize("make", SMALL_PLANS, ids=SMALL_IDS)
def test_crash_matrix_full(make, scratch, figures):
    run_matrix(scratch, make(), every_cut, all_modes, figures, label=make().name + " (full)")


@pytest.mark.slow
def test_crash_matrix_log_wrap_full(scratch, figures):
    run_matrix(scratch, plan_wrap(), every_cut, rotate_modes, figures,
               label="log wrap x3 (full)")


def test_crash_images_pass_qemu_img_check(scratch, figures):
    qemu_img = require_tool(QEMU_IMG)
    plan = plan_overwrite(seed=7)
    run_matrix(scratch, plan, lambda total, trace: range(1, total + 2, 4), rotate_modes,
               figures, label="overwrites + qemu-img check", qemu_img=qemu_img, qemu_every=3)


# --- create ----------------------------------------------------------------

def _create_through(path: str, config: dict, **opts):
    bs = open_protocol(path, O_RDWR, {"driver": "blkdebug", "config": config,
                                      "image": {"create": True}})
    bs.growable = True                  # as block.create_file does
    st = blkdebug.state(bs)
    try:
        create_vhdx(bs, 8 * MiB, block_size=MiB, log_size=MiB, **opts)
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


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_crash_during_create(subformat, scratch, figures):
    """A crash while creating leaves either an image that fails to open with
    a clean error, or a valid empty image; once create's final flush is done,
    the image must open."""
    path = os.path.join(scratch, "create.vhdx")
    st = _create_through(path, {"rules": []}, subformat=subformat)
    total = st.events
    tried = survived = 0
    failures = []
    for n in range(1, total + 2):
        for mode in MODES:
            os.unlink(path) if os.path.exists(path) else None
            st = _create_through(path, crash_rule(n, mode), subformat=subformat)
            tried += 1
            try:
                with blockdrv.open_image(path, "vhdx") as img:
                    res = img.check()
                    ok = res.corruptions == 0 and img.size == 8 * MiB
                    ok = ok and img.read(0, MiB) == bytes(MiB)
                    ok = ok and img.read(7 * MiB, MiB) == bytes(MiB)
                    if not ok:
                        failures.append(f"cut {n} {mode}: opens but is not a valid empty image")
            except BlockDriverError as exc:
                if n > total:
                    failures.append(f"completed create does not open: {exc}")
            else:
                with blockdrv.open_image(path, "vhdx", readonly=False) as img:
                    img.write(0, b"x" * 4096)
                    img.flush()
                    if img.read(0, 4096) != b"x" * 4096:
                        failures.append(f"cut {n} {mode}: created image does not take writes")
            if not failures or failures[-1].split(":")[0] != f"cut {n} {mode}":
                survived += 1
    figures(SECTION, f"create ({subformat})", tried=tried, survived=survived, events=total)
    print(f"\n[crash matrix] create ({subformat}): {tried} cut points tried, "
          f"{survived} survived")
    assert not failures, failures[:10]


def test_matrix_catches_a_lost_flush(scratch, figures, monkeypatch):
    """The checker itself: a driver whose guest flush never reaches the disk
    must fail the matrix (in-place overwrites are lost with the cache)."""
    from blockdrv.node import BlockDriverState
    real = BlockDriverState.co_flush

    async def vhdx_flush_forgotten(self):
        if self.drv.name == "vhdx":
            return
        await real(self)

    monkeypatch.setattr(BlockDriverState, "co_flush", vhdx_flush_forgotten)
    with pytest.raises(AssertionError, match="lost a flushed write"):
        run_matrix(scratch, plan_overwrite(), every_cut, lambda n: [("lose", "drop")],
                   lambda *a, **k: None)


# --- resize ----------------------------------------------------------------

RESIZE_PLANS = [plan_resize_grow, plan_resize_relocate, plan_resize_shrink, plan_resize_fixed]
RESIZE_IDS = ["grow", "relocate", "shrink", "fixed-grow"]


def test_resize_workload_is_wired():
    assert get_registry().format("vhdx").bdrv_co_truncate is not None


@pytest.mark.parametrize("make", RESIZE_PLANS, ids=RESIZE_IDS)
def test_crash_matrix_resize(make, scratch, figures):
    """Every cut point of a workload with one resize: the image opens with
    the old or the new size (never older than a returned resize), data intact."""
    run_matrix(scratch, make(), every_cut, rotate_modes, figures)


@pytest.mark.slow
@pytest.mark.parametrize("make", RESIZE_PLANS, ids=RESIZE_IDS)
def test_crash_matrix_resize_full(make, scratch, figures):
    run_matrix(scratch, make(), every_cut, all_modes, figures, label=make().name + " (full)")


def test_resize_crash_images_pass_qemu_img_check(scratch, figures):
    qemu_img = require_tool(QEMU_IMG)
    run_matrix(scratch, plan_resize_relocate(seed=11),
               lambda total, trace: range(1, total + 2, 2), rotate_modes, figures,
               label="resize relocate + qemu-img check", qemu_img=qemu_img, qemu_every=2)
