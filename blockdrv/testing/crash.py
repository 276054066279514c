"""Crash consistency, for any format: run a seeded plan of guest writes and
flushes through a ``blkdebug`` filter that crashes at the Nth write or flush
(counting the open's own metadata writes), then check what the image holds.

For every cut point N the plan runs against a fresh copy of a base image;
event N and everything after it never reach the file, and the writes since
the last completed flush are kept, lost, or kept as a seeded random subset
(a volatile write cache losing power: :data:`MODES`).  The post-crash image
must then (:func:`verify_image`)

* open read-only and read-write, and again after that (a format with a log
  replays it), with a virtual size no older than a returned resize;
* ``check`` without corruptions, where the format has a check (but on
  the first, read-only open of an image marked dirty);
* hold every write acknowledged before the last completed flush;
* show, for every 512-byte sector the plan touched, a version it held at or
  after that flush (never garbage, never a write issued after the crash),
  and for every untouched sector of a touched block its base content;
* pass the format's own checks (``extra_checks(bs, model, what, flags)``,
  e.g. VHDX: no BAT entry for a block the plan never wrote).

:func:`run_matrix` runs every cut point of a plan (``cuts``) in the crash
modes ``modes_for(n)`` picks, records tried/survived figures and fails with
the first problems.  Workloads: :func:`plan_alloc` (allocating writes, some
crossing a cluster boundary), :func:`plan_overwrite` (overwrites of data
written before the run, and new writes), :func:`plan_inplace` (larger
writes), each seeded.  :func:`abandon` drops a node graph as a dying process
would.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import blockdrv

from ..block import open_node
from ..common import O_RDWR
from ..errors import BlockDriverError
from ..protocols import blkdebug
from .qemu import sparse_copy

MiB = 1 << 20
SECTOR = 512
SECTION = "crash matrix"
# (unflushed writes at the crash, behaviour of requests after it)
MODES = (("keep", "drop"), ("lose", "drop"), ("random", "fail"))


def abandon(bs) -> None:
    """Drop the node graph under ``bs`` as a dying process would: no driver
    flushes or finishes anything, but the operating system closes the
    descriptors -- and so releases the image's locks -- as it does at exit."""
    todo = [bs]
    while todo:
        node = todo.pop()
        if node is None or node.closed:
            continue
        todo += [node.file, node.backing]
        if node.file is None and node.drv.protocol_name and node.drv.bdrv_close is not None:
            node.drv.bdrv_close(node)         # leaf protocols: just their descriptors
        node.opaque = None
        node.closed = True


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

@dataclass
class Plan:
    name: str
    size: int
    create: dict
    # ("w", offset, bytes) | ("f",) | ("t", new size) | ("d", offset, nbytes): a
    # discard, modelled as a zero write (the plan's open_options must make
    # the driver act on it) | ("x", name, fn): fn(bs) flushes, then does
    # something that must not change guest data (a compaction)
    ops: list
    setup: list = field(default_factory=list)   # ops applied to the base, flushed
    full_blocks: bool = True          # verify whole touched blocks (else written +- 1 sector)
    block_size: int = MiB
    lss: int = SECTOR
    fmt: str = "vhdx"
    open_options: dict = field(default_factory=dict)   # of the plan's run (discard=unmap)


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


def plan_alloc(seed: int = 1, lss: int = SECTOR, *, fmt: str = "vhdx", create=None,
               size: int = 24 * MiB, writes: int = 10, name: str | None = None) -> Plan:
    """``writes`` allocating writes over the whole disk, flushed every 2-4."""
    rng = random.Random(seed)
    ops = _writes(rng, 1, writes, list(range(size // MiB)), MiB, lss)
    name = name or "allocating writes" + (" (4K sectors)" if lss == 4096 else "")
    create = {"block_size": MiB, "log_size": MiB, "logical_sector_size": lss} \
        if create is None else create
    return Plan(name, size, create, ops, lss=lss, fmt=fmt)


def plan_overwrite(seed: int = 2, *, fmt: str = "vhdx", create=None, size: int = 16 * MiB,
                   name: str = "overwrites") -> Plan:
    """Overwrites of blocks written before the run (overlapping each other),
    then allocations, then a mix."""
    rng = random.Random(seed)
    allocated = [1, 3, 4, 9, 12]
    setup = [("w", b * MiB, _pattern(rng, 1000 + b, 256 * 1024)) for b in allocated]
    ops = _writes(rng, 1, 8, allocated, MiB, SECTOR, max_sectors=512, span_next=0.0)
    ops += _writes(rng, 100, 3, [6, 7, 14], MiB, SECTOR)
    ops += _writes(rng, 200, 4, allocated + [6, 7, 14], MiB, SECTOR, flush_every=(1, 3))
    create = {"block_size": MiB, "log_size": MiB} if create is None else create
    return Plan(name, size, create, ops, setup, fmt=fmt)


def plan_inplace(seed: int = 3, *, fmt: str = "vhdx", create=None, size: int = 8 * MiB,
                 name: str = "fixed") -> Plan:
    """Larger writes (up to 128 KiB) all over a small disk."""
    rng = random.Random(seed)
    ops = _writes(rng, 1, 10, list(range(size // MiB)), MiB, SECTOR, max_sectors=256)
    create = {"subformat": "fixed", "block_size": MiB, "log_size": MiB} \
        if create is None else create
    return Plan(name, size, create, ops, fmt=fmt)


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------

def make_base(path: str, plan: Plan, make_image: Callable | None = None) -> None:
    """The image the plan starts from: ``make_image(path, size, **create)``
    (default :func:`blockdrv.create_image`) plus the plan's setup, flushed."""
    if make_image is None:
        blockdrv.create_image(path, plan.fmt, plan.size, **plan.create).close()
    else:
        make_image(path, plan.size, **plan.create)
    if plan.setup:
        with blockdrv.open_image(path, plan.fmt, readonly=False) as img:
            for _, off, data in plan.setup:
                img.write(off, data)
            img.flush()


def open_blkdebug(path: str, config: dict, flags: int = O_RDWR, fmt: str = "vhdx",
                  options: dict | None = None):
    return open_node(path, fmt, flags,
                     options={**(options or {}),
                              "file": {"driver": "blkdebug", "config": config}})


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
        if op[0] in ("w", "d"):
            n = len(op[2]) if op[0] == "w" else op[2]
            first = op[1] // plan.block_size
            last = (op[1] + n - 1) // plan.block_size
            blocks.update(range(first, last + 1))
    out = {}
    with blockdrv.open_image(path, plan.fmt) as img:
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


ExtraChecks = Callable[..., list]


def verify_image(path: str, model: Model, extra_checks: ExtraChecks | None = None) -> list[str]:
    """Every post-crash property on the image at ``path`` (modifies it: a
    format with a log replays it); ``extra_checks(bs, model, what, flags)``
    adds the format's own findings."""
    plan = model.plan
    problems: list[str] = []
    for flags, what in ((0, "read-only open"), (O_RDWR, "read-write open"),
                        (0, "reopen after replay")):
        try:
            bs = open_node(path, plan.fmt, flags)
        except BlockDriverError as exc:
            problems.append(f"{what}: cannot open: {exc}")
            return problems
        try:
            if bs.total_size not in model.sizes[model.size_floor:]:
                problems.append(f"{what}: size {bs.total_size}, expected one of "
                                f"{model.sizes[model.size_floor:]}")
            if bs.drv.bdrv_check is not None:
                res = bs.check()
                # a pending log is not a corruption; nor are the stale refcounts
                # a dirty bit announces (qcow2 lazy refcounts) before the
                # read-write open repairs them
                stale = what == "read-only open" and bs.get_info().is_dirty
                if res.corruptions and not stale:
                    problems.append(f"{what}: check reports {res.corruptions} corruptions: "
                                    f"{res.messages[:3]}")
            if extra_checks is not None:
                problems += extra_checks(bs, model, what, flags)
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
        bs = open_blkdebug(path, config, fmt=plan.fmt, options=plan.open_options)
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
                elif op[0] == "d":
                    if not st.crashed:
                        model.issue(op[1], bytes(op[2]))
                    bs.pdiscard(op[1], op[2])
                    if not st.crashed:
                        model.ack(op[1], op[2])
                elif op[0] == "x":
                    op[2](bs)
                    if not st.crashed:
                        model.flushed()
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
            keep_crashed: str | None = None,
            extra_checks: ExtraChecks | None = None) -> list[str]:
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
    problems = verify_image(work, model, extra_checks)
    return [f"cut {n} {mode}: {p}" for p in problems]


def qemu_check(qemu_img: str, path: str, *args: str, fmt: str = "vhdx") -> tuple[int, str]:
    proc = subprocess.run([qemu_img, "check", "-f", fmt, *args, path],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def run_matrix(scratch: str, plan: Plan, cuts, modes_for, figures, label=None,
               qemu_img: str | None = None, qemu_every: int = 0,
               extra_checks: ExtraChecks | None = None,
               make_image: Callable | None = None, section: str = SECTION) -> dict:
    """Every cut point ``cuts(total, trace)`` (or an iterable) of ``plan`` in
    the modes ``modes_for(n)``; ``figures(section, name, **counts)`` records
    the result (``tried``, ``survived``, ``events``), which is also returned.
    With ``qemu_img``, every ``qemu_every``-th cut's crashed image also goes
    through ``qemu-img check -r all`` and ours after replay through
    ``qemu-img check``.  Fails (AssertionError) with the first problems."""
    ext = plan.fmt
    base = os.path.join(scratch, f"base.{ext}")
    work = os.path.join(scratch, f"work.{ext}")
    crashed = os.path.join(scratch, f"crashed.{ext}")
    make_base(base, plan, make_image)
    base_blocks = base_content(base, plan)
    total, trace = count_events(base, work, plan, base_blocks)
    cut_list = cuts(total, trace) if callable(cuts) else cuts
    tried = survived = qemu_checked = 0
    failures: list[str] = []
    for i, n in enumerate(cut_list):
        for mode in modes_for(n):
            with_qemu = bool(qemu_img and qemu_every and i % qemu_every == 0)
            problems = run_cut(base, work, plan, base_blocks, n, mode,
                               keep_crashed=crashed if with_qemu else None,
                               extra_checks=extra_checks)
            if with_qemu and not problems:
                # qemu replays the log we left (check -r all opens read-write)...
                rc, out = qemu_check(qemu_img, crashed, "-r", "all", fmt=plan.fmt)
                if rc != 0:
                    problems.append(f"cut {n} {mode}: qemu-img check -r all: rc {rc}: {out}")
                # ...and checks the image our replay produced (verify_image's
                # read-write open replayed it in ``work``).
                rc, out = qemu_check(qemu_img, work, fmt=plan.fmt)
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
    counts = dict(tried=tried, survived=survived, events=total,
                  **({"qemu_checked": qemu_checked} if qemu_img else {}))
    figures(section, name, tried=tried, survived=survived, events=total,
            **({"qemu_checked": qemu_checked} if qemu_img else {}))
    print(f"\n[crash matrix] {name}: {total} write/flush events, "
          f"{tried} cut points tried, {survived} survived"
          + (f", {qemu_checked} qemu-img checked" if qemu_img else ""))
    assert not failures, f"{len(failures)} problems, first: " + "\n".join(failures[:10])
    return counts


def every_cut(total, trace):
    return range(1, total + 2)          # total + 1: no crash at all


def rotate_modes(n):
    return [MODES[n % len(MODES)]]


def all_modes(n):
    return MODES


__all__ = ["abandon", "MODES", "SECTION", "Plan", "plan_alloc", "plan_overwrite", "plan_inplace",
           "make_base", "open_blkdebug", "Model", "base_content", "verify_content",
           "verify_image", "crash_rule", "run_plan", "count_events", "run_cut", "qemu_check",
           "run_matrix", "every_cut", "rotate_modes", "all_modes"]
