"""``blockdrv bench``: qemu-img bench, request for request.

``count`` requests of ``buffer_size`` bytes are sent starting at ``offset``,
each one ``step_size`` further (wrapping at the end of the image), with up to
``depth`` in flight: one asyncio task per queue slot, each awaiting
``bs.co_preadv``/``bs.co_pwritev`` on its own buffer.  ``--flush-interval``
flushes after every N completed writes, draining the queue first unless
``--no-drain``.  Only the request loop is timed, as qemu-img does.
"""

from __future__ import annotations

import asyncio
import time

from ..errors import BlockDriverError
from ..iov import IOVector
from ..common import O_NOCACHE, WRITE_FUA
from ..node import BlockDriverState
from ..engines.common import parse_cache_mode
from .common import MAX_SIZE, ArgParser, CliError, describe, open_image, strtosz

INT_MAX = (1 << 31) - 1


def _num(name: str, text: str | None, lo: int, hi: int, default: int) -> int:
    """A numeric option: ``default`` when absent, qemu-img's message when bad."""
    if text is None:
        return default
    value = strtosz(text)
    if value is None or not lo <= value <= hi:
        raise CliError(f"Invalid {name} specified")
    return value


DESCRIPTION = """\
Sends count requests of buffer_size bytes, the first at offset, each next one
step_size further (wrapping at the end of the image), with up to depth in
flight, and prints the time the requests took."""


def parser() -> ArgParser:
    p = ArgParser("bench", DESCRIPTION)
    p.add_argument("-c", dest="count", metavar="count",
                   help="number of requests (default 75000)")
    p.add_argument("-d", dest="depth", metavar="depth",
                   help="requests in flight at once (default 64)")
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    p.add_argument("-i", dest="aio", metavar="aio",
                   help="AIO mode: only threads (the default) is supported")
    p.add_argument("-n", dest="nocache", action="store_true",
                   help="bypass the host page cache (O_DIRECT), short for -t none")
    p.add_argument("-o", dest="offset", metavar="offset",
                   help="offset of the first request (default 0)")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: print only the result")
    p.add_argument("-s", dest="bufsize", metavar="buffer_size",
                   help="bytes per request (default 4k)")
    p.add_argument("-S", dest="step", metavar="step_size",
                   help="distance between requests (default: buffer_size)")
    p.add_argument("-t", dest="cache", metavar="cache",
                   help="cache mode: writeback (default), writethrough, directsync, "
                        "none, unsafe")
    p.add_argument("-w", dest="write", action="store_true",
                   help="write requests (default: read)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks that keep writers out (not with -w)")
    p.add_argument("--pattern", metavar="pattern",
                   help="byte value the write requests carry (default 0)")
    p.add_argument("--flush-interval", dest="flush_interval", metavar="flush_interval",
                   help="flush after every flush_interval writes")
    p.add_argument("--no-drain", dest="no_drain", action="store_true",
                   help="with --flush-interval, flush without waiting for the "
                        "requests in flight")
    p.add_argument("args", nargs="*", metavar="filename", help="the image")
    return p


class Bench:
    """State shared by the queue slots (qemu-img's BenchData)."""

    def __init__(self, bs: BlockDriverState, *, count: int, depth: int, offset: int,
                 bufsize: int, step: int, write: bool, pattern: int,
                 flush_interval: int, drain: bool, fua: bool) -> None:
        self.bs = bs
        self.image_size = bs.total_size
        self.count = count
        self.depth = depth
        self.offset = offset
        self.bufsize = bufsize
        self.step = step
        self.write = write
        self.pattern = pattern
        self.flush_interval = flush_interval
        self.drain = drain
        self.wflags = WRITE_FUA if fua else 0
        self.submitted = 0
        self.completed = 0
        self.in_flight = 0
        self.gate: asyncio.Event | None = None

    def _next_offset(self) -> int:
        off = self.offset
        self.offset = (off + self.step) % self.image_size
        return off

    async def _flush_point(self) -> None:
        if self.drain:
            gate = self.gate = asyncio.Event()
            while self.in_flight:
                await asyncio.sleep(0)
            try:
                await self.bs.co_flush()
            finally:
                self.gate = None
                gate.set()
        else:
            await self.bs.co_flush()

    async def _slot(self) -> None:
        bs, n = self.bs, self.bufsize
        qiov = IOVector.from_buffer(bytearray([self.pattern]) * n)
        io = bs.co_pwritev if self.write else bs.co_preadv
        args = (self.wflags,) if self.write and self.wflags else ()
        count, interval = self.count, self.flush_interval
        if not interval:
            # The hot loop: one request per iteration, nothing else.
            while self.submitted < count:
                self.submitted += 1
                off = self.offset
                self.offset = (off + self.step) % self.image_size
                await io(off, n, qiov, *args)
                self.completed += 1
            return
        while True:
            while self.gate is not None:
                await self.gate.wait()
            if self.submitted >= count:
                return
            self.submitted += 1
            self.in_flight += 1
            off = self._next_offset()
            try:
                await io(off, n, qiov, *args)
            finally:
                self.in_flight -= 1
            self.completed += 1
            if self.completed % interval == 0:
                await self._flush_point()

    async def run(self) -> float:
        start = time.perf_counter()
        if self.depth == 1:
            await self._slot()
        else:
            await asyncio.gather(*(self._slot() for _ in range(min(self.depth, self.count))))
        return time.perf_counter() - start


def run_bench(bs: BlockDriverState, **kw) -> float:
    """Run one benchmark on an open node; returns the seconds the requests took."""
    return asyncio.run(Bench(bs, **kw).run())


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    count = _num("request count", a.count, 1, INT_MAX, 75000)
    depth = _num("queue depth", a.depth, 1, INT_MAX, 64)
    offset = _num("offset", a.offset, 0, MAX_SIZE, 0)
    bufsize = _num("buffer size", a.bufsize, 1, INT_MAX, 4096)
    step = _num("step_size", a.step, 0, INT_MAX, 0)
    pattern = _num("pattern", a.pattern, 0, 0xFF, 0)
    flush_interval = _num("flush interval", a.flush_interval, 0, INT_MAX, 0)
    cache = a.cache or "writeback"
    mode = parse_cache_mode(cache)
    if mode is None:
        raise CliError("Invalid cache mode")
    if a.aio is not None and a.aio != "threads":
        raise CliError(f"aio engine '{a.aio}' is not supported by blockdrv bench "
                       "(requests run as asyncio tasks)")
    if len(a.args) != 1:
        raise CliError("Expecting one image file name", hint=True)
    if flush_interval and not a.write:
        raise CliError("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise CliError("Flush interval can't be smaller than depth")
    filename = a.args[0]
    flags = mode.flags | (O_NOCACHE if a.nocache else 0)      # -n: cache=none
    bs = open_image(filename, a.fmt, writable=a.write, flags=flags,
                    force_share=a.force_share)
    try:
        if bs.total_size <= 0:
            raise CliError(f"Could not get image size: image '{filename}' is empty")
        if not a.quiet:
            print(f"Sending {count} {'write' if a.write else 'read'} requests, "
                  f"{bufsize} bytes each, {depth} in parallel (starting at offset "
                  f"{offset}, step size {step or bufsize})")
            if flush_interval:
                print(f"Sending flush every {flush_interval} requests")
        try:
            elapsed = run_bench(bs, count=count, depth=depth, offset=offset,
                                bufsize=bufsize, step=step or bufsize, write=a.write,
                                pattern=pattern, flush_interval=flush_interval,
                                drain=not a.no_drain, fua=mode.writethrough)
        except BlockDriverError as exc:
            raise CliError(f"Failed request: {describe(exc)}") from None
        if not a.quiet:
            print(f"Run completed in {elapsed:.3f} seconds.")
    finally:
        bs.close()
    return 0
