"""A blkdebug node's state: events counted, rules fired, and the power loss.

The volatile write cache (``pending``) is modelled here too: buffered writes
until a flush, of which a crash applies only the kept subset, in order.
"""

from __future__ import annotations

import errno as _errno
from blockdrv._startup import dataclass, field

from ...coroutine import in_sync_context
from ...errors import BlockIOError, InvalidArgumentError, NoSpaceError
from ...node import BlockDriverState
from .config import Config
from .rules import Rule


@dataclass
class BlkdebugState:
    config: Config
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("reads", "writes", "flushes", "truncates", "discards"), 0))
    events: int = 0                     # writes + flushes seen (crash-matrix cut points)
    crashed: bool = False
    crash_event: int | None = None      # value of ``events`` at the crash event
    after_crash: str = "drop"
    kept_writes: int = 0                # unflushed writes applied at the crash
    lost_writes: int = 0                # unflushed writes dropped at the crash
    dropped: int = 0                    # requests dropped after the crash
    errors_injected: int = 0
    pending: list[tuple[int, bytes]] = field(default_factory=list)   # volatile cache
    trace: list[tuple] = field(default_factory=list)
    buffering: bool = False

    @property
    def writes(self) -> int:
        return self.counters["writes"]

    @property
    def flushes(self) -> int:
        return self.counters["flushes"]


def state(bs: BlockDriverState) -> BlkdebugState:
    """The blkdebug state of ``bs`` or of the first blkdebug node below it."""
    node = bs
    while node is not None:
        if isinstance(node.opaque, BlkdebugState):
            return node.opaque
        node = node.file
    raise InvalidArgumentError("no blkdebug node in this chain")


_KIND_COUNTER = {"read": "reads", "write": "writes", "flush": "flushes",
                 "truncate": "truncates", "discard": "discards"}


def _crash(bs: BlockDriverState, s: BlkdebugState, rule: Rule) -> None:
    """Power loss: apply the kept part of the volatile cache, drop the rest."""
    s.crashed = True
    s.crash_event = s.events
    s.after_crash = rule.after_crash
    pending, s.pending = s.pending, []
    if rule.unflushed == "keep":
        kept = pending
    elif rule.unflushed == "lose":
        kept = []
    else:
        import random
        rng = random.Random(rule.seed)
        kept = [w for w in pending if rng.random() < rule.keep_probability]
    s.kept_writes, s.lost_writes = len(kept), len(pending) - len(kept)
    for offset, data in kept:
        bs.file.pwrite(offset, data)


def _event(bs: BlockDriverState, kind: str, offset: int | None = None,
           nbytes: int | None = None) -> bool:
    """Count an event and fire rules.  False: the request must be dropped."""
    s: BlkdebugState = bs.opaque
    s.counters[_KIND_COUNTER[kind]] += 1
    if kind in ("write", "flush"):
        s.events += 1
    if s.crashed:
        return _event_after_crash(s, kind, reads_fail=True)
    for rule in s.config.rules:
        if not rule.matches(kind, offset, nbytes):
            continue
        rule.seen += 1
        if rule.nth is not None and rule.seen < rule.nth:
            continue
        if rule.once and rule.fired:
            continue
        rule.fired += 1
        if rule.action == "error":
            s.errors_injected += 1
            cls = NoSpaceError if rule.errno == _errno.ENOSPC else BlockIOError
            raise cls(f"blkdebug: injected error on {kind} #{s.counters[_KIND_COUNTER[kind]]}",
                      errno=rule.errno)
        _crash(bs, s, rule)
        # The read that trips a crash still completes; later ones obey after_crash.
        return _event_after_crash(s, kind, reads_fail=False)
    return True


def _event_after_crash(s: BlkdebugState, kind: str, *, reads_fail: bool) -> bool:
    """An event once the power is lost: writes, flushes, truncates and discards
    are dropped; with ``after_crash = fail`` they (and reads if ``reads_fail``)
    raise EIO instead."""
    if kind != "read":
        s.dropped += 1
    elif not reads_fail:
        return True
    if s.after_crash == "fail":
        raise BlockIOError("blkdebug: device lost power", errno=_errno.EIO)
    return kind == "read"


async def _maybe_suspend(s: BlkdebugState) -> None:
    if s.config.suspend and not in_sync_context():
        import asyncio
        await asyncio.sleep(0)


def _clip_pending(s: BlkdebugState, start: int, end: int) -> None:
    """Remove ``[start, end)`` from buffered writes (a later durable write won)."""
    out: list[tuple[int, bytes]] = []
    for off, data in s.pending:
        wend = off + len(data)
        if wend <= start or off >= end:
            out.append((off, data))
            continue
        if off < start:
            out.append((off, data[:start - off]))
        if wend > end:
            out.append((end, data[end - off:]))
    s.pending = out
