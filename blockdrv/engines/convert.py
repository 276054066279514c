"""qemu-img convert's engine (img_convert): sources in, one new image out.

The sources are walked by block status: zero ranges are skipped when the
new target reads as zeros anyway (``has_zero_init``), data ranges are read
in 2 MiB pieces and scanned per 512-byte sector (:mod:`.sparse`); runs of
zero sectors at least ``sparse_size`` long (default 4 KiB), aligned as
qemu-img aligns them, are not written.  ``sparse_size=0`` writes every byte.

``-m N`` runs N workers on threads (:meth:`ImgConvertState.copy_parallel`):
os.preadv/pwritev release the GIL, so reads overlap writes as on qemu's
thread pool.  On a 2-core host that is no faster than one request at a
time: the copy is the kernel's memcpy between page cache and buffer, bound
by memory bandwidth the two cores share, and more buffers in flight only
evict each other from the CPU caches (qemu-img there is no faster with -m 8
than with -m 1 either), so the default stays 1.  mmap'ing the source instead
of reading it, and huge-page buffers, were no faster than read+write there;
copy_file_range would skip the zero detection that keeps the output as
sparse as qemu-img's.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence, Union

from .. import block
from ..common import BLOCK_ZERO, O_FORCE_SHARE, O_RDWR, WRITE_UNMAP
from ..errors import BlockDriverError, BlockIOError, InvalidArgumentError, UnsupportedError
from ..iov import IOVector
from ..mapping import block_status
from ..node import BlockDriverState
from ..options import parse_create_options
from ..plugins import get_registry
from .common import cache_mode, open_source, reword, why
from .sparse import IO_BUF_SIZE, SECTOR, ZEROS, SparseScanner, sector_runs

MAX_COROUTINES = 16          # qemu-img's limit for -m
MAX_BUF_SECTORS = 32768      # largest -S, in sectors (qemu-img's 16 MiB)

Progress = Callable[[float], Any]
PathLike = Union[str, "os.PathLike[str]"]


class ImgConvertState:
    """The copy loop (qemu-img.c's ImgConvertState and convert_do_copy).
    :meth:`copy` is the synchronous one (one request at a time, the
    default); :meth:`copy_parallel` runs ``-m N`` requests on threads,
    writing in order unless ``-W``."""

    def __init__(self, target: BlockDriverState, min_sparse: int, zero_init: bool,
                 writethrough: bool = False, progress: Progress | None = None,
                 total: int = 0) -> None:
        self.target = target
        self.min_sparse = min_sparse          # sectors; 0 disables detection
        self.zero_init = zero_init
        self.alignment = max(_pow2floor(min_sparse),
                             -(-target.request_alignment // SECTOR), 1)
        self.writethrough = writethrough      # cache writethrough/directsync: FUA writes
        self.progress = progress
        self.total = total
        self.done = 0
        self.buf = bytearray(IO_BUF_SIZE)
        self.in_flight = 0                    # request coroutines between read and write
        self.max_in_flight = 0

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more of the sources are copied: tell the callback."""
        self.done += nbytes
        if self.progress is not None and nbytes:
            self.progress(self.done / self.total if self.total else 1.0)

    # -- what to write ------------------------------------------------------------

    def plan_zeroes(self, offset: int, nbytes: int) -> list[tuple]:
        """Requests that make [offset, offset + nbytes) read as zeros:
        ("zero", offset, n) or, for -S 0 (fully allocate), ("data", offset, view)."""
        if self.zero_init or nbytes <= 0:
            return []
        if not self.min_sparse:
            return [("data", offset + pos, ZEROS[:min(nbytes - pos, IO_BUF_SIZE)])
                    for pos in range(0, nbytes, IO_BUF_SIZE)]
        return [("zero", offset, nbytes)]

    def plan_data(self, dst: int, buf: bytearray, nbytes: int) -> list[tuple]:
        """Write what was read at ``dst``, leaving out qemu-img's zero runs."""
        view = memoryview(buf)[:nbytes]
        if not self.min_sparse:
            return [("data", dst, view)]
        ends, data = sector_runs(buf, nbytes)
        if len(ends) == 1 and data[0]:           # no zero sector at all
            return [("data", dst, view)]
        scan = SparseScanner.from_runs(ends, data, dst // SECTOR, self.alignment)
        plan: list[tuple] = []
        j, total = 0, ends[-1]
        while j < total:
            is_data, n = scan.alloc_min(j, total - j, self.min_sparse)
            lo, hi = j * SECTOR, min((j + n) * SECTOR, nbytes)
            if is_data:
                plan.append(("data", dst + lo, view[lo:hi]))
            else:
                plan.extend(self.plan_zeroes(dst + lo, hi - lo))
            j += n
        return plan

    # -- synchronous engine --------------------------------------------------------------

    def _write_error(self, offset: int, exc: BlockDriverError) -> BlockDriverError:
        return reword(exc, f"error while writing at byte {offset}: {why(exc)}")

    def _read_error(self, offset: int, exc: BlockDriverError) -> BlockDriverError:
        return reword(exc, f"error while reading at byte {offset}: {why(exc)}")

    def execute(self, plan: list[tuple]) -> None:
        target = self.target
        for kind, offset, arg in plan:
            try:
                if kind == "data":
                    target.pwrite(offset, arg)
                else:
                    target.pwrite_zeroes(offset, arg, WRITE_UNMAP)
                if self.writethrough:
                    target.flush()
            except BlockDriverError as exc:
                raise self._write_error(offset, exc) from None

    def read(self, src: BlockDriverState, pos: int, dst: int, buf: bytearray,
             nbytes: int) -> None:
        try:
            src.preadv(pos, IOVector.from_buffer(memoryview(buf)[:nbytes]))
        except BlockDriverError as exc:
            raise self._read_error(dst, exc) from None

    def extents(self, src: BlockDriverState, base: int):
        """("zero", dst, n) and ("data", src pos, dst, n <= 2 MiB) in order."""
        size, pos = src.total_size, 0
        while pos < size:
            try:
                st = block_status(src, pos, size - pos)
            except BlockDriverError as exc:
                raise reword(exc, f"error while reading block status at offset {pos}: "
                             f"{why(exc)}") from None
            end = pos + st.pnum
            if st.flags & BLOCK_ZERO:
                yield "zero", pos, base + pos, st.pnum
                pos = end
                continue
            while pos < end:
                n = min(end - pos, IO_BUF_SIZE)
                yield "data", pos, base + pos, n
                pos += n

    def copy(self, src: BlockDriverState, base: int) -> None:
        """Copy ``src`` to the target at ``base``, one request at a time."""
        self.max_in_flight = 1
        for kind, pos, dst, n in self.extents(src, base):
            if kind == "zero":
                self.execute(self.plan_zeroes(dst, n))
            else:
                self.read(src, pos, dst, self.buf, n)
                self.execute(self.plan_data(dst, self.buf, n))
            self.advance(n)

    # -- -c: compressed, one target cluster per request ------------------------------

    def copy_compressed(self, srcs: list[BlockDriverState], cluster: int) -> None:
        """qemu-img's convert with compression: the sources are walked by
        block status (concatenated), but every write is one whole target
        cluster (the image's last may be partial); a zero range shorter than
        a cluster is read as data, and a cluster whose data is all zeros is
        treated as a zero range (left out on a zero-initialised target)."""
        total = sum(s.total_size for s in srcs)
        starts, pos = [], 0
        for s in srcs:
            starts.append(pos)
            pos += s.total_size
        # several clusters are read at once and their runs of non-zero
        # clusters written as one request (the driver may compress them in
        # parallel); each cluster is still judged and stored on its own
        batch = IO_BUF_SIZE // cluster * cluster
        buf = bytearray(batch)
        offset, status_end, zero = 0, 0, False
        while offset < total:
            n = total - offset
            if status_end <= offset:
                i = next(k for k, s in enumerate(srcs)
                         if starts[k] <= offset < starts[k] + s.total_size)
                src, local = srcs[i], offset - starts[i]
                try:
                    st = block_status(src, local, src.total_size - local)
                except BlockDriverError as exc:
                    raise reword(exc, "error while reading block status at offset "
                                 f"{local}: {why(exc)}") from None
                if st.pnum <= 0:
                    raise BlockIOError(f"block status of {src.filename} made no progress")
                zero = bool(st.flags & BLOCK_ZERO)
                status_end = offset + -(-st.pnum // SECTOR) * SECTOR
            n = min(n, status_end - offset)
            if not zero:
                n = min(n, batch)
            if n < cluster:
                n, zero = min(cluster, total - offset), False
            else:
                n -= n % cluster
            if zero:
                self.execute(self.plan_zeroes(offset, n))
            else:
                self.read_across(srcs, starts, offset, buf, n)
                self.write_clusters(offset, memoryview(buf)[:n], cluster)
            self.advance(n)
            offset += n
        try:
            # the end of the copy: the driver may round its file up
            self.target.pwritev_compressed(0, IOVector())
        except BlockDriverError as exc:
            raise self._write_error(0, exc) from None

    def write_clusters(self, offset: int, view: memoryview, cluster: int) -> None:
        """Compressed writes of the clusters in ``view``; all-zero clusters
        as zero ranges (kept data under -S 0)."""
        zeros = memoryview(ZEROS)
        run = 0                         # start of the pending run of data clusters
        n = len(view)
        for pos in [*range(0, n, cluster), n]:
            end = min(pos + cluster, n)
            is_zero = pos < n and self.min_sparse and view[pos:end] == zeros[:end - pos]
            if pos < n and not is_zero:
                continue
            if pos > run:
                try:
                    self.target.pwritev_compressed(offset + run,
                                                   IOVector.from_buffer(view[run:pos]))
                except BlockDriverError as exc:
                    raise self._write_error(offset + run, exc) from None
            if pos < n:
                self.execute(self.plan_zeroes(offset + pos, end - pos))
            run = end

    def read_across(self, srcs, starts, offset: int, buf: bytearray, n: int) -> None:
        done = 0
        for src, start in zip(srcs, starts):
            end = start + src.total_size
            if end <= offset + done or start >= offset + n:
                continue
            pos = offset + done - start
            k = min(n - done, end - (offset + done))
            self.read(src, pos, offset + done, memoryview(buf)[done:done + k], k)
            done += k

    # -- -m N: concurrent requests ----------------------------------------------------

    def copy_parallel(self, srcs: list[BlockDriverState], requests: int,
                      in_order: bool = True) -> None:
        """qemu-img convert's ``-m N``: ``requests`` workers each take the
        next extent, read it into their own buffer, scan it and write it.

        Workers are threads, not coroutines: os.preadv/pwritev release the
        GIL, so one worker's read really overlaps another's write, which is
        what the coroutines on qemu's thread pool buy it.  The drivers are
        not thread-safe, so one lock serialises the sources (block status
        and reads) and one the target; the zero scan runs outside both.  In
        order (no ``-W``) a worker waits until every earlier extent is
        written before writing its own, so the target is written front to
        back as by :meth:`copy`; with ``-W`` writes go out as scans finish."""
        import threading

        def jobs():
            base = 0
            for src in srcs:
                for job in self.extents(src, base):
                    yield src, job
                base += src.total_size

        queue = jobs()
        src_lock, dst_lock = threading.Lock(), threading.Lock()
        # In order, the worker holding extent k waits on gates[k], which the
        # writer of extent k - 1 opens: one wake-up per write, where a shared
        # condition woke every waiting worker to find it was not its turn.
        order = threading.Lock()
        gates: dict[int, threading.Event] = {}
        state = {"next_seq": 0, "written": 0}
        errors: list[BaseException] = []

        def worker() -> None:
            buf = bytearray(IO_BUF_SIZE)
            while not errors:
                with src_lock:
                    item = next(queue, None)
                    if item is None or errors:
                        return
                    src, (kind, pos, dst, n) = item
                    seq = state["next_seq"]
                    state["next_seq"] += 1
                    gate = threading.Event()
                    with order:
                        self.in_flight += 1
                        self.max_in_flight = max(self.max_in_flight, self.in_flight)
                        if state["written"] == seq or errors:
                            gate.set()
                        else:
                            gates[seq] = gate
                    if kind == "data":
                        self.read(src, pos, dst, buf, n)
                plan = self.plan_data(dst, buf, n) if kind == "data" \
                    else self.plan_zeroes(dst, n)
                if in_order:
                    gate.wait()
                    if errors:
                        return
                with dst_lock:
                    self.execute(plan)
                    self.advance(n)
                with order:
                    self.in_flight -= 1
                    state["written"] += 1
                    nxt = gates.pop(state["written"], None)
                if nxt is not None:
                    nxt.set()

        def guarded() -> None:
            try:
                worker()
            except BaseException as exc:      # noqa: BLE001 -- re-raised by the caller
                with order:
                    errors.append(exc)
                    waiting = list(gates.values())
                for gate in waiting:
                    gate.set()

        threads = [threading.Thread(target=guarded, daemon=True,
                                    name=f"convert-{i}") for i in range(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


# -- argument checks (qemu-img's messages) ------------------------------------------

def check_coroutines(count: int) -> int:
    if not 1 <= count <= MAX_COROUTINES:
        raise InvalidArgumentError("Invalid number of coroutines. Allowed number of "
                                   f"coroutines is between 1 and {MAX_COROUTINES}")
    return count


def sparse_sectors(sparse_size: int) -> int:
    """``sparse_size`` bytes as sectors; multiples of 512 up to 16 MiB."""
    if sparse_size < 0 or sparse_size % SECTOR or sparse_size // SECTOR > MAX_BUF_SECTORS:
        raise InvalidArgumentError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples "
            f"of {SECTOR} up to {MAX_BUF_SECTORS * SECTOR}. Select 0 to disable sparse "
            "detection (fully allocates output).")
    return sparse_size // SECTOR


def _pow2floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0


def _create_target(target: str, fmt: str, options, size: int) -> None:
    """Create the target as qemu-img convert does: the size is the sources'
    total and may not be given as an option."""
    drv = get_registry().formats.get(fmt)
    if drv is None or drv.bdrv_create is None:
        raise InvalidArgumentError(f"Unknown file format '{fmt}'")
    items = list(options.items() if isinstance(options, dict) else options or [])
    if any(key == "size" for key, _ in items):
        raise InvalidArgumentError("Invalid parameter 'size'")
    parsed = parse_create_options(items, drv.create_opts())
    parsed["size"] = size
    try:
        block.create(target, fmt, parsed)
    except (BlockDriverError, OSError) as exc:
        raise reword(exc, f"{target}: error while converting {fmt}: {why(exc)}") from None


def _check_compression(fmt: str, options) -> None:
    """qemu-img's checks before a compressed target is created."""
    drv = get_registry().formats.get(fmt)
    if drv is not None and not drv.has("bdrv_co_pwritev_compressed"):
        raise UnsupportedError("Compression not supported for this file format")
    items = dict(options.items() if isinstance(options, dict) else options or [])
    if items.get("encrypt.format") or str(items.get("encryption", "off")) not in (
            "off", "false", "False"):
        raise InvalidArgumentError("Compression and encryption not supported at the "
                                   "same time")
    if str(items.get("preallocation", "off")) != "off":
        raise InvalidArgumentError("Compression and preallocation not supported at the "
                                   "same time")


def _cluster_size(out: BlockDriverState) -> int:
    """The target's cluster: the unit of a compressed write (at most the
    2 MiB copy buffer, as qemu-img)."""
    try:
        cluster = out.get_info().cluster_size
    except BlockDriverError:
        raise InvalidArgumentError("could not get block driver info") from None
    if not cluster or cluster % SECTOR or cluster > IO_BUF_SIZE:
        raise InvalidArgumentError("invalid cluster size")
    return cluster


def _paths(sources: PathLike | Iterable[PathLike]) -> list[str]:
    if isinstance(sources, (str, os.PathLike)):
        return [os.fspath(sources)]
    return [os.fspath(s) for s in sources]


def convert(sources: PathLike | Sequence[PathLike], target: PathLike, *,
            fmt: str = "raw", src_fmt: str | None = None,
            options: dict[str, Any] | Iterable[tuple[str, Any]] | None = None,
            sparse_size: int = 4096, coroutines: int = 1, out_of_order: bool = False,
            cache: str | None = "unsafe", src_cache: str | None = "writeback",
            skip_create: bool = False, force_share: bool = False,
            progress: Progress | None = None, compressed: bool = False) -> None:
    """Copy ``sources`` (one image or several, concatenated) into ``target``.

    See :func:`blockdrv.convert` for the arguments.  On failure a target this
    call created is removed.
    """
    names, target = _paths(sources), os.fspath(target)
    if not names:
        raise InvalidArgumentError("Must specify image file name")
    check_coroutines(coroutines)
    if compressed and out_of_order:
        raise InvalidArgumentError("Out of order write and compress are mutually exclusive")
    min_sparse = sparse_sectors(sparse_size)
    src_mode = cache_mode(src_cache, "writeback", "source ")
    dst_mode = cache_mode(cache, "unsafe")
    srcs: list[BlockDriverState] = []
    created = False
    try:
        for name in names:
            srcs.append(open_source(name, src_fmt, src_mode.flags
                                    | (O_FORCE_SHARE if force_share else 0)))
        # before anything is created or truncated
        block.check_target_not_source(target, srcs)
        total = sum(s.total_size for s in srcs)
        if compressed:
            _check_compression(fmt, options)
        if not skip_create:
            existed = os.path.lexists(target)
            _create_target(target, fmt, options, total)
            created = not existed
        out = open_source(target, fmt, dst_mode.flags | O_RDWR)
        try:
            if skip_create and out.total_size < total:
                raise InvalidArgumentError("output file is smaller than input file")
            zero_init = not skip_create and min_sparse > 0 and out.has_zero_init()
            state = ImgConvertState(out, min_sparse, zero_init, dst_mode.writethrough,
                                progress, total)
            if progress is not None:
                progress(0.0)
            if compressed:
                # in order, one cluster a request, whatever -m says
                state.copy_compressed(srcs, _cluster_size(out))
            elif coroutines == 1:
                # one request at a time (the built-in protocols never
                # suspend, so coroutines would only add event-loop overhead)
                base = 0
                for src in srcs:
                    state.copy(src, base)
                    base += src.total_size
            else:
                state.copy_parallel(srcs, coroutines, in_order=not out_of_order)
            out.flush()
            if progress is not None and not total:
                progress(1.0)       # nothing to copy: done at once
        finally:
            out.close()
        created = False   # success: keep it
    finally:
        for src in srcs:
            src.close()
        if created:
            try:
                os.unlink(target)
            except OSError:
                pass
