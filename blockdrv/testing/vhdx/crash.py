"""The VHDX side of the crash matrix (:mod:`blockdrv.testing.crash`).

* :func:`vhdx_crash_checks` -- what only VHDX can be asked after a crash: a
  read-write open replayed the log (none pending afterwards), no BAT entry is
  present for a block the plan never wrote;
* workloads that exercise VHDX machinery: :func:`plan_wrap` (400 allocations
  wrap the 1 MiB log three times) and the resize plans (grow in place, grow
  with BAT relocation, shrink, fixed grow);
* :func:`wrap_windows` -- cut points around every wrap of the log.
"""

from __future__ import annotations

import random

import numpy as np

from ..crash import SECTOR, MiB, Plan, _pattern, _writes

FULLY_PRESENT = 6


def vhdx_crash_checks(bs, model, what: str, flags: int) -> list[str]:
    plan = model.plan
    img = bs.opaque
    problems = []
    pending = img.overlay is not None
    if flags and pending:
        problems.append(f"{what}: log still pending after a read-write open")
    if what == "reopen after replay" and pending:
        problems.append(f"{what}: log pending after replay")
    if plan.create.get("subformat") != "fixed":
        allowed = model.touched_blocks() | {off // plan.block_size for _, off, _d in plan.setup}
        present = set(np.flatnonzero(img.bat.states() == FULLY_PRESENT).tolist())
        stray = present - allowed
        if stray:
            problems.append(f"{what}: BAT entries present for unwritten blocks "
                            f"{sorted(stray)[:5]}")
    return problems


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


def _compact(bs) -> None:
    """The ``("x", ...)`` op of the compaction plans: flush, then compact
    the open image (as ``blockdrv compact`` does after its open)."""
    from blockdrv.drivers.vhdx.compact import compact
    bs.flush()
    compact(bs.opaque)


def plan_discard(seed: int = 10) -> Plan:
    """Discards with an explicit discard=unmap: whole blocks journaled to
    UNMAPPED (several per log entry), partial ones zeroed in place; then
    allocations that reuse the freed blocks (zero-filled first), overwrites
    and more discards, flushed now and then."""
    rng = random.Random(seed)
    setup = [("w", b * MiB, _pattern(rng, 1000 + b, MiB)) for b in range(12)]
    ops = [("d", 2 * MiB, 3 * MiB), ("d", 6 * MiB + 64 * 1024, 128 * 1024), ("f",)]
    ops += _writes(rng, 1, 3, [13, 14, 15], MiB, SECTOR, span_next=0.0, flush_every=(1, 2))
    ops += [("d", 8 * MiB, MiB), ("w", 9 * MiB + 4096, _pattern(rng, 50, 8192)),
            ("d", 10 * MiB, 2 * MiB), ("f",)]
    ops += _writes(rng, 100, 4, [2, 3, 10, 16, 17], MiB, SECTOR, span_next=0.0,
                   flush_every=(1, 3))
    ops += [("d", 0, MiB), ("d", 13 * MiB, 4 * MiB), ("f",)]
    ops += _writes(rng, 200, 2, [0, 18], MiB, SECTOR, span_next=0.0)
    return Plan("discard: UNMAPPED blocks and reuse", 20 * MiB,
                {"block_size": MiB, "log_size": MiB}, ops, setup,
                open_options={"discard": "unmap"})


def plan_compact(seed: int = 11) -> Plan:
    """Compaction: blocks of zeros (written as data) become ZERO, the blocks
    at the end of the file move into the holes discards left (several per
    transaction), the file is truncated; writes before and after."""
    rng = random.Random(seed)
    order = list(range(20))
    rng.shuffle(order)
    setup = []
    for i, b in enumerate(order):
        setup.append(("w", b * MiB, bytes(MiB) if i % 4 == 0 else
                      _pattern(rng, 1000 + b, MiB)))
    ops = [("d", order[1] * MiB, MiB), ("d", order[2] * MiB, MiB),
           ("d", order[6] * MiB, MiB), ("f",)]
    ops += _writes(rng, 1, 2, [order[3], order[5]], MiB, SECTOR, span_next=0.0)
    ops.append(("x", "compact", _compact))
    ops += _writes(rng, 100, 3, [order[1], 21, order[19]], MiB, SECTOR, span_next=0.0,
                   flush_every=(1, 2))
    return Plan("compact: zero blocks, moves, truncate", 24 * MiB,
                {"block_size": MiB, "log_size": MiB}, ops, setup,
                open_options={"discard": "unmap"})


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




__all__ = ["vhdx_crash_checks", "plan_wrap", "plan_discard", "plan_compact", "plan_resize_grow", "plan_resize_relocate",
           "plan_resize_shrink", "plan_resize_fixed", "wrap_windows"]
