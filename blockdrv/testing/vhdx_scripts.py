"""qemu-io scripts and helpers for the VHDX interop tests.

* :func:`edge_script` -- hand-written edge cases placed relative to an image's
  block size and virtual size (unaligned writes, writes spanning blocks, zero
  writes, the last partial block, reads of unallocated blocks);
* :func:`log_wrap_script` -- more allocating writes than a 1 MiB log holds
  (each BAT update is one 8 KiB log entry: 128 fill the log), so the writer
  wraps around the circular log in one session;
* :func:`assert_same_vhdx` -- whole-file comparison through ``normalize_vhdx``
  plus the files' allocation maps (SEEK_DATA/SEEK_HOLE);
* :func:`run_blockdrv` -- the ``blockdrv`` command in-process, output captured;
* :func:`guest_bytes` -- the whole guest disk through ``blockdrv.open_image``.
"""

from __future__ import annotations

import contextlib
import io
import os
import random

from .compare import data_extents, first_diff, hexdump_context
from .qemu import _Shadow
from .vhdx import normalize_vhdx

MiB = 1 << 20
# One BAT update = descriptor sector + one data sector = 8 KiB of log.
LOG_ENTRY_SIZE = 8192
WHOLE_FILE_LIMIT = 128 * MiB


def _fit(size: int, start: int, length: int) -> tuple[int, int] | None:
    """(start, length) clipped to the image, None if nothing is left."""
    if start < 0 or start >= size:
        return None
    length = min(length, size - start)
    return (start, length) if length > 0 else None


def edge_script(size: int, block_size: int, fresh: bool = True) -> list[str]:
    """Edge cases for an image of ``size`` bytes with ``block_size`` blocks.

    Every write is followed (later in the script) by a verifying read, so the
    tools check data, not only their own report lines.  ``fresh``: the image
    is new (the script starts by reading zeros where it will write).
    """
    bs = block_size
    last_block = (size - 1) // bs * bs          # start of the last (partial) block
    cmds: list[str] = []
    shadow = _Shadow(size)
    ranges: list[tuple[int, int]] = []

    def write(pattern: int, start: int, length: int, zero: bool = False) -> None:
        r = _fit(size, start, length)
        if r is None:
            return
        s, n = r
        cmds.append(f"write -z {s} {n}" if zero else f"write -P 0x{pattern:02x} {s} {n}")
        shadow.paint(s, s + n, pattern)
        ranges.append((s, s + n))

    if fresh:
        cmds += ["read -P 0 0 64k", f"read -P 0 {last_block} {size - last_block}"]
    write(0x11, 1, 3)                           # unaligned, inside sector 0
    write(0x12, 511, 2)                         # crosses a sector boundary
    write(0x13, 4095, 4097)                     # crosses a page boundary
    write(0x14, bs - 700, 1400)                 # spans blocks 0 and 1 (unaligned)
    write(0x15, bs - 512, 2 * 512)              # spans blocks 0 and 1 (aligned)
    write(0x16, bs + bs // 2, bs + 4096)        # spans blocks 1 -> 2 -> 3
    write(0, 2 * bs + 1000, 3000, zero=True)    # zero write into allocated data
    write(0, 4 * bs + 512, 8192, zero=True)     # zero write to an unallocated block
    write(0x17, size - 512, 512)                # the last sector
    write(0x18, size - 1, 1)                    # the last byte (unaligned RMW)
    write(0x19, last_block, 4096)               # start of the last partial block
    write(0x1a, size // 2 + 7, 777)             # middle, odd offset and length
    for s, e in ranges:                         # verify what the guest must read
        for seg_s, seg_e, value in shadow.segs:
            lo, hi = max(s, seg_s), min(e, seg_e)
            if lo < hi:
                cmds.append(f"read -P 0x{value:02x} {lo} {hi - lo}")
    # reads of unallocated blocks (block 4 is allocated by the zero write
    # only if the driver allocates for zeros, which qemu does)
    for start in (6 * bs, size - 3 * bs, size // 3):
        r = _fit(size, start, min(bs, 1 << 20))
        if r:
            cmds.append(f"read {r[0]} {r[1]}")
    cmds += [f"read -v {max(0, size - 16)} 16", "read -v 0 16", "flush",
             f"write -P 0x1b {size - 512} 1024",   # crosses the end: fails on both
             f"read {size} 512", "length", "map"]
    return cmds


def log_wrap_script(size: int, block_size: int, writes: int = 200,
                    seed: int = 0) -> list[str]:
    """``writes`` allocating writes (one per block, shuffled) and reads back.

    With a 1 MiB log and more than 128 allocating writes, the circular log
    wraps within the session.
    """
    blocks = -(-size // block_size)
    if blocks < writes:
        raise ValueError(f"{blocks} blocks cannot take {writes} allocating writes")
    rng = random.Random(seed)
    order = rng.sample(range(blocks), writes)
    cmds, written = [], []
    for i, b in enumerate(order):
        start = b * block_size + rng.randrange(0, 64) * 512
        length = min(rng.choice((512, 4096, 65536, 3000)), size - start)
        pattern = (i % 254) + 1
        cmds.append(f"write -P 0x{pattern:02x} {start} {length}")
        written.append((start, length, pattern))
        if i % 50 == 49:
            cmds.append("flush")
    for start, length, pattern in written[::7]:
        cmds.append(f"read -P 0x{pattern:02x} {start} {length}")
    return cmds


def verify_reads(script: list[str], size: int) -> list[str]:
    """``read -P`` commands checking the final content of every range that the
    ``write -P`` / ``write -z`` commands of ``script`` touched."""
    shadow = _Shadow(size)
    touched = _Shadow(size)
    for cmd in script:
        words = cmd.split()
        if not words or words[0] != "write":
            continue
        start, length = int(words[-2]), int(words[-1])
        if start + length > size:
            continue
        value = int(words[2], 0) if words[1] == "-P" else 0
        shadow.paint(start, start + length, value)
        touched.paint(start, start + length, 1)
    reads = []
    for ts, te, t in touched.segs:
        if not t:
            continue
        for s, e, v in shadow.segs:
            lo, hi = max(s, ts), min(e, te)
            if lo < hi:
                reads.append(f"read -P 0x{v:02x} {lo} {hi - lo}")
    return reads


def log_sequences(path) -> list[tuple[int, int]]:
    """(file offset, sequence number) of every log entry header in the
    current header's log, in file order: a log that wrapped shows a drop."""
    import struct
    from ..drivers.vhdx.header import select_current_header
    with open(path, "rb") as f:
        f.seek(64 * 1024)
        h1 = f.read(4096)
        f.seek(128 * 1024)
        h2 = f.read(4096)
        header = select_current_header(h1, h2)[1]
        f.seek(header.log_offset)
        log = f.read(header.log_length)
    return [(header.log_offset + off, struct.unpack_from("<Q", log, off + 16)[0])
            for off in range(0, len(log), 4096) if log[off:off + 4] == b"loge"]


def normalized_file(path) -> bytes:
    with open(path, "rb") as f:
        return normalize_vhdx(f.read())


def assert_same_vhdx(a, b, extents: bool = True) -> None:
    """Files equal after ``normalize_vhdx`` (and, with ``extents``, allocated
    in the same places).

    Files up to ``WHOLE_FILE_LIMIT`` are normalized whole; larger (sparse)
    ones -- 256 MiB blocks, 40 TiB disks -- through the harness's
    ``compare_files``: the normalized structure prefix, then every data
    extent of either file byte for byte.
    """
    if max(os.path.getsize(a), os.path.getsize(b)) > WHOLE_FILE_LIMIT:
        from .compare import compare_files
        diff = compare_files(a, b, "vhdx")
        assert diff is None, f"files differ: {diff}"
        if extents:
            ea, eb = data_extents(a), data_extents(b)
            assert ea == eb, f"allocation maps differ:\n {ea}\n {eb}"
        return
    na, nb = normalized_file(a), normalized_file(b)
    assert len(na) == len(nb), f"file sizes differ: {len(na)} != {len(nb)}"
    if na != nb:
        i = first_diff(na, nb)
        raise AssertionError(f"normalized files differ at {i:#x}:\n"
                             + hexdump_context(na, nb, 0, i))
    if extents:
        ea, eb = data_extents(a), data_extents(b)
        assert ea == eb, f"allocation maps differ:\n {ea}\n {eb}"


def run_blockdrv(*args) -> tuple[int, str, str]:
    """``blockdrv ARGS...`` in-process -> (rc, stdout, stderr)."""
    from ..cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def guest_bytes(path, fmt: str | None = None, chunk: int = 8 * MiB) -> bytes:
    """The whole guest disk as read through ``blockdrv.open_image``."""
    import blockdrv
    with blockdrv.open_image(path, fmt) as img:
        size = img.size
        parts = []
        for pos in range(0, size, chunk):
            parts.append(bytes(img.read(pos, min(chunk, size - pos))))
    return b"".join(parts)


__all__ = ["edge_script", "log_wrap_script", "log_sequences", "verify_reads", "assert_same_vhdx", "normalized_file",
           "run_blockdrv", "guest_bytes", "LOG_ENTRY_SIZE"]
