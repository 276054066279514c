"""``blkdebug``: a fault-injection filter in the spirit of QEMU's blkdebug.

A ``blkdebug`` node sits between a format node and the real protocol node and
passes every request through to its ``file`` child, counting events and
firing rules::

    vhdx --file--> blkdebug --file--> file

Selecting it
------------

* by filename, as QEMU: ``blkdebug:CONFIG:PATH`` where ``CONFIG`` is the path
  of an INI or JSON rule file (may be empty: ``blkdebug::disk.vhdx``) and
  ``PATH`` any filename the child understands (``memory:x`` too);
* by options: ``open_node(path, "vhdx", flags, options={"file": {"driver":
  "blkdebug", "config": CONFIG, "image": {...child options...}}})`` where
  ``CONFIG`` is a dict (below) or the path of a rule file.

Configuration (dict or JSON)::

    {"rules": [RULE, ...],
     "cache": "writethrough" | "volatile",   # volatile: buffer unflushed writes
     "suspend": false,                       # await asyncio.sleep(0) around I/O
     "record": false}                        # keep a trace of writes/flushes

    RULE = {"event": "write" | "read" | "flush" | "truncate" | "discard"
                     | ["write", "flush", ...],   # several kinds, counted together
            "nth": N,                 # fire on the Nth matching event (1-based);
                                      # absent: on every matching event
            "offset": O, "length": L, # only requests touching [O, O+L)
            "action": "error" | "crash",
            "once": false,            # error: fire once, or on every match from nth on
            "errno": 5 | "EIO",       # error: the errno raised (default EIO)
            "after_crash": "drop" | "fail",   # crash: later writes/flushes silently
                                              # succeed, or fail with EIO
            "unflushed": "keep" | "lose" | "random",
                                      # crash: the writes since the last completed
                                      # flush all reach the medium, none do, or a
                                      # seeded random subset does
            "seed": 0, "keep_probability": 0.5}

The INI form (``.ini``/``.conf``, or any file not starting with ``{``) has one
section per rule, named after its action, plus an optional ``[blkdebug]``
section for the global keys; lists are comma separated, booleans on/off::

    [blkdebug]
    cache = volatile

    [inject-error]
    event = write
    nth = 3
    errno = ENOSPC
    once = on

    [crash]
    event = write, flush
    nth = 10
    unflushed = random
    seed = 7

Semantics
---------

Every event (read, write -- including write-zeroes --, flush, truncate,
discard) increments its counter and is matched against the rules in order;
the first rule that fires decides.  A *crash* models a power loss just before
the event: the event itself and every later write, flush, truncate and
discard never reach the child.  With ``unflushed`` other than ``keep`` (or
``cache = volatile``), writes are buffered in the filter until a flush --
reads see them -- and the crash applies only the kept subset, in order, as a
volatile write cache losing power would.  A write with ``WRITE_FUA`` is
durable at once.  A closed, never-crashed node writes back its buffer.

Inspect a node with :func:`state` (``BlkdebugState``): ``counters``
(``reads``, ``writes``, ``flushes``, ...), ``events`` (writes + flushes: the
cut points of a crash matrix), ``crashed``, ``crash_event``, ``kept_writes``,
``lost_writes``, ``errors_injected`` and, with ``record``, ``trace``.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass, field
from typing import Any

from ..coroutine import in_sync_context
from ..errors import BlockIOError, InvalidArgumentError, NoSpaceError
from ..hookspecs import hookimpl
from ..iov import IOVector
from ..node import WRITE_FUA, BlockDriverState, BlockStatus
from ..options import parse_bool

EVENTS = ("read", "write", "flush", "truncate", "discard")
ACTIONS = ("error", "crash")
_RULE_KEYS = {"event", "nth", "offset", "length", "action", "once", "errno", "after_crash",
              "unflushed", "seed", "keep_probability"}
_GLOBAL_KEYS = {"rules", "cache", "suspend", "record"}
_OWN_OPTIONS = {"driver", "config", "image"} | _GLOBAL_KEYS


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

def _parse_errno(value: Any) -> int:
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    code = getattr(_errno, text.upper(), None)
    if not isinstance(code, int):
        raise InvalidArgumentError(f"blkdebug: unknown errno '{value}'")
    return code


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.replace("|", ",").split(",") if v.strip()]
    return [str(v) for v in value]


@dataclass
class Rule:
    events: frozenset[str]
    action: str
    nth: int | None = None
    offset: int | None = None
    length: int | None = None
    once: bool = False
    errno: int = _errno.EIO
    after_crash: str = "drop"
    unflushed: str = "keep"
    seed: int = 0
    keep_probability: float = 0.5
    seen: int = 0                 # matching events so far
    fired: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], default_action: str | None = None) -> "Rule":
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise InvalidArgumentError(f"blkdebug: unknown rule key(s) {sorted(unknown)}")
        action = str(raw.get("action", default_action or "")).replace("inject-", "")
        if action not in ACTIONS:
            raise InvalidArgumentError(f"blkdebug: rule action must be one of {ACTIONS}")
        events = frozenset(_as_list(raw.get("event", "write")))
        if not events or not events <= set(EVENTS):
            raise InvalidArgumentError(f"blkdebug: rule events must be among {EVENTS}")
        rule = cls(events, action)
        try:
            if raw.get("nth") is not None:
                rule.nth = int(raw["nth"])
                if rule.nth < 1:
                    raise ValueError
            if raw.get("offset") is not None or raw.get("length") is not None:
                rule.offset = int(raw.get("offset", 0))
                rule.length = int(raw.get("length", 1 << 62))
            rule.once = parse_bool(raw.get("once", False), "once")
            rule.errno = _parse_errno(raw.get("errno", _errno.EIO))
            rule.after_crash = str(raw.get("after_crash", "drop"))
            rule.unflushed = str(raw.get("unflushed", "keep"))
            rule.seed = int(raw.get("seed", 0))
            rule.keep_probability = float(raw.get("keep_probability", 0.5))
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"blkdebug: invalid rule {raw!r}") from None
        if rule.after_crash not in ("drop", "fail"):
            raise InvalidArgumentError("blkdebug: after_crash must be 'drop' or 'fail'")
        if rule.unflushed not in ("keep", "lose", "random"):
            raise InvalidArgumentError("blkdebug: unflushed must be 'keep', 'lose' or 'random'")
        return rule

    def matches(self, kind: str, offset: int | None, nbytes: int | None) -> bool:
        if kind not in self.events:
            return False
        if self.offset is not None:
            if offset is None or nbytes is None:
                return False
            if not (offset < self.offset + self.length and offset + max(nbytes, 1) > self.offset):
                return False
        return True


@dataclass
class Config:
    rules: list[Rule] = field(default_factory=list)
    cache: str = "writethrough"
    suspend: bool = False
    record: bool = False


def parse_ini(text: str) -> dict[str, Any]:
    """The INI rule format (repeated sections allowed) as a config dict."""
    out: dict[str, Any] = {"rules": []}
    section: dict[str, Any] | None = None
    name = None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip()
            if name == "blkdebug":
                section = out
            elif name in ("inject-error", "error", "crash"):
                section = {"action": "crash" if name == "crash" else "error"}
                out["rules"].append(section)
            else:
                raise InvalidArgumentError(f"blkdebug config line {lineno}: "
                                           f"unknown section [{name}]")
            continue
        key, eq, value = line.partition("=")
        if not eq or section is None:
            raise InvalidArgumentError(f"blkdebug config line {lineno}: expected key = value "
                                       "inside a section")
        section[key.strip().replace("-", "_")] = value.strip()
    return out


def load_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise InvalidArgumentError(f"blkdebug: cannot read config: {exc.strerror}",
                                   filename=path) from None
    if path.endswith(".json") or text.lstrip().startswith("{"):
        try:
            import json
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"blkdebug: invalid JSON config: {exc}",
                                       filename=path) from None
        if not isinstance(data, dict):
            raise InvalidArgumentError("blkdebug: JSON config must be an object", filename=path)
        return data
    return parse_ini(text)


def parse_config(config: dict[str, Any] | str | None) -> Config:
    """A :class:`Config` from a dict, a rule-file path, or None (no rules)."""
    if config is None or config == "":
        return Config()
    if isinstance(config, (str, os.PathLike)):
        config = load_config_file(os.fspath(config))
    unknown = set(config) - _GLOBAL_KEYS
    if unknown:
        raise InvalidArgumentError(f"blkdebug: unknown config key(s) {sorted(unknown)}")
    cfg = Config()
    for raw in config.get("rules", ()):
        cfg.rules.append(Rule.from_dict(dict(raw)))
    cfg.cache = str(config.get("cache", "writethrough"))
    if cfg.cache not in ("writethrough", "volatile"):
        raise InvalidArgumentError("blkdebug: cache must be 'writethrough' or 'volatile'")
    cfg.suspend = parse_bool(config.get("suspend", False), "suspend")
    cfg.record = parse_bool(config.get("record", False), "record")
    return cfg


def split_filename(filename: str) -> tuple[str, str]:
    """``blkdebug:CONFIG:PATH`` -> (CONFIG, PATH)."""
    rest = filename[len("blkdebug:"):] if filename.startswith("blkdebug:") else filename
    cfg, sep, path = rest.partition(":")
    if not sep or not path:
        raise InvalidArgumentError("blkdebug: filename must be blkdebug:[CONFIG]:PATH",
                                   filename=filename)
    return cfg, path


# --------------------------------------------------------------------------
# Per-node state
# --------------------------------------------------------------------------

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
        if kind == "read":
            if s.after_crash == "fail":
                raise BlockIOError("blkdebug: device lost power", errno=_errno.EIO)
            return True
        s.dropped += 1
        if s.after_crash == "fail":
            raise BlockIOError("blkdebug: device lost power", errno=_errno.EIO)
        return False
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
        return _event_after_crash(s, kind)
    return True


def _event_after_crash(s: BlkdebugState, kind: str) -> bool:
    if kind == "read":
        return True
    s.dropped += 1
    if s.after_crash == "fail":
        raise BlockIOError("blkdebug: device lost power", errno=_errno.EIO)
    return False


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


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------

class BlkdebugFilter:
    protocol_name = "blkdebug"
    format_name = None

    @hookimpl
    def bdrv_open(self, bs: BlockDriverState, options, flags) -> None:
        from ..block import open_protocol          # block imports the registry
        options = dict(options or {})
        filename = bs.filename or ""
        if filename.startswith("blkdebug:"):
            cfg_src, child_name = split_filename(filename)
            config: Any = options.get("config", cfg_src or None)
        else:
            child_name = filename
            config = options.get("config")
        if config is None and "rules" in options:
            config = {k: options[k] for k in _GLOBAL_KEYS if k in options}
        cfg = parse_config(config)
        child_opts = options.get("image")
        if child_opts is None:
            child_opts = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}
        s = BlkdebugState(cfg)
        s.buffering = cfg.cache == "volatile" or any(
            r.action == "crash" and r.unflushed != "keep" for r in cfg.rules)
        child = open_protocol(child_name, flags, child_opts)
        child.growable = True
        bs.file = child
        bs.opaque = s
        bs.total_size = child.total_size
        bs.request_alignment = child.request_alignment

    @hookimpl
    def bdrv_close(self, bs: BlockDriverState) -> None:
        s: BlkdebugState = bs.opaque
        if s is not None and not s.crashed and s.pending and bs.file is not None:
            pending, s.pending = s.pending, []
            for offset, data in pending:        # a clean shutdown writes the cache back
                bs.file.pwrite(offset, data)

    @hookimpl
    def bdrv_reopen_prepare(self, bs, flags) -> None:
        child = bs.file
        if child.drv.bdrv_reopen_prepare is not None:
            child.drv.bdrv_reopen_prepare(child, flags)

    @hookimpl
    def bdrv_reopen_commit(self, bs, flags) -> None:
        child = bs.file
        if child.drv.bdrv_reopen_commit is not None:
            child.drv.bdrv_reopen_commit(child, flags | (child.open_flags & 0x8000))
        child.open_flags = flags | (child.open_flags & 0x8000)

    @hookimpl
    def bdrv_reopen_abort(self, bs, flags) -> None:
        child = bs.file
        if child.drv.bdrv_reopen_abort is not None:
            child.drv.bdrv_reopen_abort(child, flags)

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov: IOVector) -> None:
        s: BlkdebugState = bs.opaque
        _event(bs, "read", offset, nbytes)
        await _maybe_suspend(s)
        await bs.file.co_preadv(offset, nbytes, qiov)
        end = offset + nbytes
        for woff, data in s.pending:            # the volatile cache wins
            wend = woff + len(data)
            if wend <= offset or woff >= end:
                continue
            lo, hi = max(offset, woff), min(end, wend)
            qiov.scatter(lo - offset, memoryview(data)[lo - woff:hi - woff])
        await _maybe_suspend(s)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov: IOVector, flags) -> None:
        s: BlkdebugState = bs.opaque
        if not _event(bs, "write", offset, nbytes):
            return
        if s.config.record:
            s.trace.append(("write", offset, qiov.to_bytes()))
        await _maybe_suspend(s)
        if s.buffering and not flags & WRITE_FUA:
            s.pending.append((offset, qiov.to_bytes()))
        else:
            if s.pending:
                _clip_pending(s, offset, offset + nbytes)
            await bs.file.co_pwritev(offset, nbytes, qiov, flags)
        bs.total_size = max(bs.total_size, offset + nbytes)
        await _maybe_suspend(s)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs, offset, nbytes, flags) -> None:
        s: BlkdebugState = bs.opaque
        if s.buffering:
            from ..errors import UnsupportedError
            raise UnsupportedError("blkdebug: write-zeroes goes through the write path")
        if not _event(bs, "write", offset, nbytes):
            return
        if s.config.record:
            s.trace.append(("write", offset, bytes(nbytes)))
        await bs.file.co_pwrite_zeroes(offset, nbytes, flags)
        bs.total_size = max(bs.total_size, bs.file.total_size)

    @hookimpl
    async def bdrv_co_pdiscard(self, bs, offset, nbytes) -> None:
        if not _event(bs, "discard", offset, nbytes):
            return
        await bs.file.co_pdiscard(offset, nbytes)

    @hookimpl
    async def bdrv_co_flush(self, bs) -> None:
        s: BlkdebugState = bs.opaque
        if not _event(bs, "flush"):
            # The generic layer still flushes the child: harmless, nothing
            # after the crash ever reached it.
            return
        if s.config.record:
            s.trace.append(("flush",))
        await _maybe_suspend(s)
        pending, s.pending = s.pending, []
        for offset, data in pending:
            await bs.file.co_pwrite(offset, data)

    @hookimpl
    async def bdrv_co_truncate(self, bs, offset, exact, prealloc) -> None:
        s: BlkdebugState = bs.opaque
        if not _event(bs, "truncate", offset, 0):
            bs.total_size = offset
            return
        if s.config.record:
            s.trace.append(("truncate", offset))
        if s.pending and offset < bs.total_size:
            _clip_pending(s, offset, 1 << 62)
        await bs.file.co_truncate(offset, exact, prealloc)
        bs.total_size = offset

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        child = bs.file
        if offset >= child.total_size:
            from ..node import BLOCK_ZERO
            return BlockStatus(BLOCK_ZERO, nbytes)
        return await child.co_block_status(offset, min(nbytes, child.total_size - offset),
                                           want_zero)

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        return bs.file.has_zero_init()


driver = BlkdebugFilter()
